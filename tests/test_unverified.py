"""The unverified marks (gpubox.unverified): written whole, read back by the marks fact's command, cleared
by a pass and by a rollback. The commands run here under /bin/sh on a temporary mark directory."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from gpubox import LlamaServer, ModelFile
from gpubox.unverified import Mark, clear_command, mark_command, mark_path, marks_command, parse_marks
from operations.smoke import rollback_script

UNIT = "gemma4.service"


def sh(command: str, path: str | None = None) -> str:
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}"} if path else None
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True, env=env).stdout


def test_a_mark_is_written_whole_and_read_back(tmp_path: Path) -> None:
    marks = str(tmp_path / "unverified")
    sh(mark_command(UNIT, by="dan@laptop pid 4242", install_switched=True, mark_dir=marks))
    sh(mark_command("whisper.service", mark_dir=marks))
    assert sorted(os.listdir(marks)) == [UNIT, "whisper.service"]  # the staged file was renamed over
    found = {mark.unit: mark for mark in parse_marks(sh(marks_command(marks)).splitlines())}
    assert found[UNIT].by == "dan@laptop pid 4242" and found[UNIT].install_switched
    assert found[UNIT].marked.endswith("Z") and found[UNIT].marked[:2] == "20"
    assert found["whisper.service"] == Mark(unit="whisper.service", marked=found["whisper.service"].marked)


def test_clearing_removes_only_that_mark(tmp_path: Path) -> None:
    marks = str(tmp_path)
    for unit in (UNIT, "piper.service"):
        sh(mark_command(unit, mark_dir=marks))
    sh(clear_command(UNIT, marks))
    sh(clear_command(UNIT, marks))  # clearing twice is fine
    assert [mark.unit for mark in parse_marks(sh(marks_command(marks)).splitlines())] == ["piper.service"]


def test_no_mark_directory_is_no_marks(tmp_path: Path) -> None:
    assert parse_marks(sh(marks_command(str(tmp_path / "none"))).splitlines()) == []


def test_the_run_that_marked_is_kept_on_one_line(tmp_path: Path) -> None:
    sh(mark_command(UNIT, by="evil\nmarked=1999 $(id) 'q'", mark_dir=str(tmp_path)))
    (mark,) = parse_marks(sh(marks_command(str(tmp_path))).splitlines())
    assert mark.by == "evil marked=1999 $(id) 'q'" and mark.marked.startswith("20")


def test_an_unreadable_mark_is_still_a_mark() -> None:
    assert parse_marks(["@@gpubox-mark gemma4.service", "???"]) == [Mark(unit=UNIT)]


def test_describe() -> None:
    mark = Mark(unit=UNIT, marked="2026-05-01T10:00:00Z", by="dan@laptop pid 4242")
    assert mark.describe() == "gemma4.service was put live at 2026-05-01T10:00:00Z by the run of dan@laptop pid 4242"
    assert mark_path(UNIT) == "/var/lib/gpubox/unverified/gemma4.service"


def test_a_rollback_clears_the_mark(tmp_path: Path) -> None:
    """What runs after a miss is the previous unit (or nothing): no longer unverified."""
    server = LlamaServer(name="gemma4", model=ModelFile(path="/m.gguf", sha256="a" * 64, architecture="llama"))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / UNIT).write_text("new\n")
    (tmp_path / "etc" / f"{UNIT}.prev").write_text("old\n")
    marks = tmp_path / "unverified"
    sh(mark_command(UNIT, mark_dir=str(marks)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text("#!/bin/sh\n")
    (bin_dir / "systemctl").chmod(stat.S_IRWXU)
    script = (
        rollback_script(server, None)
        .replace("/etc/systemd/system", str(tmp_path / "etc"))
        .replace("/var/lib/gpubox/unverified", str(marks))
    )
    assert "unit-restored" in sh(script, str(bin_dir))
    assert (tmp_path / "etc" / UNIT).read_text() == "old\n"
    assert not (marks / UNIT).exists()
