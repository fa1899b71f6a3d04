"""End to end: a fleet of three test hosts watched by a Prometheus derived from the inventory.

Three booted systemd hosts each serve SmolLM2 (one behind an API key); the first is the monitor:
Prometheus (server, rules, remote-write receiver) and Alertmanager posting to a webhook receiver on
the controller. The other two run Prometheus in agent mode, remote-writing to it. The hosts share the
controller's network, so every listener has its own port. GPU metrics come from the textfile timer
fed by a fake `nvidia-smi` that prints what a real H200 printed (tests/fixtures/nvidia-smi).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from gpubox.bench import free_port
from gpubox.quoting import shell_word
from tests.e2e.conftest import CCACHE_MOUNT, LLAMA_REPO_MOUNT
from tests.e2e.test_deploy import (
    FULL,
    INVENTORY,
    REPORT,
    ROOT,
    Deployer,
    fact_loads,
    make_deployer,
    ops_reporting,
    plain,
    record,
)
from tests.testbed import TestHost, booted_host, cache_dir

pytestmark = pytest.mark.e2e

OBSERVE = "deploys/observability.py"
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "nvidia-smi" / "gpu-metrics-busy-noheader-nounits.csv"
APT_ARCHIVES = "/var/cache/apt/archives"
HOSTS = 3
T = TypeVar("T")


class WebhookReceiver:
    """Alertmanager's webhook target: records every POSTed notification with the time it arrived."""

    def __init__(self) -> None:
        self.notifications: list[tuple[float, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.notifications.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def alerts(self, since: float) -> list[tuple[float, dict[str, Any]]]:
        """(arrival, alert) for every alert of every notification that arrived after ``since``."""
        return [(at, alert) for at, body in self.notifications if at >= since for alert in body["alerts"]]


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, interval_s: float = 1.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def fleet_hosts(can_boot_hosts: None, llama_repo: tuple[Path, str], shared_ccache: Path) -> Iterator[list[TestHost]]:
    archives = cache_dir() / "apt-archives"  # the packages are downloaded once for the three hosts
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        hosts = [
            stack.enter_context(
                booted_host(
                    binds_ro=[(llama_repo[0], LLAMA_REPO_MOUNT)],
                    binds=[(shared_ccache, CCACHE_MOUNT), (archives, APT_ARCHIVES)],
                )
            )
            for _ in range(HOSTS)
        ]
        yield hosts


@pytest.fixture(scope="module")
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def deployer(
    fleet_hosts: list[TestHost], webhook: WebhookReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Deployer:
    monitor, *others = fleet_hosts
    fleet = [
        {
            "host_name": other.pyinfra_host_name(),
            "host_data": other.pyinfra_host_data(),
            "port": free_port(),
            "node_exporter_port": free_port(),
            "agent_port": free_port(),
            # the second host's llama-server takes an API key: Prometheus scrapes it with a copy of the key
            "api_key_file": "generate" if position == 0 else None,
        }
        for position, other in enumerate(others)
    ]
    monitoring = {
        "monitor": monitor.pyinfra_host_name(),
        "port": free_port(),
        "alertmanager_port": free_port(),
        "webhook_url": webhook.url,
        "scrape_interval_s": 2,
        "evaluation_interval_s": 2,
        "group_wait_s": 1,
        "down_for_s": 4,
        "slow_for_s": 4,
        "rate_window_s": 20,
    }
    return make_deployer(
        monitor,
        tmp_path_factory,
        node_exporter_port=free_port(),
        agent_port=free_port(),
        gpu_metrics_interval_s=2,
        fleet=fleet,
        monitoring=monitoring,
    )


def host_config(deployer: Deployer, position: int) -> dict[str, Any]:
    """Host ``position``'s config as inventory/testbed.py reads it (the first host's keys, then its own)."""
    return deployer.base if position == 0 else {**deployer.base, **deployer.base["fleet"][position - 1]}


def prometheus(deployer: Deployer, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{deployer.base['monitoring']['port']}{path}"
    response = requests.get(url, params=params, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def query(deployer: Deployer, promql: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = prometheus(deployer, "/api/v1/query", query=promql)["result"]
    return result


def complete(host: TestHost, config: dict[str, Any], tokens: int = 48) -> None:
    """A completion on the host's llama-server (with its key when it has one), to move its counters."""
    key = ""
    if config.get("api_key_file"):
        key = host.run("cat /etc/gpubox/keys/gemma4.key", check=True).stdout.strip()
    response = requests.post(
        f"http://127.0.0.1:{config['port']}/completion",
        json={"prompt": "Count from one to fifty:", "n_predict": tokens, "ignore_eos": True},
        headers={"Authorization": f"Bearer {key}"} if key else {},
        timeout=120,
    )
    response.raise_for_status()


def install_fake_nvidia_smi(host: TestHost) -> None:
    """`nvidia-smi` printing what an H200 printed for the textfile script's query (a CPU host has none)."""
    rows = FIXTURE.read_text()
    script = f"#!/bin/sh\ncase \"$*\" in *--query-gpu=*) printf '%s' {shell_word(rows)} ;; *) exit 9 ;; esac\n"
    host.run(f"printf '%s' {shell_word(script)} > /usr/local/bin/nvidia-smi && chmod 0755 /usr/local/bin/nvidia-smi",
             check=True)


def test_the_fleet_converges_and_every_target_is_up(deployer: Deployer, fleet_hosts: list[TestHost]) -> None:
    # one host at a time: three builds and three smoke tests at once on 2 cores starve each other
    result, _ = deployer.run(FULL, "-y", "--parallel", "1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for host in fleet_hosts:  # after the box deploy: its GPU fact must not see a GPU on a CPU host
        install_fake_nvidia_smi(host)
    # one at a time too: the hosts share one apt archive cache (the packages download once), and apt
    # does not wait for another's lock on it
    result, elapsed = deployer.run(OBSERVE, "-y", "--parallel", "1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    record("observability first converge s (3 hosts, one at a time)", round(elapsed, 1))

    names = [host.pyinfra_host_name() for host in fleet_hosts]
    expected_jobs = {f"{job}@{name}" for name in names for job in ("gemma4", "node")}

    def all_up() -> dict[str, str] | None:
        found = {series["metric"]["job"]: series["value"][1] for series in query(deployer, "up")}
        return found if set(found) >= expected_jobs and all(found[job] == "1" for job in expected_jobs) else None

    up = wait_for("`up` == 1 for every llama-server and node-exporter of the fleet", all_up, timeout_s=90)
    assert set(up) == expected_jobs, up
    # the monitor scrapes itself; each agent lists its own targets, all healthy
    for position in range(1, HOSTS):
        port = host_config(deployer, position)["agent_port"]
        targets = requests.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        assert sorted(target["labels"]["job"] for target in targets) == sorted(
            f"{job}@{names[position]}" for job in ("gemma4", "node")
        )
        assert {target["health"] for target in targets} == {"up"}, targets
    # the key never appears in a config: Prometheus reads a root-owned copy
    monitor_config = deployer.sh("cat /etc/prometheus/gpubox.yml")
    agent_config = fleet_hosts[1].run("cat /etc/prometheus/gpubox.yml", check=True).stdout
    key = fleet_hosts[1].run("cat /etc/gpubox/keys/gemma4.key", check=True).stdout.strip()
    assert "credentials_file: /etc/prometheus/gpubox/gemma4.key" in agent_config
    assert key not in agent_config and key not in monitor_config
    assert fleet_hosts[1].run("stat -c '%U:%G %a' /etc/prometheus/gpubox/gemma4.key", check=True).stdout.strip() == (
        "root:prometheus 640"
    )


def test_speed_acceptance_and_gpu_metrics_reach_the_monitor_with_their_labels(
    deployer: Deployer, fleet_hosts: list[TestHost]
) -> None:
    names = [host.pyinfra_host_name() for host in fleet_hosts]
    for position, host in enumerate(fleet_hosts):
        complete(host, host_config(deployer, position))
    window = "30s"
    speed = (
        f"rate(llamacpp:tokens_predicted_total[{window}]) / rate(llamacpp:tokens_predicted_seconds_total[{window}])"
    )
    acceptance = (
        f"rate(llamacpp:spec_decode_num_accepted_tokens_total[{window}]) / "
        f"rate(llamacpp:spec_decode_num_draft_tokens_total[{window}])"
    )

    def per_host(promql: str) -> Callable[[], dict[str, dict[str, Any]] | None]:
        def probe() -> dict[str, dict[str, Any]] | None:
            found = {series["metric"]["host"]: series for series in query(deployer, promql)
                     if series["value"][1] not in ("NaN", "+Inf")}
            return found if set(found) == set(names) else None

        return probe

    speeds = wait_for("tok/s of every service", per_host(speed), timeout_s=60)
    acceptances = wait_for("acceptance of every service", per_host(acceptance), timeout_s=30)
    for name in names:
        labels = speeds[name]["metric"]
        assert labels["service"] == "gemma4" and labels["gpu"] == "cpu" and labels["spec_type"] == "draft-simple"
        assert labels["model"] == "SmolLM2-135M-Instruct.Q4_1" and labels["kind"] == "llama-server"
        assert float(speeds[name]["value"][1]) > 0
        assert 0 < float(acceptances[name]["value"][1]) <= 1
    rates = {name: round(float(series["value"][1]), 1) for name, series in speeds.items()}
    record("observability tok/s per host (rate over 30 s)", rates)

    # the textfile timer's GPU and unit metrics, from the fake nvidia-smi's real H200 row
    used = wait_for("GPU memory of every host", per_host("gpubox_gpu_memory_used_bytes"), timeout_s=30)
    for name in names:
        assert float(used[name]["value"][1]) == 2575 * 1024 * 1024
        assert used[name]["metric"]["name"] == "NVIDIA H200" and used[name]["metric"]["gpu"] == "0"
    active = per_host('gpubox_unit_active{service="gemma4"}')()
    assert active is not None and {series["value"][1] for series in active.values()} == {"1"}


def test_gpubox_top_and_report_read_the_fleet_from_its_prometheus(
    deployer: Deployer, fleet_hosts: list[TestHost]
) -> None:
    """`gpubox top --once` and `gpubox report` on the live fleet; their output goes to the README."""
    url = f"http://127.0.0.1:{deployer.base['monitoring']['port']}"
    for position, host in enumerate(fleet_hosts):
        complete(host, host_config(deployer, position))
    env = {**os.environ, "GPUBOX_TESTBED_CONFIG": str(deployer.config_path), "COLUMNS": "120"}
    gpubox = str(Path(sys.executable).with_name("gpubox"))
    top = subprocess.run(
        [gpubox, "top", INVENTORY, "--once", "--url", url], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert top.returncode == 0, top.stdout + top.stderr
    header = next(line for line in top.stdout.splitlines() if "tok/s" in line)
    columns = [cell.strip() for cell in re.split("[┃│]", header)]
    rows = [
        dict(zip(columns, (cell.strip() for cell in re.split("[┃│]", line)), strict=False))
        for line in top.stdout.splitlines()
        if "gemma4" in line
    ]
    assert sorted(row["host"] for row in rows) == sorted(host.pyinfra_host_name() for host in fleet_hosts)
    assert {row["up"] for row in rows} == {"up"}, top.stdout
    assert all(float(row["tok/s"]) > 0 for row in rows), top.stdout
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    (REPORT.parent / "observability-top.txt").write_text(top.stdout)
    png = REPORT.parent / "observability-report.png"
    report = subprocess.run(
        [gpubox, "report", INVENTORY, "--since", "10m", "--png", str(png), "--url", url],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout + report.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{HOSTS} tok/s series" in report.stdout, report.stdout


def test_a_second_run_changes_nothing(deployer: Deployer) -> None:
    result, elapsed = deployer.run(OBSERVE, "-y", "-v")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    changed = [name for name, outcome in ops_reporting(result.stdout) if outcome == "Success"]
    assert changed == [], changed
    loads = fact_loads(output)
    # per host: every check's fact, its distro included, in one round trip
    assert loads == ["facts.batch.Facts"] * HOSTS, loads
    record("observability no-op rerun s (3 hosts)", round(elapsed, 1))


def test_a_monitor_with_grafana_gets_the_datasource_and_the_dashboard(deployer: Deployer) -> None:
    """Grafana is not in Debian: its provisioning directory stands for it; the deploy fills it in."""
    deployer.sh("mkdir -p /etc/grafana/provisioning")
    result, _ = deployer.run(OBSERVE, "-y")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    datasource = deployer.sh("cat /etc/grafana/provisioning/datasources/gpubox.yaml")
    assert f"url: http://127.0.0.1:{deployer.base['monitoring']['port']}" in datasource
    assert "gpubox-fleet.json" not in deployer.sh("ls /etc/grafana/provisioning/dashboards")
    assert "/var/lib/grafana/dashboards/gpubox" in deployer.sh("cat /etc/grafana/provisioning/dashboards/gpubox.yaml")
    dashboard = json.loads(deployer.sh("cat /var/lib/grafana/dashboards/gpubox/gpubox-fleet.json"))
    assert dashboard["templating"]["list"][0]["name"] == "host"
    rerun, _ = deployer.run(OBSERVE, "-y", "-v")
    assert [name for name, outcome in ops_reporting(rerun.stdout) if outcome == "Success"] == []


def test_a_dry_run_shows_the_generated_config_diff_and_changes_nothing(deployer: Deployer) -> None:
    before = deployer.file_state("/etc/prometheus/gpubox.yml")
    monitoring = {**deployer.base["monitoring"], "scrape_interval_s": 3}
    result, _ = deployer.run(OBSERVE, "--dry", "--diff", monitoring=monitoring)
    output = plain(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    assert "Will modify /etc/prometheus/gpubox.yml" in output
    assert re.search(r"-\s+scrape_interval: 2s", output) and re.search(r"\+\s+scrape_interval: 3s", output), output
    assert deployer.file_state("/etc/prometheus/gpubox.yml") == before


def test_a_stopped_server_fires_the_down_alert_to_the_webhook_then_resolves(
    deployer: Deployer, fleet_hosts: list[TestHost], webhook: WebhookReceiver
) -> None:
    host, name = fleet_hosts[2], fleet_hosts[2].pyinfra_host_name()
    stopped = time.monotonic()
    host.run("systemctl stop gemma4.service", check=True)

    def notified(status: str, since: float) -> float | None:
        return next(
            (
                at
                for at, alert in webhook.alerts(since)
                if alert["labels"].get("alertname") == "GpuboxServiceDown"
                and alert["labels"].get("host") == name
                and alert["status"] == status
            ),
            None,
        )

    fired = wait_for("a firing GpuboxServiceDown at the webhook", lambda: notified("firing", stopped), timeout_s=120)
    record("observability down alert latency s (stop -> webhook)", round(fired - stopped, 1))
    started = time.monotonic()
    host.run("systemctl start gemma4.service", check=True)
    resolved = wait_for("the resolved notification", lambda: notified("resolved", started), timeout_s=180)
    record("observability resolve latency s (start -> webhook)", round(resolved - started, 1))


def test_decode_slower_than_the_threshold_fires_the_slow_decode_alert(
    deployer: Deployer, fleet_hosts: list[TestHost]
) -> None:
    """The thresholds of the alerts are the smoke test's: set one above what the CPU does, and it fires."""
    result, _ = deployer.run(OBSERVE, "-y", min_tokens_per_second=100000)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    rules = deployer.sh("cat /etc/prometheus/gpubox-rules.yml")
    assert "< 100000" in rules
    names = {host.pyinfra_host_name() for host in fleet_hosts}

    def firing() -> set[str] | None:
        for position, host in enumerate(fleet_hosts):
            complete(host, host_config(deployer, position), tokens=16)
        alerts = prometheus(deployer, "/api/v1/alerts")["alerts"]
        hosts = {
            alert["labels"]["host"]
            for alert in alerts
            if alert["labels"]["alertname"] == "GpuboxSlowDecode" and alert["state"] == "firing"
        }
        return hosts if hosts == names else None

    assert wait_for("GpuboxSlowDecode firing on every host", firing, timeout_s=120, interval_s=2) == names
    result, _ = deployer.run(OBSERVE, "-y")  # back to the box's thresholds
    assert result.returncode == 0


def test_a_monitor_outside_the_inventory_is_refused_before_any_change(deployer: Deployer) -> None:
    before = deployer.file_state("/etc/prometheus/gpubox.yml")
    result, _ = deployer.run(OBSERVE, "-y", monitoring={**deployer.base["monitoring"], "monitor": "nowhere"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "monitoring.monitor" in output and "'nowhere' is not a gpubox host of this inventory" in output
    assert deployer.file_state("/etc/prometheus/gpubox.yml") == before
