"""A fleet: every gpubox host of an inventory with the one ``Monitoring`` spec, and what is scraped where.

Each host's own Prometheus scrapes it: the monitor's server scrapes the monitor host, and every
other host runs Prometheus in agent mode, scraping its loopback services and node-exporter and
remote-writing to the monitor. So nothing listens beyond loopback for monitoring's sake but the
monitor's Prometheus (and only when ``Monitoring.listen`` says so).

Every series carries ``host`` (the inventory name) and ``kind`` (the server type, ``llama-server``, or
``node``); a service's also ``service`` and what its type adds (``Service.scrape``): a llama-server's
``gpu`` (its pinned indices, ``cpu`` when none), ``model`` (the model file's name without ``.gguf``)
and ``spec_type``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpubox.box import Box
from gpubox.monitoring.spec import Monitoring
from gpubox.servers.base import Scrape, Service
from gpubox.spec import Problem, is_loopback, problems_from

MONITORING_KEY = "monitoring"
KIND_NODE = "node"
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
class FleetHost:
    """A gpubox host as the fleet sees it: its inventory name, the address others reach it at, its box."""

    name: str
    address: str
    box: Box


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


def scrape_targets(host: FleetHost) -> list[Target]:
    """What ``host``'s own Prometheus (agent or server) scrapes: each service's endpoint (``Service.scrape``),
    then node-exporter."""
    targets = [
        Target(
            job=f"{server.name}@{host.name}",
            port=server.port,
            labels=service_labels(host.name, server, scrape),
            credentials_file=credentials_path(server.name) if scrape.key_file is not None else None,
            key_source=scrape.key_file,
            path=scrape.path,
        )
        for server in host.box.services
        if (scrape := server.scrape()) is not None
    ]
    targets.append(
        Target(
            job=f"{KIND_NODE}@{host.name}",
            port=host.box.monitoring.node_exporter_port,
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
    taken = {service.port: f"service {service.name!r}" for service in monitor.box.services}
    taken[monitor.box.monitoring.node_exporter_port] = "node-exporter (box.monitoring.node_exporter_port)"
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
        for position, server in enumerate(fleet_host.box.services):
            problems += [
                Problem(field=f"{fleet_host.name}.services.{position}.{field}", message=message)
                for field, message in server.monitoring_problems()
            ]
        for target in scrape_targets(fleet_host):
            if target.job in jobs:
                problems.append(Problem(
                    field=f"{fleet_host.name}.services",
                    message=f"scrape job {target.job!r} is {jobs[target.job]}'s already: rename the service",
                ))
            jobs.setdefault(target.job, f"{fleet_host.name}'s {target.labels.get('service', 'node-exporter')}")
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

    Hosts without a ``box`` are not gpubox hosts and are left out; every host that carries a
    ``monitoring`` must carry the same one.
    """
    hosts: list[FleetHost] = []
    specs: dict[str, Monitoring] = {}
    problems: list[Problem] = []
    for name, data in entries:
        if "box" not in data:
            continue
        box = data["box"]
        try:
            box = box if isinstance(box, Box) else Box.model_validate(box)
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
    fleet_hosts = tuple(hosts)
    refused = fleet_problems(monitoring, fleet_hosts)
    if refused:
        raise FleetError("the fleet's monitoring is refused", refused)
    return Fleet(monitoring=monitoring, hosts=fleet_hosts)


def fleet_from_inventory(path: str | Path) -> Fleet:
    """The fleet of an inventory file, read with pyinfra's own loader (no host is contacted)."""
    from gpubox.inventory import load_inventory  # pyinfra's CLI loader: only where an inventory file is read

    return build_fleet((host.name, host.data) for host in load_inventory(path))


def planned_gpu_bytes(box: Box, headers_dir: Path, base: Path) -> tuple[dict[int, int], list[str]]:
    """Each expected GPU's planned total (services + reserve), from the controller's GGUF headers
    (a relative model source taken from ``base``, the inventory file's directory), as ``gpubox plan``
    makes it; and why a GPU has no plan (a header missing). None expected: nothing."""
    # Imported here, not at the top: the planner brings gguf and numpy, which a deploy that never plans
    # (the observability no-op) should not pay to import.
    from gpubox.vram import headers_for_box, plan_box, whisper_headers_for_box

    if not box.expected_gpus:
        return {}, []
    headers, missing = headers_for_box(box, headers_dir, base)
    whisper_headers, unreadable = whisper_headers_for_box(box, base)
    missing += unreadable
    gpus = [(gpu.index, gpu.memory_total_mib) for gpu in box.expected_gpus]
    plan = plan_box(box, headers, gpus, whisper_headers=whisper_headers)
    if missing or plan.problems:
        return {}, [*missing, *plan.problems]
    return {gpu.index: gpu.used_bytes for gpu in plan.gpus}, []
