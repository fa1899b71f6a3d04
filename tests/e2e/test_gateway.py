"""End to end: one endpoint in front of two test gateway_fleet that serve one model, through Debian's HAProxy.

Three booted gateway_fleet: ``gw`` runs only the gateway, ``n1`` and ``n2`` a llama-server each (SmolLM2 on the CPU,
a generated key). The inventory is tests/fixtures/inventories/gateway_fleet.py (``GPUBOX_GATEWAY_FLEET``).
In file order, on the same gateway_fleet: one deploy converges the nodes and the gateway (HAProxy from the distro,
its config checked, its unit hardened); a completion through the gateway with the gateway's key reaches a
node, which got the gateway's key for its group (not the client's); both nodes serve; a request without the
key is refused, an unknown model gets a 404; no key appears in the deploy's output; a rerun changes nothing;
a drained backend stays drained across a reload.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import requests

from gpubox.gateway_keys import STORE_ENV
from gpubox.haproxy import ADMIN_SOCKET
from tests.e2e.test_deploy import FULL, PYINFRA, ops_reporting, plain
from tests.testbed import TestHost
from tests.testbed.rollout_load import (
    INVENTORY,
    client_key,
    gateway_url,
    read_stats,
    server_name,
)
from tests.testbed.rollout_load import run as fleet_run

pytestmark = pytest.mark.e2e


def run(gateway_fleet_env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    result, _ = fleet_run(gateway_fleet_env, *argv)
    return result


def url(gateway_fleet_env: dict[str, str]) -> str:
    return gateway_url(gateway_fleet_env)


def group_key(gateway_fleet_env: dict[str, str], gateway: TestHost) -> str:
    return (Path(gateway_fleet_env[STORE_ENV]) / gateway.pyinfra_host_name() / "smol.key").read_text().strip()


DEPLOY_OUTPUT: list[str] = []


def test_one_deploy_converges_the_nodes_and_the_gateway(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, TestHost, TestHost]
) -> None:
    gateway, node1, node2 = gateway_fleet
    result = run(gateway_fleet_env, PYINFRA, "-y", "-v", INVENTORY, FULL)
    output = plain(result.stdout + result.stderr)
    DEPLOY_OUTPUT.append(output)
    journal = gateway.run("journalctl -u haproxy.service --no-pager | tail -n 30").stdout
    assert result.returncode == 0, output[-5000:] + journal
    assert gateway.run("systemctl is-active haproxy.service").stdout.strip() == "active"
    assert gateway.run("systemctl show -p User --value haproxy.service").stdout.strip() == "haproxy"
    key = group_key(gateway_fleet_env, gateway)
    for node in (node1, node2):  # the gateway's key for the group is a line of each node's key file
        lines = node.run("cat /etc/gpubox/keys/llama.key", check=True).stdout.split()
        assert len(lines) == 2 and lines[1] == key and lines[0] != key


def test_a_completion_through_the_gateway_reaches_both_nodes(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, TestHost, TestHost]
) -> None:
    gateway, *_ = gateway_fleet
    headers = {"Authorization": f"Bearer {client_key(gateway)}"}
    body = {"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    answers = [requests.post(f"{url(gateway_fleet_env)}/v1/chat/completions", json=body, headers=headers, timeout=120)
               for _ in range(4)]  # fmt: skip
    assert all(answer.status_code == 200 for answer in answers), [answer.text[:200] for answer in answers]
    assert all(answer.json()["choices"][0]["message"]["content"] for answer in answers)
    prefixed = requests.post(
        f"{url(gateway_fleet_env)}/smol/v1/chat/completions", json=body, headers=headers, timeout=120
    )
    assert prefixed.status_code == 200
    stats = gateway.run("echo 'show stat' | socat stdio /run/haproxy/gpubox-admin.sock", check=True).stdout.splitlines()
    header = stats[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in stats[1:] if line.startswith("group_smol,")]
    served = {row["svname"]: int(row["stot"]) for row in rows if row["svname"] not in ("BACKEND", "FRONTEND")}
    print("requests per node:", served)
    assert len(served) == 2 and all(count >= 1 for count in served.values()), served


def test_the_gateway_refuses_what_it_should(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, ...]
) -> None:
    gateway, *_ = gateway_fleet
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}
    assert requests.post(f"{url(gateway_fleet_env)}/v1/chat/completions", json=body, timeout=30).status_code == 401
    headers = {"Authorization": f"Bearer {client_key(gateway)}"}
    completions = f"{url(gateway_fleet_env)}/v1/chat/completions"
    unknown = requests.post(completions, json={**body, "model": "x"}, headers=headers, timeout=30)
    assert unknown.status_code == 404 and "smol" in unknown.json()["error"]["message"]
    assert requests.get(f"{url(gateway_fleet_env)}/smol/metrics", headers=headers, timeout=30).status_code == 403


def test_no_key_appears_in_the_deploys_output(
    gateway_fleet_env: dict[str, str], gateway_fleet: tuple[TestHost, ...]
) -> None:
    gateway, node1, _ = gateway_fleet
    keys = [client_key(gateway), group_key(gateway_fleet_env, gateway)]
    keys.append(node1.run("head -n1 /etc/gpubox/keys/llama.key", check=True).stdout.strip())
    assert DEPLOY_OUTPUT, "the deploy did not run"
    for key in keys:
        assert key not in DEPLOY_OUTPUT[0]
    assert key not in gateway.run("cat /etc/gpubox/gateway/haproxy.cfg", check=True).stdout


def test_a_rerun_changes_nothing(gateway_fleet_env: dict[str, str]) -> None:
    result = run(gateway_fleet_env, PYINFRA, "-y", "-v", INVENTORY, FULL)
    output = plain(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    changed = [(name, outcome) for name, outcome in ops_reporting(output) if outcome not in ("No changes", "Skipped")]
    assert not changed, f"operations changed on converged gateway_fleet: {changed}"


def test_a_drained_backend_stays_drained_across_a_reload(gateway_fleet: tuple[TestHost, TestHost, TestHost]) -> None:
    """The drop-in's ExecReload saves the servers' state before HAProxy reloads (``server-state-file``)."""
    gateway, node1, _ = gateway_fleet
    server = f"group_smol/{server_name(node1)}"
    admin = f"socat -t 5 stdio UNIX-CONNECT:{ADMIN_SOCKET}"
    gateway.run(f"echo 'set server {server} state drain' | {admin}", check=True)
    try:
        assert read_stats(gateway) is not None and read_stats(gateway)[server_name(node1)] == "DRAIN"  # type: ignore[index]
        gateway.run("systemctl reload haproxy.service", check=True)
        stats = None
        for _ in range(20):  # the new worker answers on the socket once it has loaded
            stats = read_stats(gateway)
            if stats:
                break
            time.sleep(0.5)
        assert stats is not None and stats[server_name(node1)] == "DRAIN", stats
    finally:
        gateway.run(f"echo 'set server {server} state ready' | {admin}", check=True)
