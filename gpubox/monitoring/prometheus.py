"""Prometheus, agent, node-exporter and Alertmanager: their config files and command lines, from a Fleet.

The distro's packages are used as they ship, with one systemd drop-in per unit that replaces its
``ExecStart`` (so the same rendering serves Debian's ``/etc/default`` and Arch's ``/etc/conf.d``
layouts) and config files at gpubox's own paths (never a package's conffile, so an upgrade never
asks). Each host's own Prometheus scrapes it on 127.0.0.1: the monitor's as a server (rules,
Alertmanager, the remote-write receiver when there are agents), every other host's in agent mode
remote-writing to the monitor. A host whose llama-servers use RPC servers elsewhere also runs the
distro's blackbox exporter on 127.0.0.1 (one ``tcp_connect`` module), and its Prometheus scrapes a probe
job per RPC endpoint through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from gpubox.monitoring.fleet import PROBE_MODULE, Fleet, FleetHost, Target, probe_targets, runs_probes, scrape_targets
from gpubox.monitoring.metrics import TEXTFILE_DIR
from gpubox.quoting import exec_word, shell_join, shell_word

CONFIG_DIR = "/etc/prometheus"
PROMETHEUS_CONFIG = f"{CONFIG_DIR}/gpubox.yml"
RULES_FILE = f"{CONFIG_DIR}/gpubox-rules.yml"
ALERTMANAGER_CONFIG = f"{CONFIG_DIR}/gpubox-alertmanager.yml"
BLACKBOX_CONFIG = f"{CONFIG_DIR}/gpubox-blackbox.yml"
"""gpubox's own path: the package's /etc/prometheus/blackbox.yml (a conffile) and its /etc/default ARGS are
left as they ship, and the drop-in's ExecStart names this file."""
SERVER_STORAGE = "/var/lib/prometheus/metrics2"
AGENT_STORAGE = "/var/lib/prometheus/gpubox-agent"
ALERTMANAGER_STORAGE = "/var/lib/prometheus/alertmanager"
DROP_IN_NAME = "gpubox.conf"
WEBHOOK_RECEIVER = "gpubox-webhook"


@dataclass(frozen=True)
class Daemon:
    """A distro-packaged daemon gpubox configures: its package, unit and program, per package manager."""

    role: str
    packages: dict[str, str]
    units: dict[str, str]
    programs: dict[str, str]

    def unit(self, manager: str) -> str:
        return self.units[manager]

    def drop_in_path(self, manager: str) -> str:
        return f"/etc/systemd/system/{self.units[manager]}.d/{DROP_IN_NAME}"


# Debian 12's packages are what the tests install; Arch's names are from its package files, unrun here.
NODE_EXPORTER = Daemon(
    role="node-exporter",
    packages={"apt": "prometheus-node-exporter", "pacman": "prometheus-node-exporter"},
    units={"apt": "prometheus-node-exporter.service", "pacman": "prometheus-node-exporter.service"},
    programs={"apt": "/usr/bin/prometheus-node-exporter", "pacman": "/usr/bin/prometheus-node-exporter"},
)
PROMETHEUS = Daemon(
    role="prometheus",
    packages={"apt": "prometheus", "pacman": "prometheus"},
    units={"apt": "prometheus.service", "pacman": "prometheus.service"},
    programs={"apt": "/usr/bin/prometheus", "pacman": "/usr/bin/prometheus"},
)
ALERTMANAGER = Daemon(
    role="alertmanager",
    packages={"apt": "prometheus-alertmanager", "pacman": "alertmanager"},
    units={"apt": "prometheus-alertmanager.service", "pacman": "alertmanager.service"},
    programs={"apt": "/usr/bin/prometheus-alertmanager", "pacman": "/usr/bin/alertmanager"},
)

# Debian 12's prometheus-blackbox-exporter 0.23 (its unit runs $ARGS from /etc/default as user prometheus, and
# reloads on SIGHUP); Arch's package and binary name are from its package files, unrun here.
BLACKBOX = Daemon(
    role="blackbox-exporter",
    packages={"apt": "prometheus-blackbox-exporter", "pacman": "prometheus-blackbox-exporter"},
    units={"apt": "prometheus-blackbox-exporter.service", "pacman": "prometheus-blackbox-exporter.service"},
    programs={"apt": "/usr/bin/prometheus-blackbox-exporter", "pacman": "/usr/bin/prometheus-blackbox-exporter"},
)


