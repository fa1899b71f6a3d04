"""Read a pyinfra inventory file without connecting to anything.

An inventory is a Python file whose top-level lists (or tuples) of hosts are groups; a host is a
name or a `(name, data)` pair, and a gpubox host carries its `Box` under the data key `box`.
This mirrors pyinfra's own reading of such files, so `gpubox check` and `gpubox plan` see what
`pyinfra INVENTORY ...` would.
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gpubox.spec import Box, Problem, problems_from

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


def _host_entries(value: object) -> list[tuple[str, dict[str, Any]]] | None:
    """The hosts of one top-level variable, or None when it is not a host group."""
    if not isinstance(value, list | tuple) or not value:
        return None
    entries: list[tuple[str, dict[str, Any]]] = []
    for item in value:
        if isinstance(item, str):
            entries.append((item, {}))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], dict)
        ):
            entries.append((item[0], dict(item[1])))
        else:
            return None
    return entries


def load_inventory(path: str | Path) -> list[InventoryHost]:
    """Import the inventory file and return its hosts with their groups and merged data."""
    inventory_path = Path(path)
    if not inventory_path.is_file():
        raise InventoryError(f"{inventory_path}: no such inventory file")
    try:
        namespace = runpy.run_path(str(inventory_path))
    except ValidationError as error:
        raise InventoryError(
            f"{inventory_path}: a spec in the inventory is refused while it imports",
            problems_from(error),
        ) from error
    except Exception as error:  # noqa: BLE001 - any import failure is the user's to see, named
        raise InventoryError(
            f"{inventory_path}: the inventory does not import: {type(error).__name__}: {error}"
        ) from error
    hosts: dict[str, InventoryHost] = {}
    for group, value in namespace.items():
        if group.startswith("_"):
            continue
        entries = _host_entries(value)
        if entries is None:
            continue
        for name, data in entries:
            host = hosts.setdefault(name, InventoryHost(name=name))
            host.groups.append(group)
            host.data.update(data)
    if not hosts:
        raise InventoryError(f"{inventory_path}: no host lists found (a group is a top-level list of hosts)")
    return list(hosts.values())


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
