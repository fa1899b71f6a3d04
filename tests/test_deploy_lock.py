"""The deploy lock's core (gpubox.deploy_lock): the holder record, the probe, live vs stale, and the
holder script itself, run here by /bin/sh with util-linux's `flock` on a temporary lock directory."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpubox.deploy_lock import (
    HELD_EXIT,
    Holder,
    Probe,
    Verdict,
    check_name,
    decide,
    holder_script,
    parse_probe,
    record_file,
    refusal,
    takeover,
)

ME = Holder(controller="laptop", pid=4242, user="dan", started="2026-05-01T10:00:00Z")
RECORD = [*ME.controller_lines(), "holder_pid=812", "since=1777629600"]


def test_a_record_round_trips_with_the_host_side_fields() -> None:
    assert Holder.parse(RECORD) == Holder("laptop", 4242, "dan", "2026-05-01T10:00:00Z", 812, 1777629600)


@pytest.mark.parametrize(
    "lines",
    [[], ["garbage"], ["controller=laptop"], ["pid=12"], ["controller=laptop", "pid=twelve"], ["controller=", "pid=1"]],
)
def test_a_record_without_a_controller_and_a_pid_is_unreadable(lines: list[str]) -> None:
    assert Holder.parse(lines) is None


def test_a_record_keeps_each_value_on_its_line() -> None:
    odd = Holder(controller="lap\ntop", pid=1, user="d\x1ban", started="now")
    assert odd.controller_lines() == ["controller=lap top", "pid=1", "user=d an", "started=now"]


def test_describe_says_who_when_and_how_long_ago_by_the_hosts_clock() -> None:
    holder = Holder.parse(RECORD)
    assert holder is not None
    assert holder.describe(now=1777629635) == "dan@laptop pid 4242, started 2026-05-01T10:00:00Z (35 s ago)"
    assert holder.describe() == "dan@laptop pid 4242, started 2026-05-01T10:00:00Z"


def _probe(state: str, alive: int, record: list[str]) -> list[str]:
    return [f"gpubox-lock state={state} alive={alive} now=1777629635", *record, "", "gpubox-lock end"]


@pytest.mark.parametrize(
    ("output", "verdict"),
    [
        (_probe("free", 0, []), Verdict.ACQUIRED),
        (_probe("free", 0, RECORD), Verdict.TAKEN_OVER),  # a record beside a free lock: its run died
        (_probe("free", 0, ["half a rec"]), Verdict.TAKEN_OVER),  # an unreadable one too
        (_probe("held", 1, RECORD), Verdict.HELD),
        (_probe("held", 0, RECORD), Verdict.HELD_STARTING),  # the record is the last run's: a new one starts
        (_probe("held", 0, []), Verdict.HELD_STARTING),
    ],
)
def test_the_kernels_lock_decides_live_or_stale(output: list[str], verdict: Verdict) -> None:
    assert decide(parse_probe(output)) is verdict


def test_a_probe_is_found_among_other_output() -> None:
    probe = parse_probe(["sudo: a lecture", *_probe("held", 1, RECORD), "trailing"])
    assert probe == Probe(free=False, record=Holder.parse(RECORD), alive=True, now=1777629635)


def test_no_probe_is_an_error() -> None:
    with pytest.raises(ValueError, match="no lock probe"):
        parse_probe(["mkdir: cannot create directory '/var/lib/gpubox': Permission denied"])


def test_the_refusal_names_the_holder_and_what_to_do() -> None:
    message = refusal("deploy", "box1", parse_probe(_probe("held", 1, RECORD)))
    assert "box1: another deploy holds the 'deploy' lock: dan@laptop pid 4242, started 2026-05-01T10:00:00Z" in message
    assert "(35 s ago)" in message and "pid 812 on box1" in message and "wait for it to finish" in message
    starting = refusal("deploy", "box1", parse_probe(_probe("held", 0, [])))
    assert "is starting" in starting


def test_the_takeover_says_whose_lock_it_was() -> None:
    message = takeover("deploy", "box1", parse_probe(_probe("free", 0, RECORD)))
    assert "took over the 'deploy' lock left by a deploy that ended without releasing it" in message
    assert "dan@laptop pid 4242" in message


@pytest.mark.parametrize("name", ["", "Deploy", "../etc", "a b", "x" * 64, "-rf"])
def test_a_lock_name_names_two_files_safely(name: str) -> None:
    with pytest.raises(ValueError, match="lock name"):
        check_name(name)


# The holder script itself, on this machine.


class Running:
    """A holder script started as the deploy starts it: its stdin stays open until released or closed."""

    def __init__(self, holder: Holder, lock_dir: Path, name: str = "deploy") -> None:
        self.process = subprocess.Popen(
            ["sh", "-c", holder_script(name, holder, str(lock_dir))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines = self.read_until(("gpubox-lock acquired",))

    def read_until(self, last: tuple[str, ...]) -> list[str]:
        assert self.process.stdout is not None
        lines = []
        for line in self.process.stdout:
            lines.append(line.rstrip("\n"))
            if lines[-1] in last:
                break
        return lines

    @property
    def verdict(self) -> Verdict:
        return decide(parse_probe(self.lines))

    def release(self) -> list[str]:
        assert self.process.stdin is not None
        self.process.stdin.write("release\n")
        self.process.stdin.flush()
        lines = self.read_until(("gpubox-lock released",))
        assert self.process.wait(timeout=10) == 0
        return lines


def _refused(holder: Holder, lock_dir: Path) -> tuple[int, list[str]]:
    result = subprocess.run(
        ["sh", "-c", holder_script("deploy", holder, str(lock_dir))],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode, result.stdout.splitlines()


def test_one_holder_at_a_time_the_second_refused_naming_the_first(tmp_path: Path) -> None:
    first = Running(ME, tmp_path)
    assert first.verdict is Verdict.ACQUIRED and first.lines[-1] == "gpubox-lock acquired"
    code, output = _refused(Holder("ci", 7, "ci", "2026-05-01T10:00:05Z"), tmp_path)
    assert code == HELD_EXIT
    probe = parse_probe(output)
    assert decide(probe) is Verdict.HELD
    assert probe.record is not None and probe.record.who() == "dan@laptop pid 4242"
    assert probe.record.holder_pid == first.process.pid  # the shell holding the lock
    assert first.release() == ["gpubox-lock released"]
    assert not Path(record_file("deploy", str(tmp_path))).exists()
    second = Running(Holder("ci", 7, "ci", "2026-05-01T10:00:05Z"), tmp_path)
    assert second.verdict is Verdict.ACQUIRED  # a released lock leaves no record: nothing to take over
    second.release()


def test_locks_of_two_names_are_independent(tmp_path: Path) -> None:
    deploy, rollout = Running(ME, tmp_path), Running(ME, tmp_path, name="rollout")
    assert (deploy.verdict, rollout.verdict) == (Verdict.ACQUIRED, Verdict.ACQUIRED)
    deploy.release()
    rollout.release()


def test_a_holder_whose_connection_ends_frees_the_lock_and_leaves_its_record(tmp_path: Path) -> None:
    """The SSH channel closing is the holder's stdin ending: the lock is free at once, the record says
    whose it was, and the next run takes it over."""
    first = Running(ME, tmp_path)
    assert first.process.stdin is not None
    first.process.stdin.close()
    assert first.process.wait(timeout=10) == 0
    second = Running(Holder("ci", 7, "ci", "later"), tmp_path)
    assert second.verdict is Verdict.TAKEN_OVER
    previous = parse_probe(second.lines).record
    assert previous is not None and previous.who() == "dan@laptop pid 4242"
    second.release()


def test_a_killed_holder_frees_the_lock(tmp_path: Path) -> None:
    """A holder that dies any other way (the host's sshd killed, SIGKILL): the kernel frees its flock."""
    first = Running(ME, tmp_path)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait(timeout=10)
    started = time.monotonic()
    second = Running(Holder("ci", 7, "ci", "later"), tmp_path)
    assert second.verdict is Verdict.TAKEN_OVER
    assert time.monotonic() - started < 5  # at once: no lease to wait out
    second.release()


def test_values_with_shell_characters_reach_the_record_as_they_are(tmp_path: Path) -> None:
    odd = Holder(controller="lap'top $(id) `x`", pid=1, user='d"an', started="t")
    first = Running(odd, tmp_path)
    record = Path(record_file("deploy", str(tmp_path))).read_text().splitlines()
    assert record[:4] == odd.controller_lines()
    assert Holder.parse(record) is not None and Holder.parse(record).controller == odd.controller  # type: ignore[union-attr]
    first.release()
