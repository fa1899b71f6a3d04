"""Several facts' commands in one shell command, and their outputs told apart again.

Each command runs in its own subshell, its output between two marker lines (the second carries its
exit status); its stderr is dropped, as a single fact's is when it succeeds. A newline is printed
before the end marker (output need not end with one) and taken off again.
"""

from __future__ import annotations

from collections.abc import Sequence

FactRequest = tuple[str, tuple[tuple[str, object], ...]]
"""A fact's name as `pyinfra @host fact` takes it (`files.File`, `facts.gpu.NvidiaGpus`) and its arguments."""

MARK = "@@gpubox-fact"


def join_commands(commands: Sequence[str]) -> str:
    """One command running each of `commands`, its output framed by `@@gpubox-fact N` / `... N rc=S`."""
    return "; ".join(
        f"echo '{MARK} {index}'; ( {command} ) 2>/dev/null; rc=$?; echo; echo \"{MARK} {index} rc=$rc\""
        for index, command in enumerate(commands)
    )


def split_outputs(lines: Sequence[str]) -> list[tuple[list[str], int]]:
    """Each command's output lines and exit status, in order; ValueError for a frame left open."""
    outputs: list[tuple[list[str], int]] = []
    current: list[str] | None = None
    for line in lines:
        if current is None and line == f"{MARK} {len(outputs)}":
            current = []
        elif current is not None and line.startswith(f"{MARK} {len(outputs)} rc="):
            if current and current[-1] == "":
                current.pop()  # the newline printed before the end marker
            outputs.append((current, int(line.rsplit("=", 1)[1])))
            current = None
        elif current is not None:
            current.append(line)
    if current is not None:
        raise ValueError(f"the output of command {len(outputs)} has no end (`{MARK} {len(outputs)} rc=N`)")
    return outputs
