"""A fleet: every gpubox host of an inventory with the one ``Monitoring`` spec, and what is scraped where.

Each host's own Prometheus scrapes it: the monitor's server scrapes the monitor host, and every
other host runs Prometheus in agent mode, scraping its loopback services and node-exporter and
remote-writing to the monitor. So nothing listens beyond loopback for monitoring's sake but the
monitor's Prometheus (and only when ``Monitoring.listen`` says so).

Every series carries ``host`` (the inventory name) and ``kind`` (the server type, ``llama-server``, or
``node``); a service's also ``service`` and what its type adds (``Service.scrape``): a llama-server's
``gpu`` (its pinned indices, ``cpu`` when none), ``model`` (the model file's name without ``.gguf``)
and ``spec_type``.

An RPC server (``ggml-rpc-server``) has no ``/metrics``: its unit's state is watched like every unit's,
and each host whose llama-servers put layers on RPC servers elsewhere runs the distro's blackbox
exporter on 127.0.0.1 and probes each endpoint with a TCP connect (``probe_targets``), from the host that
needs to reach it. A probe's series carry ``host`` (the client host), ``kind="rpc-probe"``, ``service``
(the llama-server), ``rpc`` (``<rpc service>@<rpc host>``) and ``endpoint`` (``address:port``).

A host that runs a gateway (``gpubox.gateway``: HAProxy in front of llama-servers, beside a box or alone)
has its Prometheus scrape HAProxy's own exporter on 127.0.0.1:``Gateway.stats_port`` (``gateway_target``):
its series carry ``host`` and ``kind="gateway"``, and HAProxy's own ``proxy`` (``group_<name>``, a model
group) and ``server`` (``<host>:<service>``, a backend). A gateway-only host has no box: its exporters'
ports are ``Gateway.monitoring``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpubox.box import Box
from gpubox.gateway import GATEWAY_KEY, Backend, Gateway
from gpubox.haproxy import backend_name
from gpubox.inventory import HostGateway, gateway_of, with_backends
from gpubox.monitoring.spec import Monitoring
from gpubox.peers import resolve_peers
from gpubox.servers.base import Scrape, Service
from gpubox.spec import HostMonitoring, Problem, is_loopback, problems_from

MONITORING_KEY = "monitoring"
KIND_NODE = "node"
KIND_GATEWAY = "gateway"
"""The ``kind`` of HAProxy's exporter on a gateway host (``gateway_target``)."""
KIND_RPC_PROBE = "rpc-probe"
"""The ``kind`` of a blackbox exporter's TCP probe of an RPC server, from a host whose llama-server uses it."""
PROBE_MODULE = "tcp_connect"
"""The blackbox exporter's module the RPC probes use (``prometheus.blackbox_config``)."""
CREDENTIALS_DIR = "/etc/prometheus/gpubox"
"""Root-owned copies of the services' API keys, readable by the prometheus group."""


