"""The fleet's Grafana dashboard and its provisioning, built with grafana-foundation-sdk.

:func:`fleet_dashboard` is one dashboard for the whole fleet, with ``host`` and ``service``
variables (from ``label_values``) and a panel per concept: decode speed (the ratio of the two
llama-server counters, as the alerts compute it, never the ``predicted_tokens_seconds`` gauge),
draft acceptance, requests, VRAM used against the plan, GPU utilization / temperature / power,
targets up, units active and restarting, and the GPU textfile's freshness; where llama-servers use
RPC servers on other hosts, their remote devices (reachable, and the raw TCP probes); where the fleet has a
gateway, a "Gateway" row: each backend UP or not, each group's healthy backends, sessions, queue, errors and
response time, from HAProxy's exporter. Every selector is
built by :func:`gpubox.monitoring.rules.selector`, the one path label values take into PromQL.

:func:`provisioning_files` is what Grafana reads: a Prometheus datasource at the fleet's
Prometheus with a fixed uid (the one the dashboard's panels name), a file provider for a
dashboards directory, and the dashboard's JSON. :func:`panel_queries` reads the queries back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as dashboard_model

from gpubox.monitoring import metrics
from gpubox.monitoring.fleet import KIND_GATEWAY, KIND_NODE, KIND_RPC_PROBE, Fleet, probe_targets
from gpubox.monitoring.rules import RESTARTS_WINDOW_S, duration, number, selector

DATASOURCE_UID = "gpubox-prometheus"
DATASOURCE_NAME = "gpubox Prometheus"
DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
DASHBOARD_UID = "gpubox-fleet"
DASHBOARD_TITLE = "gpubox fleet"
DATASOURCE_FILE = "datasources/gpubox.yaml"
"""Relative to Grafana's provisioning directory (``Monitoring.grafana_provisioning``)."""
PROVIDER_FILE = "dashboards/gpubox.yaml"
"""Relative to Grafana's provisioning directory (``Monitoring.grafana_provisioning``)."""
DASHBOARD_FILE = "gpubox-fleet.json"
"""The dashboard's file name in the provider's dashboards directory."""
DASHBOARDS_DIR = "/var/lib/grafana/dashboards/gpubox"
"""Where the file provider reads the dashboard from (Grafana's own state directory: its user can read it)."""
RATE_INTERVAL = "$__rate_interval"
"""Grafana's window for rate(): at least four scrape intervals (the datasource's ``timeInterval``)."""

# What the panels select by: the dashboard's variables (regexes: they may hold several values, or .*).
HOSTS = {"host": "$host"}
HOSTS_AND_SERVICES = {"host": "$host", "service": "$service"}
LLAMA = {"kind": "llama-server"}  # the series of llama.cpp's own metrics (metrics.LLAMA_*)
NODE = {"kind": KIND_NODE}
RPC_PROBE = {"kind": KIND_RPC_PROBE}
GATEWAY = {"kind": KIND_GATEWAY}
GATEWAY_ROW = "Gateway"


def rpc_reachable_expr(hosts_and_services: dict[str, str] = HOSTS_AND_SERVICES) -> str:
    """Each remote device of the selected llama-servers: 1 when its TCP probe connects or its llama-server is up
    (which holds the RPC server's one connection, so no probe gets in), 0 when neither."""
    probes = selector(metrics.PROBE_SUCCESS, RPC_PROBE, hosts_and_services)
    servers = selector("up", LLAMA, hosts_and_services)
    return f"clamp_max({probes} + on(host, service) group_left max by (host, service) ({servers}), 1)"


def rpc_panels() -> list[Any]:
    """The remote devices of the selected llama-servers: reachable (stat), and the TCP probes over time."""
    per_device = "{{service}}@{{host}} -> {{rpc}}"
    return [
        _up_or_down(
            "RPC devices reachable",
            "Each RPC server a llama-server puts layers on, from the llama-server's host: UP when the blackbox "
            "exporter's TCP connect succeeds, or while the llama-server is up (it holds the RPC server's one "
            "connection, and ggml-rpc-server's accept queue of 1 then lets no probe in); DOWN when neither. The "
            "alert GpuboxRpcDeviceUnreachable fires after Monitoring.down_for_s of DOWN.",
            rpc_reachable_expr(),
            per_device,
        ),
        _series(
            "RPC TCP probes",
            "probe_success of each RPC endpoint's TCP probe (1 connected): 0 while its llama-server holds the "
            "connection is expected.",
            [(selector(metrics.PROBE_SUCCESS, RPC_PROBE, HOSTS_AND_SERVICES), f"{per_device} ({{{{endpoint}}}})")],
            "short",
            min_value=0,
            max_value=1,
        ),
    ]


