"""Refuse a box whose services do not fit their GPUs' memory, before any unit is written."""

from __future__ import annotations

from pyinfra import host, state
from pyinfra.api import OperationError, operation
from rich.console import Console

from facts.gpu import NvidiaGpus
from gpubox.cli_plan import gpu_table, print_refusal
from gpubox.gguf_header import GgufHeader
from gpubox.gpu import gpus_from_fact
from gpubox.inventory import HostBox
from gpubox.spec import Box
from gpubox.vram import load_model_header, plan_box

from .models import local_source, remote_header


def _headers(box: Box) -> dict[str, GgufHeader]:
    """Each model's header: from the controller file when there is one, else from the host's file."""
    headers: dict[str, GgufHeader] = {}
    for _, model in box.models():
        source = local_source(model) if model.source is not None and not model.source_is_url else None
        header = load_model_header(source) if source is not None and source.is_file() else remote_header(model.path)
        if header is not None:
            headers[model.path] = header
    return headers


@operation()
def fits(box: Box):  # type: ignore[no-untyped-def]
    """Plan every service's VRAM (weights, KV, compute, headroom) against the host's GPUs."""
    gpus = gpus_from_fact(host.get_fact(NvidiaGpus))
    if not gpus or not any(server.gpus for server in box.services):
        host.noop("no GPU services on this host: no VRAM budget to check")
        return
    headers = _headers(box)
    plan = plan_box(box, headers, [(gpu.index, gpu.memory_total_mib or 0) for gpu in gpus])
    console = Console(width=120, record=True, stderr=True)
    for gpu in plan.gpus:
        console.print(gpu_table(host.name, gpu))
    if plan.problems and not state.is_executing:
        host.noop("the models are not all on the host yet: the budget is checked once they are")
        return
    if plan.problems:
        raise OperationError("cannot plan the VRAM budget: " + "; ".join(plan.problems))
    if not plan.fits:
        print_refusal(console, HostBox(host=host.name, box=box, problems=[]), plan, headers)
        raise OperationError(
            "the services do not fit their GPUs' memory (table above): change what it suggests, "
            "or pin a service to another GPU"
        )
    used = ", ".join(f"GPU {gpu.index} {gpu.used_bytes >> 20}/{gpu.total_bytes >> 20} MiB" for gpu in plan.gpus)
    host.noop(f"the services fit: {used}")
    yield from ()
