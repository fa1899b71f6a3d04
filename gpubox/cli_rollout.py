"""`gpubox rollout INVENTORY DEPLOY`: deploy the fleet a few hosts at a time behind its gateway (registered by
gpubox.cli).

The plan (``gpubox.rollout``) is refused before anything is touched: a ``--canary`` in no group, a ``--batch``
below 1 or one that would take a group below its ``min_healthy``. ``--dry`` prints the order and the batches
and stops there. Otherwise: the fleet's ``rollout`` lock on the gateway host, then the steps
(``gpubox.rollout_run``) over pyinfra's connections (``gpubox.rollout_io``), and a summary of which hosts run
the new state and which the old.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gpubox.box import Box
from gpubox.gateway import GATEWAY_KEY, Gateway, resolve_backends
from gpubox.inventory import HostBox, InventoryError, inventory_boxes, load_inventory
from gpubox.rollout import Group, Plan, RolloutError, groups_of, plan_rollout
from gpubox.rollout_run import Deployer, GatewayApi, Rollout, RolloutResult, Timing
from gpubox.spec import problems_from
from gpubox.tables import problems_table

DESCRIPTION = """\
Deploy the fleet a few hosts at a time behind its gateway. Per model group a canary first (the group's first
host, or --canary), then batches of --batch units; a llama-server and its RPC servers' hosts are one unit (one
--limit). Per step: wait until draining it keeps every group at min_healthy (by the gateway's `show stat`),
drain its backends over HAProxy's runtime API, wait for their in-flight requests (--drain-timeout), run
`pyinfra INVENTORY DEPLOY --limit HOST -y`, put them back and wait until the gateway sees them UP. A deploy that
fails stops the rollout: the summary says which hosts run the new state and which the old. Hosts in no group
roll one at a time after the groups. One rollout at a time per fleet (the `rollout` lock on the gateway host).
Exit status: 0 done, 1 stopped, 2 refused (nothing touched). See docs/rollout.md."""

EXIT_OK = 0
EXIT_STOPPED = 1
EXIT_REFUSED = 2


class Refused(Exception):
    def __init__(self, message: str, problems: list[HostBox] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


def fleet(inventory: str) -> tuple[list[str], dict[str, Box], list[Group]]:
    """The inventory's hosts with a box (in its order), their boxes, and the gateways' groups; ``Refused`` with
    every problem by host and field."""
    try:
        host_boxes = inventory_boxes(inventory)
        hosts = load_inventory(inventory)
    except InventoryError as error:
        raise Refused(str(error), [HostBox(host="(inventory)", box=None, problems=error.problems)]) from None
    refused = [host_box for host_box in host_boxes if host_box.problems]
    if refused:
        raise Refused(f"{inventory}: a box is refused (gpubox check {inventory} says the same)", refused)
    boxes = {host_box.host: host_box.box for host_box in host_boxes if host_box.box is not None}
    groups: list[Group] = []
    problems: list[HostBox] = []
    for host in hosts:
        value = host.data.get(GATEWAY_KEY)
        if value is None:
            continue
        try:
            gateway = value if isinstance(value, Gateway) else Gateway.model_validate(value)
        except ValidationError as error:
            problems.append(HostBox(host=host.name, box=None, problems=problems_from(error)))
            continue
        backends, found = resolve_backends(host.name, gateway, boxes)
        if found:
            problems.append(HostBox(host=host.name, box=None, problems=found))
            continue
        groups += groups_of(host.name, gateway, backends)
    if problems:
        raise Refused(f"{inventory}: a gateway is refused", problems)
    return [host_box.host for host_box in host_boxes], boxes, groups


def plan_table(plan: Plan) -> Table:
    table = Table(title=f"rollout plan: {len(plan.steps)} step(s), --batch {plan.batch}, lock on {plan.lock_host}")
    for column in ("step", "kind", "group", "hosts (--limit)", "drains"):
        table.add_column(column)
    for index, step in enumerate(plan.steps, start=1):
        group = f"{step.group.name} (min_healthy {step.group.min_healthy} of {len(step.group.servers)})" \
            if step.group else "-"  # fmt: skip
        table.add_row(
            str(index),
            step.kind,
            group,
            "\n".join(unit.name for unit in step.units),
            "\n".join(str(member) for member in step.members) or "- (in no group: rolls alone)",
        )
    return table


def summary_table(result: RolloutResult) -> Table:
    table = Table(title="rollout summary")
    for column in ("hosts", "result", "runs", "serving", "note"):
        table.add_column(column)
    styles = {"new": "green", "old": "", "rolled back": "yellow", "failed": "red"}
    for unit_result in result.results:
        table.add_row(
            unit_result.unit.name,
            Text(unit_result.outcome, style=styles[unit_result.outcome]),
            unit_result.state,
            "yes" if unit_result.serving else Text("no: drained", style="red"),
            unit_result.note,
        )
    return table


class ConsoleReporter:
    """Progress lines (time, unit, step, detail) and each deploy's output, prefixed with its unit."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def event(self, unit: str, step: str, detail: str = "") -> None:
        line = Text(time.strftime("%H:%M:%S "), style="dim")
        line.append(unit, style="bold")
        line.append(f"  {step}", style="cyan")
        if detail:
            line.append(f"  {detail}")
        self.console.print(line, highlight=False)

    def output(self, unit: str, line: str) -> None:
        self.console.print(Text(f"  {unit} | ", style="dim") + Text(line), highlight=False, soft_wrap=True)


@dataclass
class RolloutIo:
    """What a rollout talks to: the gateways' runtime APIs, the deploys, the fleet lock; ``close`` ends it all."""

    gateways: dict[str, GatewayApi]
    deployer: Deployer
    acquire: Callable[[], str]
    close: Callable[[], None]


def pyinfra_io(args: argparse.Namespace, plan: Plan) -> RolloutIo:
    """Over pyinfra: the gateway hosts through its API in this process, the deploys through its CLI."""
    from gpubox.rollout_io import FleetLock, PyinfraConnections, PyinfraDeployer, this_controller
    from gpubox.rollout_run import HaproxyRuntime

    connections = PyinfraConnections(args.inventory)
    lock = FleetLock(connections.shell(plan.lock_host), plan.lock_host, this_controller())
    gateways: dict[str, GatewayApi] = {}

    def acquire() -> str:
        said = lock.acquire()
        for gateway in plan.gateways:
            gateways[gateway] = HaproxyRuntime(connections.shell(gateway), gateway)
        return said

    def close() -> None:
        lock.release()
        connections.close()

    return RolloutIo(gateways, PyinfraDeployer(args.inventory, args.deploy), acquire, close)


IO_FACTORY: Callable[[argparse.Namespace, Plan], RolloutIo] = pyinfra_io
"""How ``cmd_rollout`` reaches the fleet (tests put fakes here)."""


def cmd_rollout(args: argparse.Namespace, console: Console) -> int:
    try:
        hosts, boxes, groups = fleet(args.inventory)
        plan = plan_rollout(hosts, boxes, groups, canary=args.canary, batch=args.batch)
    except Refused as error:
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        if error.problems:
            console.print(problems_table(error.problems))
        return EXIT_REFUSED
    except RolloutError as error:
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        return EXIT_REFUSED
    if not groups:
        console.print("no gateway in the inventory: each host rolls alone, one at a time", highlight=False)
    console.print(plan_table(plan))
    if args.dry:
        console.print("--dry: nothing was touched", highlight=False)
        return EXIT_OK
    if not Path(args.deploy).is_file():
        console.print(f"[bold red]refused[/]: {args.deploy}: no such deploy file", highlight=False)
        return EXIT_REFUSED
    try:
        io = IO_FACTORY(args, plan)
    except RolloutError as error:  # the lock's host could not be reached
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        return EXIT_REFUSED
    rollout = Rollout(
        plan, io.gateways, io.deployer, ConsoleReporter(console),
        Timing(drain_timeout_s=args.drain_timeout, ready_timeout_s=args.ready_timeout,
               health_wait_s=args.health_wait),
    )  # fmt: skip
    try:
        try:
            console.print(io.acquire(), highlight=False)
        except RolloutError as error:
            console.print(f"[bold red]refused[/]: {error}", highlight=False)
            return EXIT_REFUSED
        result = rollout.run()
    except KeyboardInterrupt:
        step = rollout.current
        left = ", ".join(str(member) for member in step.members) if step is not None else ""
        console.print(f"[bold red]interrupted[/]{f': these may be left drained: {left}' if left else ''}",
                      highlight=False)  # fmt: skip
        return EXIT_STOPPED
    finally:
        io.close()
    print_summary(console, result)
    return EXIT_OK if result.ok else EXIT_STOPPED


def print_summary(console: Console, result: RolloutResult) -> None:
    console.print(summary_table(result))
    for state, label in (("new", "new state"), ("old", "old state"), ("unknown", "unknown state (deploy failed)")):
        hosts = result.hosts(state)
        if hosts:
            console.print(f"{label}: {', '.join(hosts)}", highlight=False)
    if result.drained:
        console.print(
            f"[bold yellow]left drained[/]: {', '.join(str(member) for member in result.drained)}: put one back with "
            "`set server BACKEND/SERVER state ready` on the gateway's admin socket once it serves",
            highlight=False,
        )
    if result.stopped:
        console.print(f"[bold red]stopped[/]: {result.stopped}", highlight=False)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seconds are 0 or more, got {text!r}")
    return value


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `rollout` to gpubox's subcommands."""
    rollout = commands.add_parser(
        "rollout",
        help="deploy the fleet a few hosts at a time, each drained at the gateway while it rolls",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rollout.add_argument("inventory", help="the fleet's pyinfra inventory (hosts carry box, a gateway host gateway)")
    rollout.add_argument("deploy", help="the deploy file each step runs, e.g. deploys/danarch4090.py")
    rollout.add_argument("--canary", metavar="HOST", help="the host that rolls first, alone (default: each group's "
                         "first host)")  # fmt: skip
    rollout.add_argument("--batch", type=int, default=1, metavar="N",
                         help="units (a host, or a llama-server with its RPC servers' hosts) per step after each "
                         "group's canary (1)")  # fmt: skip
    rollout.add_argument("--drain-timeout", type=_seconds, default=300.0, metavar="S",
                         help="seconds to wait for a drained backend's in-flight requests before deploying (300)")
    rollout.add_argument("--ready-timeout", type=_seconds, default=300.0, metavar="S",
                         help="seconds to wait for a deployed backend to be UP at the gateway (300)")
    rollout.add_argument("--health-wait", type=_seconds, default=120.0, metavar="S",
                         help="seconds to wait for another group's backend that is down before stopping (120)")
    rollout.add_argument("--dry", action="store_true", help="show the order and the batches; touch nothing")
    rollout.set_defaults(run=cmd_rollout)