class FleetError(Exception):
    """The inventory holds no fleet to monitor, or its monitoring is refused: each problem named."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        self.problems = problems or []
        details = "; ".join(f"{problem.field}: {problem.message}" for problem in self.problems)
        super().__init__(f"{message}: {details}" if details else message)
        self.summary = message


@dataclass(frozen=True)
class RemoteDevice:
    """A service on another host that a service of this host uses (a llama-server's RPC server), resolved.

    + user: the service of this host that uses it; host, service: where it runs and its name
    + endpoint: the ``address:port`` the user dials (what ``--rpc`` renders)
    """

    user: str
    host: str
    service: str
    endpoint: str

    @property
    def name(self) -> str:
        """``service@host``, as an ``RpcRef`` prints itself."""
        return f"{self.service}@{self.host}"


@dataclass(frozen=True)
class FleetHost:
    """A gpubox host as the fleet sees it: its inventory name, the address others reach it at, its box (None on
    a gateway-only host), what its services use on other hosts, and its gateway with each model group's
    resolved backends."""

    name: str
    address: str
    box: Box | None
    remote: tuple[RemoteDevice, ...] = ()
    gateway: Gateway | None = None
    backends: Mapping[str, tuple[Backend, ...]] = field(default_factory=dict)

    @property
    def services(self) -> tuple[Service, ...]:
        """The box's services; none on a gateway-only host."""
        return tuple(self.box.services) if self.box is not None else ()

    @property
    def monitoring(self) -> HostMonitoring:
        """The ports its exporters and agent listen on: the box's, else (gateway only) the gateway's."""
        if self.box is not None:
            return self.box.monitoring
        assert self.gateway is not None, f"{self.name} has neither a box nor a gateway"
        return self.gateway.monitoring

    def remote_of(self, service: str) -> tuple[RemoteDevice, ...]:
        """The remote devices ``service`` of this host uses, in its references' order."""
        return tuple(device for device in self.remote if device.user == service)


@dataclass(frozen=True)
class Target:
    """One scrape job: what a host's own Prometheus reads on 127.0.0.1, and the labels it adds."""

    job: str
    port: int
    labels: dict[str, str]
    credentials_file: str | None = None
    """The copy of the service's API key Prometheus sends as a bearer token (never the key inline)."""
    key_source: str | None = None
    """The service's own key file on the host, which the copy is made from."""
    path: str = "/metrics"
    """The endpoint scraped."""
    probe: str | None = None
    """A blackbox probe's target (``address:port``): ``port`` is then the blackbox exporter's, and ``path``
    its ``/probe`` (``prometheus.scrape_config`` relabels as the blackbox exporter's docs say)."""


@dataclass(frozen=True)
class Fleet:
    monitoring: Monitoring
    hosts: tuple[FleetHost, ...]

    @property
    def monitor(self) -> FleetHost:
        return next(host for host in self.hosts if host.name == self.monitoring.monitor)

    @property
    def _listen_address(self) -> str | None:
        """The one address Prometheus listens on, when it is neither loopback nor every interface."""
        listen = self.monitoring.listen
        return None if listen in ("0.0.0.0", "::") or is_loopback(listen) else listen

    @property
    def monitor_address(self) -> str:
        """How the other hosts and ``gpubox top`` reach the monitor's Prometheus."""
        return self.monitoring.address or self._listen_address or self.monitor.address

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.monitor_address}:{self.monitoring.port}"

    @property
    def local_prometheus_url(self) -> str:
        """The monitor's Prometheus as the monitor itself reaches it (Grafana beside it)."""
        return f"http://{self._listen_address or '127.0.0.1'}:{self.monitoring.port}"

    def host(self, name: str) -> FleetHost:
        for fleet_host in self.hosts:
            if fleet_host.name == name:
                return fleet_host
        raise KeyError(f"no host {name!r} in the fleet: {[h.name for h in self.hosts]}")

    def is_monitor(self, name: str) -> bool:
        return name == self.monitoring.monitor


def service_labels(host: str, server: Service, scrape: Scrape) -> dict[str, str]:
    """The labels of a scraped service's series: where it runs, its type, and what its type adds
    (a llama-server: its GPUs, model and spec type)."""
    return {"host": host, "kind": server.type_tag(), "service": server.name, **scrape.labels}


def credentials_path(service: str) -> str:
    return f"{CREDENTIALS_DIR}/{service}.key"


def peer_endpoint(box: Box, service: Service) -> str | None:
    """``address:port`` a client on another host dials for ``service`` of ``box``: its own listen address, or
    (listening on every interface) its host's ``address``; IPv6 in brackets. None: that address is not set.
    (What gpubox.peers fills a llama-server's ``rpc`` endpoints with; tests/test_monitoring_rpc.py holds them
    equal.)"""
    address = service.host
    if address in ("0.0.0.0", "::"):
        if box.address is None:
            return None
        address = box.address
    return f"[{address}]:{service.port}" if ":" in address else f"{address}:{service.port}"


