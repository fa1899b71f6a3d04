"""Every operation and deploy reads like pyinfra's own: a `+ arg: meaning` line per argument and an Example."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

OPERATIONS = sorted((Path(__file__).resolve().parents[2] / "operations").glob("*.py"))


def _operations(path: Path) -> list[ast.FunctionDef]:
    def decorated(node: ast.FunctionDef) -> bool:
        names = [getattr(d.func if isinstance(d, ast.Call) else d, "id", "") for d in node.decorator_list]
        return "operation" in names or "deploy" in names

    return [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef) and decorated(node)]


@pytest.mark.parametrize("path", OPERATIONS, ids=lambda path: path.stem)
def test_each_operation_documents_its_arguments_and_an_example(path: Path) -> None:
    for node in _operations(path):
        doc = ast.get_docstring(node) or ""
        missing = [arg.arg for arg in node.args.args if f"+ {arg.arg}:" not in doc]
        assert not missing, f"{path.name}:{node.name} has no `+ arg:` line for {missing}"
        assert "**Example:**" in doc, f"{path.name}:{node.name} has no Example"


def test_the_operations_are_found() -> None:
    assert sum(len(_operations(path)) for path in OPERATIONS) >= 15
