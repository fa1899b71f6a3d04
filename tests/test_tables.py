"""`gpubox check`'s services table never breaks a model file name: one file a line, whole or middle-shortened."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile
from gpubox.inventory import HostBox, inventory_boxes
from gpubox.tables import MODEL_NAME_MAX, middle_ellipsis, services_table

ROOT = Path(__file__).resolve().parent.parent


def _rendered(boxes: list[HostBox], width: int) -> list[str]:
    console = Console(record=True, width=width)
    console.print(services_table(boxes))
    return console.export_text().splitlines()


def _model_cells(lines: list[str]) -> list[str]:
    """The model column's cell of every body line (the header's sixth column)."""
    return [line.split("│")[6].strip() for line in lines if line.startswith("│")]


def test_every_model_file_of_the_home_box_is_whole_on_its_own_line() -> None:
    boxes = inventory_boxes(ROOT / "inventory" / "home.py")
    names = [
        model.path.rsplit("/", 1)[-1]
        for host_box in boxes
        for service in host_box.box.services  # type: ignore[union-attr]
        for model in service.models()
        if model.format != "json"
    ]
    assert "gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf" in names  # the drafter that broke mid-word
    for width in (120, 160):
        assert [cell for cell in _model_cells(_rendered(boxes, width)) if cell] == names, width


def test_a_name_too_long_for_the_column_loses_its_middle_not_its_end() -> None:
    long_name = "Meta-Llama-3.1-405B-Instruct-abliterated-imatrix-calibrated-IQ2_XXS.gguf"
    shortened = middle_ellipsis(long_name)
    assert len(shortened) == MODEL_NAME_MAX < len(long_name)
    head, tail = shortened.split("…")
    assert long_name.startswith(head) and long_name.endswith(tail) and tail.endswith("IQ2_XXS.gguf")
    assert middle_ellipsis("short.gguf") == "short.gguf"
    model = ModelFile(path=f"/srv/models/{long_name}", sha256="a" * 64, architecture="llama")
    box = Box(llama_cpp=LlamaCppBuild(commit="b" * 40), services=(LlamaServer(name="big", model=model),))
    assert [cell for cell in _model_cells(_rendered([HostBox(host="h", box=box, problems=[])], 120)) if cell] == [
        shortened
    ]


def test_a_limit_too_small_for_an_ellipsis_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="limit must be at least 3 characters, got 2"):
        middle_ellipsis("model.gguf", 2)
