"""The llama.cpp build script under a real sh, with a cmake stand-in that prints ninja's steps:
progress on stdout, the binary's --version/--help saved beside it, older builds pruned."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gpubox.binaries import server_help_command, server_version_command
from gpubox.build import build_script, switch_script
from gpubox.spec import LlamaCppBuild

# Configure succeeds; `--build WORK` prints 40 ninja steps and makes WORK/bin/llama-server.
FAKE_CMAKE = """#!/bin/sh
if [ "$1" = --build ]; then
  i=1; while [ $i -le 40 ]; do echo "[$i/40] Building CXX object step$i.o"; i=$((i + 1)); done
  mkdir -p "$2/bin"
  printf '#!/bin/sh\\ncase "$1" in --version) echo "version: 1 (abc1234)";; --help) echo "--port N";; esac\\n' \\
    > "$2/bin/llama-server"
  chmod +x "$2/bin/llama-server"
fi
"""


def _runner(tmp_path: Path):  # type: ignore[no-untyped-def]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "cmake").write_text(FAKE_CMAKE)
    (bin_dir / "cmake").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, check=False)

    return run


def test_progress_goes_to_stdout_in_5_percent_steps_and_everything_to_the_log(tmp_path: Path) -> None:
    build = LlamaCppBuild(commit="1" * 40, prefix=f"{tmp_path}/llama.cpp")
    proc = _runner(tmp_path)(build_script(build, "cpu", ccache=False))
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stdout.splitlines() if line.startswith("llama.cpp build:")]
    assert progress[0] == "llama.cpp build: 2/40 steps (5%)"
    assert progress[-1] == "llama.cpp build: 40/40 steps (100%)"
    assert len(progress) == 20
    log = Path(f"{build.prefix}/logs/build-{'1' * 40}-cpu.log").read_text()
    assert "[17/40] Building CXX object step17.o" in log


def test_version_and_help_are_saved_beside_the_binary_and_the_facts_read_them(tmp_path: Path) -> None:
    build = LlamaCppBuild(commit="1" * 40, prefix=f"{tmp_path}/llama.cpp")
    run = _runner(tmp_path)
    assert run(build_script(build, "cpu", ccache=False)).returncode == 0
    binary = f"{build.prefix}/current/llama-server"
    assert Path(f"{binary}.version").read_text() == "version: 1 (abc1234)\n"
    Path(binary).write_text("#!/bin/sh\nexit 99\n")  # the facts must not run the binary now
    assert run(server_version_command(binary)).stdout == "version: 1 (abc1234)\n"
    assert run(server_help_command(binary)).stdout == "--port N\n"


def test_a_switch_prunes_builds_beyond_keep_builds(tmp_path: Path) -> None:
    run = _runner(tmp_path)
    prefix = f"{tmp_path}/llama.cpp"
    for digit in "1234":
        build = LlamaCppBuild(commit=digit * 40, prefix=prefix, keep_builds=3)
        proc = run(build_script(build, "cpu", ccache=False))
        assert proc.returncode == 0, proc.stderr
    builds = sorted(path.name for path in Path(prefix, "builds").iterdir())
    assert builds == [f"{digit * 40}-cpu" for digit in "234"]  # current 4, previous 3, the newest other: 2
    assert sorted(path.name for path in Path(prefix, "work").iterdir()) == builds
    assert f"pruned builds/{'1' * 40}-cpu" in proc.stdout.splitlines()  # by the 4th build

    # Switching back to an installed build keeps current and previous (keep_builds=2 prunes the rest).
    back = LlamaCppBuild(commit="3" * 40, prefix=prefix)
    proc = run(switch_script(back, "cpu"))
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(f"{prefix}/current") == f"builds/{'3' * 40}-cpu"
    assert sorted(path.name for path in Path(prefix, "builds").iterdir()) == [f"{d * 40}-cpu" for d in "34"]
    assert proc.stdout.strip() == f"pruned builds/{'2' * 40}-cpu"
