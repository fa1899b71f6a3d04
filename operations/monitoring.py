"""Monitoring on a host: the distro's node-exporter and Prometheus (server on the monitor, agent elsewhere),
Alertmanager, gpubox's GPU textfile timer, Grafana's provisioning files; all rendered from the Fleet
(``gpubox.monitoring.files.host_files``).

The box deploy imports this module for its scrape keys (``scrape_keys``): the GPU textfile's module
(prometheus_client) and Grafana's dashboards (its SDK), ~0.1 s of imports, are imported where their
files are rendered, so a box deploy does not load them."""

from __future__ import annotations

from pyinfra import host, state
from pyinfra.api import OperationError, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory, File, Sha1File
from pyinfra.facts.pacman import PacmanPackages
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed

from gpubox.keys import chmod_mode, fact_mode
from gpubox.monitoring import prometheus
from gpubox.monitoring.files import (
    PROMETHEUS_GROUP,
    HostFile,
    grafana_files,
    host_files,
    planned_vram,
    prometheus_config_file,
)
from gpubox.monitoring.fleet import CREDENTIALS_DIR, Fleet, FleetHost, Target, scrape_targets
from gpubox.quoting import shell_word
from gpubox.vram import default_headers_dir

from . import text_files
from .distro import DISTRO_READ, PackageManager, distro_name, package_manager
from .failures import refusals_fail_cleanly
from .host_facts import FactRead, prefetch, read
from .preflight import inventory_base
from .service import running_and_enabled, unit_state_reads
from .text_files import text_file

MANAGERS: tuple[PackageManager, ...] = ("apt", "pacman")


def _packages_read(manager: PackageManager) -> FactRead:
    return (DebPackages, {}) if manager == "apt" else (PacmanPackages, {})


def package_reads() -> list[FactRead]:
    """What `packages` reads, for either package manager."""
    return [_packages_read(manager) for manager in MANAGERS]


@operation()
def packages(names: list[str], manager: PackageManager):  # type: ignore[no-untyped-def]
    """
    Install the distro's packages without starting them: their services start once gpubox has
    configured them (apt: a ``policy-rc.d`` for the install's length; pacman never starts one).

    + names: the packages
    + manager: ``apt`` or ``pacman`` (``operations.distro.package_manager``)

    **Example:**

    .. code:: python

        monitoring.packages(name="Monitoring packages", names=["prometheus"], manager="apt")
    """
    installed = read(_packages_read(manager))
    missing = [name for name in names if name not in (installed or {})]
    if not missing:
        host.noop(f"{', '.join(names)} installed")
        return
    yield (
        prometheus.apt_install_without_starting(missing)
        if manager == "apt"
        else prometheus.pacman_install(missing)
    )


@operation()
@refusals_fail_cleanly
def credentials(target: Target, key_made_by_this_run: bool = False):  # type: ignore[no-untyped-def]
    """
    Give Prometheus a service's API key to scrape ``/metrics`` with: a copy made on the host
    (root-owned, group prometheus, 0640), so the key never passes through the controller or a config.
    Prometheus reads the file at every scrape: a new copy is used from the next scrape on.

    + target: a scrape target with ``credentials_file`` (the copy) and ``key_source`` (the service's key)
    + key_made_by_this_run: the box deploy, which makes a missing key before this runs: a key not there
      yet is copied once it is (else a missing key is refused: deploy the box first)

    **Example:**

    .. code:: python

        monitoring.credentials(name="Scrape key of gemma4", target=target)
    """
    assert target.credentials_file is not None and target.key_source is not None
    key_read, copy_read, copy_sha_read = credential_reads(target)
    source_sha = read(key_read)
    if source_sha is None and not key_made_by_this_run:
        raise OperationError(
            f"{target.key_source} (the API key of {target.labels['service']}) is not on the host: "
            f"deploy the box first (deploys/danarch4090.py), then the monitoring"
        )
    if source_sha is None and state.is_executing:  # the box deploy ran, and made no key there
        raise OperationError(
            f"{target.key_source} (the API key of {target.labels['service']}) is not on the host: put the key "
            f'there, or set the service\'s api_key_file="generate" (gpubox makes one)'
        )
    copy = read(copy_read)
    owned = copy and (copy["user"], copy["group"], copy["mode"]) == ("root", PROMETHEUS_GROUP, fact_mode())
    if source_sha is not None and owned and read(copy_sha_read) == source_sha:
        host.noop(f"{target.credentials_file} is the current key, readable by root and {PROMETHEUS_GROUP}")
        return
    source, copy_path = shell_word(target.key_source), shell_word(target.credentials_file)
    group = shell_word(PROMETHEUS_GROUP)
    yield (
        f"install -d -m 0750 -o root -g {group} {shell_word(CREDENTIALS_DIR)} && "
        f"install -m {chmod_mode()} -o root -g {group} {source} {copy_path}"
    )


