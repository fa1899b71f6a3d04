"""Read a pyinfra inventory file without connecting to anything.

An inventory is a Python file whose top-level lists of hosts are groups; a host is a name or a
`(name, data)` pair, and a gpubox host carries its `Box` under the data key `box`, its `Gateway`
under `gateway`, or both (a host may run only a gateway), set in the file or in `group_data/*.py`
beside it. pyinfra's own loader reads it (host data merged with the
groups' data as a deploy sees it), so `gpubox check` and `gpubox plan` see what
`pyinfra INVENTORY ...` would.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from traceback import walk_tb
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from gpubox.box import Box
from gpubox.gateway import GATEWAY_KEY, Backend, Gateway, resolve_backends
from gpubox.models import missing_source_problem, missing_sources
from gpubox.peers import has_peers, resolve_peers
from gpubox.spec import HostMonitoring, Problem, problems_from

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


@dataclass
class HostGateway:
    """A host's validated Gateway with each group's backends resolved against the inventory's boxes, or the
    problems that refuse it (each at its field: ``gateway.groups.0.backends.1``)."""

    host: str
    gateway: Gateway | None
    problems: list[Problem]
    backends: dict[str, tuple[Backend, ...]] = field(default_factory=dict)


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

    cwd = os.getcwd()
    if cwd not in sys.path:  # as `pyinfra` does: an inventory may import modules from the working directory
        sys.path.append(cwd)
    try:
        with ctx_state.use(State()):  # exec_file records the file it runs on the current state
            inventory = make_inventory_from_files(str(inventory_path), cwd=cwd)
    except UnexpectedExternalError as wrapped:  # pyinfra wraps whatever the file raised
        error, where = wrapped.exception, Path(wrapped.filename)
        at = _where(where, getattr(error, "_traceback", None) or error.__traceback__)
        if isinstance(error, ValidationError):
            raise InventoryError(
                f"{at}: {error.title} is refused while the inventory imports", problems_from(error)
            ) from error
        raise InventoryError(f"{at}: the inventory does not import: {type(error).__name__}: {error}") from error
    except SyntaxError as error:  # pyinfra compiles the file before it runs it: the error is the file's own
        line = f" line {error.lineno}" if error.lineno else ""
        raise InventoryError(
            f"{error.filename or inventory_path}{line}: the inventory is not valid Python: {error.msg}"
        ) from error
    except Exception as error:  # noqa: BLE001 - anything else pyinfra raises while loading, named
        raise InventoryError(
            f"{inventory_path}: the inventory does not import: {type(error).__name__}: {error}"
        ) from error
    return [
        InventoryHost(name=host.name, groups=list(host.groups), data=host.data.dict()) for host in inventory
    ]


def _where(path: Path, traceback: TracebackType | None) -> str:
    """``inventory/home.py line 52``: the file's last line on the traceback (where it called what raised)."""
    lines = [line for frame, line in walk_tb(traceback) if Path(frame.f_code.co_filename).resolve() == path.resolve()]
    return f"{path} line {lines[-1]}" if lines else str(path)


def missing_inventory_file(argument: str, is_host: Callable[[str], bool] = lambda _: False) -> str | None:
    """Why pyinfra's inventory argument is no inventory, when it names a file that is not there; None
    when it is a file, or no path at all (``@local``, ``host1,host2``, a host name).

    pyinfra 3.10 takes an argument that is no file for a host name: ``inventory/nosuch.py`` becomes
    a host of that name with no data, or, when the name resolves to no address, an empty inventory,
    and a deploy then runs on nothing and exits 0. A name ending in ``.py`` (a Paraguayan domain) is a
    host when ``is_host`` says it resolves; a ``/`` never is.
    """
    if "," in argument or "@" in argument or Path(argument).exists():
        return None
    if "/" not in argument and not (argument.endswith(".py") and not is_host(argument)):
        return None
    return (
        f"{argument}: no such inventory file (pyinfra would take it for a host name and deploy nothing): "
        f"give the path of an inventory file, e.g. inventory/home.py"
    )


def refusal_text(error: InventoryError) -> str:
    """The error with each refused field on a line of its own: what a plain-text printer shows."""
    return "\n".join([str(error), *(f"    {problem.field}: {problem.message}" for problem in error.problems)])


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


def gateway_of(name: str, data: Mapping[str, Any]) -> HostGateway | None:
    """Validate a host's ``gateway`` data (its backends not resolved yet); None when it carries none. ``data``:
    anything with ``get`` (a dict, pyinfra's host data)."""
    value = data.get(GATEWAY_KEY)
    if value is None:
        return None
    try:
        gateway = value if isinstance(value, Gateway) else Gateway.model_validate(value)
    except ValidationError as error:
        problems = [Problem(field=f"{GATEWAY_KEY}.{p.field}", message=p.message) for p in problems_from(error)]
        return HostGateway(host=name, gateway=None, problems=problems)
    return HostGateway(host=name, gateway=gateway, problems=[])


def gateway_monitoring_problems(gateway: Gateway, box: Box | None) -> list[Problem]:
    """On a host with a box, what the box's monitoring refuses of the gateway: ``box.monitoring`` is what runs
    there (a different ``gateway.monitoring`` is refused), and the gateway's ports are not its exporters'."""
    if box is None:
        return []
    problems = []
    if gateway.monitoring not in (HostMonitoring(), box.monitoring):
        problems.append(Problem(field=f"{GATEWAY_KEY}.monitoring", message="this host's box.monitoring is what it "
                                "runs: set the ports there and leave gateway.monitoring out"))  # fmt: skip
    watched = {box.monitoring.node_exporter_port: "node_exporter_port", box.monitoring.agent_port: "agent_port"}
    problems += [
        Problem(field=f"{GATEWAY_KEY}.{name}", message=f"port {port} is box.monitoring.{watched[port]} already: "
                "choose another")
        for name, port in (("port", gateway.port), ("stats_port", gateway.stats_port))
        if port in watched
    ]  # fmt: skip
    return problems


