"""The stale-process probe under a real sh, against a real process (systemctl stands in)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from gpubox.running import parse_stale_probe, stale_probe_command


def _probe(tmp_path: Path, pid: int, files: list[str], binary: str, need_reload: str = "no") -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(
        '#!/bin/sh\ncase "$3" in MainPID) echo ' + str(pid) + ";; NeedDaemonReload) echo " + need_reload + ";; esac\n"
    )
    systemctl.chmod(0o755)
    unit = tmp_path / "s.service"
    script = stale_probe_command("s.service", str(unit), files, binary)
    result = subprocess.run(
        ["sh", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return parse_stale_probe(result.stdout.splitlines())


def test_a_process_started_after_its_files_is_current_and_one_older_is_stale(tmp_path: Path) -> None:
    model = tmp_path / "my model.gguf"
    model.write_text("m")
    (tmp_path / "s.service").write_text("[Service]\n")
    time.sleep(1.1)  # the probe compares whole seconds
    sleeper = shutil.which("sleep")
    assert sleeper is not None
    binary = tmp_path / "current-sleep"
    binary.symlink_to(os.path.realpath(sleeper))
    process = subprocess.Popen([sleeper, "30"])
    try:
        assert _probe(tmp_path, process.pid, [str(model)], str(binary)) == []
        assert _probe(tmp_path, process.pid, [str(model)], str(binary), need_reload="yes") == ["unit not reloaded"]
        time.sleep(1.1)
        model.chmod(0o600)  # any change of the file after the start: its ctime moves
        assert _probe(tmp_path, process.pid, [str(model)], str(binary)) == [f"changed since start: {model}"]
        other = tmp_path / "other"
        other.symlink_to("/bin/sh")
        (reason,) = _probe(tmp_path, process.pid, [], str(other))
        assert reason.startswith("runs ") and "not " in reason
    finally:
        process.kill()
    assert _probe(tmp_path, 0, [str(model)], str(binary)) == []  # not running: nothing to restart
