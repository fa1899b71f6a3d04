"""What a deploy file reads from the inventory, refused the way pyinfra's CLI prints in one line.

A deploy file runs once per host while pyinfra loads it. pyinfra 3.10's CLI prints a ``PyinfraError``
raised there as one line (``--> pyinfra error in FILE line N: message``) and anything else with its
traceback, so these raise ``DeployError`` with the message gpubox's own refusals carry.
"""

from __future__ import annotations

from pyinfra import host, inventory, logger
from pyinfra.api.exceptions import DeployError

from gpubox.box import Box
from gpubox.inventory import BOX_KEY, InventoryError, box_from_host_data, no_box_message, refusal_text
from gpubox.monitoring.fleet import MONITORING_KEY, Fleet, FleetError, build_fleet


def host_box() -> Box:
    """The Box of the host being deployed; no ``box`` (a wrong inventory path?) or a refused one: DeployError."""
    try:
        return box_from_host_data(host.data.get(BOX_KEY), host.name)
    except InventoryError as error:
        raise DeployError(refusal_text(error)) from None


def data_flag(key: str, default: bool = False) -> bool:
    """A true/false switch from the host's data (``--data KEY=true``); anything else: DeployError."""
    value = host.data.get(key, default)
    if not isinstance(value, bool):
        raise DeployError(f"{key} is true or false, got {value!r}: pass --data {key}=true (or false)")
    return value


def _fleet_error(error: FleetError) -> DeployError:
    lines = [error.summary, *(f"    {problem.field}: {problem.message}" for problem in error.problems)]
    return DeployError("\n".join(lines))


def inventory_fleet() -> Fleet:
    """The inventory's fleet, with the host being deployed in it; refused (DeployError) otherwise."""
    if host.data.get(BOX_KEY) is None:
        raise DeployError(no_box_message(host.name))
    try:
        return build_fleet((fleet_host.name, fleet_host.data.dict()) for fleet_host in inventory)
    except FleetError as error:
        raise _fleet_error(error) from None


def watched_fleet() -> Fleet | None:
    """The fleet watching this host, for the box deploy to keep its scrape credentials in step; None when
    the host carries no ``monitoring``. A refused fleet is said (with what to run) rather than raised:
    the services deploy, their monitoring waits for deploys/observability.py, which refuses it too."""
    if host.data.get(MONITORING_KEY) is None:
        return None
    try:
        return build_fleet((fleet_host.name, fleet_host.data.dict()) for fleet_host in inventory)
    except FleetError as error:
        host.log(
            f"the monitoring is not kept in step with the services ({error}): fix it (gpubox check), then run "
            f"pyinfra INVENTORY deploys/observability.py",
            log_func=logger.warning,
        )
        return None
