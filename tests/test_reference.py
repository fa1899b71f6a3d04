"""docs/reference.md is generated from the models and flag tables (gpubox/reference.py): it must be
current, and every field it documents must say what it does."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import pytest
from pydantic import Field

import gpubox
from gpubox import reference
from gpubox.servers import base
from gpubox.servers.base import Service
from gpubox.servers.registry import server_types
from gpubox.spec import SourceBuild, Spec


def _spec_models() -> list[type[Spec]]:
    """Every spec model gpubox declares, abstract bases (``Service``, ``SourceBuild``) included."""
    found: list[type[Spec]] = []
    pending: list[type[Spec]] = [Spec]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass.__module__.startswith("gpubox.") and subclass not in found:
                found.append(subclass)
                pending.append(subclass)
    return found


def test_docs_reference_is_current() -> None:
    current = reference.REFERENCE.read_text() if reference.REFERENCE.exists() else ""
    generated = reference.render()
    if current != generated:
        diff = "".join(
            list(difflib.unified_diff(
                current.splitlines(keepends=True), generated.splitlines(keepends=True),
                "docs/reference.md", "generated",
            ))[:60]
        )  # fmt: skip
        pytest.fail(f"docs/reference.md is stale: regenerate it with `{reference.REGENERATE}`\n{diff}")


def test_every_public_field_has_a_description() -> None:
    missing = reference.undocumented_fields(_spec_models())
    assert not missing, f"give these fields a Field(description=...): {', '.join(missing)}"


def test_the_reference_documents_every_spec_model_and_server_type() -> None:
    documented = reference.models()
    abstract = {Service, SourceBuild}
    assert [model for model in _spec_models() if model not in documented and model not in abstract] == []
    product = [service_type for service_type in server_types() if service_type.__module__.startswith("gpubox.")]
    assert {gpubox.LlamaServer, gpubox.WhisperServer, gpubox.PiperServer} <= set(product)
    assert set(product) <= set(documented)


def test_every_flag_of_a_server_type_is_in_its_section() -> None:
    page = reference.render()
    for service_type in reference.product_server_types():
        section = page.split(f"\n## {service_type.__name__}\n", 1)[1].split("\n## ", 1)[0]
        missing = [flag.flag for flag in service_type.FLAGS if f"`{flag.flag}`" not in section]
        assert not missing, f"{service_type.__name__}: {missing}"
        for rule in service_type.RULES:
            assert f"- `{rule.__name__}`: " in section


def test_the_shared_rules_are_the_ones_every_service_runs() -> None:
    """The rules the page lists around a type's own are those ``Service.rule_problems`` calls, in order."""
    called = [name for name in Service.rule_problems.__code__.co_names if inspect.isfunction(getattr(base, name, None))]
    shared = [rule.__name__ for rule in (*reference.SHARED_RULES_BEFORE, *reference.SHARED_RULES_AFTER)]
    assert called == shared, "Service.rule_problems changed: update SHARED_RULES_* in gpubox/reference.py"


def test_a_stale_page_fails_the_check_with_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "reference.md"
    assert reference.main(["--write", "--path", str(page)]) == 0
    assert reference.main(["--check", "--path", str(page)]) == 0
    page.write_text(page.read_text().replace("The port it listens on", "The port it used to listen on", 1))
    assert reference.main(["--check", "--path", str(page)]) == 1
    assert reference.REGENERATE in capsys.readouterr().err


def test_a_field_without_a_description_is_named() -> None:
    class Documented(Spec):
        said: int = Field(default=0, description="What it does.")
        unsaid: int = 0
        blank: int = Field(default=0, description=" ")

    assert reference.undocumented_fields([Documented]) == ["Documented.unsaid", "Documented.blank"]


def test_types_render_readably() -> None:
    assert reference.type_text(gpubox.LlamaServer.model_fields["spec_draft_ngl"].annotation) == (
        "int (>= 0) | 'auto' | 'all' | None"
    )
    port = gpubox.LlamaServer.model_fields["port"]
    assert reference.type_text(port.annotation, port.metadata) == "int (>= 1, <= 65535)"
    jobs = gpubox.LlamaCppBuild.model_fields["jobs"]
    assert reference.type_text(jobs.annotation, jobs.metadata) == "int (>= 1) | None"
