"""Paths in an inventory are taken from the inventory file's directory, not the working directory.

A model's relative ``source`` and the default ``--headers`` (``gguf-headers/`` next to the inventory)
resolve the same from any directory: for ``gpubox check``, ``gpubox plan``, ``gpubox monitoring`` and,
through the directory ``operations/preflight.py`` records from pyinfra's inventory argument, the deploy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

import operations.preflight
from gpubox.cli import main
from gpubox.inventory import inventory_dir
from gpubox.spec import ModelFile
from gpubox.vram import default_headers_dir
from operations.models import local_source
from operations.preflight import check_inventory_argument, inventory_base

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "inventory" / "home.py"
SHA = "a" * 64
COMMIT = "b" * 40

INVENTORY = """
from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile
model = ModelFile(path="/srv/models/m.gguf", sha256="{sha}", architecture="gemma3", source="models/m.gguf")
llm = LlamaServer(name="gemma4", model=model)
hosts = [("box1", {{"box": Box(llama_cpp=LlamaCppBuild(commit="{commit}"), services=(llm,))}})]
"""


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is neither the repository nor the inventory's directory."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def no_recorded_inventory() -> Iterator[None]:
    saved = list(operations.preflight._inventory_dirs)
    operations.preflight._inventory_dirs.clear()
    yield
    operations.preflight._inventory_dirs[:] = saved


def a_relative_source_inventory(tmp_path: Path) -> Path:
    """An inventory in its own directory whose model's source is ``models/m.gguf`` next to it (a header)."""
    directory = tmp_path / "fleet"
    (directory / "models").mkdir(parents=True)
    header = next((ROOT / "inventory" / "gguf-headers").glob("*.gguf"))
    shutil.copy(header, directory / "models" / "m.gguf")
    inventory = directory / "inventory.py"
    inventory.write_text(INVENTORY.format(sha=SHA, commit=COMMIT))
    return inventory


def test_the_inventory_dir_is_the_inventory_files_absolute_directory(elsewhere: Path) -> None:
    assert inventory_dir("inv/home.py") == elsewhere / "inv"
    assert default_headers_dir(inventory_dir(HOME)) == ROOT / "inventory" / "gguf-headers"


def test_gpubox_plan_finds_the_default_headers_next_to_the_inventory(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["plan", str(HOME)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "danarch4090 GPU 0" in out and "fits" in out


def test_gpubox_plan_help_names_the_default_headers_directory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "gguf-headers/ in the inventory file's directory" in " ".join(capsys.readouterr().out.split())


def test_gpubox_monitoring_plans_vram_from_the_headers_next_to_the_inventory(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["monitoring", str(HOME), "--out", str(elsewhere / "out")]) == 0
    assert "no VRAM alert" not in capsys.readouterr().out


@pytest.mark.parametrize("command", ["check", "plan"])
def test_a_relative_source_is_taken_from_the_inventorys_directory(
    command: str, tmp_path: Path, elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = a_relative_source_inventory(tmp_path)
    code = main([command, str(inventory), *(["--headers", str(tmp_path / "none")] if command == "plan" else [])])
    out = capsys.readouterr().out
    assert "models/m.gguf" not in out, out  # no missing source, and plan read the header from the source
    assert code == 0, out


@pytest.mark.usefixtures("no_recorded_inventory")
def test_the_deploy_takes_a_relative_source_from_the_inventory_argument_preflight_saw(
    tmp_path: Path, elsewhere: Path
) -> None:
    inventory = a_relative_source_inventory(tmp_path)
    model = ModelFile(path="/srv/models/m.gguf", sha256=SHA, architecture="gemma3", source="models/m.gguf")
    assert inventory_base() == elsewhere  # no pyinfra command: the working directory
    with click.Context(click.Command("pyinfra")) as context:
        context.params["inventory"] = os.path.relpath(inventory, elsewhere)  # ../fleet/inventory.py
        check_inventory_argument()
    assert inventory_base() == inventory.parent
    assert local_source(model) == inventory.parent / "models" / "m.gguf"
    assert default_headers_dir(inventory_base()) == inventory.parent / "gguf-headers"
