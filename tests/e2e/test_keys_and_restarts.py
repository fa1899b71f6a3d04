"""End to end on one booted host that monitors itself: keys, refusals and restarts.

- A service's API key turned on, then rotated (its key file deleted), with the box deploy only: the
  host's Prometheus scrapes gemma4 again within a few scrape intervals, observability.py never rerun.
- A model source missing on the controller: one message naming the field, nothing changed, no traceback.
- `kill -TERM` of each server (llama-server, whisper-server, piper): systemd brings it back; the time
  until it answers again is recorded.

The tests run in file order on one host, as one chain (see tests/e2e/test_deploy.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from gpubox.bench import free_port
from tests.e2e.conftest import CCACHE_MOUNT, LLAMA_REPO_MOUNT
from tests.e2e.test_deploy import FULL, Deployer, make_deployer, ops_reporting, plain, record
from tests.e2e.test_observability import APT_ARCHIVES, OBSERVE, wait_for
from tests.testbed import TestHost, booted_host, cache_dir
from tests.testbed.speech import WHISPER_REPO_MOUNT, speech_config
from tests.testbed.whisper_assets import whisper_cpp_repo

pytestmark = pytest.mark.e2e

KEY = "/etc/gpubox/keys/gemma4.key"
COPY = "/etc/prometheus/gpubox/gemma4.key"
CONFIG = "/etc/prometheus/gpubox.yml"
UNIT = "/etc/systemd/system/gemma4.service"
SCRAPE_INTERVAL_S = 2
UP_WITHIN_S = 6 * SCRAPE_INTERVAL_S  # the reload, then a scrape or two


@pytest.fixture(scope="module")
def host(can_boot_hosts: None, llama_repo: tuple[Path, str], shared_ccache: Path) -> Iterator[TestHost]:
    whisper_repo, _ = whisper_cpp_repo()
    archives = cache_dir() / "apt-archives"  # Prometheus' packages, downloaded once for every e2e module
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    with booted_host(
        binds_ro=[(llama_repo[0], LLAMA_REPO_MOUNT), (whisper_repo, WHISPER_REPO_MOUNT)],
        binds=[(shared_ccache, CCACHE_MOUNT), (archives, APT_ARCHIVES)],
    ) as booted:
        yield booted


@pytest.fixture(scope="module")
def deployer(host: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Deployer:
    """The seed's three services on one host that is its own monitor, scraping every 2 s."""
    monitoring = {
        "monitor": host.pyinfra_host_name(),
        "port": free_port(),
        "scrape_interval_s": SCRAPE_INTERVAL_S,
        "evaluation_interval_s": SCRAPE_INTERVAL_S,
    }
    return make_deployer(
        host,
        tmp_path_factory,
        **speech_config(),
        node_exporter_port=free_port(),
        agent_port=free_port(),
        monitoring=monitoring,
    )


def instant(text: str) -> datetime:
    """Prometheus' RFC 3339 time (nanoseconds, `Z`) as an aware datetime."""
    match = re.fullmatch(r"(?P<base>[^.Z+]+)(?P<fraction>\.\d+)?(?P<zone>Z|[+-]\d\d:\d\d)", text)
    assert match, text
    zone = "+00:00" if match["zone"] == "Z" else match["zone"]
    return datetime.fromisoformat(match["base"] + (match["fraction"] or "")[:7] + zone)


def gemma4_target(deployer: Deployer) -> dict[str, Any] | None:
    """Prometheus' view of the gemma4 scrape target; None while Prometheus (re)starts or has not found it."""
    url = f"http://127.0.0.1:{deployer.base['monitoring']['port']}/api/v1/targets"
    try:
        targets = requests.get(url, timeout=10).json()["data"]["activeTargets"]
    except requests.RequestException:
        return None
    job = f"gemma4@{deployer.host.pyinfra_host_name()}"
    return next((target for target in targets if target["labels"]["job"] == job), None)


def wait_scraped_up_after(deployer: Deployer, since: datetime, timeout_s: float) -> tuple[dict[str, Any], float]:
    """The gemma4 target once a scrape that started after ``since`` succeeded, and the seconds that took."""

    def probe() -> dict[str, Any] | None:
        target = gemma4_target(deployer)
        if target is None or target["health"] != "up":
            return None
        return target if instant(target["lastScrape"]) > since else None

    target = wait_for("an `up` scrape of gemma4 after the deploy", probe, timeout_s=timeout_s, interval_s=0.5)
    return target, (instant(target["lastScrape"]) - since).total_seconds()


def outcomes(output: str) -> dict[str, str]:
    return dict(ops_reporting(plain(output)))


def assert_no_traceback(output: str) -> None:
    for noise in ("Traceback", "<Greenlet", "Unexpected error in Python callback", "An internal exception"):
        assert noise not in output, output[-4000:]


def test_the_box_and_its_monitoring_converge_without_a_key(deployer: Deployer) -> None:
    result, _ = deployer.run(FULL, "-y")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    result, _ = deployer.run(OBSERVE, "-y")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    target, _ = wait_scraped_up_after(deployer, datetime.now(UTC), timeout_s=60)
    assert "authorization" not in deployer.sh(f"cat {CONFIG}")
    assert target["health"] == "up"


