"""Read the inventory before pyinfra does, so what it would print as a traceback is one message.

pyinfra 3.10 runs ``config.py`` from the directory it is started in before it loads the inventory
(``pyinfra_cli.cli._set_config``); the project's ``config.py`` calls ``check_inventory_argument``.
It reads the inventory argument with gpubox's loader (``gpubox.inventory.load_inventory``, pyinfra's own
``make_inventory_from_files``) and raises pyinfra's ``InventoryError``, a ``PyinfraError``, which the
CLI prints as one line (``--> pyinfra error ...: message``), for:

- a path that names no file: pyinfra would take ``inventory/nosuch.py`` for a host name, and deploy
  nothing and exit 0 when the name resolves to no address;
- an inventory that is not valid Python: pyinfra compiles it outside its own error handling, prints
  "An internal exception occurred", writes ``pyinfra-debug.log`` and asks for a bug report;
- an inventory that raises while it runs, a spec refused there included (a bad field value): pyinfra
  prints the exception with its traceback (a pydantic error: some 24 lines).

It also records the inventory file's directory (``inventory_base``): operations take a model's relative
``source`` and the default ``gguf-headers`` directory from it, as ``gpubox check`` and ``gpubox plan`` do.
pyinfra keeps no inventory path on its state, and the deploy files run in greenlets without the click
context, so this is the one place that sees the argument.

Nothing else is refused here (a host's ``box`` given as data is validated by the deploy that reads it),
and an argument that is no path (``@local``, ``host1,host2``, a host name) is left to pyinfra.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click
from pyinfra import state
from pyinfra.api.exceptions import InventoryError as PyinfraInventoryError

from gpubox.inventory import InventoryError, inventory_dir, load_inventory, missing_inventory_file, refusal_text

_inventory_dirs: list[Path] = []
"""The running ``pyinfra`` command's inventory directory, once ``check_inventory_argument`` saw a file."""


def record_inventory_dir(argument: str) -> None:
    """Remember the directory of the inventory file ``argument`` names (nothing for a host list)."""
    if os.path.isfile(argument):
        _inventory_dirs[:] = [inventory_dir(argument)]


def inventory_base() -> Path:
    """The directory a model's relative ``source`` and the default ``gguf-headers`` are taken from: the
    inventory file's, when ``config.py`` ran (``pyinfra`` started from the project's directory); else the
    directory pyinfra runs in (``state.cwd``)."""
    if _inventory_dirs:
        return _inventory_dirs[0]
    return Path(state.cwd or os.getcwd())


def resolves(name: str) -> bool:
    """Whether pyinfra would find a host by this name (as ``pyinfra_cli.inventory._resolves_to_host``)."""
    try:
        socket.getaddrinfo(name, None)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def inventory_problem(argument: str) -> str | None:
    """What is wrong with pyinfra's inventory argument, as one message; None when pyinfra may load it."""
    missing = missing_inventory_file(argument, resolves)
    if missing is not None:
        return missing
    if "," in argument or "@" in argument:
        return None
    try:
        load_inventory(argument)
    except InventoryError as error:
        return refusal_text(error)
    return None


def check_inventory_argument() -> None:
    """Refuse the running ``pyinfra`` command's inventory (PyinfraError) when ``inventory_problem`` finds one.

    Outside a ``pyinfra`` command (no click context, e.g. a test importing ``config.py``): nothing.
    """
    context = click.get_current_context(silent=True)
    argument = context.params.get("inventory") if context is not None else None
    if not isinstance(argument, str):
        return
    problem = inventory_problem(argument)
    if problem is not None:
        raise PyinfraInventoryError(problem)
    record_inventory_dir(argument)
