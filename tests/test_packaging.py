"""The wheel is the product: gpubox with its pyinfra facts and operations, and no test bed or tests.

Built from a clean export of the work tree (tracked files plus untracked ones git doesn't ignore: no
build/, egg-info or caches), offline (``--no-build-isolation``: setuptools and wheel are dev extras).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    export = tmp_path_factory.mktemp("export")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():  # the index still lists files deleted from the work tree
            (export / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, export / name)
    out = tmp_path_factory.mktemp("wheelhouse")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out), str(export)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (whl,) = out.glob("gpubox-*.whl")
    return whl


def test_wheel_holds_the_product_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {"gpubox/__init__.py", "gpubox/cli.py", "gpubox/spec.py", "gpubox/py.typed"} <= set(names)
    assert [n for n in names if n.startswith("facts/") and n.endswith(".py")], "no facts package"
    assert [n for n in names if n.startswith("operations/") and n.endswith(".py")], "no operations package"
    assert "facts/__init__.py" in names and "operations/__init__.py" in names
    assert not [n for n in names if n.startswith("gpubox/testbed")], "the test bed is in the wheel"
    assert not [n for n in names if n.startswith("tests/")], "tests are in the wheel"
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"gpubox", "facts", "operations", wheel.name.split("-py")[0] + ".dist-info"}, top


def test_installed_wheel_has_no_testbed(wheel: Path, tmp_path: Path) -> None:
    """Import from the unpacked wheel with site-packages but no .pth files (so not the editable
    install of this checkout) and not the checkout itself: gpubox imports, gpubox.testbed doesn't."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import sys; sys.path[:0] = sys.argv[1:3]\n"
        "import gpubox, facts, operations\n"
        "assert all(m.__file__.startswith(sys.argv[1]) for m in (gpubox, facts, operations))\n"
        "try:\n    import gpubox.testbed\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, str(site), sysconfig.get_paths()["purelib"]],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "missing gpubox.testbed"
