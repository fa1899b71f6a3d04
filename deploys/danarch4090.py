"""Converge a whole gpubox host: its builds and installs, its models, every service, their smoke tests.

    pyinfra inventory/home.py deploys/danarch4090.py            # converge
    pyinfra inventory/home.py deploys/danarch4090.py --dry --diff   # show what would change

The host's `gpubox.Box` comes from its inventory data (`box`). A bad Box is refused when the
inventory is imported, before any connection. llama.cpp and whisper.cpp are built by one build
operation, piper is installed in a venv; each service restarts only when its unit, its models or
its install changed, and is smoke tested after a restart (speech round trip when the box has both).
"""

from pyinfra import host

from gpubox.inventory import box_from_host_data
from operations import box_state, models, piper, service, smoke, source_build, vram

box = box_from_host_data(host.data.get("box"), host.name)
box_state.prefetch_box(box)  # what the checks below read, in one round trip

# Each install's operation metas, by its prefix (a box's installs have their own prefixes).
install_metas = {build.prefix: source_build.build(build) for build in box.builds()}
if box.piper is not None:
    install_metas[box.piper.prefix] = piper.piper(box.piper, box_state.piper_flavor(box))

placed_by_path = {}
for user, model in box.models():
    role = "Drafter" if model is getattr(user, "model_draft", None) else "Model"
    placed = models.place(name=f"{role} {model.path}", model=model, hub=box.huggingface)
    models.stamp(name=f"{role} {model.path} verified", model=model, placed=placed)
    placed_by_path[model.path] = placed

vram.fits(name="The services fit their GPUs' memory", box=box)

restarts = {}
for server in box.services:
    install = box.install_of(server)
    changed = [*install_metas[install.prefix], *(placed_by_path[model.path] for model in server.models())]
    restarts[server.name] = service.server(server, install.prefix, changed=changed)
    smoke.smoke_test(server, restarts[server.name], install, install_metas[install.prefix])

# The speech round trip, when a restart could have changed either end: piper speaks, whisper hears.
smoke.round_trip_test(box, restarts, install_metas)

# Last, once the services run on the box's models: the files gpubox placed that left the box are
# reported, and deleted with `--data gpubox_remove_unused_models=true` (unless a unit still names one).
remove_unused = host.data.get("gpubox_remove_unused_models", False)
if not isinstance(remove_unused, bool):
    raise ValueError(f"gpubox_remove_unused_models is true or false, got {remove_unused!r}")
models.unused(
    name="Models no longer in the box", in_box=[model.path for _, model in box.models()], remove=remove_unused
)
