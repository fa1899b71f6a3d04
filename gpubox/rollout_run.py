"""The rollout's steps carried out, over three small interfaces (the I/O is ``gpubox.rollout_io``'s):

- ``GatewayApi``: a gateway's runtime API (``HaproxyRuntime`` sends it through a ``Shell``: SSH to the
  gateway host, or this machine);
- ``Deployer``: the deploy of some hosts alone (``pyinfra INVENTORY DEPLOY --limit ... -y``), its output
  streamed line by line, its exit status the verdict (its smoke test and rollback are its own);
- ``Reporter``: the progress (host, step, in-flight count) and the deploys' output.

Per step (a group's canary, a batch, a unit alone): wait until draining it keeps every group at
``min_healthy`` by the gateways' ``show stat`` (a backend already down counts), or stop naming those down;
drain its backends (``state drain``); wait until their in-flight requests end, or the drain timeout; deploy
each unit (the units of a batch at once); mark its backends down until the gateway's checks pass again
(``health down``: what ``show stat`` said before is stale); put each deployed unit's backends back
(``state ready``) and wait until the gateway sees them ``UP``. A deploy that fails stops the rollout after
its step: its backends go back only when the deploy rolled the host back and the gateway's checks pass;
otherwise they stay drained and the summary says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gpubox.haproxy import ADMIN_SOCKET
from gpubox.rollout import (
    ROLLED_BACK,
    SHOW_STAT,
    Member,
    Plan,
    RolloutError,
    ServerStat,
    ServerState,
    Step,
    Unit,
    parse_show_stat,
    recheck_command,
    runtime_shell,
    set_state_command,
    short_groups,
)

Stats = Mapping[tuple[str, str], ServerStat]


class Shell(Protocol):
    """A shell on one host: run a command, get its exit status, stdout and stderr."""

    def run(self, command: str) -> tuple[int, str, str]: ...


class GatewayApi(Protocol):
    def stats(self) -> Stats: ...
    def set_state(self, member: Member, state: ServerState) -> None: ...
    def recheck(self, member: Member) -> None:
        """Down until its checks pass again (``rollout.recheck_command``)."""
        ...


class Deployer(Protocol):
    def deploy(self, hosts: Sequence[str], say: Callable[[str], None]) -> int:
        """Deploy ``hosts`` alone (one run), each output line to ``say``; the exit status."""
        ...


class Reporter(Protocol):
    def event(self, unit: str, step: str, detail: str = "") -> None: ...
    def output(self, unit: str, line: str) -> None: ...


class RuntimeApiError(RolloutError):
    """The gateway's runtime API could not be reached, or refused a command."""


class HaproxyRuntime:
    """A gateway's HAProxy runtime API, each command one ``socat`` to its admin socket through ``shell``."""

    def __init__(self, shell: Shell, where: str, socket: str = ADMIN_SOCKET) -> None:
        self.shell, self.where, self.socket = shell, where, socket

    def send(self, command: str) -> str:
        try:
            code, out, err = self.shell.run(runtime_shell(command, self.socket))
        except Exception as error:  # noqa: BLE001 - the connection's (SSH, timeout, subprocess): named, not a traceback
            raise RuntimeApiError(f"{self.where}: {command!r} did not reach HAProxy: {type(error).__name__}: "
                                  f"{error}") from error  # fmt: skip
        if code != 0:
            raise RuntimeApiError(
                f"{self.where}: HAProxy's runtime API ({self.socket}) did not answer {command!r}: exit {code}: "
                f"{(err or out).strip()[:300]}"
            )
        return out

    def stats(self) -> Stats:
        text = self.send(SHOW_STAT)
        try:
            return parse_show_stat(text)
        except ValueError as error:
            raise RuntimeApiError(f"{self.where}: {error}") from None

    def set_state(self, member: Member, state: ServerState) -> None:
        self._command(set_state_command(member, state))

    def recheck(self, member: Member) -> None:
        self._command(recheck_command(member))

    def _command(self, command: str) -> None:
        answer = self.send(command).strip()
        if answer:  # HAProxy answers a successful `set server` with an empty line
            raise RuntimeApiError(f"{self.where}: HAProxy refused {command!r}: {answer}")


