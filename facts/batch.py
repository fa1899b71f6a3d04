"""Several facts in one round trip: each one's own command and parser, run together.

pyinfra @host fact facts.batch.Facts requests='[["files.File", [["path", "/etc/hosts"]]]]'

A no-op deploy is mostly round trips, one per fact; `operations.host_facts.prefetch` loads every fact
a run will read in one of these and hands each operation its own fact's value.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pyinfra.api.command import StringCommand
from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox.batch import FactRequest, join_commands, split_outputs


def fact_class(name: str) -> type[FactBase[Any]]:
    """`files.File` -> pyinfra.facts.files.File; `facts.gpu.NvidiaGpus` -> gpubox's own."""
    module, _, attribute = name.rpartition(".")
    package = module if module.startswith("facts.") else f"pyinfra.facts.{module}"
    found: type[FactBase[Any]] = getattr(import_module(package), attribute)
    return found


def _raw(command: str | StringCommand) -> str:
    return command.get_raw_value() if isinstance(command, StringCommand) else command


class Facts(FactBase[list[tuple[list[str], int]]]):
    """
    The outputs of several facts' commands (``requests``: each a fact's name, as ``pyinfra @host
    fact`` takes it, and its arguments), in order, from one command: each one's lines and exit status.
    ``values`` turns them into the facts' values, each by its own fact's parser.
    """

    @override
    def command(self, requests: tuple[FactRequest, ...]) -> str:
        return join_commands([_raw(fact_class(name)().command(**dict(arguments))) for name, arguments in requests])

    @override
    def process(self, output: list[str]) -> list[tuple[list[str], int]]:
        try:
            return split_outputs(output)
        except ValueError as error:
            raise FactProcessError(str(error)) from error


def values(requests: tuple[FactRequest, ...], outputs: list[tuple[list[str], int]]) -> list[Any]:
    """Each request's value, by its own fact's parser: its default when its command failed or said
    nothing, as when the fact is loaded alone."""
    if len(outputs) != len(requests):
        raise FactProcessError(f"{len(requests)} facts asked, {len(outputs)} answered")
    found = []
    for (name, arguments), (lines, status) in zip(requests, outputs, strict=True):
        fact = fact_class(name)()
        fact.command(**dict(arguments))  # a fact may keep what its command chose (FileContents' marker)
        found.append(fact.process(lines) if status == 0 and lines else fact.default())
    return found