def remote_devices(name: str, boxes: Mapping[str, Box]) -> tuple[RemoteDevice, ...]:
    """What the services of host ``name`` use on other hosts (``Service.peer_refs``), with their endpoints."""
    devices = []
    for user in boxes[name].services:
        for peer_host, peer_name in user.peer_refs():
            box = boxes[peer_host]
            peer = next(service for service in box.services if service.name == peer_name)
            endpoint = peer_endpoint(box, peer)
            if endpoint is not None:
                devices.append(RemoteDevice(user=user.name, host=peer_host, service=peer_name, endpoint=endpoint))
    return tuple(devices)


def probe_job(host: str, device: RemoteDevice) -> str:
    """The scrape job of ``device.user@host``'s probe of one remote device."""
    return f"{KIND_RPC_PROBE}:{device.name}/{device.user}@{host}"


def probe_targets(host: FleetHost) -> list[Target]:
    """The TCP probes ``host``'s blackbox exporter runs: one per RPC server each of its llama-servers uses,
    labelled with the client service, the RPC server (``rpc``: ``service@host``) and its endpoint."""
    return [
        Target(
            job=probe_job(host.name, device),
            port=host.monitoring.blackbox_port,
            labels={
                "host": host.name,
                "kind": KIND_RPC_PROBE,
                "service": device.user,
                "rpc": device.name,
                "endpoint": device.endpoint,
            },
            path="/probe",
            probe=device.endpoint,
        )
        for device in host.remote
    ]


def runs_probes(host: FleetHost) -> bool:
    """Whether ``host`` runs the blackbox exporter: its llama-servers use RPC servers elsewhere."""
    return bool(probe_targets(host))


def gateway_job(host: str) -> str:
    return f"{KIND_GATEWAY}@{host}"


def gateway_target(host: FleetHost) -> Target | None:
    """HAProxy's Prometheus exporter on a gateway host (127.0.0.1:``stats_port``, ``/metrics``); None elsewhere."""
    if host.gateway is None:
        return None
    return Target(
        job=gateway_job(host.name), port=host.gateway.stats_port, labels={"host": host.name, "kind": KIND_GATEWAY}
    )


def group_proxy(group: str) -> str:
    """HAProxy's name of a model group's backend: its series' ``proxy`` label (``group_<name>``)."""
    return backend_name(group)


def scrape_targets(host: FleetHost) -> list[Target]:
    """What ``host``'s own Prometheus (agent or server) scrapes: each service's endpoint (``Service.scrape``),
    HAProxy's exporter on a gateway host, then node-exporter."""
    targets = [
        Target(
            job=f"{server.name}@{host.name}",
            port=server.port,
            labels=service_labels(host.name, server, scrape),
            credentials_file=credentials_path(server.name) if scrape.key_file is not None else None,
            key_source=scrape.key_file,
            path=scrape.path,
        )
        for server in host.services
        if (scrape := server.scrape()) is not None
    ]
    gateway = gateway_target(host)
    if gateway is not None:
        targets.append(gateway)
    targets.append(
        Target(
            job=f"{KIND_NODE}@{host.name}",
            port=host.monitoring.node_exporter_port,
            labels={"host": host.name, "kind": KIND_NODE},
        )
    )
    return targets