@dataclass(frozen=True)
class Timing:
    drain_timeout_s: float = 300.0
    ready_timeout_s: float = 300.0  # a deployed backend back UP; a rolled-back one passing its checks
    health_wait_s: float = 120.0  # another backend down: how long to wait for it before stopping
    poll_s: float = 1.0


Outcome = Literal["new", "old", "rolled back", "failed"]


@dataclass
class UnitResult:
    unit: Unit
    outcome: Outcome = "old"
    serving: bool = True  # its backends take requests (not left drained)
    note: str = ""

    @property
    def state(self) -> str:
        """Which llama.cpp state it runs: new, old, or unknown (a failed deploy that did not roll back)."""
        if self.outcome == "new":
            return "new"
        if self.outcome in ("old", "rolled back"):
            return "old"
        return "unknown"


@dataclass
class RolloutResult:
    results: list[UnitResult]
    stopped: str | None = None

    def hosts(self, state: str) -> list[str]:
        return [host for result in self.results if result.state == state for host in result.unit.hosts]

    @property
    def drained(self) -> list[Member]:
        return [member for result in self.results if not result.serving for member in result.unit.members]

    @property
    def ok(self) -> bool:
        return self.stopped is None


@dataclass
class Rollout:
    """Carries out a plan; ``clock`` and ``sleep`` are injectable for tests."""

    plan: Plan
    gateways: Mapping[str, GatewayApi]
    deployer: Deployer
    reporter: Reporter
    timing: Timing = field(default_factory=Timing)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    current: Step | None = None  # the step under way (what an interrupt may leave drained)

    def run(self) -> RolloutResult:
        results = {unit.name: UnitResult(unit) for unit in self.plan.units}
        outcome = RolloutResult(list(results.values()))
        for index, step in enumerate(self.plan.steps, start=1):
            label = f"step {index}/{len(self.plan.steps)} ({step.kind}{f' of {step.group}' if step.group else ''})"
            self.current = step
            try:
                stopped = self._step(step, results, label)
            except RolloutError as error:
                stopped = str(error)
            if stopped is not None:
                outcome.stopped = stopped
                break
        self.current = None
        return outcome

    # -- the gateways

    def _stats(self, members: Sequence[Member]) -> dict[str, Stats]:
        return {gateway: self.gateways[gateway].stats() for gateway in dict.fromkeys(m.gateway for m in members)}

    def _all_stats(self) -> dict[str, Stats]:
        return {gateway: self.gateways[gateway].stats() for gateway in self.plan.gateways}

    def _set(self, members: Sequence[Member], state: ServerState, unit: str) -> None:
        for member in members:
            self.gateways[member.gateway].set_state(member, state)
            self.reporter.event(unit, state, f"{member} on {member.gateway}")

    def _wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = self.clock() + timeout_s
        while not done():
            if self.clock() >= deadline:
                return False
            self.sleep(self.timing.poll_s)
        return True

    # -- one step

    def _step(self, step: Step, results: dict[str, UnitResult], label: str) -> str | None:
        name = " ".join(unit.name for unit in step.units)
        members = step.members
        self.reporter.event(name, "start", label)
        if members:
            refused = self._capacity(step, name)
            if refused is not None:
                return refused
            drained: list[Member] = []
            try:
                for member in members:
                    self._set([member], "drain", name)
                    drained.append(member)
                self._drain(members, name)
            except BaseException:  # nothing deployed yet: what this step drained serves again
                for member in drained:
                    self.gateways[member.gateway].set_state(member, "ready")
                raise
        codes = self._deploy(step.units)
        for member in members:  # the gateway's view predates the deploy: UP again only once its checks pass
            self.gateways[member.gateway].recheck(member)
            self.reporter.event(name, "recheck", f"{member}: down until the gateway's checks pass")
        failed: list[str] = []
        ready: list[Member] = []
        for unit in step.units:
            code, rolled_back = codes[unit.name]
            result = results[unit.name]
            if code == 0:
                result.outcome = "new"
                self._set(unit.members, "ready", unit.name)
                ready += unit.members
                continue
            failed.append(f"{unit.name} (exit {code})")
            result.outcome = "rolled back" if rolled_back else "failed"
            if not unit.members:
                result.note = "its deploy rolled it back" if rolled_back else "its deploy failed; see its output"
            elif rolled_back and self._checks_pass(unit.members):
                self._set(unit.members, "ready", unit.name)
                ready += unit.members
                result.note = "its deploy rolled it back; the gateway's checks pass: serving again"
            else:
                result.serving = False
                why = "its deploy did not roll it back" if not rolled_back else "the gateway's checks fail"
                result.note = f"left drained: {why} ({', '.join(str(m) for m in unit.members)})"
                self.reporter.event(unit.name, "left drained", why)
        not_up = self._up(ready, name)
        for unit in step.units:
            missing = [member for member in unit.members if member in not_up]
            if missing:
                results[unit.name].note = (f"{', '.join(str(m) for m in missing)} not UP at the gateway after "
                                           f"{self.timing.ready_timeout_s:g} s (ready: it takes requests once its "
                                           "checks pass)")  # fmt: skip
        if failed:
            return f"the deploy of {', '.join(failed)} failed: the rollout stops here"
        if not_up:
            return f"{', '.join(str(m) for m in not_up)} did not come back UP at the gateway: the rollout stops here"
        self.reporter.event(name, "done", label)
        return None

    def _capacity(self, step: Step, name: str) -> str | None:
        """None once draining the step keeps every group at min_healthy; else why the rollout stops."""
        short = short_groups(step.members, self.plan.groups, self._all_stats())
        if not short:
            return None
        for shortage in short:
            self.reporter.event(name, "wait", f"{shortage}: waiting up to {self.timing.health_wait_s:g} s")
        shortages = short

        def enough() -> bool:
            nonlocal shortages
            shortages = short_groups(step.members, self.plan.groups, self._all_stats())
            return not shortages

        if self._wait(enough, self.timing.health_wait_s):
            return None
        return (
            f"not draining {name}: " + "; ".join(str(s) for s in shortages) + ". Bring those backends back (or wait) "
            "and run the rollout again: the hosts rolled so far keep the new state"
        )

    def _drain(self, members: Sequence[Member], name: str) -> None:
        last: int | None = None

        def idle() -> bool:
            nonlocal last
            stats = self._stats(members)
            flying = sum(stats[m.gateway][(m.backend, m.server)].in_flight for m in members
                         if (m.backend, m.server) in stats[m.gateway])  # fmt: skip
            if flying != last:
                self.reporter.event(name, "in flight", str(flying))
                last = flying
            return flying == 0

        if not self._wait(idle, self.timing.drain_timeout_s):
            self.reporter.event(name, "drain timeout", f"{last} still in flight after "
                                f"{self.timing.drain_timeout_s:g} s: deploying anyway")  # fmt: skip

    def _deploy(self, units: Sequence[Unit]) -> dict[str, tuple[int, bool]]:
        def one(unit: Unit) -> tuple[int, bool]:
            rolled_back = threading.Event()

            def say(line: str) -> None:
                if ROLLED_BACK in line:
                    rolled_back.set()
                self.reporter.output(unit.name, line)

            self.reporter.event(unit.name, "deploy", f"--limit {' --limit '.join(unit.hosts)}")
            code = self.deployer.deploy(unit.hosts, say)
            self.reporter.event(unit.name, "deployed" if code == 0 else "deploy failed", f"exit {code}")
            return code, rolled_back.is_set()

        if len(units) == 1:
            return {units[0].name: one(units[0])}
        with ThreadPoolExecutor(max_workers=len(units)) as pool:
            futures = {unit.name: pool.submit(one, unit) for unit in units}
            return {name: future.result() for name, future in futures.items()}

    def _checks_pass(self, members: Sequence[Member]) -> bool:
        def passing() -> bool:
            stats = self._stats(members)
            return all(
                (m.backend, m.server) in stats[m.gateway] and stats[m.gateway][(m.backend, m.server)].checks_pass
                for m in members
            )

        return self._wait(passing, self.timing.ready_timeout_s)

    def _up(self, members: Sequence[Member], name: str) -> list[Member]:
        """Wait until ``members`` are UP at their gateways; those that are not by the ready timeout."""
        if not members:
            return []
        down: list[Member] = list(members)

        def up() -> bool:
            nonlocal down
            stats = self._stats(members)
            down = [m for m in members if not (
                (m.backend, m.server) in stats[m.gateway] and stats[m.gateway][(m.backend, m.server)].healthy
            )]  # fmt: skip
            return not down

        if self._wait(up, self.timing.ready_timeout_s):
            self.reporter.event(name, "up", ", ".join(str(m) for m in members))
        return down
