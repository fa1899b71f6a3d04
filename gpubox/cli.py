"""The `gpubox` command, without pyinfra: none of its subcommands deploys to or changes a host.

check validates an inventory's boxes and gateways (and its monitoring) without connecting; plan budgets each GPU's
memory from the models' GGUF headers; smoke tests a running llama-server against thresholds; bench sweeps
slots, drafter and n-max (on a running server or temporary local ones); monitoring writes the fleet's
Prometheus, alert and Grafana files; top shows the fleet live from its Prometheus, and report draws its
history as a PNG (./gpubox-report.png unless --png); rollout deploys the fleet a few hosts at a time, each
drained at its gateway while it rolls (a canary first, a llama-server with its RPC servers' hosts as one).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from gpubox import cli_client, cli_monitoring, cli_plan, cli_rollout
from gpubox.inventory import (
    HostBox,
    InventoryError,
    inventory_dir,
    inventory_hosts,
    load_inventory,
    with_missing_sources,
)
from gpubox.monitoring.fleet import MONITORING_KEY, FleetError, build_fleet, scrape_targets
from gpubox.tables import gateway_table, problems_table, services_table, warnings_table

EXIT_OK = 0
EXIT_REFUSED = 2


def cmd_check(args: argparse.Namespace, console: Console) -> int:
    """Validate every host's Box and Gateway in an inventory; print the services and gateways, or every problem."""
    try:
        boxes, gateways = inventory_hosts(args.inventory)
    except InventoryError as error:
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        if error.problems:
            console.print(problems_table([HostBox(host="(inventory)", box=None, problems=error.problems)]))
        return EXIT_REFUSED
    base = inventory_dir(args.inventory)
    boxes = [with_missing_sources(host_box, base) for host_box in boxes]  # as the deploy looks for them
    refused = [host_box for host_box in boxes if host_box.problems]
    refused += [HostBox(host=found.host, box=None, problems=found.problems) for found in gateways if found.problems]
    if refused:
        console.print(problems_table(refused))
        return EXIT_REFUSED
    if boxes:
        console.print(services_table(boxes))
    if gateways:
        console.print(gateway_table(gateways))
    warnings = warnings_table(boxes, gateways)
    if warnings is not None:
        console.print(warnings)  # accepted: the exit code stays 0
    return check_monitoring(args.inventory, console)


def check_monitoring(inventory: str, console: Console) -> int:
    """The fleet's monitoring, when the hosts carry a ``monitoring`` spec: refused by field, or summed up."""
    hosts = load_inventory(inventory)
    if not any(MONITORING_KEY in host.data for host in hosts):
        return EXIT_OK
    try:
        fleet = build_fleet((host.name, host.data) for host in hosts)
    except FleetError as error:
        console.print(f"[bold red]refused[/]: monitoring: {error.summary}", highlight=False)
        console.print(problems_table([HostBox(host="(fleet)", box=None, problems=error.problems)]))
        return EXIT_REFUSED
    jobs = sum(len(scrape_targets(fleet_host)) for fleet_host in fleet.hosts)
    console.print(
        f"monitoring: Prometheus on {fleet.monitor.name} ({fleet.prometheus_url}), {len(fleet.hosts)} host(s), "
        f"{jobs} scrape jobs; deploy it with deploys/observability.py",
        highlight=False,
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpubox", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate an inventory's boxes and gateways without connecting")
    check.add_argument("inventory", help="a pyinfra inventory file, e.g. inventory/home.py")
    check.set_defaults(run=cmd_check)
    cli_client.register(commands)
    cli_plan.register(commands)
    cli_monitoring.register(commands)
    cli_rollout.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=max(Console().width, 120))
    code: int = args.run(args, console)
    return code


if __name__ == "__main__":
    sys.exit(main())
