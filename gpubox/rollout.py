"""A rolling deploy of a fleet behind its gateway: the plan, and what the gateway's runtime API says.

``gpubox rollout`` deploys the fleet a few hosts at a time while the gateway (HAProxy, ``gpubox.haproxy``)
sends requests to the others. This module is its pure part, no I/O:

- **units**: the hosts that roll together. A llama-server and the hosts of its RPC servers are one unit
  (one ``--limit``): they must never run two llama.cpp commits at once (``docs/rpc.md``).
- **the plan**: per model group, a canary (the group's first unit, or ``--canary``'s) alone, then batches
  of ``--batch`` units; then the units in no group, one at a time. A unit that serves several groups is
  drained in all of them, and rolls once (with the first group that names it).
- **min_healthy arithmetic**: a step drains every backend on its units' hosts; each group must keep
  ``min_healthy`` of its backends. A step that could not, even with every backend up, is refused before
  anything starts (with the largest ``--batch`` that works); at run time the backends already down count too
  (``short_groups``).
- **the runtime API**: the commands (``set server group_x/host:service state drain``, ``show stat``), built
  from checked words, the shell line that sends one to the admin socket with ``socat``, and the parser of
  ``show stat``'s CSV.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gpubox.haproxy import ADMIN_SOCKET, backend_name
from gpubox.quoting import haproxy_word, shell_word

if TYPE_CHECKING:
    from gpubox.box import Box
    from gpubox.gateway import Backend, Gateway

LOCK_NAME = "rollout"
"""The fleet's rollout lock (``gpubox.deploy_lock``'s, under this name) on the gateway host."""
SHOW_STAT = "show stat -1 4 -1"
"""Every proxy's servers (type 4), none of the frontend and backend lines."""
ServerState = Literal["ready", "drain", "maint"]
HEALTHY = "UP"
"""``show stat``'s status of a server that takes requests and passes its checks."""
DRAINED_HEALTHY = "DRAIN"
"""... of a drained server that passes its checks (it takes no new requests)."""
ROLLED_BACK = "was restored"
"""What a deploy's smoke miss prints once it put a service's previous unit back (``operations.smoke``)."""


class RolloutError(Exception):
    """The rollout is refused (bad input, a batch that breaks min_healthy) or cannot go on."""


@dataclass(frozen=True)
class Member:
    """A backend a unit's host serves: drained while it rolls, in its gateway's group."""

    gateway: str  # the gateway host
    group: str
    server: str  # HAProxy's server name, ``<host>:<service>``
    host: str

    @property
    def backend(self) -> str:
        """HAProxy's backend of the group, ``group_<name>``."""
        return backend_name(self.group)

    def __str__(self) -> str:
        return f"{self.backend}/{self.server}"


@dataclass(frozen=True)
class Group:
    """A model group as the rollout sees it: its backends (server names, in order) and what it must keep."""

    gateway: str
    name: str
    min_healthy: int
    servers: tuple[str, ...]
    hosts: tuple[str, ...]  # each server's host, in the same order

    @property
    def key(self) -> tuple[str, str]:
        return (self.gateway, self.name)

    @property
    def spare(self) -> int:
        """How many of its backends may be out at once, when all are up."""
        return len(self.servers) - self.min_healthy

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Unit:
    """Hosts that roll together (a llama-server's host and its RPC servers' hosts), and what they serve."""

    hosts: tuple[str, ...]
    members: tuple[Member, ...] = ()

    @property
    def name(self) -> str:
        return "+".join(self.hosts)

    def __str__(self) -> str:
        return self.name


StepKind = Literal["canary", "batch", "alone"]


@dataclass(frozen=True)
class Step:
    """Units drained, deployed and put back together: a group's canary, one of its batches, or a unit alone."""

    kind: StepKind
    group: Group | None
    units: tuple[Unit, ...]

    @property
    def members(self) -> tuple[Member, ...]:
        return tuple(member for unit in self.units for member in unit.members)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(host for unit in self.units for host in unit.hosts)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    groups: tuple[Group, ...]
    lock_host: str  # where the fleet's rollout lock is taken
    gateways: tuple[str, ...] = ()
    batch: int = 1

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(unit for step in self.steps for unit in step.units)


def groups_of(gateway_host: str, gateway: Gateway, backends: Mapping[str, tuple[Backend, ...]]) -> list[Group]:
    """A gateway's groups with their backends resolved (``gpubox.gateway.resolve_backends``)."""
    return [
        Group(
            gateway=gateway_host,
            name=group.name,
            min_healthy=group.min_healthy,
            servers=tuple(backend.server_name for backend in backends.get(group.name, ())),
            hosts=tuple(backend.ref.host for backend in backends.get(group.name, ())),
        )
        for group in gateway.groups
    ]


