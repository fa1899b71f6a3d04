"""Surgical MTP redeploy: the drafter, the one service's unit, its restart and its smoke test.

    pyinfra inventory/home.py deploys/gemma4_mtp.py
    pyinfra inventory/home.py deploys/gemma4_mtp.py --data gpubox_service=other

Touches nothing else: no build, no packages, no other service. It first checks that the
installed llama-server lists the service's spec type (`draft-mtp` for the seed box) in its
`--help`, and that the drafter on the host has the GGUF architecture the spec declares.
"""

from pyinfra import host
from pyinfra.api.exceptions import DeployError

from operations import deploy_lock, models, monitoring, service, smoke, speculation, vram
from operations.deploy_inputs import host_box, watched_fleet

box = host_box()  # no `box` (a wrong inventory path?) or a refused one: one message, no traceback
try:
    server = box.llama_server(host.data.get("gpubox_service", "gemma4"))
except KeyError as error:
    raise DeployError(f"gpubox_service: {error.args[0]}: pass --data gpubox_service=NAME") from None
if box.llama_cpp is None or server.model_draft is None:
    raise DeployError(f"{server.name} has no model_draft: the surgical MTP redeploy places and uses a drafter")
fleet = watched_fleet()
deploy_lock.acquire()  # one deploy at a time: the full deploy's lock, before anything is read

speculation.supported(
    name=f"llama-server supports --spec-type {server.spec_type}", server=server, prefix=box.llama_cpp.prefix
)
drafter = models.place(name=f"Drafter {server.model_draft.path}", model=server.model_draft, hub=box.huggingface)
models.stamp(name=f"Drafter {server.model_draft.path} verified", model=server.model_draft, placed=drafter)
speculation.drafter_architecture(
    name=f"Drafter is a {server.model_draft.architecture} GGUF", model=server.model_draft
)
vram.fits(name="The services fit their GPUs' memory", box=box)
restarted = service.server(server, box.llama_cpp.prefix, changed=[drafter], ensure_user=False)
smoke.smoke_test(server, restarted)
if fleet is not None:  # its key turned on or rotated: the host's Prometheus scrapes with the new one
    monitoring.scrape_keys(fleet, host.name)
