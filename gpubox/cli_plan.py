"""`gpubox plan INVENTORY`: each host's VRAM budget per GPU, from its models' GGUF headers.

A model's header is read from its ``source`` when that is a file on the controller, otherwise from
``--headers DIR/<basename of the model's path>`` (a header-only GGUF, see
``scripts/make-gemma4-headers``). GPUs are the box's ``expected_gpus``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gpubox.gguf_header import GgufError, GgufHeader
from gpubox.inventory import HostBox, InventoryError, inventory_boxes
from gpubox.spec import Box
from gpubox.vram import (
    CUDA_CONTEXT_MIB,
    DEFAULT_HEADERS_DIR,
    MIB,
    BoxPlan,
    GpuBudget,
    header_path_for,
    load_model_header,
    plan_box,
    what_to_change,
)

EXIT_OK = 0
EXIT_REFUSED = 2

TERM_EXPLANATIONS: dict[str, str] = {
    "weights": "target tensors on the GPU: offloaded layers + output head (a tied head is a GPU copy of "
    "token_embd, which itself stays on the CPU)",
    "draft weights": "drafter tensors on the GPU (a gemma4-assistant reads the target's token_embd)",
    "KV cache": "cells x (K + V row bytes) per layer with its own cache; sliding-window layers hold "
    "n_swa + n_ubatch cells per slot, shared-KV layers nothing",
    "draft KV": "drafter's own KV (0 for a gemma4-assistant: it shares the target's last layers)",
    "compute": "llama.cpp's compute buffers for one n_ubatch batch (logits, activations, attention "
    "mask or KQ), calibrated against llama-server's logged buffers",
    "headroom": f"CUDA context, cuBLAS workspace, FA pool: {CUDA_CONTEXT_MIB} MiB per process per GPU "
    "(an estimate; re-measured by the GPU validation run)",
}


def _mib(value: int) -> str:
    return f"{value / MIB:,.0f}"


def headers_for_box(box: Box, headers_dir: Path) -> tuple[dict[str, GgufHeader], list[str]]:
    """Read each model's header on the controller; return them by host path, and what was missing."""
    headers: dict[str, GgufHeader] = {}
    missing: list[str] = []
    for service, model in box.models():
        path = header_path_for(model, headers_dir)
        if path is None:
            missing.append(
                f"{service.name}: no header for {model.path}: set its source to a local file, or put a "
                f"header-only GGUF at {headers_dir / Path(model.path).name}"
            )
            continue
        try:
            headers[model.path] = load_model_header(path)
        except (OSError, GgufError) as error:
            missing.append(f"{service.name}: {path}: {error}")
    return headers, missing


def gpu_table(host: str, gpu: GpuBudget) -> Table:
    verdict = "[green]fits[/]" if gpu.fits else "[bold red]over budget[/]"
    table = Table(title=f"{host} GPU {gpu.index}: {_mib(gpu.total_bytes)} MiB, {verdict}")
    names = list(TERM_EXPLANATIONS)
    for column in ("service", *names, "total"):
        table.add_column(column + (" MiB" if column != "service" else ""), justify="right")
    for share in gpu.shares:
        table.add_row(share.service, *(_mib(share.terms.get(name, 0)) for name in names), _mib(share.total))
    free_style = "green" if gpu.fits else "bold red"
    table.add_row(
        "[bold]GPU[/]",
        *("" for _ in names),
        f"{_mib(gpu.used_bytes)} used / [{free_style}]{_mib(gpu.free_bytes)} free[/]",
    )
    return table


def _explain(console: Console) -> None:
    for name, text in TERM_EXPLANATIONS.items():
        console.print(f"  [bold]{name}[/]: {text}", highlight=False)


def print_refusal(console: Console, host_box: HostBox, plan: BoxPlan, headers: dict[str, GgufHeader]) -> None:
    box = host_box.box
    assert box is not None
    for gpu in plan.gpus:
        if gpu.fits:
            continue
        over = -gpu.free_bytes
        console.print(
            f"[bold red]refused[/]: {host_box.host} GPU {gpu.index} is over budget by {_mib(over)} MiB; "
            f"any one of these fits:",
            highlight=False,
        )
        for share in gpu.shares:
            service = box.service(share.service)
            draft = headers.get(service.model_draft.path) if service.model_draft else None
            for suggestion in what_to_change(service, headers[service.model.path], draft, over):
                console.print(f"  {share.service}: {suggestion}", highlight=False)


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    """Print each host's GPU budget; refuse (exit 2) when a GPU is over budget or a header is missing."""
    try:
        boxes = inventory_boxes(args.inventory)
    except InventoryError as error:
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        return EXIT_REFUSED
    code = EXIT_OK
    for host_box in boxes:
        if host_box.box is None or host_box.problems:
            console.print(f"[bold red]refused[/]: {host_box.host}: run `gpubox check` first", highlight=False)
            code = EXIT_REFUSED
            continue
        box = host_box.box
        if not box.expected_gpus:
            console.print(f"{host_box.host}: no expected_gpus: nothing to budget against", highlight=False)
            continue
        headers, missing = headers_for_box(box, Path(args.headers))
        plan = plan_box(box, headers, [(gpu.index, gpu.memory_total_mib) for gpu in box.expected_gpus])
        for problem in (*missing, *plan.problems):
            console.print(f"[bold red]refused[/]: {host_box.host}: {problem}", highlight=False)
        for gpu in plan.gpus:
            console.print(gpu_table(host_box.host, gpu))
        for service_plan in plan.services:
            cells = service_plan.kv_cells
            console.print(
                f"{service_plan.service}: KV cells {cells.full} full-attention / {cells.swa} sliding-window; "
                f"on the CPU: {_mib(service_plan.cpu_weights)} MiB weights, {_mib(service_plan.cpu_kv_cache)} MiB KV",
                highlight=False,
            )
            for note in service_plan.notes:
                console.print(f"  note: {note}", highlight=False)
        _explain(console)
        if missing or not plan.fits:
            print_refusal(console, host_box, plan, headers)
            code = EXIT_REFUSED
    return code


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    plan = commands.add_parser("plan", help="budget each GPU's memory from the models' GGUF headers")
    plan.add_argument("inventory", help="a pyinfra inventory file, e.g. inventory/home.py")
    plan.add_argument(
        "--headers",
        default=str(DEFAULT_HEADERS_DIR),
        help="directory of header-only GGUFs named like the models' basenames (default: %(default)s)",
    )
    plan.set_defaults(run=cmd_plan)
