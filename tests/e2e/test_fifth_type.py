"""End to end: the fifth, throwaway server type (tests.testbed.static_server: ``python3 -m http.server``,
no install, scraped) on a booted test host, with no product edit.

Its inventory (tests/fixtures/inventories/fifth_type.py) registers the type and is pointed at the host by
``GPUBOX_FIFTH_TYPE_HOST``. `gpubox check` and `gpubox plan` see it; the box deploy writes and starts its
unit and checks it is ready (``GET /health``: its type has no smoke test of its own); a rerun changes
nothing; the observability deploy scrapes its ``/metrics``, and Prometheus finds the target up. The tests
run in file order on one host, as tests/e2e/test_deploy.py's do.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gpubox.bench import free_port
from gpubox.quoting import shell_word
from tests.e2e.conftest import CCACHE_MOUNT, LLAMA_REPO_MOUNT
from tests.e2e.test_deploy import FULL, PYINFRA, ROOT, ops_reporting, plain
from tests.e2e.test_observability import APT_ARCHIVES, OBSERVE
from tests.testbed import TestHost, booted_host, cache_dir

pytestmark = pytest.mark.e2e

INVENTORY = "tests/fixtures/inventories/fifth_type.py"
METRICS = "# TYPE static_files gauge\nstatic_files 2\n"


@pytest.fixture(scope="module")
def fifth_host(can_boot_hosts: None, llama_repo: tuple[Path, str], shared_ccache: Path) -> Iterator[TestHost]:
    """A booted host with the shared apt archive cache (Prometheus' packages download once) and the static
    server's directory: ``health`` and ``metrics`` files."""
    archives = cache_dir() / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    with booted_host(
        binds_ro=[(llama_repo[0], LLAMA_REPO_MOUNT)],
        binds=[(shared_ccache, CCACHE_MOUNT), (archives, APT_ARCHIVES)],
    ) as host:
        health, metrics = shell_word("ok\n"), shell_word(METRICS)
        files = f"printf %s {health} > /srv/static/health && printf %s {metrics} > /srv/static/metrics"
        host.run(f"mkdir -p /srv/static && {files} && chmod -R a+rX /srv/static", check=True)
        yield host


@pytest.fixture(scope="module")
def environment(fifth_host: TestHost) -> dict[str, str]:
    """The environment that points the fifth type's inventory at the booted host (which shares the
    controller's network: every listener gets a free port)."""
    booted = {
        "name": fifth_host.pyinfra_host_name(),
        "data": fifth_host.pyinfra_host_data(),
        "port": free_port(),
        "monitoring": {"node_exporter_port": free_port(), "agent_port": free_port()},
        "fleet_monitoring": {"port": free_port(), "alertmanager_port": free_port(), "scrape_interval_s": 2},
    }
    return {**os.environ, "GPUBOX_FIFTH_TYPE_HOST": json.dumps(booted), "COLUMNS": "200"}


def run(environment: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1800, check=False)
    print(result.stdout[-6000:], result.stderr[-8000:], sep="\n")
    return result


def gpubox(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run(environment, sys.executable, "-c", "from gpubox.cli import main; raise SystemExit(main())", *args)


def port(environment: dict[str, str], key: str, field: str | None = None) -> int:
    booted = json.loads(environment["GPUBOX_FIFTH_TYPE_HOST"])
    return int(booted[key] if field is None else booted[key][field])


def test_check_and_plan_see_the_type(environment: dict[str, str]) -> None:
    check = gpubox(environment, "check", INVENTORY)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "static-http" in check.stdout and "serves /srv/static" in check.stdout
    plan = gpubox(environment, "plan", INVENTORY)
    assert plan.returncode == 0, plan.stdout + plan.stderr


def test_the_deploy_starts_it_and_checks_it_is_ready(environment: dict[str, str], fifth_host: TestHost) -> None:
    result = run(environment, PYINFRA, "-y", INVENTORY, FULL)
    output = plain(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    assert "smoke static.service: GET /health: passed" in output
    assert fifth_host.run("systemctl is-active static.service").stdout.strip() == "active"
    unit = fifth_host.run("cat /etc/systemd/system/static.service", check=True).stdout
    assert "ExecStart=/usr/bin/python3" in unit and f"--directory /srv/static {port(environment, 'port')}" in unit
    served = fifth_host.run(f"curl -sf http://127.0.0.1:{port(environment, 'port')}/metrics", check=True).stdout
    assert served == METRICS


def test_a_rerun_changes_nothing(environment: dict[str, str], fifth_host: TestHost) -> None:
    pid = fifth_host.run("systemctl show --property MainPID --value static.service", check=True).stdout.strip()
    result = run(environment, PYINFRA, "-y", "-v", INVENTORY, FULL)
    output = plain(result.stdout + result.stderr)
    assert result.returncode == 0, output[-4000:]
    outcomes = ops_reporting(result.stdout + result.stderr)
    assert outcomes, "no operations reported"
    changed = [(name, outcome) for name, outcome in outcomes if outcome not in ("No changes", "Skipped")]
    assert not changed, f"operations changed on a converged host: {changed}"
    assert "smoke static.service" not in output
    again = fifth_host.run("systemctl show --property MainPID --value static.service", check=True).stdout.strip()
    assert again == pid


def test_observability_scrapes_its_metrics(environment: dict[str, str], fifth_host: TestHost) -> None:
    name, target = fifth_host.pyinfra_host_name(), f"127.0.0.1:{port(environment, 'port')}"
    planned = run(environment, PYINFRA, "--dry", "--diff", INVENTORY, OBSERVE)
    output = plain(planned.stdout + planned.stderr)
    assert planned.returncode == 0, output[-4000:]
    assert f"static@{name}" in output and target in output, "the scrape config names no static target"

    result = run(environment, PYINFRA, "-y", INVENTORY, OBSERVE)
    assert result.returncode == 0, plain(result.stdout + result.stderr)[-4000:]
    prometheus = f"http://127.0.0.1:{port(environment, 'fleet_monitoring', 'port')}/api/v1/query"
    deadline = time.monotonic() + 90
    up: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            answer = requests.get(prometheus, params={"query": f'up{{job="static@{name}"}}'}, timeout=5).json()
            up = answer["data"]["result"]
            if up and up[0]["value"][1] == "1":  # type: ignore[index]
                break
        time.sleep(2)
    assert up and up[0]["value"][1] == "1", f"Prometheus never found static@{name} up: {up}"  # type: ignore[index]
    labels = up[0]["metric"]
    assert labels["kind"] == "static-http" and labels["directory"] == "/srv/static", labels  # type: ignore[index]
