"""The stale-process probe under a real sh, against a real process (systemctl and stat stand in).

The stub ``stat`` answers the probe's two questions, a process's start (``%Y`` of ``/proc/PID``) and a
file's ctime (``%Z``), with the seconds the test names: ``os.utime`` cannot set a ctime, and waiting
for the clock to move it would make the test slow and timing-dependent.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from gpubox.running import parse_stale_probe, stale_probe_command

STARTED = 1_700_000_000  # the process's start, whole seconds since the epoch


def _write_stub(path: Path, script: str) -> None:
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def _stat_stub(ctimes: dict[Path, int]) -> str:
    """``stat -c %Y /proc/PID``: STARTED; ``stat -c %Z FILE``: its ctime, failing for a file not named."""
    files = "".join(f"    {shlex.quote(str(path))}) echo {ctime} ;;\n" for path, ctime in ctimes.items())
    return (
        'case "$1 $2" in\n'
        f'  "-c %Y") case "$3" in /proc/*) echo {STARTED} ;; *) exit 1 ;; esac ;;\n'
        '  "-c %Z") case "$3" in\n' + files + "    *) exit 1 ;;\n  esac ;;\n"
        "  *) exit 2 ;;\n"
        "esac\n"
    )


def _probe(
    tmp_path: Path, pid: int, files: list[Path], binary: str, ctimes: dict[Path, int], need_reload: str = "no"
) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    # `systemctl show --property MainPID --property NeedDaemonReload UNIT`: one call, Key=value lines
    systemctl = '[ "$1 $2 $3 $4 $5" = "show --property MainPID --property NeedDaemonReload" ] || exit 2\n'
    systemctl += f"echo NeedDaemonReload={need_reload}; echo MainPID={pid}\n"
    _write_stub(bin_dir / "systemctl", systemctl)
    _write_stub(bin_dir / "stat", _stat_stub(ctimes))
    script = stale_probe_command("s.service", str(tmp_path / "s.service"), [str(file) for file in files], binary)
    result = subprocess.run(
        ["sh", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return parse_stale_probe(result.stdout.splitlines())


def test_a_process_started_after_its_files_is_current_and_one_older_is_stale(tmp_path: Path) -> None:
    unit, model = tmp_path / "s.service", tmp_path / "my model.gguf"
    before = {unit: STARTED - 60, model: STARTED}  # the same second as the start: the probe compares whole seconds
    sleeper = shutil.which("sleep")
    assert sleeper is not None
    binary = tmp_path / "current-sleep"
    binary.symlink_to(os.path.realpath(sleeper))
    process = subprocess.Popen([sleeper, "30"])
    try:
        assert _probe(tmp_path, process.pid, [model], str(binary), before) == []
        assert _probe(tmp_path, process.pid, [model], str(binary), before, need_reload="yes") == ["unit not reloaded"]
        model_changed = {**before, model: STARTED + 1}  # any change of the file after the start moves its ctime
        assert _probe(tmp_path, process.pid, [model], str(binary), model_changed) == [f"changed since start: {model}"]
        unit_changed = {**before, unit: STARTED + 1}
        assert _probe(tmp_path, process.pid, [model], str(binary), unit_changed) == [f"changed since start: {unit}"]
        assert _probe(tmp_path, process.pid, [model], str(binary), {}) == []  # files gone: nothing to compare
        other = tmp_path / "other"
        other.symlink_to("/bin/sh")
        (reason,) = _probe(tmp_path, process.pid, [], str(other), before)
        assert reason.startswith("runs ") and "not " in reason
    finally:
        process.kill()
    assert _probe(tmp_path, 0, [model], str(binary), model_changed) == []  # not running: nothing to restart