def gateway_panels(fleet: Fleet) -> list[Any]:
    """HAProxy's view of each model group's backends on the selected gateway hosts."""
    selected = {"labels": GATEWAY, "regex": HOSTS}
    per_server = "{{host}} {{proxy}} {{server}}"
    per_group = "{{host}} {{proxy}}"
    minimums = ", ".join(
        f"{group.name}@{host.name} {group.min_healthy} of {len(group.backends)}"
        for host in fleet.hosts if host.gateway is not None for group in host.gateway.groups
    )  # fmt: skip
    up = {"labels": {**GATEWAY, "state": metrics.HAPROXY_STATE_UP}, "regex": HOSTS}
    window = f"[{RATE_INTERVAL}]"
    return [
        _up_or_down(
            "Gateway backends up",
            "Each backend (proxy group_<name>, server <host>:<service>) as HAProxy sees it: UP while it passes its "
            "/health checks and takes requests; DOWN when it fails them, is drained (a rollout) or in "
            "maintenance.",
            f"max by (host, proxy, server) ({selector(metrics.HAPROXY_SERVER_STATUS, **up)})",
            per_server,
        ),
        _series(
            "Gateway healthy backends",
            "Backends UP per model group; GpuboxGatewayGroupDegraded fires below the group's ModelGroup.min_healthy "
            f"for Monitoring.down_for_s = {fleet.monitoring.down_for_s}: {minimums}.",
            [(f"count by (host, proxy) ({selector(metrics.HAPROXY_SERVER_STATUS, **up)} == 1)", per_group)],
            "short",
            min_value=0,
        ),
        _series(
            "Gateway sessions",
            "Requests each backend serves now (at most its llama-server's parallel: HAProxy's maxconn).",
            [(selector(metrics.HAPROXY_SERVER_SESSIONS, **selected), per_server)],
            "short",
            min_value=0,
        ),
        _series(
            "Gateway queue",
            "Requests waiting for a free slot: in the group's queue (no backend chosen yet), and each backend's; "
            "a request waits up to GatewayTimeouts.queue_s, then gets a 503.",
            [
                (selector(metrics.HAPROXY_BACKEND_QUEUE, **selected), f"{per_group} group"),
                (selector(metrics.HAPROXY_SERVER_QUEUE, **selected), per_server),
            ],
            "short",
            min_value=0,
        ),
        _series(
            "Gateway errors",
            "Per backend and second: 5xx responses, failed connections and broken responses.",
            [
                (f"rate({selector(metrics.HAPROXY_SERVER_RESPONSES, {**GATEWAY, 'code': '5xx'}, HOSTS)}{window})",
                 f"{per_server} 5xx"),
                (f"rate({selector(metrics.HAPROXY_SERVER_CONNECTION_ERRORS, **selected)}{window})",
                 f"{per_server} connection errors"),
                (f"rate({selector(metrics.HAPROXY_SERVER_RESPONSE_ERRORS, **selected)}{window})",
                 f"{per_server} response errors"),
            ],
            "reqps",
            min_value=0,
        ),  # fmt: skip
        _series(
            "Gateway response time",
            "HAProxy's average time to a backend's response headers over its last 1024 requests (a streamed "
            "answer's first bytes).",
            [(selector(metrics.HAPROXY_SERVER_RESPONSE_TIME, **selected), per_server)],
            "s",
            min_value=0,
        ),
    ]


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE).range()


def _series(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    unit: str,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    threshold: float | None = None,
) -> timeseries.Panel:
    """A time-series panel of ``queries`` (expr, legend); ``threshold`` draws a red line at it."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(12)
        .height(8)
        .fill_opacity(10)
    )
    for position, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + position)))
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    if threshold is not None:
        panel = panel.thresholds(
            dashboard_builder.ThresholdsConfig()
            .mode(dashboard_model.ThresholdsMode.ABSOLUTE)
            .steps([
                dashboard_model.Threshold(value=None, color="green"),
                dashboard_model.Threshold(value=threshold, color="red"),
            ])
        ).thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common_model.GraphThresholdsStyleMode.DASHED))
    return panel


def _up_or_down(title: str, description: str, expr: str, legend: str) -> stat.Panel:
    """A stat panel of 0/1 series: red DOWN, green UP."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(12)
        .height(6)
        .with_target(_query(expr, legend).instant())
        .mappings([
            dashboard_model.ValueMap(options={
                "0": dashboard_model.ValueMappingResult(text="DOWN", color="red"),
                "1": dashboard_model.ValueMappingResult(text="UP", color="green"),
            })
        ])
        .thresholds(
            dashboard_builder.ThresholdsConfig()
            .mode(dashboard_model.ThresholdsMode.ABSOLUTE)
            .steps([
                dashboard_model.Threshold(value=None, color="red"),
                dashboard_model.Threshold(value=1, color="green"),
            ])
        )
    )


