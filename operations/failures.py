"""Failing an operation with one message, as pyinfra 3.10's CLI can print it: no traceback.

How the CLI (``pyinfra_cli``) prints an error depends on where it is raised and what it is:

- While the deploy files load (and, without ``-y``, while each operation's checks run): a
  ``PyinfraError`` (``OperationError``, ``DeployError``, ...) is one line, ``--> Operation error in
  FILE line N: message``; any other exception is printed with its traceback.
- While operations execute (always, with ``-y``): an ``OperationError`` raised by an operation's
  body still ends as that one line, but gevent first prints the greenlet's whole traceback. A
  ``FunctionCommand`` whose function raises is caught: "Unexpected error in Python callback" and a
  traceback (even after a clear message the function logged, such as a smoke test's rollback).

What fails cleanly while executing is a command that reports failure: a shell command that exits
non-zero, or a ``FunctionCommand`` whose function takes ``state`` and ``host`` (pyinfra then calls it
directly and takes what it returns as the command's status) and returns False. The operation then
fails, the host with it, and the run exits 1. ``python_step`` wraps a function that raises
``OperationError`` into that form; ``refusals_fail_cleanly`` does it for an operation's body.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from functools import wraps
from typing import Any, ParamSpec

from pyinfra import logger, state
from pyinfra.api import FunctionCommand, OperationError
from pyinfra.api.host import Host
from pyinfra.api.state import State
from pyinfra.context import ctx_state

from .pyinfra_internals import state_host_step

P = ParamSpec("P")


def report(host: Host, message: str) -> bool:
    """Log ``message`` as the host's error (red, one line per line of it); False, a failed command's status."""
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


def python_step(function: Callable[..., object], *args: Any, **kwargs: Any) -> FunctionCommand:
    """A command that runs ``function(*args, **kwargs)`` on the controller while the operation executes;
    an ``OperationError`` it raises fails the operation with the error's message and no traceback.

    Use it where ``FunctionCommand(function, args, kwargs)`` would be yielded; any other exception is
    left to pyinfra (a bug: its traceback is wanted).
    """

    def step(state: State, host: Host, *args: Any, **kwargs: Any) -> bool:  # pyinfra passes both: it names them
        try:
            function(*args, **kwargs)
        except OperationError as error:
            return report(host, str(error))
        return True

    step.__name__ = step.__qualname__ = getattr(function, "__name__", "step")  # as --debug-operations names it
    return state_host_step(step, *args, **kwargs)


def _executing() -> bool:
    return ctx_state.isset() and bool(state.is_executing)


def refusals_fail_cleanly(
    body: Callable[P, Generator[Any, Any, None]],
) -> Callable[P, Generator[Any, Any, None]]:
    """For an operation's body (under ``@operation()``): an ``OperationError`` it raises while
    executing fails the operation with the message alone, after the commands it yielded before.
    While planning the error is raised as it is: pyinfra's CLI prints it as one line there.

    **Example:**

    .. code:: python

        @operation()
        @refusals_fail_cleanly
        def place(model: ModelFile): ...
    """

    @wraps(body)
    def checked(*args: P.args, **kwargs: P.kwargs) -> Generator[Any, Any, None]:
        try:
            yield from body(*args, **kwargs)
        except OperationError as error:
            if not _executing():
                raise
            message = str(error)
            yield state_host_step(lambda state, host: report(host, message))

    return checked