def units_of(hosts: Sequence[str], boxes: Mapping[str, Box], groups: Sequence[Group]) -> list[Unit]:
    """The inventory's hosts (with a box, in its order) as units: each host with the hosts whose services its
    services use (an RPC server's host), transitively; each unit with its hosts' backends in every group."""
    parent = {host: host for host in hosts}

    def root(host: str) -> str:
        while parent[host] != host:
            parent[host] = parent[parent[host]]
            host = parent[host]
        return host

    for host in hosts:
        for service in boxes[host].services:
            for peer_host, _ in service.peer_refs():
                if peer_host in parent:
                    a, b = root(host), root(peer_host)
                    parent[max(a, b, key=hosts.index)] = min(a, b, key=hosts.index)
    members: dict[str, list[Member]] = {}
    for group in groups:
        for server, host in zip(group.servers, group.hosts, strict=True):
            members.setdefault(host, []).append(Member(gateway=group.gateway, group=group.name, server=server,
                                                       host=host))  # fmt: skip
    by_root: dict[str, list[str]] = {}
    for host in hosts:
        by_root.setdefault(root(host), []).append(host)
    return [
        Unit(hosts=tuple(unit_hosts), members=tuple(m for h in unit_hosts for m in members.get(h, ())))
        for unit_hosts in by_root.values()
    ]


def drained_beyond(step_members: Iterable[Member], groups: Sequence[Group]) -> list[tuple[Group, int]]:
    """The groups a step would take below min_healthy with every backend up: (group, how many it drains)."""
    counts: dict[tuple[str, str], int] = {}
    for member in step_members:
        counts[(member.gateway, member.group)] = counts.get((member.gateway, member.group), 0) + 1
    return [(group, counts[group.key]) for group in groups if counts.get(group.key, 0) > group.spare]


def _order(units: Sequence[Unit], groups: Sequence[Group], canary: Unit | None, batch: int) -> list[Step]:
    steps: list[Step] = []
    rolled: set[tuple[str, ...]] = set()
    unit_of = {host: unit for unit in units for host in unit.hosts}
    if canary is not None:
        first = next(group for group in groups if any(h in canary.hosts for h in group.hosts))
        steps.append(Step("canary", first, (canary,)))
        rolled.add(canary.hosts)
    for group in groups:
        todo = [unit for unit in dict.fromkeys(unit_of[host] for host in group.hosts) if unit.hosts not in rolled]
        if not todo:
            continue
        if canary is None or not any(host in canary.hosts for host in group.hosts):
            steps.append(Step("canary", group, (todo[0],)))
            todo = todo[1:]
        steps += [Step("batch", group, tuple(todo[start : start + batch])) for start in range(0, len(todo), batch)]
        rolled.update(unit.hosts for unit in todo)
        rolled.update(step.units[0].hosts for step in steps if step.kind == "canary")
    steps += [Step("alone", None, (unit,)) for unit in units if unit.hosts not in rolled]
    return steps


def _refusals(steps: Sequence[Step], groups: Sequence[Group]) -> list[tuple[Step, Group, int]]:
    return [(step, group, count) for step in steps for group, count in drained_beyond(step.members, groups)]


def plan_rollout(
    hosts: Sequence[str],
    boxes: Mapping[str, Box],
    groups: Sequence[Group],
    *,
    canary: str | None = None,
    batch: int = 1,
) -> Plan:
    """The rollout's steps, or a ``RolloutError`` saying why it is refused: a ``batch`` below 1, a ``canary``
    in no group, a step that would take a group below its ``min_healthy`` with every backend up."""
    if batch < 1:
        raise RolloutError(f"--batch {batch}: a batch is at least one unit (a host, or a llama-server with its "
                           "RPC servers' hosts)")  # fmt: skip
    if not hosts:
        raise RolloutError("no host carries a `box`: nothing to roll")
    units = units_of(hosts, boxes, groups)
    canary_unit = None
    if canary is not None:
        canary_unit = next((unit for unit in units if canary in unit.hosts and unit.members), None)
        if canary_unit is None:  # a host of a unit with a backend (an RPC server's host names its client's)
            known = ", ".join(sorted({host for group in groups for host in group.hosts})) or "none: no gateway"
            raise RolloutError(f"--canary {canary}: no model group has a backend on {canary} (their hosts: {known})")
    steps = _order(units, groups, canary_unit, batch)
    refused = _refusals(steps, groups)
    if refused:
        raise RolloutError(_refusal_text(refused, units, groups, canary_unit, batch))
    gateways = tuple(dict.fromkeys(group.gateway for group in groups))
    lock_host = gateways[0] if gateways else hosts[0]
    return Plan(steps=tuple(steps), groups=tuple(groups), lock_host=lock_host, gateways=gateways, batch=batch)


