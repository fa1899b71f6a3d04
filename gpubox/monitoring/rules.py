"""Prometheus alert rules derived from the inventory: every threshold comes from a spec, and says which.

:func:`alert_rules` turns a :class:`~gpubox.monitoring.fleet.Fleet` (and the VRAM plan of each
host's GPUs) into a Prometheus rule file; :func:`rules_yaml` writes it. One rule per thing watched
(a target, a service, a host, a GPU), so each alert names the host and service it is about, and
each threshold is the number its spec holds:

| alert | per | fires when | for |
| --- | --- | --- | --- |
| GpuboxServiceDown | llama-server target | ``up{job=...} == 0`` | ``down_for_s`` |
| GpuboxUnitInactive | service (any type) | ``gpubox_unit_active == 0`` | ``down_for_s`` |
| GpuboxHostSilent | host | no ``up{kind="node"} == 1`` | ``down_for_s`` |
| GpuboxRpcDeviceUnreachable | RPC server in use | its TCP probe fails, its llama-server not up | ``down_for_s`` |
| GpuboxGatewayDown | gateway host | ``up`` of HAProxy's exporter ``== 0`` | ``down_for_s`` |
| GpuboxGatewayGroupDegraded | model group | backends UP < ``ModelGroup.min_healthy`` | ``down_for_s`` |
| GpuboxSlowDecode | llama-server with smoke | tok/s < ``SmokeThresholds.min_tokens_per_second`` | ``slow_for_s`` |
| GpuboxLowAcceptance | drafting llama-server | accepted/drafted < ``SmokeThresholds.min_acceptance`` | ``slow_for_s`` |
| GpuboxGpuMemoryOverPlan | planned GPU | used > plan + ``vram_margin_mib`` | 2m |
| GpuboxUnitRestarting | service (any type) | restarts in 15m > ``restarts_max`` | |
| GpuboxNvidiaSmiFailing | host with GPUs | ``gpubox_nvidia_smi_up == 0`` | 5m |

Rates are over ``Monitoring.rate_window_s``; ``down_for_s``, ``slow_for_s``, ``restarts_max`` and
``vram_margin_mib`` are ``Monitoring``'s too.

Decode speed is the ratio of two counter rates (tokens over the seconds spent predicting them),
never llama-server's ``llamacpp:predicted_tokens_seconds`` gauge (see :mod:`.metrics`). An idle
server's rates are both 0, and 0/0 is NaN, which no comparison holds for: idle never alerts.

A host is silent when its node-exporter target is absent or down (``absent(up{...} == 1)``): its
agent stopped writing, or its exporter stopped answering, and either way the unit and GPU series
the other alerts read are gone. whisper-server and piper have no ``/metrics``: their units are
what is watched. So is an RPC server's (``ggml-rpc-server`` has no HTTP at all).

An RPC device is probed from the host of the llama-server that uses it (the blackbox exporter's TCP
connect). ggml-rpc-server serves one connection at a time and listens with a backlog of 1
(ggml-rpc's transport.cpp, ``listen(sockfd, 1)``): while its llama-server holds its connection, two
probes fill the accept queue and every later one times out, though the device works. So a failed
probe counts only while the llama-server depending on it is not up: then the device is free and must
accept (or its loss is what keeps the llama-server down). An RPC server that dies under an idle
llama-server is its own unit's alert on its host (``GpuboxUnitInactive``); the llama-server's next
request aborts it, and then this alert fires if the device is still gone.

A model group's healthy backends are its servers HAProxy has in state UP (``haproxy_server_status``'s
state set): a backend drained for a rollout, in maintenance or failing its checks is not one. No series
(HAProxy or its host's agent gone) counts as none healthy, so the group alert fires then too, beside
``GpuboxGatewayDown`` or ``GpuboxHostSilent``.

Every label value reaches PromQL through :func:`label_matcher` (a PromQL string literal, escaped)
and the alert's labels and annotations through :func:`template_text` (Prometheus expands Go
templates in both), so an inventory name with quotes, backslashes or ``{{`` can't break the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from gpubox.monitoring import metrics
from gpubox.monitoring.fleet import (
    KIND_GATEWAY,
    KIND_NODE,
    Fleet,
    FleetHost,
    gateway_job,
    group_proxy,
    probe_targets,
    scrape_targets,
)
from gpubox.servers.base import Service

MIB = 1024 * 1024
GIB = 1024 * MIB
RESTARTS_WINDOW_S = 15 * 60
"""The window of ``GpuboxUnitRestarting``: ``Monitoring.restarts_max`` counts restarts in 15 minutes."""
MEMORY_OVER_PLAN_FOR_S = 2 * 60
NVIDIA_SMI_FAILING_FOR_S = 5 * 60
SEVERITY_CRITICAL = "critical"
SEVERITY_WARNING = "warning"

MatchOp = Literal["=", "!=", "=~", "!~"]
LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
METRIC_NAME = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")
_STRING_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# --- PromQL and template quoting: the one path every label value takes ----------------------------


def promql_string(value: str) -> str:
    """``value`` as a double-quoted PromQL string literal that reads back exactly ``value``.

    PromQL's lexer unquotes like Go: ``\\`` and ``"`` are escaped, as are line breaks and tabs
    (a raw newline ends the literal with an error), and any other control character as ``\\xHH``.
    """
    out = []
    for char in value:
        if char in _STRING_ESCAPES:
            out.append(_STRING_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def label_matcher(label: str, value: str, op: MatchOp = "=") -> str:
    """One PromQL label matcher, ``label="value"``, with the value escaped (:func:`promql_string`)."""
    if not LABEL_NAME.match(label):
        raise ValueError(f"{label!r} is not a Prometheus label name")
    if op not in ("=", "!=", "=~", "!~"):
        raise ValueError(f"{op!r} is not a PromQL label match operator")
    return f"{label}{op}{promql_string(value)}"


def selector(
    metric: str,
    labels: Mapping[str, str] | None = None,
    regex: Mapping[str, str] | None = None,
    exclude: Mapping[str, str] | None = None,
) -> str:
    """``metric{...}``: a matcher for each of ``labels`` (``=``), of ``regex`` (``=~``) and of ``exclude`` (``!=``)."""
    if not METRIC_NAME.match(metric):
        raise ValueError(f"{metric!r} is not a Prometheus metric name")
    ops: tuple[tuple[Mapping[str, str] | None, MatchOp], ...] = ((labels, "="), (regex, "=~"), (exclude, "!="))
    matchers = [label_matcher(name, value, op) for given, op in ops for name, value in (given or {}).items()]
    return f"{metric}{{{','.join(matchers)}}}"


def template_text(value: str) -> str:
    """``value`` as literal text in a Prometheus label or annotation template (Go templates): each
    ``{{`` that would open an action is written as the action that prints it."""
    return value.replace("{{", '{{ "{{" }}')


def duration(seconds: int) -> str:
    """A Prometheus duration: ``300`` is ``5m``, ``90`` is ``90s``, ``7200`` is ``2h``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def number(value: float) -> str:
    """A threshold as PromQL (and people) read it: ``100`` rather than ``100.0``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --- the rules ------------------------------------------------------------------------------------

# What an annotation may show of the alert's value: Prometheus template actions, kept as they are.
_VALUE_ACTIONS = {
    "value": "{{ $value | humanize }}",
    "percent": "{{ $value | humanizePercentage }}",
    "bytes": "{{ $value | humanize1024 }}B",
}


def _text(pattern: str, **values: object) -> str:
    """An annotation: ``pattern`` (gpubox's own text) with each of ``values`` as literal text
    (:func:`template_text`) and ``{value}``, ``{percent}``, ``{bytes}`` as the alert's value."""
    return pattern.format(**{name: template_text(str(value)) for name, value in values.items()}, **_VALUE_ACTIONS)


def _rule(
    alert: str,
    expr: str,
    for_s: int,
    severity: str,
    labels: Mapping[str, str],
    summary: str,
    description: str,
) -> dict[str, Any]:
    """One alerting rule; ``labels`` are literal values, ``summary`` and ``description`` made by :func:`_text`."""
    rule: dict[str, Any] = {"alert": alert, "expr": expr}
    if for_s:
        rule["for"] = duration(for_s)
    rule["labels"] = {"severity": severity, **{name: template_text(value) for name, value in labels.items()}}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def _node(host: FleetHost, **labels: str) -> dict[str, str]:
    """The labels of a host's textfile series: node-exporter's target labels, then the metric's own."""
    return {"host": host.name, "kind": KIND_NODE, **labels}


def _service(host: FleetHost, server: Service) -> dict[str, str]:
    """The labels that select a scraped service's series."""
    return {"host": host.name, "kind": server.type_tag(), "service": server.name}


def counter_ratio(numerator: str, denominator: str, labels: Mapping[str, str], window: str) -> str:
    """``rate(numerator[w]) / rate(denominator[w])`` of the series with ``labels``: NaN (no sample
    compares true against it) while both counters stand still."""
    return f"rate({selector(numerator, labels)}[{window}]) / rate({selector(denominator, labels)}[{window}])"


def rpc_clients(fleet: Fleet) -> dict[str, list[str]]:
    """Per RPC server (``service@host``), the llama-servers of the fleet that put layers on it (``service@host``)."""
    clients: dict[str, list[str]] = {}
    for host in fleet.hosts:
        for device in host.remote:
            clients.setdefault(device.name, []).append(f"{device.user}@{host.name}")
    return clients


def rpc_unreachable_expr(probe_job: str, client_job: str) -> str:
    """The probe of ``probe_job`` failing while the llama-server of ``client_job`` (which holds the RPC
    server's one connection while it is up) is not up."""
    return (
        f"({selector(metrics.PROBE_SUCCESS, {'job': probe_job})} == 0) "
        f"unless on(host, service) ({selector('up', {'job': client_job})} == 1)"
    )


def rpc_rules(fleet: Fleet) -> list[dict[str, Any]]:
    """An RPC device its llama-server's host can't reach, for ``Monitoring.down_for_s``: one rule per probe."""
    down_for = fleet.monitoring.down_for_s
    clients = rpc_clients(fleet)
    rules: list[dict[str, Any]] = []
    for host in fleet.hosts:
        for target in probe_targets(host):
            service, rpc, endpoint = target.labels["service"], target.labels["rpc"], target.labels["endpoint"]
            rules.append(_rule(
                "GpuboxRpcDeviceUnreachable",
                rpc_unreachable_expr(target.job, f"{service}@{host.name}"),
                down_for,
                SEVERITY_CRITICAL,
                {"host": host.name, "service": service, "rpc": rpc},
                _text("RPC server {rpc} ({endpoint}) is unreachable from {host}: {clients} can't serve",
                      rpc=rpc, endpoint=endpoint, host=host.name, clients=", ".join(clients[rpc])),
                _text(
                    "{host}'s blackbox exporter has not connected to RPC server {rpc} at {endpoint} for "
                    "Monitoring.down_for_s = {down_for} while {service} is not up. The llama-servers that put "
                    "layers on it: {clients}; they abort without it (no CPU fallback). Check {rpc}'s unit on "
                    "its host, the network between the hosts, and its allow_from.",
                    host=host.name, rpc=rpc, endpoint=endpoint, down_for=down_for, service=f"{service}@{host.name}",
                    clients=", ".join(clients[rpc]),
                ),
            ))  # fmt: skip
    return rules


def healthy_backends_expr(host: str, group: str) -> str:
    """How many of ``group``'s backends HAProxy on ``host`` has UP now: 0 when it reports none (or nothing)."""
    labels = {"host": host, "kind": KIND_GATEWAY, "proxy": group_proxy(group), "state": metrics.HAPROXY_STATE_UP}
    return f"(count({selector(metrics.HAPROXY_SERVER_STATUS, labels)} == 1) or vector(0))"


def gateway_rules(fleet: Fleet) -> list[dict[str, Any]]:
    """Each gateway's exporter down, and each model group with fewer healthy backends than its ``min_healthy``,
    for ``Monitoring.down_for_s``."""
    down_for = fleet.monitoring.down_for_s
    rules: list[dict[str, Any]] = []
    for host in fleet.hosts:
        if host.gateway is None:
            continue
        gateway = host.gateway
        rules.append(_rule(
            "GpuboxGatewayDown",
            f"{selector('up', {'job': gateway_job(host.name)})} == 0",
            down_for,
            SEVERITY_CRITICAL,
            {"host": host.name, "service": KIND_GATEWAY},
            _text("the gateway on {host} does not answer /metrics", host=host.name),
            _text(
                "Prometheus's scrape of HAProxy's exporter on {host} (127.0.0.1:{port}, Gateway.stats_port) has "
                "failed for Monitoring.down_for_s = {down_for}: HAProxy is down or hung, and {groups} with it.",
                host=host.name, port=gateway.stats_port, down_for=down_for,
                groups=", ".join(group.name for group in gateway.groups),
            ),
        ))  # fmt: skip
        for group in gateway.groups:
            backends = ", ".join(f"{ref.service}@{ref.host}" for ref in group.backends)
            rules.append(_rule(
                "GpuboxGatewayGroupDegraded",
                f"{healthy_backends_expr(host.name, group.name)} < {group.min_healthy}",
                down_for,
                SEVERITY_CRITICAL,
                {"host": host.name, "group": group.name},
                _text("model group {group} on gateway {host} has {value} healthy backend(s), fewer than "
                      "{min_healthy}", group=group.name, host=host.name, min_healthy=group.min_healthy),
                _text(
                    "HAProxy on {host} has had {value} of group {group}'s {count} backends ({backends}) UP for "
                    "Monitoring.down_for_s = {down_for}, fewer than ModelGroup.min_healthy = {min_healthy}. A "
                    "backend that fails its /health checks, is drained or in maintenance is not UP; none at all "
                    "when HAProxy's exporter is not scraped (GpuboxGatewayDown). Requests to {group} queue or fail.",
                    host=host.name, group=group.name, count=len(group.backends), backends=backends,
                    down_for=down_for, min_healthy=group.min_healthy,
                ),
            ))  # fmt: skip
    return rules


def availability_rules(fleet: Fleet) -> list[dict[str, Any]]:
    """Down targets, inactive units and silent hosts: each for ``Monitoring.down_for_s``."""
    down_for = fleet.monitoring.down_for_s
    rules: list[dict[str, Any]] = []
    for host in fleet.hosts:
        for target in scrape_targets(host):
            if target.labels.get("kind") in (KIND_NODE, KIND_GATEWAY):  # the gateway's: gateway_rules
                continue
            name = target.labels["service"]
            rules.append(_rule(
                "GpuboxServiceDown",
                f"{selector('up', {'job': target.job})} == 0",
                down_for,
                SEVERITY_CRITICAL,
                {"host": host.name, "service": name},
                _text("{service} on {host} does not answer /metrics", service=name, host=host.name),
                _text(
                    "Prometheus's scrape of {service} (job {job}, 127.0.0.1:{port}) has failed for "
                    "Monitoring.down_for_s = {down_for}: the llama-server is down, hung or refusing its key.",
                    service=name, job=target.job, port=target.port, down_for=down_for,
                ),
            ))
        for service in host.services:
            rules.append(_rule(
                "GpuboxUnitInactive",
                f"{selector(metrics.UNIT_ACTIVE, _node(host, service=service.name))} == 0",
                down_for,
                SEVERITY_CRITICAL,
                {"host": host.name, "service": service.name},
                _text("{service}.service on {host} is not active", service=service.name, host=host.name),
                _text(
                    "systemd has not reported {service}.service ({type}) active for Monitoring.down_for_s = "
                    "{down_for}.",
                    service=service.name, type=service.type_tag(), down_for=down_for,
                ),
            ))
        rules.append(_rule(
            "GpuboxHostSilent",
            f"absent({selector('up', _node(host))} == 1)",
            down_for,
            SEVERITY_CRITICAL,
            {"host": host.name},
            _text("{host} stopped reporting", host=host.name),
            _text(
                "No sample of {host}'s node-exporter has said up for Monitoring.down_for_s = {down_for}: its "
                "Prometheus agent stopped writing, its node-exporter stopped answering, or the host is down. "
                "Its unit and GPU alerts can't fire meanwhile.",
                host=host.name, down_for=down_for,
            ),
        ))
    return rules + rpc_rules(fleet) + gateway_rules(fleet)


def performance_rules(fleet: Fleet) -> list[dict[str, Any]]:
    """Decode speed and draft acceptance below each llama-server's smoke thresholds, over ``rate_window_s``."""
    monitoring = fleet.monitoring
    window = duration(monitoring.rate_window_s)
    over = {"window": window, "rate_window_s": monitoring.rate_window_s, "slow_for_s": monitoring.slow_for_s}
    over_text = "over {window} (Monitoring.rate_window_s = {rate_window_s}) for Monitoring.slow_for_s = {slow_for_s}"
    rules: list[dict[str, Any]] = []
    for host in fleet.hosts:
        for server in host.services:
            thresholds, scrape = server.decode_thresholds(), server.scrape()
            if thresholds is None or scrape is None:
                continue
            labels = _service(host, server)
            minimum = number(thresholds.min_tokens_per_second)
            speed = counter_ratio(
                metrics.LLAMA_TOKENS_PREDICTED, metrics.LLAMA_TOKENS_PREDICTED_SECONDS, labels, window
            )
            rules.append(_rule(
                "GpuboxSlowDecode",
                f"{speed} < {minimum}",
                monitoring.slow_for_s,
                SEVERITY_WARNING,
                {"host": host.name, "service": server.name},
                _text("{service} on {host} decodes below {minimum} tok/s", service=server.name, host=host.name,
                      minimum=minimum),
                _text(
                    "{service} decoded at {value} tok/s " + over_text + ", below "
                    "SmokeThresholds.min_tokens_per_second = {minimum} (its smoke threshold).",
                    service=server.name, minimum=minimum, **over,
                ),
            ))
            if server.drafts and thresholds.min_acceptance is not None:
                minimum = number(thresholds.min_acceptance)
                acceptance = counter_ratio(metrics.LLAMA_ACCEPTED_TOKENS, metrics.LLAMA_DRAFT_TOKENS, labels, window)
                rules.append(_rule(
                    "GpuboxLowAcceptance",
                    f"{acceptance} < {minimum}",
                    monitoring.slow_for_s,
                    SEVERITY_WARNING,
                    {"host": host.name, "service": server.name},
                    _text("{service} on {host} accepts less than {minimum} of its drafted tokens",
                          service=server.name, host=host.name, minimum=minimum),
                    _text(
                        "{service}'s drafter ({spec_type}) had {percent} of its drafted tokens accepted "
                        + over_text + ", below SmokeThresholds.min_acceptance = {minimum} (its smoke threshold): "
                        "the drafter is not paying for itself.",
                        service=server.name, spec_type=scrape.labels.get("spec_type", ""), minimum=minimum, **over,
                    ),
                ))
    return rules


def _has_gpus(host: FleetHost) -> bool:
    return (host.box is not None and bool(host.box.expected_gpus)) or any(service.gpus for service in host.services)


def gpu_and_unit_rules(fleet: Fleet, planned: Mapping[str, Mapping[int, int]]) -> list[dict[str, Any]]:
    """VRAM over plan, restarting units and a failing nvidia-smi."""
    monitoring = fleet.monitoring
    margin = monitoring.vram_margin_mib
    restarts_window = duration(RESTARTS_WINDOW_S)
    rules: list[dict[str, Any]] = []
    for host in fleet.hosts:
        for gpu, planned_bytes in sorted(planned.get(host.name, {}).items()):
            limit = planned_bytes + margin * MIB
            rules.append(_rule(
                "GpuboxGpuMemoryOverPlan",
                f"{selector(metrics.GPU_MEMORY_USED, _node(host, gpu=str(gpu)))} > {limit}",
                MEMORY_OVER_PLAN_FOR_S,
                SEVERITY_WARNING,
                {"host": host.name, "gpu": str(gpu)},
                _text("GPU {gpu} of {host} uses more memory than planned: something else is on the card",
                      gpu=gpu, host=host.name),
                _text(
                    "GPU {gpu} of {host} uses {bytes}, more than the VRAM plan's {planned} bytes (gpubox plan: "
                    "its services + reserve) plus Monitoring.vram_margin_mib = {margin} MiB (limit {limit} bytes), "
                    "for {for_}.",
                    gpu=gpu, host=host.name, planned=planned_bytes, margin=margin, limit=limit,
                    for_=duration(MEMORY_OVER_PLAN_FOR_S),
                ),
            ))
        for service in host.services:
            rules.append(_rule(
                "GpuboxUnitRestarting",
                f"increase({selector(metrics.UNIT_RESTARTS, _node(host, service=service.name))}[{restarts_window}])"
                f" > {monitoring.restarts_max}",
                0,
                SEVERITY_WARNING,
                {"host": host.name, "service": service.name},
                _text("{service}.service on {host} keeps restarting", service=service.name, host=host.name),
                _text(
                    "systemd restarted {service}.service {value} times in the last {window}, more than "
                    "Monitoring.restarts_max = {restarts_max}.",
                    service=service.name, window=restarts_window, restarts_max=monitoring.restarts_max,
                ),
            ))
        if _has_gpus(host):
            rules.append(_rule(
                "GpuboxNvidiaSmiFailing",
                f"{selector(metrics.NVIDIA_SMI_UP, _node(host))} == 0",
                NVIDIA_SMI_FAILING_FOR_S,
                SEVERITY_CRITICAL,
                {"host": host.name},
                _text("nvidia-smi fails on {host}", host=host.name),
                _text(
                    "nvidia-smi has failed on {host} for {for_}: the NVIDIA driver is gone or wedged (its "
                    "services are pinned to GPUs, or its box names expected_gpus).",
                    host=host.name, for_=duration(NVIDIA_SMI_FAILING_FOR_S),
                ),
            ))
    return rules


def alert_rules(fleet: Fleet, planned: Mapping[str, Mapping[int, int]]) -> dict[str, Any]:
    """The fleet's Prometheus rule file (``groups`` of ``rules``); ``planned``: per host name, per GPU
    index, the planned VRAM bytes (:func:`~gpubox.monitoring.fleet.planned_gpu_bytes`); a host or GPU
    without a plan gets no memory alert."""
    interval = duration(fleet.monitoring.evaluation_interval_s)
    groups = [
        ("gpubox-availability", availability_rules(fleet)),
        ("gpubox-performance", performance_rules(fleet)),
        ("gpubox-gpus-and-units", gpu_and_unit_rules(fleet, planned)),
    ]
    return {"groups": [{"name": name, "interval": interval, "rules": rules} for name, rules in groups if rules]}


def rules_yaml(fleet: Fleet, planned: Mapping[str, Mapping[int, int]]) -> str:
    """:func:`alert_rules` as the YAML file Prometheus loads (``rule_files``)."""
    header = "# Generated by gpubox from the inventory (gpubox.monitoring.rules): edit the specs, not this file.\n"
    return header + yaml.safe_dump(alert_rules(fleet, planned), sort_keys=False, allow_unicode=True, width=1000)
