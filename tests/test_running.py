"""The unit-state probe under a real sh, against a real process (systemctl and stat stand in).

`gpubox.running.unit_states_command` reads every unit with one ``systemctl show``; the stub answers
it with the records the test names, in systemd's own order (``MainPID`` before ``Id``, a blank line
between units). The stub ``stat`` answers a process's start (``%Y`` of ``/proc/PID``) and the files'
ctimes (``%Z %n``) with the seconds the test names: ``os.utime`` cannot set a ctime, and waiting for the
clock to move it would make the test slow and timing-dependent. ``readlink`` is the real one, on a real
process and real symlinks.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

from facts.systemd import UnitStates
from gpubox.running import (
    ACTIVE_SUB_STATES,
    ENABLED_FILE_STATES,
    PROPERTIES,
    StaleProbe,
    UnitState,
    parse_unit_states,
    unit_states_command,
)

STARTED = 1_700_000_000  # the process's start, whole seconds since the epoch


def _write_stub(path: Path, script: str) -> None:
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def _stat_stub(ctimes: dict[Path, int]) -> str:
    """``stat -c %Y /proc/PID``: STARTED; ``stat -c '%Z %n' -- FILE...``: each named file's ctime and name
    (a file not named is gone: stat says nothing of it and fails, as the real one does)."""
    files = "".join(f'      {shlex.quote(str(path))}) echo "{ctime} $file" ;;\n' for path, ctime in ctimes.items())
    return (
        'case "$1 $2" in\n'
        f'  "-c %Y") case "$3" in /proc/*) echo {STARTED} ;; *) exit 1 ;; esac ;;\n'
        '  "-c %Z %n") shift 3; status=0\n'
        '    for file in "$@"; do case "$file" in\n' + files + "      *) status=1 ;;\n    esac; done\n"
        "    exit $status ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n"
    )


def _systemctl_stub(records: list[dict[str, str]]) -> str:
    """``systemctl show --property ... -- UNIT...``: the records of the units named, in their order."""
    expected = " ".join(f"--property {name}" for name in PROPERTIES)
    cases = ""
    for record in records:
        lines = "\\n".join(f"{key}={value}" for key, value in record.items())
        cases += f"    {shlex.quote(record['Id'])}) printf '{lines}\\n' ;;\n"
    return (
        f'[ "$1" = show ] && shift && [ "$*" != "${{*#{expected} -- }}" ] || exit 2\n'
        f"shift {2 * len(PROPERTIES) + 1}; first=yes\n"
        'for unit in "$@"; do\n'
        "  [ $first = yes ] || echo; first=no\n"
        '  case "$unit" in\n'
        + cases
        + "    *) printf 'MainPID=0\\nId=%s\\nSubState=dead\\nUnitFileState=\\nNeedDaemonReload=no\\n' \"$unit\" ;;\n"
        "  esac\ndone\n"
    )


def record(
    unit: str, pid: int, sub_state: str = "running", file_state: str = "enabled", reload: str = "no"
) -> dict[str, str]:
    # systemd prints the service's MainPID before the unit's Id (Service interface, then Unit)
    return {
        "MainPID": str(pid),
        "Id": unit,
        "SubState": sub_state,
        "UnitFileState": file_state,
        "NeedDaemonReload": reload,
    }


def states(
    tmp_path: Path, records: list[dict[str, str]], units: list[str], probes: list[StaleProbe], ctimes: dict[Path, int]
) -> dict[str, UnitState]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _write_stub(bin_dir / "systemctl", _systemctl_stub(records))
    _write_stub(bin_dir / "stat", _stat_stub(ctimes))
    result = subprocess.run(
        ["sh", "-c", unit_states_command(units, probes)], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return parse_unit_states(result.stdout.splitlines(), probes)


@pytest.fixture
def sleeper() -> Iterator[int]:
    found = shutil.which("sleep")
    assert found is not None
    process = subprocess.Popen([found, "30"])
    yield process.pid
    process.kill()


def test_a_process_started_after_its_files_is_current_and_one_older_is_stale(tmp_path: Path, sleeper: int) -> None:
    unit, model = tmp_path / "s.service", tmp_path / "my model.gguf"
    before = {unit: STARTED - 60, model: STARTED}  # the same second as the start: the probe compares whole seconds
    binary = tmp_path / "current-sleep"
    binary.symlink_to(os.path.realpath(shutil.which("sleep") or "/bin/sleep"))
    probe = StaleProbe("s.service", str(unit), (str(model),), str(binary))

    def stale(ctimes: dict[Path, int], **changed: str) -> tuple[str, ...]:
        return states(tmp_path, [record("s.service", sleeper, **changed)], [], [probe], ctimes)["s.service"].stale

    assert stale(before) == ()
    assert stale(before, reload="yes") == ("unit not reloaded",)
    assert stale({**before, model: STARTED + 1}) == (f"changed since start: {model}",)  # a change moves its ctime
    assert stale({**before, unit: STARTED + 1}) == (f"changed since start: {unit}",)
    assert stale({}) == ()  # files gone: nothing to compare
    other = tmp_path / "other"
    other.symlink_to("/bin/sh")
    (reason,) = states(
        tmp_path, [record("s.service", sleeper)], [], [StaleProbe("s.service", str(unit), (), str(other))], before
    )["s.service"].stale
    assert reason.startswith("runs ") and reason.endswith(f"not {os.path.realpath('/bin/sh')}")
    not_running = states(tmp_path, [record("s.service", 0, sub_state="dead")], [], [probe], {model: STARTED + 1})
    assert not_running["s.service"] == UnitState(active=False, enabled=True)  # nothing to restart


def test_every_unit_is_read_at_once_and_each_probe_sees_its_own_process(tmp_path: Path, sleeper: int) -> None:
    a_model, b_model = tmp_path / "a.gguf", tmp_path / "b.gguf"
    binary = tmp_path / "current-sleep"
    binary.symlink_to(os.path.realpath(shutil.which("sleep") or "/bin/sleep"))
    probes = [
        StaleProbe("a.service", str(tmp_path / "a.service"), (str(a_model),), str(binary)),
        StaleProbe("b.service", str(tmp_path / "b.service"), (str(b_model),), str(binary)),
    ]
    records = [
        record("a.service", sleeper),
        record("b.service", sleeper, reload="yes"),
        record("timer.timer", 0, sub_state="waiting", file_state="static"),
        record("off.service", 0, sub_state="dead", file_state="disabled"),
    ]
    found = states(tmp_path, records, ["timer.timer", "off.service", "a.service"], probes, {b_model: STARTED + 5})
    assert found == {
        "timer.timer": UnitState(active=True, enabled=True),
        "off.service": UnitState(active=False, enabled=False),
        "a.service": UnitState(active=True, enabled=True),
        "b.service": UnitState(
            active=True, enabled=True, stale=("unit not reloaded", f"changed since start: {b_model}")
        ),
    }
    command = unit_states_command(["timer.timer", "off.service", "a.service"], probes)
    assert command.count("systemctl") == 1  # one for all of them, the probes' units included once


def test_active_and_enabled_count_as_pyinfras_own_facts() -> None:
    assert tuple(SystemdStatus.state_values) == ACTIVE_SUB_STATES
    assert tuple(SystemdEnabled.state_values) == ENABLED_FILE_STATES


def test_a_run_reads_merge_into_one_and_each_gets_its_share() -> None:
    probe = StaleProbe("a.service", "/etc/systemd/system/a.service", ("/srv/m.gguf",), "/opt/x/current/server")
    reads = [
        {"units": ("a.service",), "probes": (probe,)},
        {"units": ("a.service",)},
        {"units": ("prometheus.service",)},
    ]
    merged = UnitStates.merged(reads)
    assert merged == {"units": ("a.service", "prometheus.service"), "probes": (probe,)}
    value = {"a.service": UnitState(True, True, ("unit not reloaded",)), "prometheus.service": UnitState(True, False)}
    assert UnitStates.share(value, reads[2]) == {"prometheus.service": UnitState(True, False)}
    assert UnitStates.share(value, reads[0]) == {"a.service": UnitState(True, True, ("unit not reloaded",))}
    assert UnitStates.share(value, {"units": ("gone.service",)}) == {}
