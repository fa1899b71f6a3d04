"""Commands an operation runs itself, from a `FunctionCommand`, with the operation's own connector arguments.

pyinfra prints a command's output only at -vvv, and reports a command's success, not its output. A
long build that should show progress, and a smoke test that reads answers and may roll back, run
their commands here, with the same `_sudo` & co. the operation was called with.
"""

from __future__ import annotations

from collections.abc import Mapping
from io import StringIO
from typing import Any

from pyinfra import host
from pyinfra.api import OperationError, StringCommand
from pyinfra.connectors.util import CommandOutput

from . import pyinfra_internals


def connector_arguments() -> dict[str, Any]:
    """The running operation's connector arguments (`_sudo`, `_sudo_user`, ...), to pass to a FunctionCommand.

    Call it while the operation yields its commands: only then does the host know them.
    """
    return pyinfra_internals.connector_arguments(host)


EXIT_MARKER = "__gpubox_exit="


def run_status(command: str, arguments: Mapping[str, Any]) -> tuple[str, int]:
    """Run a command on the host; its stdout and its exit code, for a caller that reads both (curl's
    exit code tells a refused connection from a timeout), where pyinfra reports success only."""
    script = StringCommand(f"{command}; printf '\\n{EXIT_MARKER}%s\\n' \"$?\"")
    _, output = host.run_shell_command(script, **arguments)
    lines = output.stdout_lines
    exit_code = int(lines[-1].removeprefix(EXIT_MARKER)) if lines and lines[-1].startswith(EXIT_MARKER) else 255
    return "\n".join(lines[:-1]) + "\n", exit_code


def run(script: str, arguments: Mapping[str, Any], *, show_output: bool = False) -> CommandOutput:
    """Run a script on the host; its output, shown line by line as it comes when `show_output`.

    Raises OperationError with the last lines of its stderr when it fails.
    """
    succeeded, output = host.run_shell_command(
        StringCommand(script), print_output=show_output, print_input=False, **arguments
    )
    if not succeeded:
        raise OperationError("\n".join(output.stderr_lines[-30:]) or "the command failed")
    return output


def put_secret(text: str, staged: str, then: str, failed: str) -> None:
    """Upload ``text`` (a key) to ``staged`` on the host, then run ``then`` (which moves or appends it and removes
    the staged file), printing nothing of either: the key is in no argv, no diff and no log. ``failed`` is the
    error's message."""
    if not host.put_file(StringIO(text), staged, print_output=False, print_input=False):
        raise OperationError(f"{failed}: could not upload {staged}")
    succeeded, _ = host.run_shell_command(StringCommand(then), print_output=False, print_input=False)
    if not succeeded:
        raise OperationError(failed)