def _credential_targets(fleet_host: FleetHost) -> list[Target]:
    return [target for target in scrape_targets(fleet_host) if target.credentials_file is not None]


def credential_reads(target: Target) -> tuple[FactRead, FactRead, FactRead]:
    """What `credentials` reads, in its order: the key's sha1, its copy's stat, the copy's sha1."""
    assert target.credentials_file is not None and target.key_source is not None
    copy = target.credentials_file
    return (Sha1File, {"path": target.key_source}), (File, {"path": copy}), (Sha1File, {"path": copy})


def _credential_reads(fleet_host: FleetHost) -> list[FactRead]:
    return [fact_read for target in _credential_targets(fleet_host) for fact_read in credential_reads(target)]


def _grafana_read(fleet: Fleet) -> FactRead:
    return Directory, {"path": fleet.monitoring.grafana_provisioning}


def _prometheus_config_read() -> FactRead:
    return text_files.contents_read(prometheus.PROMETHEUS_CONFIG)


def facts_read(fleet: Fleet, fleet_host: FleetHost, files: list[HostFile], grafana: list[HostFile]) -> list[FactRead]:
    """What ``observe`` reads on a converged host, with the arguments it reads them with: for either
    package manager (the distro is read in the same round trip; the other's reads come back empty).
    ``files``: the host's files as either manager's host renders them (only drop-in paths differ);
    ``grafana``: Grafana's files, on the monitor."""
    from gpubox.monitoring import textfile  # with the monitoring's deploy, not the box's (the module's docstring)

    reads: list[FactRead] = [DISTRO_READ, *package_reads()]
    daemons = prometheus.daemons(fleet, fleet_host)
    paths = [host_file.path for host_file in files]
    paths += [daemon.drop_in_path(manager) for manager in MANAGERS for daemon in daemons]
    reads += [fact_read for path in dict.fromkeys(paths) for fact_read in text_files.facts_read(path)]
    reads += _credential_reads(fleet_host)
    if fleet.is_monitor(fleet_host.name):
        reads.append(_grafana_read(fleet))
        reads += [fact_read for grafana_file in grafana for fact_read in text_files.facts_read(grafana_file.path)]
    units = dict.fromkeys(daemon.unit(manager) for manager in MANAGERS for daemon in daemons)
    return reads + [fact_read for unit in (textfile.TIMER_UNIT, *units) for fact_read in unit_state_reads(unit)]


def _write(host_file: HostFile) -> OperationMeta:
    return text_file(
        name=host_file.name,
        path=host_file.path,
        text=host_file.text,
        mode=host_file.mode,
        group=host_file.group,
        check=list(host_file.check) or None,
    )


