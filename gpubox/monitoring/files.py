"""Every file monitoring writes on a host, rendered once: the deploy places them, ``gpubox monitoring --out``
writes them under a directory (``<out>/<host>/<path on the host>``) for a user who runs Prometheus already.

Per host: each daemon's drop-in (its flags), the GPU metrics script and its two units, the Prometheus
config (server on the monitor, agent elsewhere), the blackbox exporter's config where llama-servers use
RPC servers (a change restarts the exporter: it is stateless); on the monitor also the alert rules, Alertmanager's
config (with a webhook) and Grafana's provisioning files and dashboard. Each file says what its change
sets off: a restart (new flags), a reload (new config) or a run of the GPU metrics timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpubox.keys import chmod_mode
from gpubox.monitoring import prometheus, rules
from gpubox.monitoring.fleet import Fleet, FleetHost, planned_gpu_bytes

PROMETHEUS_GROUP = "prometheus"
"""The group the distro's daemons run as (Debian's and Arch's packages): their configs are root:prometheus
0640, like the key copies they name (gpubox.keys)."""
Manager = Literal["apt", "pacman"]


@dataclass(frozen=True)
class HostFile:
    """A file monitoring writes on a host, and what its change sets off.

    + name: how the deploy calls its operation
    + path: where it goes on the host
    + text: its whole content
    + mode, group: its mode and group (root owns it)
    + check: the command that must accept it before it replaces the live one (``{}``: the staged file)
    + restarts: the daemon (role) whose flags it holds
    + reloads: the daemon (role) that rereads it
    + gpu_metrics: one of the GPU metrics timer's files (a change runs the script now)
    """

    name: str
    path: str
    text: str
    mode: str = "0644"
    group: str | None = None
    check: tuple[str, ...] = ()
    restarts: str | None = None
    reloads: str | None = None
    gpu_metrics: bool = False


def _config(name: str, path: str, text: str, check: list[str], reloads: str) -> HostFile:
    return HostFile(name=name, path=path, text=text, mode=chmod_mode(), group=PROMETHEUS_GROUP, check=tuple(check),
                    reloads=reloads)  # fmt: skip


def grafana_files(fleet: Fleet) -> list[HostFile]:
    """Grafana's provisioning files (under ``grafana_provisioning``) and the dashboard (where its provider reads)."""
    from gpubox.monitoring import dashboards  # Grafana's SDK (~60 ms): for the monitor's files, not every deploy's

    files = dashboards.provisioning_files(fleet, prometheus_url=fleet.local_prometheus_url)
    provisioning = fleet.monitoring.grafana_provisioning
    return [
        HostFile(
            name=f"Grafana {relative}",
            path=f"{dashboards.DASHBOARDS_DIR if relative == dashboards.DASHBOARD_FILE else provisioning}/{relative}",
            text=text,
        )
        for relative, text in files.items()
    ]


def prometheus_config_file(fleet: Fleet, fleet_host: FleetHost) -> HostFile:
    """The host's Prometheus config (server on the monitor, agent elsewhere): its scrape jobs, each keyed
    service's with the copy of its key. The box deploy keeps it in step when a service's key changes."""
    kind = "server" if fleet.is_monitor(fleet_host.name) else "agent"
    return _config(
        f"Prometheus {kind} config",
        prometheus.PROMETHEUS_CONFIG,
        prometheus.to_yaml(prometheus.prometheus_config(fleet, fleet_host)),
        prometheus.validate_command("{}", fleet, fleet_host, "config"),
        prometheus.PROMETHEUS.role,
    )


