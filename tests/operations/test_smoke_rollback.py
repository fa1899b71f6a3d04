"""The smoke test's rollback: what it runs on a miss, and that the message says what it really did."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from gpubox import LlamaCppBuild, LlamaServer, ModelFile
from operations.smoke import rollback_script, what_rollback_did

SERVER = LlamaServer(name="gemma4", model=ModelFile(path="/m.gguf", sha256="a" * 64, architecture="llama"))
BUILD = LlamaCppBuild(commit="0" * 40, prefix="/opt/llama.cpp")


def _run(script: str, root: Path) -> tuple[str, list[str]]:
    """Run the rollback with its paths under `root` and a `systemctl` that records its calls."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {root}/systemctl.calls\n')
    systemctl.chmod(systemctl.stat().st_mode | stat.S_IXUSR)
    script = script.replace("/etc/systemd/system", f"{root}/etc").replace("/opt/llama.cpp", f"{root}/opt")
    result = subprocess.run(
        ["sh", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    calls = (root / "systemctl.calls").read_text().splitlines()
    return result.stdout, calls


def test_with_a_previous_unit_it_is_restored_and_restarted(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/gemma4.service").write_text("new\n")
    (tmp_path / "etc/gemma4.service.prev").write_text("old\n")
    printed, calls = _run(rollback_script(SERVER, None), tmp_path)
    assert (tmp_path / "etc/gemma4.service").read_text() == "old\n"
    assert calls == ["daemon-reload", "restart gemma4.service"]
    message = what_rollback_did(SERVER, printed)
    assert message.startswith("The previous unit (/etc/systemd/system/gemma4.service.prev) was restored, and")
    assert "current" not in message


def test_without_a_previous_unit_the_service_is_stopped_and_the_message_says_so(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/gemma4.service").write_text("new\n")
    printed, calls = _run(rollback_script(SERVER, None), tmp_path)
    assert (tmp_path / "etc/gemma4.service").read_text() == "new\n"
    assert calls == ["daemon-reload", "stop gemma4.service"]
    message = what_rollback_did(SERVER, printed)
    assert "had no previous unit to restore (its first deploy): it was stopped and is not serving" in message
    assert "restored" not in message


def test_a_switched_build_goes_back_to_previous(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/gemma4.service.prev").write_text("old\n")
    (tmp_path / "opt/builds/a").mkdir(parents=True)
    (tmp_path / "opt/builds/b").mkdir(parents=True)
    (tmp_path / "opt/current").symlink_to("builds/b")
    (tmp_path / "opt/previous").symlink_to("builds/a")
    printed, _ = _run(rollback_script(SERVER, BUILD), tmp_path)
    assert os.readlink(tmp_path / "opt/current") == "builds/a"
    assert "llama.cpp's `current` back on the previous build" in what_rollback_did(SERVER, printed)