def daemons(fleet: Fleet, host: FleetHost) -> list[Daemon]:
    """What ``host`` runs for monitoring: node-exporter and Prometheus everywhere, Alertmanager on the
    monitor when there is a webhook to send to, the blackbox exporter where llama-servers use RPC servers."""
    wanted = [NODE_EXPORTER, PROMETHEUS]
    if fleet.is_monitor(host.name) and fleet.monitoring.webhook_url is not None:
        wanted.append(ALERTMANAGER)
    if runs_probes(host):
        wanted.append(BLACKBOX)
    return wanted


def _seconds(value: int) -> str:
    return f"{value}s"


def probe_config(target: Target) -> dict[str, Any]:
    """One probe job, as the blackbox exporter's docs relabel it: the endpoint is the ``target`` parameter
    and the ``instance`` label, and the address scraped is the blackbox exporter on 127.0.0.1."""
    return {
        "job_name": target.job,
        "metrics_path": target.path,
        "params": {"module": [PROBE_MODULE]},
        "static_configs": [{"targets": [target.probe], "labels": dict(target.labels)}],
        "relabel_configs": [
            {"source_labels": ["__address__"], "target_label": "__param_target"},
            {"source_labels": ["__param_target"], "target_label": "instance"},
            {"target_label": "__address__", "replacement": f"127.0.0.1:{target.port}"},
        ],
    }


def scrape_config(target: Target) -> dict[str, Any]:
    """One job: the target on 127.0.0.1 with its labels; a bearer token read from a file when it has a key;
    a blackbox probe's through the exporter (``probe_config``)."""
    if target.probe is not None:
        return probe_config(target)
    job: dict[str, Any] = {
        "job_name": target.job,
        "static_configs": [{"targets": [f"127.0.0.1:{target.port}"], "labels": dict(target.labels)}],
    }
    if target.path != "/metrics":  # Prometheus's default
        job["metrics_path"] = target.path
    if target.credentials_file is not None:
        job["authorization"] = {"type": "Bearer", "credentials_file": target.credentials_file}
    return job


def host_jobs(host: FleetHost) -> list[dict[str, Any]]:
    """Every job ``host``'s own Prometheus runs: its scrape targets, then its RPC probes."""
    return [scrape_config(target) for target in [*scrape_targets(host), *probe_targets(host)]]


def blackbox_config() -> dict[str, Any]:
    """The blackbox exporter's modules: a TCP connect (its timeout: the scrape's, less the exporter's offset)."""
    return {"modules": {PROBE_MODULE: {"prober": "tcp"}}}


def has_agents(fleet: Fleet) -> bool:
    return any(not fleet.is_monitor(host.name) for host in fleet.hosts)


def server_config(fleet: Fleet) -> dict[str, Any]:
    """The monitor's prometheus config: its own host's targets, the rules, Alertmanager when configured."""
    monitoring = fleet.monitoring
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": _seconds(monitoring.scrape_interval_s),
            "evaluation_interval": _seconds(monitoring.evaluation_interval_s),
        },
        "rule_files": [RULES_FILE],
    }
    if monitoring.webhook_url is not None:
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{monitoring.alertmanager_port}"]}]}]
        }
    config["scrape_configs"] = host_jobs(fleet.monitor)
    return config


def agent_config(fleet: Fleet, host: FleetHost) -> dict[str, Any]:
    """A non-monitor host's agent config: its own targets, remote-written to the monitor."""
    return {
        "global": {"scrape_interval": _seconds(fleet.monitoring.scrape_interval_s)},
        "scrape_configs": host_jobs(host),
        "remote_write": [{"url": f"{fleet.prometheus_url}/api/v1/write"}],
    }


def prometheus_config(fleet: Fleet, host: FleetHost) -> dict[str, Any]:
    return server_config(fleet) if fleet.is_monitor(host.name) else agent_config(fleet, host)


def alertmanager_config(fleet: Fleet) -> dict[str, Any]:
    """One route to the webhook, grouped per alert, host and service; resolved alerts are sent too."""
    monitoring = fleet.monitoring
    assert monitoring.webhook_url is not None, "Alertmanager runs only with a webhook_url"
    return {
        "route": {
            "receiver": WEBHOOK_RECEIVER,
            "group_by": ["alertname", "host", "service"],
            "group_wait": _seconds(monitoring.group_wait_s),
            "group_interval": _seconds(max(monitoring.group_wait_s, 1) * 2),
            "repeat_interval": "4h",
        },
        "receivers": [
            {"name": WEBHOOK_RECEIVER, "webhook_configs": [{"url": monitoring.webhook_url, "send_resolved": True}]}
        ],
    }


