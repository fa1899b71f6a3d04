"""Read a pyinfra inventory file without connecting to anything.

An inventory is a Python file whose top-level lists of hosts are groups; a host is a name or a
`(name, data)` pair, and a gpubox host carries its `Box` under the data key `box`, set in the
file or in `group_data/*.py` beside it. pyinfra's own loader reads it (host data merged with the
groups' data as a deploy sees it), so `gpubox check` and `gpubox plan` see what
`pyinfra INVENTORY ...` would.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpubox.box import Box
from gpubox.spec import Problem, problems_from

BOX_KEY = "box"


class InventoryError(Exception):
    """The inventory file can't be read: it does not import, holds no hosts, or a spec in it is refused."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass
class InventoryHost:
    name: str
    groups: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class HostBox:
    """A host's validated Box, or the problems that refuse it."""

    host: str
    box: Box | None
    problems: list[Problem]


def import_pyinfra_cli_without_gevent_patching() -> None:
    """Import ``pyinfra_cli`` without its package ``__init__``'s ``gevent.monkey.patch_all()``.

    The pyinfra CLI patches the whole stdlib for gevent when its package is imported. Building an
    inventory needs none of it (it executes the inventory and group data files and builds
    ``Inventory``), and the gpubox CLI goes on to run subprocesses and HTTP clients (bench, smoke)
    that must not inherit a late patch (gevent warns that patching ``ssl`` after it is imported can
    break it). Inside a pyinfra run the package is already imported and patched: nothing to do.
    """
    if "pyinfra_cli" in sys.modules:
        return
    from gevent import monkey

    patch_all = monkey.patch_all
    monkey.patch_all = lambda *args, **kwargs: None
    try:
        import pyinfra_cli  # noqa: F401
    finally:
        monkey.patch_all = patch_all


def _pyinfra_hosts(inventory_path: Path) -> list[InventoryHost]:
    """Build the inventory with pyinfra's own CLI loader: the file's groups, then ``group_data/``.

    ``make_inventory_from_files`` is what ``pyinfra INVENTORY ...`` calls (``pyinfra_cli.cli``,
    with ``cwd`` the working directory): group data from ``./group_data`` and from the inventory's
    own directory's ``group_data`` (``all.py``, ``<group>.py``, ``<inventory name>.py``). The
    import is lazy because this is the CLI's adapter, not the pure core: ``gpubox`` imports no
    pyinfra at module level (the deploy's modules are the only ones that run inside pyinfra).
    Like the pyinfra CLI, the loader keeps each file's compiled code by path for the process.
    """
    from pyinfra.api.state import State
    from pyinfra.context import ctx_state

    import_pyinfra_cli_without_gevent_patching()
    from pyinfra_cli.exceptions import UnexpectedExternalError
    from pyinfra_cli.inventory import make_inventory_from_files

    try:
        with ctx_state.use(State()):  # exec_file records the file it runs on the current state
            inventory = make_inventory_from_files(str(inventory_path), cwd=os.getcwd())
    except UnexpectedExternalError as wrapped:  # pyinfra wraps whatever the file raised
        error, where = wrapped.exception, Path(wrapped.filename)
        if isinstance(error, ValidationError):
            raise InventoryError(
                f"{where}: a spec in the inventory is refused while it imports", problems_from(error)
            ) from error
        raise InventoryError(f"{where}: the inventory does not import: {type(error).__name__}: {error}") from error
    except Exception as error:  # noqa: BLE001 - anything else pyinfra raises while loading, named
        raise InventoryError(
            f"{inventory_path}: the inventory does not import: {type(error).__name__}: {error}"
        ) from error
    return [
        InventoryHost(name=host.name, groups=list(host.groups), data=host.data.dict()) for host in inventory
    ]


def load_inventory(path: str | Path) -> list[InventoryHost]:
    """The inventory's hosts with their groups and their data merged as pyinfra merges it (host,
    then its groups' data, then ``all``, including ``group_data/`` files beside the inventory)."""
    inventory_path = Path(path)
    if not inventory_path.is_file():
        raise InventoryError(f"{inventory_path}: no such inventory file")
    hosts = _pyinfra_hosts(inventory_path)
    if not hosts:
        raise InventoryError(f"{inventory_path}: no host lists found (a group is a top-level list of hosts)")
    return hosts


def box_of(host: InventoryHost) -> HostBox | None:
    """Validate a host's `box` data; None when the host is not a gpubox host."""
    if BOX_KEY not in host.data:
        return None
    value = host.data[BOX_KEY]
    try:
        box = value if isinstance(value, Box) else Box.model_validate(value)
    except ValidationError as error:
        return HostBox(host=host.name, box=None, problems=problems_from(error))
    return HostBox(host=host.name, box=box, problems=[])


def box_from_host_data(value: object, host_name: str) -> Box:
    """The Box a deploy runs for a host, validated; refused with every problem named."""
    if value is None:
        raise InventoryError(f"{host_name}: no `{BOX_KEY}` in the host's data: put its gpubox.Box there")
    if isinstance(value, Box):
        return value
    try:
        return Box.model_validate(value)
    except ValidationError as error:
        problems = problems_from(error)
        lines = "; ".join(f"{problem.field}: {problem.message}" for problem in problems)
        raise InventoryError(f"{host_name}: its box is refused: {lines}", problems) from error


def inventory_boxes(path: str | Path) -> list[HostBox]:
    """Every gpubox host of an inventory, each with its Box or its problems."""
    boxes = [box for box in (box_of(host) for host in load_inventory(path)) if box is not None]
    if not boxes:
        raise InventoryError(f"{path}: no host carries a `{BOX_KEY}` in its data")
    return boxes