def fleet_problems(monitoring: Monitoring, hosts: tuple[FleetHost, ...]) -> list[Problem]:
    """What refuses a fleet's monitoring, each at the field to change (``monitoring.monitor``, a host's box)."""
    names = [host.name for host in hosts]
    if monitoring.monitor not in names:
        return [Problem(
            field="monitoring.monitor",
            message=f"{monitoring.monitor!r} is not a gpubox host of this inventory: name one of {names}",
        )]
    problems: list[Problem] = []
    monitor = next(host for host in hosts if host.name == monitoring.monitor)
    taken = {service.port: f"service {service.name!r}" for service in monitor.services}
    taken[monitor.monitoring.node_exporter_port] = "node-exporter (monitoring.node_exporter_port)"
    if runs_probes(monitor):
        taken[monitor.monitoring.blackbox_port] = "the blackbox exporter (box.monitoring.blackbox_port)"
    if monitor.gateway is not None:
        taken[monitor.gateway.port] = "the gateway (gateway.port)"
        taken[monitor.gateway.stats_port] = "HAProxy's exporter (gateway.stats_port)"
    own_ports = [("port", monitoring.port)]
    if monitoring.webhook_url is not None:
        own_ports.append(("alertmanager_port", monitoring.alertmanager_port))
    for field_name, port in own_ports:
        if port in taken:
            problems.append(Problem(
                field=f"monitoring.{field_name}",
                message=f"port {port} is taken on {monitor.name} by {taken[port]}: choose another",
            ))
    jobs: dict[str, str] = {}
    for fleet_host in hosts:
        for position, server in enumerate(fleet_host.services):
            problems += [
                Problem(field=f"{fleet_host.name}.services.{position}.{field}", message=message)
                for field, message in server.monitoring_problems()
            ]
        if runs_probes(fleet_host):
            blackbox_port = fleet_host.monitoring.blackbox_port
            problems += [
                Problem(
                    field=f"{fleet_host.name}.monitoring.blackbox_port",
                    message=f"port {blackbox_port} is service {server.name!r}'s already, and this host runs the "
                    f"blackbox exporter (its llama-servers use RPC servers): give it its own port",
                )
                for server in fleet_host.services
                if server.port == blackbox_port
            ]
        for target in [*scrape_targets(fleet_host), *probe_targets(fleet_host)]:
            if target.job in jobs:
                problems.append(Problem(
                    field=f"{fleet_host.name}.services",
                    message=f"scrape job {target.job!r} is {jobs[target.job]}'s already: rename the service",
                ))
            owner = target.labels.get("service", "HAProxy's exporter" if target.labels.get("kind") == KIND_GATEWAY
                                      else "node-exporter")  # fmt: skip
            jobs.setdefault(target.job, f"{fleet_host.name}'s {owner}")
    if is_loopback(monitoring.listen) and monitoring.address is None:
        remote = [host.name for host in hosts if host.name != monitor.name and not is_loopback(host.address)]
        if remote:
            problems.append(Problem(
                field="monitoring.listen",
                message=f"{', '.join(remote)} write to the monitor's Prometheus, which listens on {monitoring.listen} "
                f"only: set listen to an address they reach (0.0.0.0, or the monitor's LAN address)",
            ))
    return problems


def build_fleet(entries: Iterable[tuple[str, Mapping[str, Any]]]) -> Fleet:
    """A fleet from ``(host name, host data)`` pairs as pyinfra merges them; refused with every problem named.

    Hosts with neither a ``box`` nor a ``gateway`` are not gpubox hosts and are left out; a gateway's groups are
    resolved against the boxes (``gpubox.gateway.resolve_backends``); every host that carries a ``monitoring``
    must carry the same one.
    """
    hosts: list[FleetHost] = []
    specs: dict[str, Monitoring] = {}
    problems: list[Problem] = []
    gateways: list[HostGateway] = []
    for name, data in entries:
        if "box" not in data and data.get(GATEWAY_KEY) is None:
            continue
        box = data.get("box")
        found = gateway_of(name, dict(data))
        if found is not None:
            gateways.append(found)
            problems += [Problem(field=f"{name}.{p.field}", message=p.message) for p in found.problems]
        try:
            box = box if isinstance(box, Box) or box is None else Box.model_validate(box)
            value = data.get(MONITORING_KEY)
            if value is not None:
                specs[name] = value if isinstance(value, Monitoring) else Monitoring.model_validate(value)
        except ValidationError as error:
            problems += [Problem(field=f"{name}.{p.field}", message=p.message) for p in problems_from(error)]
            continue
        hosts.append(FleetHost(name=name, address=str(data.get("ssh_hostname") or name), box=box))
    if problems:
        raise FleetError("the inventory's specs are refused", problems)
    if not specs:
        raise FleetError(
            f"no host carries `{MONITORING_KEY}`: put gpubox.monitoring.Monitoring(monitor=...) in the hosts' data"
        )
    distinct = {spec.model_dump_json() for spec in specs.values()}
    if len(distinct) > 1:
        raise FleetError(
            "hosts carry different `monitoring` specs: give every host the same one (group data)",
            [Problem(field=f"{name}.monitoring", message=repr(spec)) for name, spec in specs.items()],
        )
    monitoring = next(iter(specs.values()))
    fleet_hosts = with_gateways(with_peers(hosts), gateways)
    refused = fleet_problems(monitoring, fleet_hosts)
    if refused:
        raise FleetError("the fleet's monitoring is refused", refused)
    return Fleet(monitoring=monitoring, hosts=fleet_hosts)


