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

model_metas_by_service = {}
for server in box.services:
    model_metas = []
    for role, model in (("Model", server.model), ("Drafter", server.model_draft)):
        if model is None:
            continue
        placed = models.place(name=f"{role} {model.path}", model=model)
        models.stamp(name=f"{role} {model.path} verified", model=model, placed=placed)
        model_metas.append(placed)
    model_metas_by_service[server.name] = model_metas

vram.fits(name="The services fit their GPUs' memory", box=box)

for server in box.services:
    model_metas = model_metas_by_service[server.name]
    unit_meta, restart_meta = service.llama_server(
        server, box.llama_cpp.prefix, changed=[*build_metas, *model_metas]
    )
    smoke.smoke_test(server, restart_meta, box.llama_cpp, build_metas)
