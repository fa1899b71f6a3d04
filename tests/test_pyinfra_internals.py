"""The pyinfra internals gpubox relies on (``operations/pyinfra_internals.py``), on the installed pyinfra.

Each test names one internal; a pyinfra release that renames, moves or changes it fails here, not in
a deploy. ``pyproject.toml`` pins the range these pass on.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import StateOperationHostData

from operations.pyinfra_internals import (
    connector_arguments,
    host_command,
    host_operations,
    on_host_disconnect,
    operation_order,
    state_host_step,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def local() -> tuple[State, Host]:
    inventory = Inventory((["@local"], {}))
    run_state = State(inventory, Config())
    return run_state, inventory.get_host("@local")


def test_the_installed_pyinfra_is_in_the_pinned_range() -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [pin for pin in pins if pin.startswith("pyinfra")]
    low, high = re.fullmatch(r"pyinfra>=([\d.]+),<([\d.]+)", pin.replace(" ", "")).groups()  # type: ignore[union-attr]

    def key(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", text)[:3])

    assert key(low) <= key(version("pyinfra")) < key(high)


def test_host_operations_reads_the_states_ops(local: tuple[State, Host]) -> None:
    run_state, host = local
    assert host_operations(run_state, host) == []
    meta = OperationMeta("hash1", is_change=True)
    run_state.set_op_data_for_host(host, "hash1", StateOperationHostData(iter, {}, meta))  # type: ignore[arg-type]
    assert host_operations(run_state, host) == [meta]
    assert not meta.is_complete()  # what `changes_so_far` asks of each, with did_change()
    assert callable(meta.did_change)


def test_connector_arguments_are_the_running_operations(local: tuple[State, Host]) -> None:
    _, host = local
    host.current_op_global_arguments = None
    assert connector_arguments(host) == {}
    host.current_op_global_arguments = {"_sudo": True, "_sudo_user": "svc", "name": "x", "_if": []}  # type: ignore[typeddict-unknown-key]
    assert connector_arguments(host) == {"_sudo": True, "_sudo_user": "svc"}


def test_host_command_is_the_line_pyinfra_would_run(local: tuple[State, Host]) -> None:
    run_state, host = local
    line = host_command(run_state, host, "echo ab", drop=("_get_pty", "_timeout", "_stdin", "_success_exit_codes"))
    assert line == "sh -c 'echo ab'"


def test_a_state_host_step_is_called_with_both_and_its_result_is_the_success(local: tuple[State, Host]) -> None:
    run_state, host = local
    seen: list[tuple[State, Host, str]] = []

    def step(state: State, host: Host, word: str) -> bool:
        seen.append((state, host, word))
        return False

    assert state_host_step(step, "w").execute(run_state, host, {}) is False  # type: ignore[typeddict-item]
    assert seen == [(run_state, host, "w")]


def test_on_host_disconnect_runs_when_pyinfra_disconnects_a_host(local: tuple[State, Host]) -> None:
    run_state, host = local
    disconnected: list[str] = []
    on_host_disconnect(run_state, lambda state, host: disconnected.append(host.name))
    host.disconnect()
    assert disconnected == ["@local"]


def test_pyinfra_cli_patches_gevent_on_import_and_gpubox_imports_it_without() -> None:
    import pyinfra_cli

    assert "monkey.patch_all()" in inspect.getsource(pyinfra_cli)  # what gpubox/inventory.py stops
    code = (
        "from gpubox.inventory import import_pyinfra_cli_without_gevent_patching as load; load(); "
        "import sys; from gevent import monkey; "
        "print('pyinfra_cli' in sys.modules, monkey.is_module_patched('socket'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["True", "False"]  # imported, and the stdlib left alone


DEPLOY_WITH_NESTED_CALLS = """\
def operation(probe):
    return probe()


def nested(probe):
    return operation(
        probe,
    )


RESULT = [nested(PROBE), [
    operation(PROBE)
    for _ in range(2)
]]
"""


@pytest.mark.parametrize("in_cli", [True, False])
@pytest.mark.parametrize("deploy_file", ["the deploy", "another file", ""])
def test_operation_order_gives_pyinfras_numbers_from_the_frames(
    local: tuple[State, Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_cli: bool, deploy_file: str
) -> None:
    import pyinfra
    from pyinfra.api.util import get_operation_order_from_stack

    run_state, _ = local
    path = tmp_path / "deploy.py"
    path.write_text(DEPLOY_WITH_NESTED_CALLS)
    named = {"the deploy": str(path), "another file": str(tmp_path / "other.py"), "": None}[deploy_file]
    monkeypatch.setattr(run_state, "current_deploy_filename", named)
    monkeypatch.setattr(run_state, "current_op_file_number", 7)
    monkeypatch.setattr(pyinfra, "is_cli", in_cli)

    def probe() -> tuple[list[int], list[int]]:  # both called from the same frame, as pyinfra calls them
        return get_operation_order_from_stack(run_state), operation_order(run_state)

    scope: dict[str, object] = {"PROBE": probe}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    first, loop = scope["RESULT"]  # type: ignore[misc]
    for theirs, ours in [first, *loop]:
        assert ours == theirs
    if deploy_file == "the deploy":  # the multi-line call counts from its first line, as inspect does
        expected = ([7] if in_cli else []) + [11, 6, 2]  # RESULT's line, `return operation(`, `return probe()`
        assert first[1][: len(expected)] == expected


def test_importing_gpubox_operations_puts_operation_order_in_pyinfras_place() -> None:
    code = (
        "import operations, sys; from operations.pyinfra_internals import operation_order; "
        "print(sys.modules['pyinfra.api.operation'].get_operation_order_from_stack is operation_order)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["True"]


def test_importing_gpubox_operations_has_pyinfra_read_its_global_arguments_once() -> None:
    code = (
        "import operations, typing, pyinfra.api.arguments as a, pyinfra.api.facts as f\n"
        "fresh = list(typing.get_type_hints(a.AllArguments).items())\n"
        "first = a.all_global_arguments(); first.clear()  # a caller's change is its own\n"
        "print(a.all_global_arguments() == fresh, f.all_global_arguments() == fresh, len(fresh) > 10)\n"
        "operations.pyinfra_internals.use_global_arguments_once()  # again: still pyinfra's own types\n"
        "print(a.all_global_arguments() == fresh)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["True", "True", "True", "True"]