def with_gateways(hosts: tuple[FleetHost, ...], gateways: list[HostGateway]) -> tuple[FleetHost, ...]:
    """The hosts with their gateways, each group's backends resolved against the fleet's boxes; refused with each
    problem at its host's field (``<host>.gateway.groups.0.backends.1``), as ``gpubox check`` refuses it."""
    resolved = with_backends(gateways, {host.name: host.box for host in hosts if host.box is not None})
    refused = [
        Problem(field=f"{found.host}.{p.field}", message=p.message) for found in resolved for p in found.problems
    ]
    if refused:
        raise FleetError("the inventory's gateways are refused", refused)
    by_host = {found.host: found for found in resolved}
    return tuple(
        replace(host, gateway=by_host[host.name].gateway, backends=by_host[host.name].backends)
        if host.name in by_host
        else host
        for host in hosts
    )


def with_peers(hosts: list[FleetHost]) -> tuple[FleetHost, ...]:
    """The hosts with what their services use on other hosts resolved (``gpubox.peers``: a llama-server's RPC
    endpoints); refused with each problem at its host's field, as the rest of the fleet is."""
    resolved, problems = resolve_peers({host.name: host.box for host in hosts if host.box is not None})
    refused = [
        Problem(field=f"{name}.{problem.field}", message=problem.message)
        for name, found in problems.items()
        for problem in found
    ]
    if refused:
        raise FleetError("the inventory's references across hosts are refused", refused)
    return tuple(
        replace(host, box=resolved[host.name], remote=remote_devices(host.name, resolved))
        if host.box is not None
        else host
        for host in hosts
    )


def fleet_from_inventory(path: str | Path) -> Fleet:
    """The fleet of an inventory file, read with pyinfra's own loader (no host is contacted)."""
    from gpubox.inventory import load_inventory  # pyinfra's CLI loader: only where an inventory file is read

    return build_fleet((host.name, host.data) for host in load_inventory(path))


def planned_gpu_bytes(box: Box | None, headers_dir: Path, base: Path) -> tuple[dict[int, int], list[str]]:
    """Each expected GPU's planned total (services + reserve), from the controller's GGUF headers
    (a relative model source taken from ``base``, the inventory file's directory), as ``gpubox plan``
    makes it; and why a GPU has no plan (a header missing). None expected: nothing."""
    # Imported here, not at the top: the planner brings gguf and numpy, which a deploy that never plans
    # (the observability no-op) should not pay to import.
    from gpubox.vram import headers_for_box, plan_box, whisper_headers_for_box

    if box is None or not box.expected_gpus:
        return {}, []
    headers, missing = headers_for_box(box, headers_dir, base)
    whisper_headers, unreadable = whisper_headers_for_box(box, base)
    missing += unreadable
    gpus = [(gpu.index, gpu.memory_total_mib) for gpu in box.expected_gpus]
    plan = plan_box(box, headers, gpus, whisper_headers=whisper_headers)
    if missing or plan.problems:
        return {}, [*missing, *plan.problems]
    return {gpu.index: gpu.used_bytes for gpu in plan.gpus}, []
