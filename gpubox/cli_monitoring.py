"""`gpubox monitoring`, `top` and `report`: the fleet's monitoring files, and the fleet as its Prometheus
sees it (registered by gpubox.cli)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from gpubox.cli_plan import HEADERS_HELP, headers_dir
from gpubox.inventory import HostBox, InventoryError, inventory_dir
from gpubox.monitoring.files import monitoring_files, planned_vram, write_files
from gpubox.monitoring.fleet import Fleet, FleetError, fleet_from_inventory
from gpubox.monitoring.query import (
    PrometheusClient,
    PrometheusError,
    fleet_rows,
    gateway_rows,
    gateway_table,
    report_png,
    top_table,
)
from gpubox.tables import problems_table

EXIT_OK = 0
EXIT_REFUSED = 2
DEFAULT_REPORT_PNG = "gpubox-report.png"

DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
UNIT_SECONDS = (7 * 86400, 86400, 3600, 60, 1)


def parse_duration(text: str) -> int:
    """Seconds of a duration like ``30m``, ``1h``, ``2d``, ``1h30m`` (units w, d, h, m, s)."""
    match = DURATION.match(text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(
            f"a duration is a number and a unit (w, d, h, m, s) such as 30m, 1h or 2d, got {text!r}"
        )
    seconds = sum(int(value) * unit for value, unit in zip(match.groups(), UNIT_SECONDS, strict=True) if value)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the duration must be longer than 0 s, got {text!r}")
    return seconds


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the interval must be positive, got {text!r}")
    return value


def _load_fleet(inventory: str, console: Console) -> Fleet | None:
    """The inventory's fleet, or None after printing why it is refused."""
    try:
        return fleet_from_inventory(inventory)
    except (FleetError, InventoryError) as error:
        reason = error.summary if isinstance(error, FleetError) else str(error)
        console.print(f"[bold red]refused[/]: {inventory}: {reason}", highlight=False)
        if error.problems:
            console.print(problems_table([HostBox(host="(fleet)", box=None, problems=error.problems)]))
        return None


def _client(args: argparse.Namespace, fleet: Fleet) -> PrometheusClient:
    return PrometheusClient(args.url or fleet.prometheus_url, timeout_s=args.timeout)


def _fleet_table(fleet: Fleet, client: PrometheusClient) -> Table | Group:
    """The services' table; with a gateway, its model groups' table below it."""
    title = f"gpubox fleet ({client.url}, {time.strftime('%H:%M:%S')})"
    services = top_table(fleet_rows(fleet, client), title=title)
    groups = gateway_rows(fleet, client)
    return Group(services, gateway_table(groups)) if groups else services


def cmd_top(args: argparse.Namespace, console: Console) -> int:
    """The fleet's services with speed, acceptance, VRAM and firing alerts, and each gateway's model groups;
    refreshed until Ctrl-C on a terminal, printed once where stdout is not one (a pipe, a file, watch, cron):
    a live display there would print nothing."""
    fleet = _load_fleet(args.inventory, console)
    if fleet is None:
        return EXIT_REFUSED
    client = _client(args, fleet)
    try:
        table = _fleet_table(fleet, client)
    except PrometheusError as error:
        console.print(f"[bold red]Prometheus error[/]: {error}", highlight=False)
        return EXIT_REFUSED
    if args.once or not console.is_terminal:
        console.print(table)
        return EXIT_OK
    try:
        with Live(table, console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                try:
                    table = _fleet_table(fleet, client)
                    live.update(table, refresh=True)
                except PrometheusError as error:
                    # A blip (the monitor restarting) keeps the last table on screen, with why it is stale.
                    live.update(Group(table, f"[bold red]stale[/]: {error}"), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """A PNG of the fleet's last --since: tok/s, acceptance, VRAM used vs planned."""
    fleet = _load_fleet(args.inventory, console)
    if fleet is None:
        return EXIT_REFUSED
    client = _client(args, fleet)
    try:
        drawn = report_png(fleet, client, args.since, args.png)
    except PrometheusError as error:
        console.print(f"[bold red]Prometheus error[/]: {error}", highlight=False)
        return EXIT_REFUSED
    console.print(
        f"wrote {args.png}: {len(drawn.tokens_per_second)} tok/s series, {len(drawn.acceptance)} acceptance "
        f"series, {len(drawn.vram_used)} GPU(s) used / {len(drawn.vram_planned)} planned",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


def cmd_monitoring(args: argparse.Namespace, console: Console) -> int:
    """Write the fleet's Prometheus/agent configs, rules, Alertmanager config, textfile scripts and
    Grafana files under --out, as the observability deploy renders them; no host is touched."""
    fleet = _load_fleet(args.inventory, console)
    if fleet is None:
        return EXIT_REFUSED
    planned, notes = planned_vram(fleet, headers_dir(args), inventory_dir(args.inventory))
    written = write_files(monitoring_files(fleet, planned), Path(args.out))
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    for note in notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False)
    console.print(f"{len(written)} files for {len(fleet.hosts)} host(s); Prometheus at {fleet.prometheus_url}")
    return EXIT_OK


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `monitoring`, `top` and `report` to gpubox's subcommands."""
    files = commands.add_parser(
        "monitoring", help="write the fleet's Prometheus, alert and Grafana files (no host is touched)"
    )
    files.add_argument("inventory", help="the fleet's pyinfra inventory (hosts carry box and monitoring)")
    files.add_argument("--out", required=True, help="the directory to write them under")
    files.add_argument(
        "--headers",
        help=f"header-only GGUFs for the VRAM plan the memory alerts use (default: {HEADERS_HELP})",
    )
    files.set_defaults(run=cmd_monitoring)

    top = commands.add_parser("top", help="the fleet's services live from Prometheus: speed, VRAM, alerts")
    top.add_argument("inventory", help="the fleet's pyinfra inventory (hosts carry box and monitoring)")
    top.add_argument("--url", help="Prometheus's base URL (default: the monitor's, from the inventory)")
    top.add_argument(
        "--once", action="store_true", help="print one table and exit (what top does when stdout is not a terminal)"
    )
    top.add_argument("--interval", type=_positive_seconds, default=5.0, help="seconds between refreshes (5)")
    top.add_argument("--timeout", type=_positive_seconds, default=10.0, help="seconds per Prometheus request")
    top.set_defaults(run=cmd_top)

    report = commands.add_parser(
        "report",
        help=f"a PNG of the fleet's tok/s, acceptance and VRAM over --since (./{DEFAULT_REPORT_PNG} unless --png)",
        description=f"Draw the fleet's tok/s, acceptance and VRAM over --since from its Prometheus into one PNG: "
        f"{DEFAULT_REPORT_PNG} in the working directory unless --png names another file.",
    )
    report.add_argument("inventory", help="the fleet's pyinfra inventory (hosts carry box and monitoring)")
    report.add_argument("--since", type=parse_duration, default=parse_duration("1h"), help="30m, 1h, 2d (1h)")
    report.add_argument(
        "--png",
        default=DEFAULT_REPORT_PNG,
        help="where to write the figure (default: %(default)s in the working directory, overwritten)",
    )
    report.add_argument("--url", help="Prometheus's base URL (default: the monitor's, from the inventory)")
    report.add_argument("--timeout", type=_positive_seconds, default=30.0, help="seconds per Prometheus request")
    report.set_defaults(run=cmd_report)
