"""Services one host serves to others (RPC servers), and the services elsewhere that restart with them.

pyinfra loads a deploy file for every host at once (one greenlet per host), then orders the operations
as a graph of each host's own sequence: two hosts' operations are ordered against each other only
through an operation both call (the same line). The box deploy converges the services others use first,
in a loop of its own (``SERVES_PEERS``), then every host of an RPC pair passes ``converged``, one
operation at one line: the serving host's operations, smoke tests included, come before it, the client's
restart after it. Each host registers what may restart such a service here; a client
host's file waits for the registration (the files load concurrently, so it comes) and restarts its own
service when the peer's restart or start runs (``a changed RPC server restarts its clients``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gevent.event
from pyinfra import host, state
from pyinfra.api import operation
from pyinfra.api.exceptions import DeployError
from pyinfra.api.operation import OperationMeta

from gpubox.servers.base import Service

from .service import Restarted

REGISTRATION_TIMEOUT_S = 300.0
"""How long a client host's deploy file waits for its peers' files to register their services."""


@dataclass
class _Registration:
    ready: gevent.event.Event = field(default_factory=gevent.event.Event)
    metas: list[OperationMeta] = field(default_factory=list)


_REGISTRY: dict[tuple[int, str, str], _Registration] = {}


def _slot(host_name: str, service_name: str) -> _Registration:
    return _REGISTRY.setdefault((id(state), host_name, service_name), _Registration())


def serving(server: Service, restarted: Restarted) -> None:
    """Register what may put a new process of ``server`` (served to other hosts) live in this run."""
    slot = _slot(host.name, server.name)
    metas = [meta for meta in (restarted.restart, restarted.start) if meta is not None]
    # Whether each will change is decided here, on this host: pyinfra answers it from the current host's
    # operations, and the client asks it from its own host's file.
    slot.metas = [meta for meta in metas if meta.will_change]
    slot.ready.set()


def peer_changes(server: Service) -> list[OperationMeta]:
    """The operations of other hosts whose change restarts ``server`` (a restart or start of its RPC servers);
    waits for those hosts' deploy files to register them."""
    metas: list[OperationMeta] = []
    for peer_host, peer_service in server.peer_refs():
        slot = _slot(peer_host, peer_service)
        if not slot.ready.wait(REGISTRATION_TIMEOUT_S):
            raise DeployError(
                f"{server.name} uses {peer_service}@{peer_host}, whose deploy file registered nothing in "
                f"{REGISTRATION_TIMEOUT_S:.0f} s: is {peer_host} in this run, and did its deploy file load?"
            )
        if slot.metas:
            host.log(f"{server.unit_name} restarts if {peer_service}@{peer_host} restarts or starts in this run")
        metas += slot.metas
    return metas


@operation(is_idempotent=True)
def converged():  # type: ignore[no-untyped-def]
    """
    A point every host of an RPC pair passes in one operation: what a host serves to others (and its smoke
    test) comes before it, the services that use them after it. It runs nothing.

    **Example:**

    .. code:: python

        peers.converged(name="Services other hosts use are converged and checked")
    """
    host.noop("the services other hosts use are converged and checked")
    yield from ()
