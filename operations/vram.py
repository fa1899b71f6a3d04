"""Refuse a box whose services do not fit their GPUs' memory, or whose models' headers refuse a field
(a per-slot context above the trained context), before any unit is written."""

from __future__ import annotations

from pyinfra import host, state
from pyinfra.api import OperationError, operation

from facts.gpu import NvidiaGpus
from gpubox.box import Box
from gpubox.gguf_header import GgufFile
from gpubox.gpu import gpus_from_fact
from gpubox.inventory import HostBox
from gpubox.vram import load_model_header, moves, plan_box, whisper_headers_for_box

from .host_facts import FactRead, read
from .models import file_read, local_source, remote_header
from .preflight import inventory_base


def _gpus_read() -> FactRead:
    return NvidiaGpus, {}


def facts_read(box: Box) -> list[FactRead]:
    """What `fits` reads on the host (for `host_facts.prefetch`): its GPUs, the stat of each non-GGUF model."""
    return [_gpus_read(), *(file_read(model) for _, model in box.models() if model.format != "gguf")]


def _headers(box: Box) -> dict[str, GgufFile]:
    """Each model's header: from the controller file when there is one, else from the host's file."""
    headers: dict[str, GgufFile] = {}
    for _, model in box.models():
        if model.format != "gguf":
            continue
        source = local_source(model) if model.source is not None and not model.source_is_url else None
        header = load_model_header(source) if source is not None and source.is_file() else remote_header(model.path)
        if header is not None:
            headers[model.path] = header
    return headers


def _model_sizes(box: Box) -> dict[str, int]:
    """The sizes of the box's non-GGUF models on the host (whisper, piper): the placement stat them already."""
    sizes: dict[str, int] = {}
    for _, model in box.models():
        info = read(file_read(model)) if model.format != "gguf" else None
        if info:
            sizes[model.path] = int(info["size"])
    return sizes


@operation()
def fits(box: Box):  # type: ignore[no-untyped-def]
    """
    Refuse a box whose services do not fit their GPUs: plan every service's VRAM (weights, KV,
    compute, headroom) against the host's GPUs and print the table. On any host, GPUs or not,
    refuse a field the models' headers refuse (``services.N.ctx_size`` above the trained context).

    + box: the host's ``Box``; the models' headers come from controller files, else the host's files (a ggml
      whisper model's from its controller file only)

    **Example:**

    .. code:: python

        vram.fits(name="The services fit their GPUs' memory", box=box)
    """
    gpus = gpus_from_fact(read(_gpus_read()))
    headers = _headers(box)
    # a controller source that is no ggml whisper model was refused when it was placed (check_local_source)
    whisper_headers, _ = whisper_headers_for_box(box, inventory_base())
    plan = plan_box(
        box,
        headers,
        [(gpu.index, gpu.memory_total_mib or 0) for gpu in gpus],
        model_sizes=_model_sizes(box),
        whisper_headers=whisper_headers,
    )
    if plan.refused:
        from gpubox.tables import problems_table, stderr_console  # rich is loaded only to draw a table

        stderr_console().print(problems_table([HostBox(host=host.name, box=box, problems=list(plan.refused))]))
        raise OperationError(
            "refused by the models' headers: "
            + "; ".join(f"{problem.field}: {problem.message}" for problem in plan.refused)
        )
    if not gpus or not any(server.gpus for server in box.services):
        host.noop("no GPU services on this host: no VRAM budget to check")
        return
    from gpubox.tables import gpu_table, print_refusal, stderr_console  # a GPU box draws its budget

    console = stderr_console(record=True)
    for gpu in plan.gpus:
        console.print(gpu_table(host.name, gpu))
    if plan.problems and not state.is_executing:
        host.noop("the models are not all on the host yet: the budget is checked once they are")
        return
    if plan.problems:
        raise OperationError("cannot plan the VRAM budget: " + "; ".join(plan.problems))
    if not plan.fits:
        print_refusal(console, host.name, box, plan, headers)
        raise OperationError(
            "the services do not fit their GPUs' memory (table above): change what it suggests, "
            "or pin a service to another GPU"
            + "".join(f"; {move.field}: {move.message}" for move in moves(box, plan))
        )
    used = ", ".join(f"GPU {gpu.index} {gpu.used_bytes >> 20}/{gpu.total_bytes >> 20} MiB" for gpu in plan.gpus)
    host.noop(f"the services fit: {used}")
    yield from ()