def test_turning_the_key_on_with_the_box_deploy_keeps_the_target_up(deployer: Deployer) -> None:
    deployer.base = {**deployer.base, "api_key_file": "generate"}  # from here on, gemma4 has a key
    result, _ = deployer.run(FULL, "-y")
    ended = datetime.now(UTC)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    done = outcomes(output)
    assert done.get("Scrape keys | Scrape key of gemma4") == "Success", done
    assert done.get("Scrape keys | Prometheus server config") == "Success", done
    assert done.get("Scrape keys | Reload prometheus.service (new scrape keys)") == "Success", done
    target, seconds = wait_scraped_up_after(deployer, ended, timeout_s=UP_WITHIN_S)
    assert target["lastError"] == ""
    key = deployer.sh(f"cat {KEY}")
    assert deployer.sh(f"cat {COPY}") == key
    config = deployer.sh(f"cat {CONFIG}")
    assert f"credentials_file: {COPY}" in config and key not in config
    assert deployer.sh(f"stat -c '%U:%G %a' {COPY}") == "root:prometheus 640"
    record("key turned on: gemma4 scraped up again s after the box deploy", round(seconds, 1))


def test_rotating_the_key_with_the_box_deploy_keeps_the_target_up(deployer: Deployer) -> None:
    old = deployer.sh(f"cat {KEY}")
    deployer.sh(f"rm {KEY}")
    result, _ = deployer.run(FULL, "-y")
    ended = datetime.now(UTC)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    new = deployer.sh(f"cat {KEY}")
    assert new != old
    assert deployer.sh(f"cat {COPY}") == new
    done = outcomes(output)
    assert done.get("Scrape keys | Scrape key of gemma4") == "Success", done
    assert done.get("Scrape keys | Prometheus server config") == "No changes", done  # the config names the copy
    target, seconds = wait_scraped_up_after(deployer, ended, timeout_s=UP_WITHIN_S)
    assert target["lastError"] == ""
    record("key rotated: gemma4 scraped up again s after the box deploy", round(seconds, 1))


def test_a_rerun_reads_the_host_once_and_changes_nothing(deployer: Deployer) -> None:
    result, _ = deployer.run(FULL, "-y", "-v")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    loads = re.findall(r"Loaded fact (\S+)(?: \((.*?)\))?", plain(output))
    # The scrape keys' checks are read with the box's, in its one batch. The service's own key check
    # (operations/service.py `api_key`) reads its key file's stat on its own, at planning and at execution.
    assert [name for name, arguments in loads if (name, arguments) != ("files.File", f"path={KEY}")] == [
        "facts.batch.Facts"
    ], loads
    batch = plain(output)
    for read in (f"('files.FileContents', (('path', '{CONFIG}'),))", f"('files.Sha1File', (('path', '{COPY}'),))"):
        assert read in batch
    changed = {name: outcome for name, outcome in outcomes(output).items() if outcome not in ("No changes", "Skipped")}
    assert not changed, changed


def test_a_model_source_missing_on_the_controller_is_refused_by_field_before_anything_changes(
    deployer: Deployer,
) -> None:
    before = (deployer.file_state(UNIT), deployer.main_pid())
    gone = "/nonexistent/models/gone.gguf"
    result, _ = deployer.run(FULL, "-y", model_source=gone, model_sha256="b" * 64)
    output = plain(result.stdout + result.stderr)
    assert result.returncode != 0
    assert_no_traceback(output)
    assert "the host lacks 2 model(s) whose source is not on this machine; nothing was changed" in output
    for field in ("services.0.model.source", "services.0.model_draft.source"):
        assert f"    {field}: {gone} is not a file on this machine (the controller)" in output, output[-4000:]
    assert "Beginning operation run" not in output  # refused while the deploy loaded
    assert (deployer.file_state(UNIT), deployer.main_pid()) == before


RESTART_PROBE = r"""
unit={unit}; url={url}
pid=$(systemctl show -p MainPID --value "$unit"); restarts=$(systemctl show -p NRestarts --value "$unit")
start=$(date +%s.%N)
kill -TERM "$pid"
deadline=$(( $(date +%s) + 300 ))
while :; do
  now=$(systemctl show -p MainPID --value "$unit")
  if [ "$now" != 0 ] && [ "$now" != "$pid" ] && curl -sf -o /dev/null --max-time 2 "$url"; then break; fi
  [ "$(date +%s)" -lt "$deadline" ] || {{ echo "never came back"; exit 1; }}
  sleep 0.1
done
end=$(date +%s.%N)
echo "$pid $now $restarts $(systemctl show -p NRestarts --value "$unit") $start $end"
"""


@pytest.mark.parametrize(
    ("unit", "port_key", "path"),
    [("gemma4.service", "port", "/health"), ("whisper.service", "whisper_port", "/health"),
     ("piper.service", "piper_port", "/info")],
)  # fmt: skip
def test_kill_term_of_a_server_brings_it_back(deployer: Deployer, unit: str, port_key: str, path: str) -> None:
    url = f"http://127.0.0.1:{deployer.base[port_key]}{path}"
    deployer.wait_healthy(deployer.base["port"])  # gemma4 serves: no restart left over from a test before
    result = deployer.host.run(RESTART_PROBE.format(unit=unit, url=url), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    old_pid, new_pid, restarts_before, restarts_after, start, end = result.stdout.split()
    assert new_pid != old_pid
    assert int(restarts_after) == int(restarts_before) + 1  # systemd restarted it (Restart=always), no one else
    exit_line = deployer.sh(
        f"journalctl -u {unit} --no-pager -o cat -n 40 | grep -E 'Main process exited|Deactivated|Scheduled restart' "
        "| tail -n 2 | tr '\\n' ' '"
    )
    seconds = round(float(end) - float(start), 1)
    record(f"kill -TERM {unit}: answering again after s", seconds)
    record(f"kill -TERM {unit}: systemd said", exit_line.strip())
    assert seconds < 300
