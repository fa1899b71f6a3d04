"""The pyinfra internals gpubox relies on, in one place: why ``pyproject.toml`` pins ``pyinfra>=3.10,<3.11``.

pyinfra's documented API (operations, facts, ``host.get_fact``) is not enough for some of what
gpubox does; these reach into pyinfra 3.10's own modules and behaviour, and
``tests/test_pyinfra_internals.py`` checks each against the installed pyinfra, so a release that
changes one fails there by name rather than in a deploy:

- ``host_operations``: the run's ``State.ops`` (host -> operation hash -> its data), read by
  ``operations/host_facts.py`` to know whether anything changed the host since a fact was read;
- ``connector_arguments``: ``Host.current_op_global_arguments`` filtered by ``CONNECTOR_ARGUMENT_KEYS``,
  the running operation's ``_sudo`` & co., used by ``operations/host_commands.py`` and ``operations/models.py``;
- ``host_command``: ``pop_global_arguments`` and ``make_unix_command_for_host``, the command line pyinfra
  would run for the host (``operations/deploy_lock.py`` runs it on its own channel of the connection);
- ``state_host_step``: ``FunctionCommand``'s calling convention: a function whose parameters are
  *named* ``state`` and ``host`` is called with both and its return value is the command's success
  (``False`` fails the operation without a traceback); ``operations/failures.py`` uses it;
- ``on_host_disconnect``: ``State.add_callback_handler`` and ``BaseStateCallback.host_disconnect``,
  which pyinfra triggers for every host at the end of every run (``operations/deploy_lock.py``
  releases its locks there);
- ``operation_order``: the order pyinfra's CLI gives each operation
  (``pyinfra.api.util.get_operation_order_from_stack``: the line numbers of the call stack from the
  deploy file on, pyinfra's own frames left out), found by walking the frames. pyinfra's builds
  ``inspect.stack()``, which reads every frame's source line and searches ``sys.modules`` for its module:
  ~3 ms an operation, 0.09 s of a 28-operation no-op, and 16 times that on a 16-host run.
  ``use_operation_order`` puts it in pyinfra's place; ``operations/__init__.py`` calls it, so every run
  of a gpubox deploy uses it, and the test compares it with pyinfra's own on real call stacks;
- ``global_arguments``: ``pyinfra.api.arguments.all_global_arguments``, the operations' global arguments
  (``_sudo`` & co.) with their types, which pyinfra works out with ``typing.get_type_hints`` again for every
  operation of every host and every fact class defined: ~0.5 ms each, 0.07 s of a 16-host no-op. The types
  never change in a process: ``use_global_arguments_once`` has pyinfra read them once (the same list, a
  fresh copy each call); ``operations/__init__.py`` calls it too.

One more lives in ``gpubox/inventory.py`` (``import_pyinfra_cli_without_gevent_patching``), where the
pure core would otherwise import this package: importing ``pyinfra_cli`` calls
``gevent.monkey.patch_all()`` from its package ``__init__``, which gpubox's own CLI replaces with a no-op
while it imports pyinfra's inventory loader. The test checks that one too.
"""

from __future__ import annotations

import importlib
import itertools
import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import pyinfra
from pyinfra.api import FunctionCommand, StringCommand
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.host import Host
from pyinfra.api.operation import OperationMeta
from pyinfra.api.state import BaseStateCallback, State
from pyinfra.api.util import PYINFRA_INSTALL_DIR
from pyinfra.connectors.util import make_unix_command_for_host

StateHostFunction = Callable[..., bool]
"""A step pyinfra calls as ``function(state, host, *args, **kwargs)``: its first parameters must be named so."""


def host_operations(run_state: State, run_host: Host) -> list[OperationMeta]:
    """The operations pyinfra has planned (and maybe run) on ``run_host`` in this run, in order."""
    ops: dict[Host, dict[str, Any]] = getattr(run_state, "ops", {})
    return [data.operation_meta for data in ops.get(run_host, {}).values()]


def connector_arguments(run_host: Host) -> dict[str, Any]:
    """The running operation's connector arguments (``_sudo``, ``_sudo_user``, ...); only while it yields."""
    arguments = run_host.current_op_global_arguments or {}
    return {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments}


def host_command(run_state: State, run_host: Host, command: str, drop: Iterable[str] = ()) -> str:
    """The shell line pyinfra would run for ``command`` on this host (sudo & co. from the global arguments),
    less the connector arguments named in ``drop``."""
    arguments, _ = pop_global_arguments(run_state, run_host, {})
    connector = {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments and key not in drop}
    return str(make_unix_command_for_host(run_state, run_host, StringCommand(command), **connector).get_raw_value())


def state_host_step(function: StateHostFunction, *args: Any, **kwargs: Any) -> FunctionCommand:
    """A ``FunctionCommand`` pyinfra calls as ``function(state, host, *args, **kwargs)``, its result the success."""
    return FunctionCommand(function, args, kwargs)


def on_host_disconnect(run_state: State, callback: Callable[[State, Host], None]) -> None:
    """Call ``callback(state, host)`` when pyinfra disconnects a host: at the end of every run, however it ended."""

    class _OnDisconnect(BaseStateCallback):
        @staticmethod
        def host_disconnect(state: State, host: Host) -> None:  # type: ignore[override]
            callback(state, host)

    run_state.add_callback_handler(_OnDisconnect())


def _frame_line(frame: FrameType) -> int:
    """The line ``inspect.getframeinfo`` gives a frame: where its current instruction starts (a call
    spread over several lines: its first), else the frame's line."""
    if frame.f_lasti >= 0:
        start, *_ = next(itertools.islice(frame.f_code.co_positions(), frame.f_lasti // 2, None))
        if start is not None:
            return start
    return frame.f_lineno


def operation_order(run_state: State) -> list[int]:
    """``get_operation_order_from_stack(state)`` of pyinfra 3.10, without ``inspect.stack()``: the
    running deploy file's operation number (CLI), then the line of each frame from the deploy file's
    outermost one inwards, pyinfra's own frames left out."""
    frames: list[FrameType] = []
    frame: FrameType | None = sys._getframe()  # this one included: pyinfra's own frame ends its stack
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()  # outermost first, as pyinfra reads inspect.stack() reversed
    start = 0
    if run_state.current_deploy_filename:
        for start, outer in enumerate(frames):  # noqa: B007 (pyinfra's loop: the last frame when none matches)
            if outer.f_code.co_filename == run_state.current_deploy_filename:
                break
    order = [run_state.current_op_file_number] if pyinfra.is_cli else []
    order.extend(
        _frame_line(inner)
        for inner in frames[start:-1]  # less this function's own frame, as pyinfra's is left out
        if not inner.f_code.co_filename.startswith(PYINFRA_INSTALL_DIR)
    )
    return order


def use_operation_order() -> None:
    """Have pyinfra order this process's operations with ``operation_order`` (the same numbers, faster)."""
    sys.modules["pyinfra.api.operation"].get_operation_order_from_stack = operation_order


def use_global_arguments_once() -> None:
    """Have pyinfra work out its global arguments' types once in this process rather than at every call."""
    arguments_module = importlib.import_module("pyinfra.api.arguments")
    found: list[tuple[str, type]] = arguments_module.all_global_arguments()

    def global_arguments() -> list[tuple[str, type]]:
        """pyinfra's ``all_global_arguments()``, read once (a copy: a caller may change its list)."""
        return list(found)

    for module in (arguments_module, importlib.import_module("pyinfra.api.facts")):
        module.all_global_arguments = global_arguments  # type: ignore[attr-defined]