def to_yaml(document: dict[str, Any]) -> str:
    # libyaml's emitter where PyYAML has it (the same text, ~5x faster: every host's no-op renders its config)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    text: str = yaml.dump(document, Dumper=dumper, sort_keys=False, default_flow_style=False)
    return "# Generated by gpubox from the inventory: edits are overwritten.\n" + text


def arguments(daemon: Daemon, fleet: Fleet, host: FleetHost) -> list[str]:
    """The daemon's command-line flags on ``host``."""
    monitoring = fleet.monitoring
    if daemon is NODE_EXPORTER:
        return [
            f"--web.listen-address=127.0.0.1:{host.monitoring.node_exporter_port}",
            f"--collector.textfile.directory={TEXTFILE_DIR}",
        ]
    if daemon is BLACKBOX:
        return [
            f"--config.file={BLACKBOX_CONFIG}",
            f"--web.listen-address=127.0.0.1:{host.monitoring.blackbox_port}",
        ]
    if daemon is ALERTMANAGER:
        return [
            f"--config.file={ALERTMANAGER_CONFIG}",
            f"--storage.path={ALERTMANAGER_STORAGE}",
            f"--web.listen-address=127.0.0.1:{monitoring.alertmanager_port}",
            "--cluster.listen-address=",  # no gossip port on every interface: one Alertmanager
        ]
    if not fleet.is_monitor(host.name):
        return [
            "--enable-feature=agent",
            f"--config.file={PROMETHEUS_CONFIG}",
            f"--storage.agent.path={AGENT_STORAGE}",
            f"--web.listen-address=127.0.0.1:{host.monitoring.agent_port}",
        ]
    server = [
        f"--config.file={PROMETHEUS_CONFIG}",
        f"--storage.tsdb.path={SERVER_STORAGE}",
        f"--storage.tsdb.retention.time={monitoring.retention}",
        f"--web.listen-address={monitoring.listen}:{monitoring.port}",
    ]
    if has_agents(fleet):
        server.append("--web.enable-remote-write-receiver")
    return server


def drop_in(daemon: Daemon, manager: str, fleet: Fleet, host: FleetHost) -> str:
    """The unit drop-in that runs the distro's daemon with gpubox's flags (``ExecStart=`` cleared first)."""
    words = [daemon.programs[manager], *arguments(daemon, fleet, host)]
    command = " ".join(exec_word(word, f"{daemon.role} flag") for word in words)
    return "\n".join([
        "# Generated by gpubox from the inventory: edits are overwritten.",
        "[Service]",
        "ExecStart=",
        f"ExecStart={command}",
        "",
    ])  # fmt: skip


def validate_command(path: str, fleet: Fleet, host: FleetHost, kind: str) -> list[str]:
    """The check a staged file must pass before it replaces the live one (``kind``: config, rules, alertmanager,
    blackbox)."""
    if kind == "blackbox":
        return [BLACKBOX.programs["apt"], "--config.check", "--config.file", path]
    if kind == "rules":
        return ["promtool", "check", "rules", path]
    if kind == "alertmanager":
        return ["amtool", "check-config", path]
    agent = [] if fleet.is_monitor(host.name) else ["--agent"]
    return ["promtool", "check", "config", *agent, path]


POLICY_RC_D = "/usr/sbin/policy-rc.d"


def apt_install_without_starting(packages: list[str]) -> str:
    """Install Debian packages without their maintainer scripts starting the daemons.

    Debian starts a daemon as its package is installed, with the package's default flags (Prometheus
    on 0.0.0.0:9090): a ``policy-rc.d`` that answers 101 ("action forbidden") holds every start off
    for the install's length; it is removed on exit, failed or not. A host's own ``policy-rc.d`` is
    left as it is. Conffiles already there are kept (``--force-confold``).
    """
    policy = shell_word(POLICY_RC_D)
    return "\n".join([
        "set -e",
        f"if [ ! -e {policy} ]; then",
        f"  trap 'rm -f {POLICY_RC_D}' EXIT",
        f"  printf '#!/bin/sh\\nexit 101\\n' > {policy} && chmod 0755 {policy}",
        "fi",
        "export DEBIAN_FRONTEND=noninteractive",
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confdef "
        f"-o Dpkg::Options::=--force-confold {shell_join(packages)}",
    ])  # fmt: skip


def pacman_install(packages: list[str]) -> str:
    """Install Arch packages (pacman never starts a daemon)."""
    return f"pacman -S --noconfirm --needed {shell_join(packages)}"
