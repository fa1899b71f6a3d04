"""The rich tables gpubox prints: the CLI's and the operations' (one rendering for both)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from gpubox.box import Box
from gpubox.gateway import Gateway
from gpubox.gguf_header import GgufFile
from gpubox.gpu import gpu_list
from gpubox.inventory import HostBox, HostGateway
from gpubox.servers.base import Service
from gpubox.vram import CUDA_CONTEXT_MIB, MIB, BoxPlan, GpuBudget, moves

TERM_EXPLANATIONS: dict[str, str] = {
    "weights": "target tensors on the GPU: offloaded layers + output head (a tied head is a GPU copy of "
    "token_embd, which itself stays on the CPU); a whisper or piper model file",
    "draft weights": "drafter tensors on the GPU (a gemma4-assistant reads the target's token_embd)",
    "KV cache": "cells x (K + V row bytes) per layer with its own cache; sliding-window layers hold "
    "n_swa + n_ubatch cells per slot, shared-KV layers nothing",
    "draft KV": "drafter's own KV at spec_draft_type_k/v (default f16, not the target's cache types); "
    "0 for a gemma4-assistant: it shares the target's last layers",
    "compute": "llama.cpp's compute buffers for one n_ubatch batch (min(ctx_size, batch_size, ubatch_size); "
    "default 512): logits, activations, attention mask or KQ, calibrated against llama-server's logged buffers; "
    "whisper: its state (KV self/cross, conv/encode/cross/decode buffers, by model size); piper: its ONNX session",
    "headroom": f"CUDA context, cuBLAS workspace, FA pool: {CUDA_CONTEXT_MIB} MiB per process per GPU "
    "(an estimate; re-measured by the GPU validation run)",
}


def stderr_console(record: bool = False) -> Console:
    """Where a deploy draws its tables: stderr, 120 columns (``record``: kept for ``export_text``)."""
    return Console(width=120, stderr=True, record=record)


def mib(value: int) -> str:
    """Bytes as whole MiB with thousands separators."""
    return f"{value / MIB:,.0f}"


MODEL_NAME_MAX = 44
"""The longest file name the services table shows whole; a longer one loses its middle to an ellipsis."""


def middle_ellipsis(name: str, limit: int = MODEL_NAME_MAX) -> str:
    """``name`` whole when it fits in ``limit`` characters, else its start and end around ``…`` (the
    end holds the quantization and the extension, which tell files of one model apart)."""
    if limit < 3:
        raise ValueError(f"limit must be at least 3 characters, got {limit}")
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    return f"{name[: limit - 1 - tail]}…{name[len(name) - tail :]}"


def model_names(service: Service) -> str:
    """The service's model files (not a voice's JSON config), one a line, each whole or middle-shortened."""
    names = [model.path.rsplit("/", 1)[-1] for model in service.models() if model.format != "json"]
    return "\n".join(middle_ellipsis(name) for name in names)


def services_table(boxes: list[HostBox]) -> Table:
    """Every service of every box: where it runs and how it is configured.

    Each model file is on its own line and never wrapped (a file name broken mid-word reads as two
    names); the other columns give way, and a name longer than ``MODEL_NAME_MAX`` loses its middle.
    """
    table = Table(title="gpubox services")
    for column in ("host", "service", "type", "GPUs", "port"):
        table.add_column(column, overflow="fold")
    table.add_column("model", no_wrap=True, overflow="ellipsis")
    table.add_column("configuration", overflow="fold")
    for host_box in boxes:
        if host_box.box is None:
            continue
        for service in host_box.box.services:
            table.add_row(
                host_box.host,
                service.name,
                service.type_tag(),
                gpu_list(service.placement),
                str(service.port),
                model_names(service),
                service.summary(),
            )
    return table


def _listen(gateway: Gateway) -> str:
    address = f"[{gateway.host}]" if ":" in gateway.host else gateway.host
    admitted = f"\nallow_from {', '.join(gateway.allow_from)}" if gateway.allow_from else ""
    return f"{address}:{gateway.port}{admitted}"


def _client_keys(gateway: Gateway) -> str:
    if gateway.api_key_file is None:
        return "no"
    return f"yes ({'generated: ' if gateway.generate_api_key else ''}{gateway.api_key_file})"


def gateway_table(gateways: list[HostGateway]) -> Table:
    """Every gateway: where it listens, TLS or not, client keys or not, and a row per model group with its
    backends (``host:service`` at the address the gateway dials, their slots) and its ``min_healthy``."""
    table = Table(title="gpubox gateways")
    for column in ("host", "listen", "TLS", "client keys", "group", "backends", "min healthy"):
        table.add_column(column, overflow="fold")
    for found in gateways:
        gateway = found.gateway
        if gateway is None:
            continue
        for index, group in enumerate(gateway.groups):
            first = index == 0
            backends = "\n".join(
                f"{backend.server_name} {backend.address}:{backend.port} (parallel {backend.parallel})"
                for backend in found.backends.get(group.name, ())
            )
            table.add_row(
                found.host if first else "",
                _listen(gateway) if first else "",
                (f"yes ({gateway.tls_cert})" if gateway.tls_cert else "no") if first else "",
                _client_keys(gateway) if first else "",
                group.name,
                backends,
                f"{group.min_healthy} of {len(group.backends)}",
            )
    return table


def warnings_table(boxes: list[HostBox], gateways: Sequence[HostGateway] = ()) -> Table | None:
    """What the rules accept but a reviewer would question, in yellow; None when there is nothing."""
    table = Table(title="warnings", title_style="bold yellow", style="yellow")
    for column in ("host", "service", "field", "why"):
        table.add_column(column, overflow="fold", style="yellow")
    for host_box in boxes:
        for service in host_box.box.services if host_box.box is not None else ():
            for field, why in service.warnings():
                table.add_row(host_box.host, service.name, field, why)
    for found in gateways:
        for field, why in found.gateway.warnings() if found.gateway is not None else ():
            table.add_row(found.host, "gateway", f"gateway.{field}", why)
    return table if table.row_count else None


def problems_table(boxes: list[HostBox]) -> Table:
    """Every refused field of every box, with what to change."""
    table = Table(title="refused", title_style="bold red")
    for column in ("host", "field", "what to change"):
        table.add_column(column, overflow="fold")
    for host_box in boxes:
        for problem in host_box.problems:
            table.add_row(host_box.host, problem.field, problem.message)
    return table


def gpu_table(host: str, gpu: GpuBudget) -> Table:
    """One GPU's budget: a row per service and its terms, then used / free."""
    verdict = "[green]fits[/]" if gpu.fits else "[bold red]over budget[/]"
    table = Table(title=f"{host} GPU {gpu.index}: {mib(gpu.total_bytes)} MiB, {verdict}")
    names = list(TERM_EXPLANATIONS)
    for column in ("service", *names, "total"):
        table.add_column(column + (" MiB" if column != "service" else ""), justify="right")
    for share in gpu.shares:
        table.add_row(share.service, *(mib(share.terms.get(name, 0)) for name in names), mib(share.total))
    if gpu.reserve_bytes:
        table.add_row("[italic]reserved[/]", *("" for _ in names), mib(gpu.reserve_bytes))
    free_style = "green" if gpu.fits else "bold red"
    table.add_row(
        "[bold]GPU[/]",
        *("" for _ in names),
        f"{mib(gpu.used_bytes)} used / [{free_style}]{mib(gpu.free_bytes)} free[/]",
    )
    return table


def explain_terms(console: Console) -> None:
    """One line per term of the VRAM table: what it counts."""
    for name, text in TERM_EXPLANATIONS.items():
        console.print(f"  [bold]{name}[/]: {text}", highlight=False)


def print_refusal(console: Console, host: str, box: Box, plan: BoxPlan, headers: dict[str, GgufFile]) -> None:
    """Each over-budget GPU by how much, and the changes that would make each service fit."""
    for gpu in plan.gpus:
        if gpu.fits:
            continue
        over = -gpu.free_bytes
        console.print(
            f"[bold red]refused[/]: {host} GPU {gpu.index} is over budget by {mib(over)} MiB; "
            f"any one of these fits:",
            highlight=False,
        )
        own = {service.name for service in box.services}
        for share in gpu.shares:
            if share.service not in own:  # lent through an RPC server: `moves` names the client's split
                continue
            for suggestion in box.service(share.service).vram_changes(headers, over):
                console.print(f"  {share.service}: {suggestion}", highlight=False)
    for move in moves(box, plan):
        console.print(f"  {move.field}: {move.message}", highlight=False)