def _ratio(numerator: str, denominator: str, exclude: dict[str, str] | None = None) -> str:
    """rate(numerator) / rate(denominator) of the selected llama-servers: NaN (a gap) while idle."""
    selected = {"labels": LLAMA, "regex": HOSTS_AND_SERVICES, "exclude": exclude}
    return (
        f"rate({selector(numerator, **selected)}[{RATE_INTERVAL}]) / "
        f"rate({selector(denominator, **selected)}[{RATE_INTERVAL}])"
    )


def _smoke_minimums(fleet: Fleet) -> tuple[str, str]:
    """Each llama-server's smoke minimums, as the panels' descriptions list them."""
    speeds, acceptances = [], []
    for host in fleet.hosts:
        for server in host.services:
            thresholds = server.decode_thresholds()
            if thresholds is None:
                continue
            speeds.append(f"{server.name}@{host.name} {number(thresholds.min_tokens_per_second)} tok/s")
            if server.drafts and thresholds.min_acceptance is not None:
                acceptances.append(f"{server.name}@{host.name} {number(thresholds.min_acceptance)}")
    return ", ".join(speeds) or "none set", ", ".join(acceptances) or "none set"


def _variable(name: str, label: str, query: str) -> dashboard_builder.QueryVariable:
    return (
        dashboard_builder.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def fleet_dashboard(fleet: Fleet) -> dict[str, Any]:
    """The fleet's dashboard, as the JSON Grafana loads (a dict)."""
    monitoring = fleet.monitoring
    speeds, acceptances = _smoke_minimums(fleet)
    llama = {"labels": LLAMA, "regex": HOSTS_AND_SERVICES}
    nodes = {"labels": NODE, "regex": HOSTS}
    units = {"labels": NODE, "regex": HOSTS_AND_SERVICES}
    per_gpu = "{{host}} GPU {{gpu}}"
    per_service = "{{host}} {{service}}"
    restarts_window = duration(RESTARTS_WINDOW_S)
    panels = [
        _series(
            "Decode speed",
            "Tokens predicted per second spent predicting them (llama-server's two counters; never its "
            f"predicted_tokens_seconds gauge). Smoke minimums (SmokeThresholds.min_tokens_per_second): {speeds}; "
            f"alerts use the ratio over Monitoring.rate_window_s = {monitoring.rate_window_s}.",
            [(_ratio(metrics.LLAMA_TOKENS_PREDICTED, metrics.LLAMA_TOKENS_PREDICTED_SECONDS), per_service)],
            "suffix: tok/s",
            min_value=0,
        ),
        _series(
            "Draft acceptance",
            "Accepted over drafted tokens of the drafting llama-servers. Smoke minimums "
            f"(SmokeThresholds.min_acceptance): {acceptances}.",
            [(_ratio(metrics.LLAMA_ACCEPTED_TOKENS, metrics.LLAMA_DRAFT_TOKENS, {"spec_type": "none"}), per_service)],
            "percentunit",
            min_value=0,
            max_value=1,
        ),
        _series(
            "Requests processing and deferred",
            "Requests llama-server is working on, and those waiting for a free slot.",
            [
                (selector(metrics.LLAMA_REQUESTS_PROCESSING, **llama), f"{per_service} processing"),
                (selector(metrics.LLAMA_REQUESTS_DEFERRED, **llama), f"{per_service} deferred"),
            ],
            "short",
            min_value=0,
        ),
        _series(
            "VRAM used vs planned",
            "nvidia-smi's memory.used of each GPU against the VRAM plan's total for it (services + reserve, "
            f"gpubox plan); an alert fires above the plan plus Monitoring.vram_margin_mib = "
            f"{monitoring.vram_margin_mib}.",
            [
                (selector(metrics.GPU_MEMORY_USED, **nodes), f"{per_gpu} used"),
                (selector(metrics.GPU_PLANNED_MEMORY, **nodes), f"{per_gpu} planned"),
                (selector(metrics.GPU_MEMORY_TOTAL, **nodes), f"{per_gpu} total"),
            ],
            "bytes",
            min_value=0,
        ),
        _series(
            "GPU utilization",
            "nvidia-smi's utilization.gpu.",
            [(selector(metrics.GPU_UTILIZATION, **nodes), per_gpu)],
            "percentunit",
            min_value=0,
            max_value=1,
        ),
        _series(
            "GPU temperature",
            "nvidia-smi's temperature.gpu.",
            [(selector(metrics.GPU_TEMPERATURE, **nodes), per_gpu)],
            "celsius",
        ),
        _series(
            "GPU power",
            "nvidia-smi's power.draw (absent where the card reports [N/A]).",
            [(selector(metrics.GPU_POWER, **nodes), per_gpu)],
            "watt",
            min_value=0,
        ),
        _series(
            f"Unit restarts ({restarts_window})",
            f"systemd's automatic restarts of each unit over {restarts_window}; an alert fires above "
            f"Monitoring.restarts_max = {monitoring.restarts_max}.",
            [(f"increase({selector(metrics.UNIT_RESTARTS, **units)}[{restarts_window}])", per_service)],
            "short",
            min_value=0,
            threshold=monitoring.restarts_max + 1,
        ),
        _up_or_down(
            "Targets up",
            "Each scrape target (every llama-server's /metrics, each host's node-exporter) as Prometheus last "
            "scraped it.",
            selector("up", regex=HOSTS),
            "{{job}}",
        ),
        _up_or_down(
            "Units active",
            "systemd's view of every service's unit: whisper-server and piper have no /metrics, this is how "
            "they are watched.",
            selector(metrics.UNIT_ACTIVE, **units),
            per_service,
        ),
        _series(
            "GPU metrics age",
            "Seconds since each host's GPU textfile was written (Box.monitoring.gpu_metrics_interval_s).",
            [(f"time() - {selector(metrics.TEXTFILE_UPDATED, **nodes)}", "{{host}}")],
            "s",
            min_value=0,
        ),
        _series(
            "Host memory available",
            "node-exporter's MemAvailable of each host.",
            [(selector("node_memory_MemAvailable_bytes", **nodes), "{{host}}")],
            "bytes",
            min_value=0,
        ),
    ]
    if any(probe_targets(host) for host in fleet.hosts):
        panels += rpc_panels()
    builder = (
        dashboard_builder.Dashboard(DASHBOARD_TITLE)
        .uid(DASHBOARD_UID)
        .tags(["gpubox"])
        .description(f"Every gpubox host of the fleet, from its Prometheus at {fleet.prometheus_url}.")
        .refresh(duration(max(monitoring.scrape_interval_s, 5)))
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(_variable("host", "Host", "label_values(up, host)"))
        .with_variable(
            _variable("service", "Service", f"label_values({selector(metrics.UNIT_ACTIVE, regex=HOSTS)}, service)")
        )
    )
    for panel in panels:
        builder = builder.with_panel(panel)
    if any(host.gateway is not None for host in fleet.hosts):
        builder = builder.with_row(dashboard_builder.Row(GATEWAY_ROW))
        for panel in gateway_panels(fleet):
            builder = builder.with_panel(panel)
    encoded: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    return encoded


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (panel title, PromQL expr) of a dashboard's JSON, in panel order (rows' panels included)."""
    return [
        (str(panel.get("title", "")), str(target["expr"]))
        for panel in _panels(dashboard.get("panels") or [])
        for target in panel.get("targets") or []
        if target.get("expr")
    ]


def provisioning_files(
    fleet: Fleet, dashboards_dir: str = DASHBOARDS_DIR, prometheus_url: str | None = None
) -> dict[str, str]:
    """Grafana's provisioning for the fleet: relative path -> text.

    ``DATASOURCE_FILE`` and ``PROVIDER_FILE`` go under Grafana's provisioning directory
    (``Monitoring.grafana_provisioning``); ``DASHBOARD_FILE`` into ``dashboards_dir``, where the
    provider reads it. The datasource points at ``prometheus_url`` (default: the fleet's
    ``prometheus_url``, as the other hosts reach it).
    """
    monitoring = fleet.monitoring
    datasources = {
        "apiVersion": 1,
        "datasources": [{
            "name": DATASOURCE_NAME,
            "type": "prometheus",
            "uid": DATASOURCE_UID,
            "access": "proxy",
            "url": prometheus_url or fleet.prometheus_url,
            "isDefault": False,
            "editable": False,
            # $__rate_interval is four of these at least: a rate() window that always holds two samples
            "jsonData": {"timeInterval": duration(monitoring.scrape_interval_s), "httpMethod": "POST"},
        }],
    }
    providers = {
        "apiVersion": 1,
        "providers": [{
            "name": "gpubox",
            "orgId": 1,
            "folder": "gpubox",
            "type": "file",
            "disableDeletion": True,
            "allowUiUpdates": False,
            "updateIntervalSeconds": 60,
            "options": {"path": dashboards_dir, "foldersFromFilesStructure": False},
        }],
    }
    header = "# Generated by gpubox from the inventory (gpubox.monitoring.dashboards): edit the specs, not this file.\n"
    return {
        DATASOURCE_FILE: header + yaml.safe_dump(datasources, sort_keys=False),
        PROVIDER_FILE: header + yaml.safe_dump(providers, sort_keys=False),
        DASHBOARD_FILE: json.dumps(fleet_dashboard(fleet), indent=2, sort_keys=True) + "\n",
    }
