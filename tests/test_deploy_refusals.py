"""The deploys refuse bad input before any connection, and an unreachable host fails fast and clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
HOME = (ROOT / "inventory" / "home.py").read_text()


def pyinfra(inventory: Path | str, deploy: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYINFRA, *flags, str(inventory), deploy],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bad_box_is_refused_before_connecting(tmp_path: Path) -> None:
    inventory = tmp_path / "home.py"
    inventory.write_text(HOME.replace("parallel=1,", "parallel=4,"))
    for deploy in ("deploys/danarch4090.py", "deploys/gemma4_mtp.py"):
        result = pyinfra(inventory, deploy, "--dry")
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "parallel trap" in output and "\n    parallel: spec_type 'draft-mtp' with parallel=4" in output
        line = HOME.splitlines().index("gemma4 = LlamaServer(") + 1
        assert f"{inventory} line {line}: LlamaServer is refused" in output  # the inventory's line, in one message
        assert "Traceback" not in output
        assert "Connecting to hosts" not in output


def test_inventory_that_does_not_import_is_refused_before_connecting(tmp_path: Path) -> None:
    inventory = tmp_path / "broken.py"
    inventory.write_text("from gpubox import NoSuchThing\nhosts = ['x']\n")
    result = pyinfra(inventory, "deploys/danarch4090.py", "--dry")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "NoSuchThing" in output
    assert "Connecting to hosts" not in output


def test_dict_box_with_a_bad_field_names_it(tmp_path: Path) -> None:
    inventory = tmp_path / "dict.py"
    inventory.write_text(
        "box = {'llama_cpp': {'commit': 'abc'}, 'services': []}\n"
        "hosts = [('@local', {'box': box})]\n"
    )
    result = pyinfra(inventory, "deploys/danarch4090.py", "--dry")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "llama_cpp.commit" in output and "full 40-hex sha" in output


def test_unreachable_host_fails_fast_with_a_clear_message() -> None:
    result = pyinfra(ROOT / "inventory" / "home.py", "deploys/danarch4090.py", "--dry")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "[danarch4090] Could not" in output
    assert "No hosts remaining" in output
