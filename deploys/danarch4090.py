"""Converge a whole gpubox host: its builds and installs, its models, every service, their smoke tests.

    pyinfra inventory/home.py deploys/danarch4090.py            # converge
    pyinfra inventory/home.py deploys/danarch4090.py --dry --diff   # show what would change

The host's `gpubox.Box` comes from its inventory data (`box`). A bad Box is refused when the
inventory is imported, before any connection. llama.cpp and whisper.cpp are built by one build
operation, piper is installed in a venv; each service restarts only when its unit, its models or
its install changed, and is smoke tested after a restart or a start (speech round trip when the box
has both).

Services other hosts use (RPC servers) converge first, on every host, and pass their check before any
service that uses them restarts; a restart of one restarts its clients (`operations.peers`).

One deploy at a time per host: the run takes the host's deploy lock before it reads the host, and
refuses at once, naming the holder, when another run has it (`operations.deploy_lock`). A service a
cut run restarted and never saw pass its smoke test is smoke-tested by the next run (and rolled back
on a miss).
"""

from pyinfra import host

from gpubox.peers import has_peers
from gpubox.servers.base import Service
from operations import box_state, deploy_lock, models, monitoring, peers, piper, service, smoke, source_build, vram
from operations import gateway as gateway_ops
from operations.deploy_inputs import data_flag, gateway_keys_for, gateway_only, host_box, host_gateway, watched_fleet
from operations.host_facts import prefetch


def converge_box() -> None:
    """The host's box: installs, models, services (RPC servers first), smoke tests, the scrape keys, unused
    models."""
    box = host_box()  # no `box` (a wrong inventory path?) or a refused one: one message, no traceback
    fleet = watched_fleet()  # the monitoring the host carries (None: none), whose scrape keys follow the services'
    deploy_lock.acquire()  # one deploy at a time: before anything is read
    # what the checks below read, in one round trip
    prefetch([*box_state.box_reads(box), *monitoring.scrape_key_reads(fleet, host.name)])
    models.check_sources(box)  # a model the host lacks whose controller source is missing: refused before any change

    # Each install's operation metas, by its prefix (a box's installs have their own prefixes).
    install_metas = {build.prefix: source_build.build(build) for build in box.builds()}
    if box.piper is not None:
        install_metas[box.piper.prefix] = piper.piper(box.piper, box_state.piper_flavor(box))

    placed_by_path = {}
    for user, model in box.models():
        role = user.model_role(model)  # `Model`, or what the service calls it (a llama-server's `Drafter`)
        placed = models.place(name=f"{role} {model.path}", model=model, hub=box.huggingface)
        models.stamp(name=f"{role} {model.path} verified", model=model, placed=placed)
        placed_by_path[model.path] = placed

    vram.fits(name="The services fit their GPUs' memory", box=box)

    restarts = {}
    gateway_keys = gateway_keys_for(box)  # the keys gateways of the inventory send this host's backends


    def converge(server: Service) -> None:
        """Its user, flag check, unit and restart (when its unit, models, install or peers changed), its smoke test."""
        prefix = box.prefix_of(server)  # None: the server runs from no install (its program is the host's)
        install_changed = install_metas[prefix] if prefix is not None else []
        changed = [*install_changed, *(placed_by_path[model.path] for model in server.models())]
        changed += peers.peer_changes(server)  # its RPC servers on other hosts restarted: restart with them
        restarts[server.name] = service.server(
            server, prefix, changed=changed, install=install_changed, gateway_keys=gateway_keys.get(server.name, [])
        )
        if server.SERVES_PEERS:
            peers.serving(server, restarts[server.name])
        smoke.smoke_test(server, restarts[server.name], box.install_of(server), install_changed, box=box)


    # What other hosts use (RPC servers) first; then every host of an RPC pair passes one operation, which
    # orders the serving hosts' operations (smoke tests included) before their clients' (operations.peers).
    for server in [server for server in box.services if server.SERVES_PEERS]:
        converge(server)
    if has_peers(box) or any(server.SERVES_PEERS for server in box.services):
        peers.converged(name="Services other hosts use are converged and checked")
    for server in [server for server in box.services if not server.SERVES_PEERS]:
        converge(server)

    # The speech round trip, when a restart could have changed either end: piper speaks, whisper hears.
    smoke.round_trip_test(box, restarts, install_metas)

    # A key turned on or rotated above: the host's Prometheus scrapes with the new one (where it is deployed).
    if fleet is not None:
        monitoring.scrape_keys(fleet, host.name)

    # Last, once the services run on the box's models: the files gpubox placed that left the box are
    # reported, and deleted with `--data gpubox_remove_unused_models=true` (unless a unit still names one).
    models.unused(
        name="Models no longer in the box",
        in_box=[model.path for _, model in box.models()],
        remove=data_flag("gpubox_remove_unused_models"),
    )


if gateway_only():  # a host that runs only a gateway: its lock, then the gateway
    deploy_lock.acquire()
else:
    converge_box()

# The gateway, where the host runs one: after the box, so a backend on this host is up before it routes there.
gateway = host_gateway()  # refused (a backend it can't reach, a group mixing models): one message
if gateway is not None:
    gateway_ops.gateway(*gateway)
