"""pyinfra-testing fixtures for gpubox's operations: one folder per operation (``<module>.<op>``) of JSON files.

Each file has the keys of pyinfra's own operation tests (``args``/``kwargs``, ``facts``, ``commands``,
``exception``, ``noop_description``, ``local_files``) and is run the way
``pyinfra_testing.operations.make_operation_tests`` runs one (its FakeState, ``parse_value``,
``coerce_operation_arguments``, ``patch_files``, ``parse_commands``, ``assert_commands``), with these
differences, for what the stock runner cannot express:

- gpubox's operations take pydantic specs (``LlamaCppBuild``, ``ModelFile``, ``LlamaServer``), which
  ``coerce_operation_arguments`` leaves as dicts (it builds enums and dataclasses only): an argument
  whose annotation is a pydantic model is built with ``model_validate`` first, so a spec the real
  code would refuse fails the test the same way.
- A fact without arguments (``gpu.NvidiaGpus``, ``cuda.CudaToolkit``) comes back from the stock
  FakeHost as its ``FakeFact`` wrapper, which is never ``None`` and always truthy: here it comes back
  as its value (``null`` -> ``None``, ``[]`` -> an empty list), like a fact with arguments does and
  like real pyinfra returns it.
- ``local_files`` patches the controller's filesystem only when a fixture has the key: ``patch_files``
  replaces ``os.stat`` & co. process-wide with a stub that breaks ``pathlib`` (``stat(follow_symlinks=)``),
  and ``models.place`` reads its controller source for real (sha256 and GGUF header of a committed file).
- ``host.log`` lines are recorded; the optional ``logs`` key lists the lines the operation must log.
- With ``exception``, an optional ``commands`` lists what the operation yielded before it raised.
- ``state`` (e.g. ``{"is_executing": true}``) sets attributes of the fake state for one test.

The values of gpubox's own facts in the fixtures are their records' JSON form (``Record.to_json()``, what
``pyinfra @host fact ...`` prints): ``test_fact_values_are_record_json`` checks each round-trips exactly.

``GPUBOX_UPDATE_FIXTURES=1 .venv/bin/pytest tests/operations`` rewrites the ``commands``, ``logs``,
``noop_description`` and exception ``message`` of each fixture to what the operation does now (e.g.
after a change to the build script): review ``git diff tests/operations`` before keeping it.

``@repo@`` in a fixture stands for the repository root (``state.cwd`` of the test, so a relative
``source`` of a model names a committed file under ``tests/fixtures``).

A fact value may name a fact fixture instead of copying its value: ``{"@fact@":
"llamacpp.LlamaServerFlags/help_0c1e57098"}`` is the ``fact`` of ``tests/facts/<that>.json`` (what the
fact parsed from real output, e.g. the pinned llama-server's ``--help``), so the flag list lives in one
file. ``"@without@": {"flags": [...]}`` drops values from its lists (each must be there: a fixture
cannot name a flag the pinned build lacks) and ``"@update@": {"spec_types": []}`` replaces keys, for an
older or newer build. ``test_llama_server_flags_name_the_fact_fixture`` refuses an inlined copy.
"""

from __future__ import annotations

import inspect
import json
import os
import typing
import warnings
from contextlib import nullcontext
from importlib import import_module
from pathlib import Path
from typing import Any
from unittest import TestCase

import pytest
from pydantic import BaseModel, TypeAdapter
from pyinfra.api.arguments import all_argument_meta
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing import testgen
from pyinfra_testing.operations import assert_commands, parse_commands
from pyinfra_testing.util import (
    FakeHost,
    FakeState,
    _wrap_fact_value,
    coerce_operation_arguments,
    parse_value,
    patch_files,
)

from gpubox import binaries, cuda, gpu

HERE = Path(__file__).parent
REPO_ROOT = HERE.parent.parent
REPO_TOKEN = "@repo@"
FACT_FIXTURES = HERE.parent / "facts"
FACT_REFERENCE, WITHOUT, UPDATE_KEYS = "@fact@", "@without@", "@update@"
UPDATE = os.environ.get("GPUBOX_UPDATE_FIXTURES") == "1"


def _replace_strings(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace_strings(item, old, new) for item in value]
    if isinstance(value, dict):
        return {key: _replace_strings(item, old, new) for key, item in value.items()}
    return value


def _with_repo_root(value: Any) -> Any:
    return _replace_strings(value, REPO_TOKEN, str(REPO_ROOT))


def _without(values: list[Any], dropped: list[Any], where: str) -> list[Any]:
    absent = [value for value in dropped if value not in values]
    assert not absent, f"{where}: {absent} not in the fact fixture, nothing to drop"
    return [value for value in values if value not in dropped]


