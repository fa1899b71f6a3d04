"""What the services of one host use on other hosts (a llama-server's RPC servers), resolved across the inventory.

A service names what it uses elsewhere (``Service.peer_refs``: host and service); this module hands each such
service every host's ``Box`` (``Service.with_peers``) and gets it back with those references resolved (an RPC
endpoint's address and port), or the problems that refuse them, each at its field. Then the rule no single
spec can check: a service that serves a limited number of clients (``PEER_CLIENTS_MAX``: an RPC server serves
one) is used by no more. ``gpubox check``, ``gpubox plan``, the monitoring and a deploy all read an inventory
through here, so a reference is refused by field before any host is touched.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpubox.box import Box
from gpubox.spec import Problem


def _field(position: int, loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in ("services", position, *loc))


def resolve_peers(boxes: Mapping[str, Box]) -> tuple[dict[str, Box], dict[str, list[Problem]]]:
    """Every host's Box with its services' references to other hosts resolved, and each host's problems
    (its own fields: ``services.0.rpc.1.service``). A host whose references are refused keeps its Box as
    written (nothing resolved), with the problems beside it."""
    resolved: dict[str, Box] = {}
    problems: dict[str, list[Problem]] = {name: [] for name in boxes}
    users: dict[tuple[str, str], list[str]] = {}
    for name, box in boxes.items():
        services = []
        for position, service in enumerate(box.services):
            peer_refs = service.peer_refs()
            for peer in peer_refs:
                users.setdefault(peer, []).append(f"{service.name}@{name}")
            updated, violations = service.with_peers(name, boxes)
            problems[name] += [Problem(field=_field(position, loc), message=message) for loc, message, _ in violations]
            services.append(updated)
        changed = any(new is not old for new, old in zip(services, box.services, strict=True))
        resolved[name] = box.model_copy(update={"services": tuple(services)}) if changed else box
    for (host, service_name), clients in users.items():
        server_box = boxes.get(host)
        served = [s for s in server_box.services if s.name == service_name] if server_box is not None else []
        limit = served[0].PEER_CLIENTS_MAX if served else None
        if limit is None or len(clients) <= limit:
            continue
        for client in clients[limit:]:
            client_service, client_host = client.split("@", 1)
            position = next(
                index for index, service in enumerate(boxes[client_host].services) if service.name == client_service
            )
            problems[client_host].append(Problem(
                field=f"services.{position}",
                message=f"{service_name}@{host} serves {limit} client(s) at a time and {', '.join(clients[:limit])} "
                f"use it already: give "
                f"{client} its own {served[0].server_name} (another port or host)",
            ))  # fmt: skip
    return resolved, problems


def has_peers(box: Box) -> bool:
    """Whether any service of ``box`` uses a service on another host."""
    return any(service.peer_refs() for service in box.services)


def peer_hosts(box: Box) -> list[str]:
    """The hosts whose services ``box``'s services use, in first-use order."""
    return list(dict.fromkeys(host for service in box.services for host, _ in service.peer_refs()))
