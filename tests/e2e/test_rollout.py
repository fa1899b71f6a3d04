"""End to end: `gpubox rollout` of two llama-servers behind the gateway, under load, on three test gateway_fleet.

The fleet of tests/e2e/test_gateway.py (tests/fixtures/inventories/gateway_fleet.py: ``gw`` runs only the
gateway, ``n1`` and ``n2`` a llama-server each, SmolLM2 on the CPU), its settings changed between runs through
``GPUBOX_GATEWAY_FLEET`` (``ctx_sizes``, ``min_tokens_per_second``). In file order, on the same gateway_fleet: one
deploy converges them; ``--dry`` with a changed ctx_size prints the order (n1 the canary, then n2) and touches
nothing; a rollout while another holds the fleet lock is refused naming the holder; with three clients
sending completions through the gateway (streamed and not), a rollout of the new ctx_size restarts each
llama-server once, never leaves the gateway without an UP server and fails no request; a new state whose
smoke test cannot pass stops at the canary, which is rolled back and serves again, the other node never
drained, and no request fails. ``tests/testbed/rollout_load.py`` holds the load and the sampling.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.testbed import TestHost
from tests.testbed.rollout_load import (
    FULL,
    GPUBOX,
    INVENTORY,
    PYINFRA,
    ROOT,
    Load,
    Watch,
    changed,
    client_key,
    failed,
    gateway_url,
    run,
    server_name,
    unit_text,
)

pytestmark = pytest.mark.e2e

NEW_CTX = [4096, 4096]
HOLD_LOCK = """
import sys
from gpubox.rollout_io import FleetLock, PyinfraConnections, this_controller
connections = PyinfraConnections(sys.argv[1])
lock = FleetLock(connections.shell(sys.argv[2]), sys.argv[2], this_controller())
print(lock.acquire(), flush=True)
sys.stdin.readline()
lock.release()
connections.close()
"""


def main_pid(node: TestHost) -> str:
    return node.run("systemctl show -p MainPID --value llama.service", check=True).stdout.strip()


def test_one_deploy_converges_the_fleet(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, TestHost, TestHost]
) -> None:
    result, seconds = run(gateway_fleet_env, PYINFRA, "-y", INVENTORY, FULL, echo=False)
    print(f"converged in {seconds:.0f} s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    for node in gateway_fleet[1:]:
        assert "--ctx-size 2048" in unit_text(node)


def test_dry_shows_the_order_and_touches_nothing(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, TestHost, TestHost]
) -> None:
    gateway, node1, node2 = gateway_fleet
    before = [main_pid(node) for node in (node1, node2)]
    result, _ = run(changed(gateway_fleet_env, ctx_sizes=NEW_CTX), GPUBOX, "rollout", INVENTORY, FULL, "--dry")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any("canary" in line and node1.pyinfra_host_name() in line for line in lines), result.stdout
    batch = [line for line in lines if "│ batch" in line]
    assert len(batch) == 1 and node2.pyinfra_host_name() in batch[0], result.stdout
    assert "2 step(s)" in result.stdout and f"lock on {gateway.pyinfra_host_name()}" in result.stdout
    assert "--dry: nothing was touched" in result.stdout
    assert [main_pid(node) for node in (node1, node2)] == before
    assert all("--ctx-size 2048" in unit_text(node) for node in (node1, node2))
    stat = gateway.run("echo 'show stat' | socat stdio /run/haproxy/gpubox-admin.sock", check=True).stdout
    assert "DRAIN" not in stat and "MAINT" not in stat


def test_a_second_rollout_is_refused_naming_the_holder(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, TestHost, TestHost]
) -> None:
    gateway, node1, node2 = gateway_fleet
    before = [main_pid(node) for node in (node1, node2)]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, INVENTORY, gateway.pyinfra_host_name()], cwd=ROOT, env=gateway_fleet_env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdin is not None
        said = holder.stdout.readline()
        assert "holds the 'rollout' lock" in said, said + (holder.stderr.read() if holder.poll() is not None
                                                           and holder.stderr else "")  # fmt: skip
        result, _ = run(changed(gateway_fleet_env, ctx_sizes=NEW_CTX), GPUBOX, "rollout", INVENTORY, FULL)
        text = " ".join(result.stdout.split())
        assert result.returncode == 2, text[-3000:]
        assert "another rollout of this fleet holds the 'rollout' lock" in text
        assert f"pid {holder.pid}" in text, text[-3000:]
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert [main_pid(node) for node in (node1, node2)] == before


def test_a_rollout_under_load_restarts_each_node_once_and_fails_no_request(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, TestHost, TestHost]
) -> None:
    gateway, node1, node2 = gateway_fleet
    watch = Watch(gateway, (node1, node2)).start()
    load = Load(gateway_url(gateway_fleet_env), client_key(gateway)).start()
    try:
        result, seconds = run(changed(gateway_fleet_env, ctx_sizes=NEW_CTX), GPUBOX, "rollout", INVENTORY, FULL,
                              "--drain-timeout", "120")  # fmt: skip
    finally:
        requests_ = load.stop()
        watch.stop()
    print(f"rollout {seconds:.0f} s, {len(requests_)} requests, pids {watch.pids(0)} {watch.pids(1)}, "
          f"{len(watch.stats)} samples of show stat")  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:]
    assert len(requests_) >= 10
    assert not failed(requests_), failed(requests_)[:5]
    assert watch.restarts(0) == 1 and watch.restarts(1) == 1, (watch.pids(0), watch.pids(1))
    assert watch.unread() <= len(watch.stats) // 10, "show stat could not be read in most samples"
    assert watch.fewest_up() >= 1, [s.statuses for s in watch.stats]
    for node in (node1, node2):  # each was drained once
        assert "DRAIN" in watch.statuses(node) or "MAINT" in " ".join(watch.statuses(node)), watch.statuses(node)
    names = f"{node1.pyinfra_host_name()}, {node2.pyinfra_host_name()}"
    assert f"new state: {names}" in result.stdout and "old state:" not in result.stdout
    assert all("--ctx-size 4096" in unit_text(node) for node in (node1, node2))


def test_a_canary_missing_its_smoke_test_is_rolled_back_and_stops_the_rollout(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, TestHost, TestHost]
) -> None:
    gateway, node1, node2 = gateway_fleet
    bad = changed(gateway_fleet_env, ctx_sizes=[3072, 3072], min_tokens_per_second=[1_000_000, 1_000_000])
    before = main_pid(node2)
    watch = Watch(gateway, (node1, node2)).start()
    load = Load(gateway_url(gateway_fleet_env), client_key(gateway)).start()
    try:
        result, seconds = run(bad, GPUBOX, "rollout", INVENTORY, FULL, "--drain-timeout", "120")
    finally:
        requests_ = load.stop()
        watch.stop()
    print(f"stopped after {seconds:.0f} s, {len(requests_)} requests, pids {watch.pids(0)} {watch.pids(1)}")
    text = " ".join(result.stdout.split())
    assert result.returncode == 1, text[-5000:]
    assert "rolled back" in text and "stopped" in text
    assert f"old state: {node1.pyinfra_host_name()}, {node2.pyinfra_host_name()}" in text
    assert not failed(requests_), failed(requests_)[:5]
    assert "--ctx-size 4096" in unit_text(node1)  # the previous unit, restored
    assert 2 <= watch.restarts(0) <= 3, watch.pids(0)  # the new unit, then the previous one back
    assert watch.restarts(1) == 0 and main_pid(node2) == before
    assert all(status == "UP" for status in watch.statuses(node2)), sorted(set(watch.statuses(node2)))
    assert "DRAIN" in watch.statuses(node1) or any("MAINT" in s for s in watch.statuses(node1))
    assert watch.statuses(node1)[-1] == "UP", watch.statuses(node1)[-5:]  # serving again
    assert watch.fewest_up() >= 1
    assert server_name(node1) in text  # the summary names its backend's drain and ready