def _refusal_text(
    refused: Sequence[tuple[Step, Group, int]], units: Sequence[Unit], groups: Sequence[Group],
    canary: Unit | None, batch: int,
) -> str:  # fmt: skip
    alone = [(step, group, count) for step, group, count in refused if len(step.units) == 1]
    if alone:
        step, group, count = alone[0]
        return (
            f"{step.units[0]} serves {count} of group {group.name}'s {len(group.servers)} backend(s) "
            f"(on {group.gateway}), which keeps min_healthy={group.min_healthy}: draining it leaves "
            f"{len(group.servers) - count}. Add a backend to the group or lower its min_healthy; a group that "
            f"cannot lose one is deployed with plain pyinfra (and is down meanwhile)"
        )
    works = next(
        (size for size in range(batch - 1, 0, -1) if not _refusals(_order(units, groups, canary, size), groups)), 1
    )
    step, group, count = refused[0]
    return (
        f"--batch {batch} would drain {count} of group {group.name}'s {len(group.servers)} backends at once "
        f"({', '.join(unit.name for unit in step.units)}), and it keeps min_healthy={group.min_healthy}: at most "
        f"--batch {works}"
    )


@dataclass(frozen=True)
class ServerStat:
    """One server of ``show stat``: its backend, name, in-flight requests and status."""

    backend: str
    server: str
    status: str
    scur: int = 0  # current sessions (requests being served)
    qcur: int = 0  # queued for this server

    @property
    def in_flight(self) -> int:
        return self.scur + self.qcur

    @property
    def healthy(self) -> bool:
        """Takes requests and passes its checks."""
        return self.status == HEALTHY

    @property
    def checks_pass(self) -> bool:
        """Passes its checks, drained or not."""
        return self.status in (HEALTHY, DRAINED_HEALTHY)


def parse_show_stat(text: str) -> dict[tuple[str, str], ServerStat]:
    """``show stat``'s CSV (a ``# pxname,svname,...`` header line) as each server's stat by (backend, server);
    the FRONTEND and BACKEND lines left out. ValueError when it is no such CSV (an error message)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not `show stat` output: {text.strip()[:200]!r}")
    rows = csv.DictReader([lines[0][2:], *lines[1:]])
    stats: dict[tuple[str, str], ServerStat] = {}
    for row in rows:
        if row.get("svname") in ("FRONTEND", "BACKEND", None):
            continue
        stat = ServerStat(
            backend=row["pxname"],
            server=row["svname"],
            status=(row.get("status") or "").strip(),
            scur=int(row.get("scur") or 0),
            qcur=int(row.get("qcur") or 0),
        )
        stats[(stat.backend, stat.server)] = stat
    return stats


def set_state_command(member: Member, state: ServerState) -> str:
    """``set server group_x/host:service state drain``: one runtime API command, its words checked."""
    if state not in ("ready", "drain", "maint"):
        raise ValueError(f"a server's state is ready, drain or maint, got {state!r}")
    return f"set server {member.backend}/{haproxy_word(member.server, 'a backend')} state {state}"


def recheck_command(member: Member) -> str:
    """``set server group_x/host:service health down``: the server counts as down until ``rise`` checks pass
    again. After a deploy, what the gateway says of a drained server is stale: it may not have checked the
    restarted process yet (``DRAIN`` hides a failed check), and ``state ready`` would send it requests."""
    return f"set server {member.backend}/{haproxy_word(member.server, 'a backend')} health down"


def runtime_shell(command: str, socket: str = ADMIN_SOCKET) -> str:
    """The shell line that sends one runtime API command to HAProxy's admin socket and prints its answer."""
    if "\n" in command or ";" in command:
        raise ValueError(f"one runtime API command a line, without ';': {command!r}")
    return f"printf '%s\\n' {shell_word(command)} | socat -t 10 stdio {shell_word(f'UNIX-CONNECT:{socket}')}"


@dataclass(frozen=True)
class Shortage:
    """A group that a step would take below min_healthy now: its healthy backends apart from the step's, and
    those that are not healthy (with their status)."""

    group: Group
    healthy: int
    down: tuple[tuple[str, str], ...] = field(default=())

    def __str__(self) -> str:
        down = ", ".join(f"{server} ({status or 'missing'})" for server, status in self.down) or "none"
        return (
            f"group {self.group.name!r} would keep {self.healthy} healthy backend(s) of {len(self.group.servers)}, "
            f"below its min_healthy={self.group.min_healthy}; not healthy now: {down}"
        )


def short_groups(
    step_members: Sequence[Member], groups: Sequence[Group], stats: Mapping[str, Mapping[tuple[str, str], ServerStat]]
) -> list[Shortage]:
    """The groups that draining ``step_members`` would take below min_healthy, by the gateways' ``show stat``
    now (``stats``: each gateway host's): a backend already down or drained counts as lost."""
    leaving = {(member.gateway, member.group, member.server) for member in step_members}
    touched = {(member.gateway, member.group) for member in step_members}
    short = []
    for group in groups:
        if group.key not in touched:
            continue
        seen = stats.get(group.gateway, {})
        backend = backend_name(group.name)
        healthy = 0
        down = []
        for server in group.servers:
            stat = seen.get((backend, server))
            if stat is None or not stat.healthy:
                down.append((server, stat.status if stat is not None else ""))
            elif (group.gateway, group.name, server) not in leaving:
                healthy += 1
        if healthy < group.min_healthy:
            short.append(Shortage(group=group, healthy=healthy, down=tuple(down)))
    return short
