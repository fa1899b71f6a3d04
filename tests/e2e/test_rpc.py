"""End to end: one model across two test hosts through llama.cpp's RPC server.

``helper`` runs ``ggml-rpc-server`` on its CPU; ``client``'s llama-server puts every layer there
(``--rpc``, ``--tensor-split 1``, ``--fit off``). The inventory is tests/fixtures/inventories/rpc_pair.py,
pointed at the two booted hosts by ``GPUBOX_RPC_PAIR``. In file order, on the same two hosts: a run
``--limit``ed to the client is refused with nothing changed; the deploy converges the RPC server first and
checks it listens, then the client, whose log shows the RPC buffers and whose smoke test passes while the
helper's process holds about the model; a rerun changes nothing; a changed RPC server restarts its client;
the observability deploy (the client is the monitor, and its blackbox exporter probes the helper's RPC
endpoint) finds everything up with no RPC alert; with the RPC server stopped a request fails, the client's
unit keeps restarting and GpuboxRpcDeviceUnreachable fires naming the client's llama-server; once the RPC
server is back the client serves again and the alert resolves.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpubox.bench import free_port
from gpubox.vram import parse_memory_breakdown
from tests.e2e.conftest import CCACHE_MOUNT, LLAMA_REPO_MOUNT
from tests.e2e.test_deploy import FULL, PYINFRA, ROOT, ops_reporting, plain, record
from tests.e2e.test_observability import APT_ARCHIVES, OBSERVE, wait_for
from tests.testbed import TestHost, booted_host, cache_dir

pytestmark = pytest.mark.e2e

INVENTORY = "tests/fixtures/inventories/rpc_pair.py"
PAIR_KEY = "GPUBOX_RPC_PAIR"
ALERT = "GpuboxRpcDeviceUnreachable"
DOWN_FOR_S = 4


@pytest.fixture(scope="module")
def pair(
    can_boot_hosts: None, llama_repo: tuple[Path, str], shared_ccache: Path
) -> Iterator[tuple[TestHost, TestHost]]:
    """Two booted hosts (client, helper), each with the llama.cpp repo, the shared ccache and the shared apt
    archive cache (Prometheus' packages download once)."""
    repo, _ = llama_repo
    archives = cache_dir() / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    binds = {
        "binds_ro": [(repo, LLAMA_REPO_MOUNT)],
        "binds": [(shared_ccache, CCACHE_MOUNT), (archives, APT_ARCHIVES)],
    }
    with booted_host(**binds) as client, booted_host(**binds) as helper:  # type: ignore[arg-type]
        yield client, helper


@pytest.fixture(scope="module")
def environment(pair: tuple[TestHost, TestHost], llama_repo: tuple[Path, str], smollm2: Path) -> dict[str, str]:
    import hashlib

    client, helper = pair
    def ports() -> dict[str, int]:  # the hosts share the controller's network: every listener its own port
        return {"node_exporter_port": free_port(), "agent_port": free_port(), "blackbox_port": free_port()}

    booted = {
        "client": {"name": client.pyinfra_host_name(), "data": client.pyinfra_host_data(), "monitoring": ports()},
        "helper": {"name": helper.pyinfra_host_name(), "data": helper.pyinfra_host_data(), "monitoring": ports()},
        "repo": LLAMA_REPO_MOUNT,
        "commit": llama_repo[1],
        "ccache_dir": CCACHE_MOUNT,
        "model_source": str(smollm2),
        "model_sha256": hashlib.sha256(smollm2.read_bytes()).hexdigest(),
        "llama_port": free_port(),
        "rpc_port": free_port(),
        "threads": 2,
        "fleet_monitoring": {
            "port": free_port(),
            "alertmanager_port": free_port(),
            "scrape_interval_s": 2,
            "evaluation_interval_s": 2,
            "down_for_s": DOWN_FOR_S,
        },
    }
    return {**os.environ, PAIR_KEY: json.dumps(booted), "COLUMNS": "200"}


def run(environment: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1800, check=False)
    print(result.stdout[-6000:], result.stderr[-8000:], sep="\n")
    return result


def setting(environment: dict[str, str], key: str) -> object:
    return json.loads(environment[PAIR_KEY])[key]


def main_pid(host: TestHost, unit: str) -> str:
    return host.run(f"systemctl show --property MainPID --value {unit}", check=True).stdout.strip()


def completion(client: TestHost, port: object) -> subprocess.CompletedProcess[str]:
    body = json.dumps({"prompt": "The capital of France is", "n_predict": 8})
    return client.run(
        f"curl -s -m 60 -o /dev/null -w '%{{http_code}}' -H 'Content-Type: application/json' "
        f"-d '{body}' http://127.0.0.1:{port}/completion"
    )


def prometheus(environment: dict[str, str], path: str, **params: str) -> Any:
    port = json.loads(environment[PAIR_KEY])["fleet_monitoring"]["port"]
    response = requests.get(f"http://127.0.0.1:{port}{path}", params=params, timeout=10)
    response.raise_for_status()
    return response.json()["data"]


def rpc_alerts(environment: dict[str, str], state: str | None = None) -> list[dict[str, Any]]:
    """The GpuboxRpcDeviceUnreachable alerts Prometheus has (pending or firing; only ``state``'s if given)."""
    alerts: list[dict[str, Any]] = prometheus(environment, "/api/v1/alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == ALERT and state in (None, a["state"])]


def exec_start(unit: str) -> str:
    """The unit's command line as one shell line (its ExecStart= continuation lines joined)."""
    lines = unit[unit.index("ExecStart=") + len("ExecStart=") :].splitlines()
    words: list[str] = []
    for line in lines:
        words.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(words)


def buffers_log(client: TestHost, unit: str) -> str:
    """The client's llama-server log at verbosity 4 (its buffer lines), run by hand while its unit is stopped."""
    command = exec_start(unit)
    client.run("systemctl stop llama.service", check=True)
    try:
        return client.run(
            f"{command} -lv 4 > /tmp/buffers.log 2>&1 & server=$!; "
            "for i in $(seq 240); do grep -q 'model loaded' /tmp/buffers.log && break; sleep 0.5; done; "
            "kill $server; wait $server || true; cat /tmp/buffers.log",
            check=True,
        ).stdout
    finally:
        client.run("systemctl start llama.service", check=True)


def test_a_run_limited_to_the_client_is_refused(environment: dict[str, str], pair: tuple[TestHost, TestHost]) -> None:
    client, _ = pair
    result = run(environment, PYINFRA, "-y", INVENTORY, FULL, "--limit", client.pyinfra_host_name())
    output = plain(result.stdout + result.stderr)
    assert result.returncode != 0
    assert "which this run leaves out" in output and f"--limit {client.pyinfra_host_name()}" in output, output[-3000:]
    assert client.run("test -e /etc/systemd/system/llama.service").returncode != 0, "the refused run wrote a unit"


def test_the_deploy_converges_the_rpc_server_first(
    environment: dict[str, str], pair: tuple[TestHost, TestHost]
) -> None:
    client, helper = pair
    result = run(environment, PYINFRA, "-y", INVENTORY, FULL)
    output = plain(result.stdout + result.stderr)
    assert result.returncode == 0, output[-5000:]
    listening = output.find("smoke rpc0.service: listening on port")
    assert listening >= 0, output[-3000:]
    assert "passed" in output[listening : output.find("\n", listening)]
    client_smoke = output.find("smoke llama.service:")
    assert client_smoke > listening, "the client was smoke-tested before its RPC server listened"
    assert "passed" in output[client_smoke : output.find("\n", client_smoke)], output[client_smoke - 2000 :]

    assert helper.run("systemctl is-active rpc0.service").stdout.strip() == "active"
    unit = client.run("cat /etc/systemd/system/llama.service", check=True).stdout
    rpc_port = setting(environment, "rpc_port")
    assert f"--rpc 127.0.0.1:{rpc_port}" in unit and "--tensor-split 1" in unit and "--fit off" in unit
    helper_unit = helper.run("cat /etc/systemd/system/rpc0.service", check=True).stdout
    assert "ggml-rpc-server" in helper_unit and "CacheDirectory=gpubox-rpc/rpc0" in helper_unit

    # The helper's process holds about the model; the client's command line, run by hand at log verbosity 4
    # (the unit stopped: the RPC server serves one client), logs the RPC device's buffers.
    model_bytes = Path(str(setting(environment, "model_source"))).stat().st_size
    pid = main_pid(helper, "rpc0.service")
    rss_kib = int(helper.run(f"ps -o rss= -p {pid}", check=True).stdout.split()[0])
    assert rss_kib * 1024 > 0.7 * model_bytes, f"ggml-rpc-server holds {rss_kib} KiB for a {model_bytes}-byte model"
    log = buffers_log(client, unit)
    breakdown = parse_memory_breakdown(log)
    rpc_model = breakdown.total("model", "RPC0")
    assert rpc_model * 2**20 > 0.7 * model_bytes, f"RPC0 model buffers {rpc_model} MiB: {breakdown.lines}"
    print(f"RPC0 model buffer {rpc_model:.1f} MiB; ggml-rpc-server RSS {rss_kib / 1024:.1f} MiB; model "
          f"{model_bytes / 2**20:.1f} MiB")


def test_a_rerun_changes_nothing(environment: dict[str, str], pair: tuple[TestHost, TestHost]) -> None:
    client, helper = pair
    pids = (main_pid(client, "llama.service"), main_pid(helper, "rpc0.service"))
    result = run(environment, PYINFRA, "-y", "-v", INVENTORY, FULL)
    output = plain(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    changed = [(name, outcome) for name, outcome in ops_reporting(output) if outcome not in ("No changes", "Skipped")]
    assert not changed, f"operations changed on converged hosts: {changed}"
    assert (main_pid(client, "llama.service"), main_pid(helper, "rpc0.service")) == pids


def test_a_changed_rpc_server_restarts_its_client(environment: dict[str, str], pair: tuple[TestHost, TestHost]) -> None:
    client, helper = pair
    before = (main_pid(client, "llama.service"), main_pid(helper, "rpc0.service"))
    booted = json.loads(environment[PAIR_KEY])
    changed = {**environment, PAIR_KEY: json.dumps({**booted, "threads": 1})}
    dry = run(changed, PYINFRA, "--dry", "--diff", INVENTORY, FULL)
    dry_output = plain(dry.stdout + dry.stderr)
    assert dry.returncode == 0, dry_output[-4000:]
    assert "llama.service restarts if rpc0@" in dry_output, "the dry run does not say the client restarts with it"
    result = run(changed, PYINFRA, "-y", INVENTORY, FULL)
    output = plain(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    after = (main_pid(client, "llama.service"), main_pid(helper, "rpc0.service"))
    assert after[1] != before[1], "the RPC server did not restart"
    assert after[0] != before[0], "its client did not restart with it"
    assert re.search(r"smoke llama\.service: .*passed", output), output[-3000:]
    assert "--threads 1" in helper.run("cat /etc/systemd/system/rpc0.service", check=True).stdout


def test_the_observability_deploy_probes_the_rpc_server_from_the_client(
    environment: dict[str, str], pair: tuple[TestHost, TestHost]
) -> None:
    client, helper = pair
    name = client.pyinfra_host_name()
    # one host at a time: the hosts share one apt archive cache, and apt does not wait for another's lock on it
    result = run(environment, PYINFRA, "-y", "--parallel", "1", INVENTORY, OBSERVE)
    assert result.returncode == 0, plain(result.stdout + result.stderr)[-4000:]
    assert client.run("systemctl is-active prometheus-blackbox-exporter.service").stdout.strip() == "active"
    assert helper.run("systemctl is-active prometheus-blackbox-exporter.service").stdout.strip() != "active"
    rules = [rule for group in prometheus(environment, "/api/v1/rules")["groups"] for rule in group["rules"]]
    rpc_rules = [rule for rule in rules if rule["name"] == ALERT]
    assert len(rpc_rules) == 1 and rpc_rules[0]["labels"]["service"] == "llama", rpc_rules

    def scraped() -> dict[str, str] | None:
        found = {series["metric"]["job"]: series["value"][1] for series in prometheus(
            environment, "/api/v1/query", query="up")["result"]}  # fmt: skip
        probe = [job for job in found if job.startswith("rpc-probe:")]
        return found if all(found.get(job) == "1" for job in [*jobs, *probe[:1]]) and probe else None

    # the helper's node-exporter through its agent, which writes to the client's Prometheus
    jobs = (f"llama@{name}", f"node@{name}", f"node@{helper.pyinfra_host_name()}")
    up = wait_for("the client's llama-server, its RPC probe and both node-exporters scraped", scraped, timeout_s=90)
    assert set(up) == {*jobs, f"rpc-probe:rpc0@{helper.pyinfra_host_name()}/llama@{name}"}, up
    # the llama-server up holds the RPC server's one connection: no probe gets in, and that alerts nothing
    time.sleep(2 * DOWN_FOR_S)
    assert rpc_alerts(environment) == [], rpc_alerts(environment)


def test_the_client_recovers_when_the_rpc_server_comes_back(
    environment: dict[str, str], pair: tuple[TestHost, TestHost]
) -> None:
    """And GpuboxRpcDeviceUnreachable fires (after Monitoring.down_for_s) naming the client's llama-server,
    and resolves once it serves again."""
    client, helper = pair
    name, port = client.pyinfra_host_name(), setting(environment, "llama_port")
    restarts_before = int(client.run("systemctl show --property NRestarts --value llama.service").stdout or 0)
    stopped = time.monotonic()
    helper.run("systemctl stop rpc0.service", check=True)
    try:
        answer = completion(client, port)
        assert answer.stdout.strip() != "200", "a request succeeded with the RPC server down"
        firing = wait_for(f"{ALERT} firing", lambda: rpc_alerts(environment, "firing"), timeout_s=120)
        fired_after = time.monotonic() - stopped
        assert len(firing) == 1, firing
        labels, annotations = firing[0]["labels"], firing[0]["annotations"]
        assert labels["host"] == name and labels["service"] == "llama", labels
        assert labels["rpc"] == f"rpc0@{helper.pyinfra_host_name()}", labels
        assert f"llama@{name}" in annotations["summary"], annotations
        deadline = time.monotonic() + 60
        restarts = restarts_before
        while time.monotonic() < deadline and restarts < restarts_before + 2:
            time.sleep(2)
            restarts = int(client.run("systemctl show --property NRestarts --value llama.service").stdout or 0)
        assert restarts >= restarts_before + 2, f"llama.service restarted {restarts - restarts_before} times"
        assert rpc_alerts(environment, "firing"), "the alert stopped firing while the RPC server was still down"
    finally:
        started = time.monotonic()
        helper.run("systemctl start rpc0.service", check=True)
    deadline = time.monotonic() + 120
    status = ""
    while time.monotonic() < deadline:
        status = completion(client, port).stdout.strip()
        if status == "200":
            break
        time.sleep(2)
    assert status == "200", f"the client never served again after its RPC server came back: {status!r}"
    served_after = time.monotonic() - started
    wait_for(f"{ALERT} resolved", lambda: not rpc_alerts(environment) or None, timeout_s=60)
    resolved_after = time.monotonic() - started
    print(f"{ALERT}: fired {fired_after:.1f} s after rpc0 stopped (down_for_s {DOWN_FOR_S}); the client served "
          f"{served_after:.1f} s and the alert resolved {resolved_after:.1f} s after rpc0 started")
    record("rpc alert fired s (rpc0 stopped -> firing)", round(fired_after, 1))
    record("rpc alert resolved s (rpc0 started -> resolved)", round(resolved_after, 1))