def with_backends(host_gateways: list[HostGateway], boxes: dict[str, Box | None]) -> list[HostGateway]:
    """The gateways with each group's backends resolved (``gateway.resolve_backends``) against ``boxes`` (every
    host's Box by name, None where it is refused), and what refuses them. A backend on a host whose box is
    refused is named as such: that box's own problems say why."""
    valid = {name: box for name, box in boxes.items() if box is not None}
    resolved = []
    for host_gateway in host_gateways:
        gateway = host_gateway.gateway
        if gateway is None:
            resolved.append(host_gateway)
            continue
        backends, problems = resolve_backends(host_gateway.host, gateway, valid)
        refused_refs = {
            f"{GATEWAY_KEY}.groups.{g}.backends.{b}": f"{ref}: the box of {ref.host} is refused (its own rows say why)"
            for g, group in enumerate(gateway.groups)
            for b, ref in enumerate(group.backends)
            if ref.host in boxes and boxes[ref.host] is None
        }
        problems = [p for p in problems if not any(p.field.startswith(where) for where in refused_refs)]
        problems += [Problem(field=where, message=message) for where, message in refused_refs.items()]
        problems += gateway_monitoring_problems(gateway, valid.get(host_gateway.host))
        resolved.append(HostGateway(host=host_gateway.host, gateway=gateway, backends=backends,
                                    problems=[*host_gateway.problems, *problems]))  # fmt: skip
    return resolved


def no_box_message(host_name: str) -> str:
    """What a deploy says when it runs for a host without a ``box``: most likely a wrong inventory path."""
    return (
        f"{host_name}: no `{BOX_KEY}` in the host's data, so it is no gpubox host. Is the inventory path right? "
        f"pyinfra takes an inventory argument that is no file for a host name (`inventory/nosuch.py` becomes a "
        f"host of that name). A gpubox inventory gives each host its gpubox.Box under `{BOX_KEY}` "
        f"(see inventory/home.py); `gpubox check INVENTORY` reads it without connecting"
    )


def inventory_dir(inventory: str | Path) -> Path:
    """The inventory file's directory (absolute): a model's relative ``source`` and the default
    ``gguf-headers`` directory are taken from it, not from the directory gpubox or pyinfra runs in."""
    return Path(os.path.abspath(inventory)).parent


def with_missing_sources(host_box: HostBox, base: Path) -> HostBox:
    """The host's Box with a problem for each model whose controller source is not a file here."""
    if host_box.box is None:
        return host_box
    missing = [missing_source_problem(*found) for found in missing_sources(host_box.box, base)]
    return HostBox(host=host_box.host, box=host_box.box, problems=[*host_box.problems, *missing])


def box_from_host_data(value: object, host_name: str) -> Box:
    """The Box a deploy runs for a host, validated; refused with every problem named."""
    if value is None:
        raise InventoryError(no_box_message(host_name))
    if isinstance(value, Box):
        return value
    try:
        return Box.model_validate(value)
    except ValidationError as error:
        problems = problems_from(error)
        lines = "; ".join(f"{problem.field}: {problem.message}" for problem in problems)
        raise InventoryError(f"{host_name}: its box is refused: {lines}", problems) from error


def inventory_boxes(path: str | Path) -> list[HostBox]:
    """Every gpubox host of an inventory, each with its Box (what it uses on other hosts resolved: ``gpubox.peers``)
    or its problems."""
    boxes = [box for box in (box_of(host) for host in load_inventory(path)) if box is not None]
    if not boxes:
        raise InventoryError(f"{path}: no host carries a `{BOX_KEY}` in its data")
    return with_peers(boxes)


def inventory_hosts(path: str | Path) -> tuple[list[HostBox], list[HostGateway]]:
    """Every gpubox host of an inventory: its Box (peers resolved) or problems, and its Gateway (backends resolved
    against the boxes) or problems. A host with a ``gateway`` and no ``box`` is a gpubox host too."""
    hosts = load_inventory(path)
    boxes = with_peers([box for box in (box_of(host) for host in hosts) if box is not None])
    gateways = [found for found in (gateway_of(host.name, host.data) for host in hosts) if found is not None]
    if not boxes and not gateways:
        raise InventoryError(f"{path}: no host carries a `{BOX_KEY}` or a `{GATEWAY_KEY}` in its data")
    return boxes, with_backends(gateways, {host_box.host: host_box.box for host_box in boxes})


def with_peers(host_boxes: list[HostBox]) -> list[HostBox]:
    """The hosts' Boxes with their references to other hosts resolved, and what refuses those references."""
    valid = {host_box.host: host_box.box for host_box in host_boxes if host_box.box is not None}
    if not any(has_peers(box) for box in valid.values()):
        return host_boxes
    resolved, problems = resolve_peers(valid)
    return [
        HostBox(
            host=host_box.host, box=resolved[host_box.host], problems=[*host_box.problems, *problems[host_box.host]]
        )
        if host_box.box is not None
        else host_box
        for host_box in host_boxes
    ]
