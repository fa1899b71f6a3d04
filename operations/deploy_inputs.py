"""What a deploy file reads from the inventory, refused the way pyinfra's CLI prints in one line.

A deploy file runs once per host while pyinfra loads it. pyinfra 3.10's CLI prints a ``PyinfraError``
raised there as one line (``--> pyinfra error in FILE line N: message``) and anything else with its
traceback, so these raise ``DeployError`` with the message gpubox's own refusals carry.
"""

from __future__ import annotations

from pyinfra import host, inventory, logger, state
from pyinfra.api.exceptions import DeployError
from pyinfra.context import ctx_inventory

from gpubox.box import Box
from gpubox.gateway import GATEWAY_KEY, Gateway
from gpubox.gateway_keys import group_key
from gpubox.haproxy import haproxy_config
from gpubox.inventory import (
    BOX_KEY,
    InventoryError,
    box_from_host_data,
    gateway_of,
    no_box_message,
    refusal_text,
    with_backends,
)
from gpubox.monitoring.fleet import MONITORING_KEY, Fleet, FleetError, build_fleet
from gpubox.peers import has_peers, peer_hosts, resolve_peers
from gpubox.servers.base import Service


def host_box() -> Box:
    """The Box of the host being deployed; no ``box`` (a wrong inventory path?) or a refused one: DeployError.

    A box whose services use services on other hosts (a llama-server's RPC servers) gets them resolved from
    every host's box (``gpubox.peers``), refused by field as ``gpubox check`` refuses them, and only with
    those hosts in the run (see ``_peers_in_run``)."""
    try:
        box = box_from_host_data(host.data.get(BOX_KEY), host.name)
    except InventoryError as error:
        raise DeployError(refusal_text(error)) from None
    return _with_peers(box) if has_peers(box) else box


def _inventory_boxes(own: Box | None = None) -> dict[str, Box]:
    """Every box of the inventory, validated (``own``: this host's, validated already); a refused one is a
    DeployError naming its host."""
    boxes: dict[str, Box] = {}
    for other in inventory:
        data = other.data.get(BOX_KEY)
        if data is None:
            continue
        if own is not None and other.name == host.name:
            boxes[other.name] = own
            continue
        try:
            boxes[other.name] = box_from_host_data(data, other.name)
        except InventoryError as error:
            raise DeployError(f"{host.name} uses {other.name}'s box, which is refused: {refusal_text(error)}") from None
    return boxes


def _with_peers(box: Box) -> Box:
    resolved, problems = resolve_peers(_inventory_boxes(box))
    if problems[host.name]:
        lines = [f"{host.name}: what it uses on other hosts is refused:"]
        lines += [f"    {problem.field}: {problem.message}" for problem in problems[host.name]]
        raise DeployError("\n".join(lines))
    _peers_in_run(box)
    return resolved[host.name]


def _peers_in_run(box: Box) -> None:
    """Refuse a run (``--limit``) that leaves out a host whose services this one's use.

    Its llama-server would restart against an RPC server this run neither converges nor checks: built from
    another llama.cpp commit (the HELLO check aborts the connection) or not listening (llama-server aborts at
    start), and the restart would leave the service crash-looping. Deploying both is the safe run."""
    outside = [name for name in peer_hosts(box) if not state.is_host_in_limit(inventory.get_host(name))]
    if outside:
        names = " ".join(f"--limit {name}" for name in (host.name, *outside))
        raise DeployError(
            f"{host.name} uses services on {', '.join(outside)}, which this run leaves out: its llama-server would "
            f"restart against RPC servers the run neither converges nor checks (another llama.cpp commit aborts the "
            f"connection, one not listening aborts llama-server). Deploy them together: {names}"
        )


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
    if host.data.get(BOX_KEY) is None and host.data.get(GATEWAY_KEY) is None:  # a gateway-only host is watched too
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


def gateway_only() -> bool:
    """Whether the host runs a gateway and no box (the box deploy has nothing else to do there)."""
    return host.data.get(BOX_KEY) is None and host.data.get(GATEWAY_KEY) is not None


def host_gateway() -> tuple[Gateway, str, list[str]] | None:
    """The host's gateway, its HAProxy config (its backends resolved from every box of the inventory) and each
    group's backend key (from the controller's store); None when the host runs none. Refused: DeployError."""
    found = gateway_of(host.name, host.data)
    if found is None:
        return None
    (resolved,) = with_backends([found], dict(_inventory_boxes()))
    if resolved.gateway is None or resolved.problems:
        lines = [f"{host.name}: its gateway is refused:", *(f"    {p.field}: {p.message}" for p in resolved.problems)]
        raise DeployError("\n".join(lines))
    spec, backends = resolved.gateway, resolved.backends
    keyed = {name for name, group in backends.items() if any(backend.key_file for backend in group)}
    keys = [group_key(host.name, group.name) for group in spec.groups]
    return spec, haproxy_config(spec, backends, keyed_groups=keyed), keys


def gateway_keys_for(box: Box) -> dict[str, list[str]]:
    """Each service of this host that a gateway of the inventory routes to and that checks a key: the gateway's
    key for its group (another line of its key file)."""
    keys: dict[str, list[str]] = {}
    if not ctx_inventory.isset():  # a deploy run outside an inventory (the operation tests): no gateway
        return keys
    for other in inventory:
        found = gateway_of(other.name, other.data)
        if found is None or found.gateway is None:  # a refused gateway is refused by its own host's deploy
            continue
        for group in found.gateway.groups:
            for ref in group.backends:
                if ref.host != host.name:
                    continue
                served: list[Service] = [service for service in box.services if service.name == ref.service]
                if served and served[0].key_file is not None:
                    keys.setdefault(ref.service, []).append(group_key(found.host, group.name))
    return keys