def host_files(
    fleet: Fleet, fleet_host: FleetHost, manager: Manager, planned: dict[str, dict[int, int]]
) -> list[HostFile]:
    """What monitoring writes on ``fleet_host``, in the order it is written (rules before the config naming them)."""
    from gpubox.monitoring import textfile  # prometheus_client (~35 ms): for the monitoring's deploy, not the box's

    files = [
        HostFile(
            name=f"Flags of {daemon.unit(manager)}",
            path=daemon.drop_in_path(manager),
            text=prometheus.drop_in(daemon, manager, fleet, fleet_host),
            restarts=daemon.role,
        )
        for daemon in prometheus.daemons(fleet, fleet_host)
    ]
    files += [
        HostFile(
            name="GPU metrics script",
            path=textfile.SCRIPT_PATH,
            text=textfile.gpu_metrics_script(fleet_host.box, planned.get(fleet_host.name, {})),
            mode="0755",
            gpu_metrics=True,
        ),
        HostFile(name=f"Unit {textfile.SERVICE_UNIT}", path=textfile.service_path(), text=textfile.service_unit(),
                 gpu_metrics=True),
        HostFile(name=f"Unit {textfile.TIMER_UNIT}", path=textfile.timer_path(),
                 text=textfile.timer_unit(fleet_host.monitoring.gpu_metrics_interval_s), gpu_metrics=True),
    ]  # fmt: skip
    role = prometheus.PROMETHEUS.role
    if fleet.is_monitor(fleet_host.name):
        files.append(_config("Alert rules", prometheus.RULES_FILE, rules.rules_yaml(fleet, planned),
                             prometheus.validate_command("{}", fleet, fleet_host, "rules"), role))  # fmt: skip
    if prometheus.BLACKBOX in prometheus.daemons(fleet, fleet_host):
        # before the Prometheus config, whose probe jobs name its module
        files.append(HostFile(
            name="Blackbox exporter config",
            path=prometheus.BLACKBOX_CONFIG,
            text=prometheus.to_yaml(prometheus.blackbox_config()),
            mode=chmod_mode(),
            group=PROMETHEUS_GROUP,
            check=tuple(prometheus.validate_command("{}", fleet, fleet_host, "blackbox")),
            restarts=prometheus.BLACKBOX.role,
        ))  # fmt: skip
    files.append(prometheus_config_file(fleet, fleet_host))
    if fleet.is_monitor(fleet_host.name) and fleet.monitoring.webhook_url is not None:
        files.append(_config(
            "Alertmanager config",
            prometheus.ALERTMANAGER_CONFIG,
            prometheus.to_yaml(prometheus.alertmanager_config(fleet)),
            prometheus.validate_command("{}", fleet, fleet_host, "alertmanager"),
            prometheus.ALERTMANAGER.role,
        ))  # fmt: skip
    return files


def planned_vram(fleet: Fleet, headers_dir: Path, base: Path) -> tuple[dict[str, dict[int, int]], list[str]]:
    """Each host's planned VRAM per GPU from the controller's headers (relative model sources taken from
    ``base``, the inventory file's directory), and why a host has none."""
    planned: dict[str, dict[int, int]] = {}
    notes: list[str] = []
    for fleet_host in fleet.hosts:
        planned[fleet_host.name], missing = planned_gpu_bytes(fleet_host.box, headers_dir, base)
        notes += [f"{fleet_host.name}: no VRAM alert: {reason}" for reason in missing]
    return planned, notes


def monitoring_files(fleet: Fleet, planned: dict[str, dict[int, int]], manager: Manager = "apt") -> dict[str, str]:
    """Every host's files as ``<host>/<path on the host>`` -> text (Grafana's under the monitor's name)."""
    files = {
        f"{fleet_host.name}{host_file.path}": host_file.text
        for fleet_host in fleet.hosts
        for host_file in host_files(fleet, fleet_host, manager, planned)
    }
    files |= {f"{fleet.monitor.name}{host_file.path}": host_file.text for host_file in grafana_files(fleet)}
    return files


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    """Write the bundle under ``out`` (each file whole: written beside it, then renamed)."""
    written: list[Path] = []
    for relative, text in sorted(files.items()):
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.tmp")
        staged.write_text(text)
        staged.replace(path)
        written.append(path)
    return written
