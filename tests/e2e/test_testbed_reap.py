"""A test host whose booting process is SIGKILLed keeps running (nspawn is its own session); the
registry lets ``python -m tests.testbed down`` and the next boot reap it: the container's processes,
its overlay mount and its directory."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed import booted_host
from tests.testbed.registry import HostRecord, alive, reap, records

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

# Boots a host, starts a service inside it (as a deploy starts llama-server), then waits to be killed.
BOOT = """
import time
from tests.testbed import create_host
host = create_host()
host.run("systemd-run --unit=tb-orphan /bin/sleep infinity", check=True)
print("booted", flush=True)
time.sleep(3600)
"""


def _mountinfo_targets() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh]


@pytest.fixture
def own_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A registry of this test's own (`down` must not reap the hosts of other test runs); whatever a
    failed test left in it is reaped afterwards.  Yields the environment for subprocesses."""
    monkeypatch.setenv("GPUBOX_TESTBED_REGISTRY", str(tmp_path / "registry"))
    yield {**os.environ, "PYTHONPATH": str(REPO)}
    reap(orphans_only=False)


def _boot_and_sigkill(env: dict[str, str]) -> HostRecord:
    """Boot a host in a subprocess, SIGKILL the subprocess, and return the host's record."""
    proc = subprocess.Popen([sys.executable, "-c", BOOT], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 480)
        line = proc.stdout.readline() if ready else ""
        assert line.strip() == "booted", f"the boot subprocess did not boot (rc={proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (record,) = records()
    # What the registry recorded, and what the killed run left behind.
    assert record.owner is not None and record.owner[0] == proc.pid and record.orphaned()
    assert alive(record.nspawn) and alive(record.leader), "the host should outlive its owner"
    assert str(Path(record.base) / "root") in _mountinfo_targets()
    assert Path(record.base, "upper").is_dir()
    return record


def _assert_reaped(record: HostRecord) -> None:
    assert not alive(record.nspawn), "systemd-nspawn still runs"
    assert not alive(record.leader), "the container's PID 1 still runs"
    assert not [t for t in _mountinfo_targets() if t.startswith(record.base)], "the overlay is still mounted"
    assert not os.path.lexists(record.base), "the host's directory is still there"
    assert not record.path.exists(), "the record is still there"


def test_down_reaps_the_host_of_a_killed_run(can_boot_hosts: None, own_registry: dict[str, str]) -> None:
    record = _boot_and_sigkill(own_registry)
    down = subprocess.run([sys.executable, "-m", "tests.testbed", "down"], cwd=REPO, env=own_registry,
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert f"reaped {record.machine}" in down.stdout, down.stdout
    _assert_reaped(record)
    assert records() == []


def test_next_boot_reaps_the_host_of_a_killed_run(can_boot_hosts: None, own_registry: dict[str, str]) -> None:
    record = _boot_and_sigkill(own_registry)
    with booted_host() as host:
        _assert_reaped(record)
        assert [r.base for r in records()] == [str(host.root.parent)]  # only the new host
    assert records() == []
