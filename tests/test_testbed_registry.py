"""The test-host registry: reaping what a killed run left behind (processes, mounts, directories)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed.__main__ import main as cli_main
from tests.testbed.registry import HostRecord, proc_id, reap, records


@pytest.fixture(autouse=True)
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GPUBOX_TESTBED_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.setenv("GPUBOX_CACHE", str(tmp_path / "cache"))  # the CLI's state file
    return tmp_path / "registry"


def _dead_owner() -> list[int]:
    """(pid, start time) of a process that has exited: the owner of an orphan."""
    proc = subprocess.Popen(["sleep", "60"])
    ident = proc_id(proc.pid)
    proc.kill()
    proc.wait()
    assert ident is not None
    return list(ident)


def _mountinfo_targets() -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh]


@pytest.fixture
def orphan(tmp_path: Path) -> Iterator[tuple[HostRecord, subprocess.Popen[bytes], bool]]:
    """A recorded host whose owner is dead: a real directory, a tmpfs at its root where we can mount
    one (root), and a live process recorded as its nspawn."""
    base = tmp_path / "gpubox-testbed-orphan"
    for sub in ("root", "upper/etc", "work"):
        (base / sub).mkdir(parents=True)
    (base / "console.log").write_text("booted\n")
    root = base / "root"
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True
    ).returncode == 0
    if mounted:
        (root / "llama-server.log").write_text("serving\n")
    nspawn = subprocess.Popen(["sleep", "600"])
    nspawn_id = proc_id(nspawn.pid)
    assert nspawn_id is not None
    record = HostRecord(base=str(base), mounts=[str(root)], owner=_dead_owner(), machine="gpubox-tb-orphan",
                        nspawn=list(nspawn_id))
    record.save()
    try:
        yield record, nspawn, mounted
    finally:
        nspawn.kill()
        nspawn.wait()
        if str(root) in _mountinfo_targets():
            subprocess.run(["umount", "-l", str(root)], check=False)


def _live_record(tmp_path: Path, name: str, detached: bool = False) -> HostRecord:
    base = tmp_path / name
    base.mkdir()
    record = HostRecord.new(base)  # owned by this (live) process
    if detached:
        record.owner = None  # as `python -m tests.testbed up` leaves it
    record.save()
    return record


def test_reap_orphans_removes_processes_mounts_and_directories(
    orphan: tuple[HostRecord, subprocess.Popen[bytes], bool], tmp_path: Path
) -> None:
    record, nspawn, mounted = orphan
    base, root = Path(record.base), Path(record.base) / "root"
    live = _live_record(tmp_path, "gpubox-testbed-live")
    detached = _live_record(tmp_path, "gpubox-testbed-up", detached=True)
    assert record.orphaned() and not live.orphaned() and not detached.orphaned()
    assert (str(root) in _mountinfo_targets()) == mounted

    (line,) = reap(orphans_only=True)

    assert "gpubox-tb-orphan" in line and str(nspawn.pid) in line
    assert nspawn.wait(timeout=10) == -signal.SIGKILL
    assert str(root) not in _mountinfo_targets()
    if mounted:
        assert str(root) in line  # reported as unmounted
    assert not base.exists()
    assert not record.path.exists()
    # Hosts whose owner lives, and the detached one `up` booted, are not orphans.
    assert sorted(r.base for r in records()) == sorted([live.base, detached.base])
    assert Path(live.base).is_dir() and Path(detached.base).is_dir()
    assert reap(orphans_only=True) == []


def test_down_reaps_the_hosts_no_running_process_owns_and_down_all_the_rest(
    orphan: tuple[HostRecord, subprocess.Popen[bytes], bool], registry: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    record, nspawn, _ = orphan
    live = _live_record(tmp_path, "gpubox-testbed-live")  # a running pytest's host: `down` leaves it
    detached = _live_record(tmp_path, "gpubox-testbed-up", detached=True)

    assert cli_main(["down"]) == 0

    captured = capsys.readouterr()
    assert captured.out.count("reaped ") == 2, captured.out
    for rec in (record, detached):
        assert not Path(rec.base).exists()
        assert rec.base in captured.out
    assert nspawn.wait(timeout=10) == -signal.SIGKILL
    assert Path(live.base).is_dir() and [r.base for r in records()] == [live.base]
    assert f"left 1 test host(s) a running process owns (pid {os.getpid()})" in captured.err

    assert cli_main(["down", "--all"]) == 0
    out = capsys.readouterr().out
    assert out.count("reaped ") == 1 and live.base in out and not Path(live.base).exists()
    assert records() == [] and list(registry.glob("*.json")) == []
    assert cli_main(["down"]) == 0
    assert "no test host recorded" in capsys.readouterr().err


def test_a_corrupt_record_does_not_stop_reaping(registry: Path, tmp_path: Path) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    (registry / "gpubox-testbed-torn.json").write_text("{not json")
    record = HostRecord(base=str(tmp_path / "gpubox-testbed-x"), owner=_dead_owner())
    Path(record.base).mkdir()
    record.save()
    assert len(reap(orphans_only=True)) == 1
    assert not Path(record.base).exists()