def _fact_fixture_value(reference: dict[str, Any]) -> Any:
    """The fact fixture's ``fact`` that ``reference`` names, less its ``@without@``, with its ``@update@``."""
    name = reference[FACT_REFERENCE]
    unknown = set(reference) - {FACT_REFERENCE, WITHOUT, UPDATE_KEYS}
    assert not unknown, f"{name}: unknown keys {sorted(unknown)} beside {FACT_REFERENCE}"
    value = json.loads((FACT_FIXTURES / f"{name}.json").read_text())["fact"]
    for key, dropped in reference.get(WITHOUT, {}).items():
        value[key] = _without(value[key], dropped, f"{name} {key}")
    updates = reference.get(UPDATE_KEYS, {})
    assert set(updates) <= set(value), f"{name}: {sorted(set(updates) - set(value))} not in the fact"
    return {**value, **updates}


def _with_fact_fixtures(value: Any) -> Any:
    """Each ``{"@fact@": ...}`` in a fixture's facts replaced by the fact fixture's value it names."""
    if isinstance(value, dict) and FACT_REFERENCE in value:
        return _fact_fixture_value(value)
    if isinstance(value, dict):
        return {key: _with_fact_fixtures(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_fact_fixtures(item) for item in value]
    return value


def _update_fixture(path: Path, **found: Any) -> None:
    """Rewrite what the operation did into the fixture (GPUBOX_UPDATE_FIXTURES=1), keeping its other keys.

    Fails when that changed the fixture: an update run passes only where nothing changed, and a
    change is for a person to review (`git diff`) before the next run.
    """
    before = path.read_text()
    data = json.loads(before)
    found = _replace_strings(found, str(REPO_ROOT), REPO_TOKEN)
    if "message" in found:
        data["exception"]["message"] = found["message"]
        if "commands" in data:
            data["commands"] = found["commands"]
    else:
        data["commands"] = found["commands"]
        if "logs" in data:
            data["logs"] = found["logs"]
        if "noop_description" in data or not found["commands"]:
            data["noop_description"] = found["noop_description"]
    after = json.dumps(data, indent=4) + "\n"
    path.write_text(after)
    assert after == before, f"{path} rewritten with what the operation did now: review `git diff {path}` and rerun"


class GpuboxFakeHost(FakeHost):
    def __init__(self, state: FakeState, facts: dict[str, Any]) -> None:
        super().__init__(state, "testhost", facts=facts, data={})
        self.logs: list[str] = []

    def log(self, message: str, log_func: Any = None) -> None:
        self.logs.append(message)

    def get_fact(self, fact_cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_kwargs = {key: value for key, value in kwargs.items() if key not in all_argument_meta}
        if args or real_kwargs:
            return super().get_fact(fact_cls, *args, **kwargs)
        fact_key = self._get_fact_key(fact_cls)
        fact = getattr(self.fact, fact_key, None)
        if fact is None:
            raise KeyError(f"Missing test fact: {fact_key}")
        return _wrap_fact_value(fact.data)


def _build_specs(op: Any, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Build each pydantic-annotated argument from its JSON object, as a deploy would pass it."""
    inner = op._inner
    hints = typing.get_type_hints(inner, include_extras=True)  # AnyService validates through the registry
    names = list(inspect.signature(inner).parameters)

    def build(name: str | None, value: Any) -> Any:
        hint = hints.get(name) if name is not None else None
        if isinstance(hint, type) and issubclass(hint, BaseModel) and isinstance(value, dict):
            return hint.model_validate(value)
        if hint is not None and not isinstance(hint, type) and isinstance(value, dict):
            return TypeAdapter(hint).validate_python(value)  # a union of specs (AnyService, AnySourceBuild)
        return value

    built_args = [build(names[index] if index < len(names) else None, value) for index, value in enumerate(args)]
    built_kwargs = {name: build(name, value) for name, value in kwargs.items()}
    return built_args, built_kwargs


def make_gpubox_operation_tests(base_import_path: str, operation_path: str, tests_folder: Path) -> type:
    module_name, op_name = operation_path.rsplit(".", 1)
    op = getattr(import_module(f"{base_import_path}.{module_name}"), op_name)

    class OperationTests(
        TestCase,
        metaclass=testgen.TestGenerator,
        tests_dir=tests_folder,
        test_prefix=f"test_{module_name}_{op_name}_",
        test_method="_test",
    ):
        def _test(self, test_name: str, test_data: dict[str, Any]) -> None:
            test_data = _with_repo_root(test_data)
            state = FakeState()
            state.cwd = str(REPO_ROOT)
            for key, value in test_data.get("state", {}).items():
                setattr(state, key, value)
            host = GpuboxFakeHost(state, facts=parse_value(_with_fact_fixtures(test_data.get("facts", {}))))

            args = parse_value(test_data.get("args", []))
            kwargs = parse_value(test_data.get("kwargs", {}))
            args, kwargs = _build_specs(op, args, kwargs)
            args, kwargs = coerce_operation_arguments(op, args, kwargs)

            allowed_exception = test_data.get("exception")
            local_files = patch_files(test_data["local_files"]) if "local_files" in test_data else nullcontext()
            with ctx_state.use(state), ctx_host.use(host), local_files:
                output_commands: list[Any] = []
                try:
                    for command in op._inner(*args, **kwargs):
                        output_commands.append(command)
                except Exception as error:
                    if not allowed_exception:
                        raise
                    names = allowed_exception.get("names") or [allowed_exception["name"]]
                    if error.__class__.__name__ not in names:
                        raise
                    if UPDATE:
                        fixture = tests_folder / f"{test_name}.json"
                        _update_fixture(fixture, message=error.args[0], commands=parse_commands(output_commands))
                        return
                    self.assertEqual(error.args[0], allowed_exception["message"])
                    if "commands" in test_data:
                        assert_commands(parse_commands(output_commands), test_data["commands"])
                    return
            if allowed_exception:
                yielded = len(output_commands)
                self.fail(f"expected {allowed_exception['name']}, the operation yielded {yielded} commands")

            commands = parse_commands(output_commands)
            if UPDATE:
                _update_fixture(
                    tests_folder / f"{test_name}.json",
                    commands=commands,
                    logs=host.logs,
                    noop_description=host.noop_description,
                )
                return
            assert_commands(commands, test_data["commands"])
            if "logs" in test_data:
                self.assertEqual(host.logs, test_data["logs"])

            noop_description = test_data.get("noop_description")
            if commands and noop_description is not None:
                self.fail(f"{len(commands)} commands and a noop_description")
            if not commands:
                if noop_description is None:
                    warnings.warn(f"no noop_description in {operation_path}/{test_name}.json", stacklevel=1)
                self.assertEqual(host.noop_description, noop_description)
            else:
                self.assertIsNone(host.noop_description, "the operation yielded commands and called host.noop")

    OperationTests.__name__ = OperationTests.__qualname__ = f"TestOperation_{module_name}_{op_name}"
    return OperationTests


for _folder in sorted(path for path in HERE.iterdir() if path.is_dir() and "." in path.name):
    _case = make_gpubox_operation_tests("operations", _folder.name, _folder)
    globals()[_case.__name__] = _case
del _folder, _case


# gpubox's facts, the records they return, and whether they take arguments (then the fixture keys
# their values by the arguments, e.g. "path=/opt/llama.cpp/src").
FACT_RECORDS: dict[str, tuple[TypeAdapter[Any], bool]] = {
    "cuda.CudaToolkit": (TypeAdapter(cuda.Nvcc | None), False),
    "gpu.NvidiaGpus": (TypeAdapter(list[gpu.Gpu]), False),
    "llamacpp.LlamaCppCheckout": (TypeAdapter(binaries.SourceCheckout | None), True),
    "llamacpp.LlamaServerVersion": (TypeAdapter(binaries.ServerVersion | None), True),
    "llamacpp.LlamaServerFlags": (TypeAdapter(binaries.ServerFlags | None), True),
}


@pytest.mark.parametrize("fixture", sorted(HERE.glob("*.*/*.json")), ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_fact_values_are_record_json(fixture: Path) -> None:
    """A gpubox fact's value in a fixture is exactly what its record serialises to: no field missing,
    none extra, none renamed (so a change to a record fails here rather than passing silently)."""
    facts = _with_fact_fixtures(json.loads(fixture.read_text()).get("facts", {}))
    for key, (adapter, keyed) in FACT_RECORDS.items():
        if key in facts:
            for value in facts[key].values() if keyed else [facts[key]]:
                assert adapter.dump_python(adapter.validate_python(value), mode="json") == value, key


@pytest.mark.parametrize("fixture", sorted(HERE.glob("*.*/*.json")), ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_llama_server_flags_name_the_fact_fixture(fixture: Path) -> None:
    """The pinned llama-server's flags live in one file, the fact fixture of its ``--help``: an operation
    fixture names it (``@fact@``, with what an other build lacks under ``@without@``), never copies it."""
    values = json.loads(fixture.read_text()).get("facts", {}).get("llamacpp.LlamaServerFlags", {})
    inlined = [key for key, value in values.items() if value is not None and FACT_REFERENCE not in value]
    assert not inlined, f"{fixture}: the flags are copied for {inlined}: name the fact fixture ({FACT_REFERENCE})"
