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

Nothing else is refused here (a host's ``box`` given as data is validated by the deploy that reads it),
and an argument that is no path (``@local``, ``host1,host2``, a host name) is left to pyinfra.
"""

from __future__ import annotations

import socket

import click
from pyinfra.api.exceptions import InventoryError as PyinfraInventoryError

from gpubox.inventory import InventoryError, load_inventory, missing_inventory_file, refusal_text


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
