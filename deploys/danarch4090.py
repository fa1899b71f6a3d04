"""Converge a whole gpubox host: llama.cpp at the pinned commit, the models, every service.

    pyinfra inventory/home.py deploys/danarch4090.py            # converge
    pyinfra inventory/home.py deploys/danarch4090.py --dry --diff   # show what would change

The host's `gpubox.Box` comes from its inventory data (`box`). A bad Box is refused when the
inventory is imported, before any connection.
"""

from pyinfra import host

from gpubox.inventory import box_from_host_data
from operations import llamacpp, models, service, smoke, vram

box = box_from_host_data(host.data.get("box"), host.name)

build_metas = llamacpp.build(box.llama_cpp)

placed_by_path = {}
for user, model in box.models():
    role = "Drafter" if model is user.model_draft else "Model"
    placed = models.place(name=f"{role} {model.path}", model=model)
    models.stamp(name=f"{role} {model.path} verified", model=model, placed=placed)
    placed_by_path[model.path] = placed

vram.fits(name="The services fit their GPUs' memory", box=box)

for server in box.services:
    model_metas = [placed_by_path[model.path] for model in server.models()]
    restart_meta = service.llama_server(server, box.llama_cpp.prefix, changed=[*build_metas, *model_metas])
    smoke.smoke_test(server, restart_meta, box.llama_cpp, build_metas)

# Last, once the services run on the box's models: the files gpubox placed that left the box are
# reported, and deleted with `--data gpubox_remove_unused_models=true` (unless a unit still names one).
remove_unused = host.data.get("gpubox_remove_unused_models", False)
if not isinstance(remove_unused, bool):
    raise ValueError(f"gpubox_remove_unused_models is true or false, got {remove_unused!r}")
models.unused(
    name="Models no longer in the box", in_box=[model.path for _, model in box.models()], remove=remove_unused
)