@deploy("Monitoring")
def observe(fleet: Fleet, host_name: str) -> None:
    """
    Converge one host's monitoring: packages, the scrape keys, every file ``host_files`` renders
    (drop-ins, the GPU metrics script and timer, the Prometheus or agent config, on the monitor its
    rules, Alertmanager's config and Grafana's files); then start what is stopped, restart what got new
    flags, reload what got a new config, run the GPU metrics script when it changed.

    + fleet: the inventory's fleet (``gpubox.monitoring.fleet.build_fleet``)
    + host_name: the host being deployed (``host.name``)

    **Example:**

    .. code:: python

        monitoring.observe(fleet, host.name)
    """
    from gpubox.monitoring import textfile  # (the module's docstring)

    fleet_host = fleet.host(host_name)
    base = inventory_base()
    planned, _ = planned_vram(fleet, default_headers_dir(base), base)
    files = host_files(fleet, fleet_host, "apt", planned)
    grafana = grafana_files(fleet) if fleet.is_monitor(host_name) else []
    prefetch(facts_read(fleet, fleet_host, files, grafana))  # one round trip, the distro included
    manager = package_manager()
    if manager is None:
        raise OperationError(
            f"gpubox installs Prometheus and node-exporter with apt or pacman; this host is {distro_name()!r}"
        )
    if manager != "apt":
        files = host_files(fleet, fleet_host, manager, planned)
    daemons = prometheus.daemons(fleet, fleet_host)

    packages(name="Monitoring packages", names=[daemon.packages[manager] for daemon in daemons], manager=manager)
    # the keys first: the Prometheus config's check reads the files it names
    keys = [
        credentials(name=f"Scrape key of {target.labels['service']}", target=target)
        for target in _credential_targets(fleet_host)
    ]
    written = {host_file.path: _write(host_file) for host_file in files}
    if fleet.is_monitor(host_name) and read(_grafana_read(fleet)):
        for grafana_file in grafana:
            _write(grafana_file)

    units = [written[host_file.path] for host_file in files if host_file.restarts or host_file.gpu_metrics]
    if any(meta.will_change for meta in units):
        systemd.daemon_reload(name="systemd daemon-reload", _if=any_changed(*units))
    running_and_enabled(name=f"{textfile.TIMER_UNIT} running and enabled", unit_name=textfile.TIMER_UNIT)
    gpu_metrics = [written[host_file.path] for host_file in files if host_file.gpu_metrics]
    if any(meta.will_change for meta in gpu_metrics):
        systemd.service(name="Write the GPU metrics now", service=textfile.SERVICE_UNIT, restarted=True)

    for daemon in daemons:
        unit = daemon.unit(manager)
        running_and_enabled(name=f"{unit} running and enabled", unit_name=unit)
        flags = [written[host_file.path] for host_file in files if host_file.restarts == daemon.role]
        configs = [written[host_file.path] for host_file in files if host_file.reloads == daemon.role]
        if daemon is prometheus.PROMETHEUS:
            configs += keys
        if any(meta.will_change for meta in flags):
            systemd.service(name=f"Restart {unit} (new flags)", service=unit, restarted=True, _if=any_changed(*flags))
        elif any(meta.will_change for meta in configs):
            systemd.service(name=f"Reload {unit} (new config)", service=unit, reloaded=True, _if=any_changed(*configs))


def scrape_key_reads(fleet: Fleet | None, host_name: str) -> list[FactRead]:
    """What ``scrape_keys`` reads on a converged host (the box deploy reads them with its own, in one
    round trip): the host's Prometheus config, then each keyed service's key and its copy."""
    if fleet is None or host_name not in {fleet_host.name for fleet_host in fleet.hosts}:
        return []
    return [_prometheus_config_read(), *_credential_reads(fleet.host(host_name))]


@deploy("Scrape keys")
def scrape_keys(fleet: Fleet, host_name: str) -> None:
    """
    Keep the host's Prometheus scraping its services with their current API keys, from the box deploy:
    a service's key turned on, or rotated (its key file deleted, a new one made), left Prometheus
    sending the old one (or none: ``401 Unauthorized``, the target down) until deploys/observability.py
    ran again. Where the host's monitoring is deployed (its Prometheus config is there), each key's copy
    is made anew and the config names it, as observability.py writes them; Prometheus is reloaded when
    either changed. Nothing else of the monitoring is touched; a host without it is left alone.

    + fleet: the inventory's fleet (``gpubox.monitoring.fleet.build_fleet``)
    + host_name: the host being deployed (``host.name``)

    **Example:**

    .. code:: python

        monitoring.scrape_keys(fleet, host.name)  # after the services' keys and units
    """
    if read(_prometheus_config_read()) is None:
        return  # no monitoring here yet: observability.py copies the keys when it deploys it
    fleet_host = fleet.host(host_name)
    keys = [
        credentials(name=f"Scrape key of {target.labels['service']}", target=target, key_made_by_this_run=True)
        for target in _credential_targets(fleet_host)
    ]
    config = _write(prometheus_config_file(fleet, fleet_host))
    changed = [*keys, config]
    if any(meta.will_change for meta in changed):
        unit = prometheus.PROMETHEUS.unit("apt")  # prometheus.service with either package manager
        systemd.service(
            name=f"Reload {unit} (new scrape keys)", service=unit, reloaded=True, _if=any_changed(*changed)
        )
