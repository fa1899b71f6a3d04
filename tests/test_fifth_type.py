"""A server type defined outside the product (tests.testbed.static_server) registers from its inventory:
`gpubox check`, `gpubox plan`, `plan --json` and `gpubox monitoring` (separate processes) see it, and its
unit renders, with no product edit. The deploy, smoke test and scrape on a host: tests/e2e/test_fifth_type.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from gpubox.unit import render_unit
from tests.testbed.static_server import StaticServer

ROOT = Path(__file__).resolve().parent.parent
INVENTORY = "tests/fixtures/inventories/fifth_type.py"


def gpubox(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from gpubox.cli import main; raise SystemExit(main())", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_check_shows_the_fifth_type() -> None:
    result = gpubox("check", INVENTORY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "static-http" in result.stdout and "serves /srv/static" in result.stdout


def test_plan_and_plan_json_price_it_on_no_gpu() -> None:
    assert gpubox("plan", INVENTORY).returncode == 0
    result = gpubox("plan", "--json", INVENTORY)
    assert result.returncode == 0, result.stderr
    (host,) = json.loads(result.stdout)["hosts"]
    assert host["fits"] and host["problems"] == [] and host["gpus"][0]["services"] == []


def test_monitoring_scrapes_its_metrics(tmp_path: Path) -> None:
    result = gpubox("monitoring", "--out", str(tmp_path), INVENTORY)
    assert result.returncode == 0, result.stdout + result.stderr
    config = tmp_path / "fifth" / "etc" / "prometheus" / "gpubox.yml"
    jobs = {job["job_name"]: job for job in yaml.safe_load(config.read_text())["scrape_configs"]}
    labels = jobs["static@fifth"]["static_configs"][0]["labels"]
    assert labels == {"host": "fifth", "kind": "static-http", "service": "static", "directory": "/srv/static"}


def test_its_unit_runs_python_without_an_install() -> None:
    server = StaticServer(name="static", directory="/srv/static")
    unit = render_unit(server, server.binary(None))
    assert "ExecStart=/usr/bin/python3 \\\n    -m http.server" in unit
    assert "--directory /srv/static 8099" in unit and "PrivateDevices=yes" in unit


def test_the_deploy_reads_no_help_and_checks_it_is_ready() -> None:
    """A type without an install: no --help read (no build pins it), and the smoke test is its readiness."""
    from gpubox import Box
    from operations import service, smoke

    server = StaticServer(name="static", directory="/srv/static")
    reads = [fact.__name__ for fact, _ in service.facts_read(server, None)]
    assert "ServerOptions" not in reads and "LlamaServerFlags" not in reads
    probed = [arguments["probes"] for fact, arguments in service.facts_read(server, None) if "probes" in arguments]
    assert [probe.unit_name for probes in probed for probe in probes] == [server.unit_name]  # its stale probe
    assert server.smoke_tested and server.SMOKE_KIND == "ready" and server.generated_key_file is None
    assert smoke.round_trip_pair(Box(services=(server,))) is None
