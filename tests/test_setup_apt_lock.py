"""scripts/setup waits, bounded and saying so, for another apt's locks instead of failing with exit 100.

The script runs for real in a copy of the repo's layout, with ``apt-get``, ``dpkg`` and ``python3 -m
venv`` replaced by stubs on PATH (the stub apt-get records its arguments), and ``GPUBOX_APT_LOCKS``
pointed at a lock file this test holds with fcntl, as apt and dpkg hold theirs: no real apt lock is
touched, no package is installed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

APT_GET_STUB = """#!/bin/sh
printf '%s\\n' "$*" >> "$APT_GET_LOG"
"""
DPKG_STUB = """#!/bin/sh
exit 1
"""
# python3 -m venv makes a .venv whose python and gpubox do nothing; anything else is the real python.
PYTHON3_STUB = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/sh\\n' > "$3/bin/python"
    printf '#!/bin/sh\\necho usage: gpubox\\n' > "$3/bin/gpubox"
    chmod +x "$3/bin/python" "$3/bin/gpubox"
    exit 0
fi
exec {sys.executable} "$@"
"""


def _stub(directory: Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)


def _tree(tmp_path: Path) -> Path:
    """A copy of the script and its package list, with the stubs in tmp_path/bin."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / ".ci").mkdir()
    shutil.copy2(REPO / "scripts" / "setup", root / "scripts" / "setup")
    shutil.copy2(REPO / ".ci" / "apt-packages.txt", root / ".ci" / "apt-packages.txt")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "apt-get", APT_GET_STUB)
    _stub(bin_dir, "dpkg", DPKG_STUB)
    _stub(bin_dir, "python3", PYTHON3_STUB)
    return root


def _run_setup(tmp_path: Path, lock: Path, timeout_s: int) -> tuple[subprocess.CompletedProcess[str], float]:
    root = _tree(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "APT_GET_LOG": str(tmp_path / "apt-get.log"),
        "GPUBOX_APT_LOCKS": f"{tmp_path / 'absent-lock'} {lock}",
        "GPUBOX_APT_LOCK_TIMEOUT": str(timeout_s),
    }
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(root / "scripts" / "setup")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, time.monotonic() - started


def _apt_get_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt-get.log"
    return log.read_text().splitlines() if log.exists() else []


@contextmanager
def _held(lock: Path, seconds: float) -> Iterator[None]:
    """Hold ``lock`` as apt does (fcntl, exclusive) for ``seconds``, from a thread of this process."""
    lock.touch()
    handle = lock.open("rb+")
    fcntl.lockf(handle, fcntl.LOCK_EX)
    released = threading.Timer(seconds, handle.close)
    released.start()
    try:
        yield
    finally:
        released.cancel()
        handle.close()


def test_every_apt_get_call_waits_for_the_dpkg_lock(tmp_path: Path) -> None:
    result, _ = _run_setup(tmp_path, tmp_path / "lock", timeout_s=300)
    assert result.returncode == 0, result.stderr
    calls = _apt_get_calls(tmp_path)
    assert [call.split()[2] for call in calls] == ["update", "install"]
    for call in calls:
        option, value = call.split()[:2]
        assert option == "-o" and value.startswith("DPkg::Lock::Timeout="), call
        assert 0 < int(value.removeprefix("DPkg::Lock::Timeout=")) <= 300, call


def test_setup_waits_for_a_held_lock_and_says_so(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with _held(lock, seconds=2.0):
        result, elapsed = _run_setup(tmp_path, lock, timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert elapsed >= 1.5
    assert f"another apt or dpkg holds {lock}; waiting for it, up to 60 s" in result.stderr
    assert [call.split()[2] for call in _apt_get_calls(tmp_path)] == ["update", "install"]


def test_setup_gives_up_after_the_timeout_with_what_to_do(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    with _held(lock, seconds=30.0):
        result, elapsed = _run_setup(tmp_path, lock, timeout_s=1)
    assert result.returncode == 100
    assert elapsed < 20
    assert f"{lock} is still held after 1 s" in result.stderr
    assert "rerun scripts/setup" in result.stderr and "GPUBOX_APT_LOCK_TIMEOUT" in result.stderr
    assert _apt_get_calls(tmp_path) == []
