"""`pytest -m "not e2e"` is the fast lane: it must leave out every test that boots a host or builds llama.cpp."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

E2E = Path(__file__).parent / "e2e"


@pytest.mark.parametrize("module", sorted(path.stem for path in E2E.glob("test_*.py")))
def test_every_e2e_module_is_marked_e2e(module: str) -> None:
    """An e2e module without ``pytestmark = pytest.mark.e2e`` would run in the fast lane (and boot hosts)."""
    marks = getattr(importlib.import_module(f"tests.e2e.{module}"), "pytestmark", [])
    assert any(mark.name == "e2e" for mark in (marks if isinstance(marks, list) else [marks])), module
