"""The VRAM planner against a real llama-server's logged buffers, on this machine's CPU.

SmolLM2 serves with gpubox's rendered command line (plus `-lv 4`, which logs every buffer) and the
planner's terms are compared with what llama-server allocated at load (`parse_memory_breakdown`).
llama-server sizes its buffers the same way on any backend, so the KV and compute terms checked here
are the ones the plan puts on a GPU; the logs are read on the CPU only because this machine has no GPU.

- a separate drafter's KV cache uses the draft cache types (`--spec-draft-type-k/-v`, default f16),
  not the target's: the planner's draft-KV term against the logged draft KV buffer;
- the micro-batch (`--ubatch-size`) sizes the compute buffer;
- a per-slot context above the trained context: llama-server caps the slot and still allocates the
  whole KV cache, which the planner refuses.

The binary is LLAMA_SERVER_BIN, or the CPU llama-server built here (`local_llama_server`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gpubox.bench import local_server
from gpubox.gguf_header import read_gguf_header
from gpubox.servers.llama import LlamaServer
from gpubox.spec import ModelFile
from gpubox.unit import server_environment
from gpubox.vram import (
    MIB,
    MemoryBreakdown,
    kv_cache_split,
    model_shape,
    parse_memory_breakdown,
    plan_service,
    trained_context_problems,
)
from tests.testbed import free_port, local_llama_server, sha256_file, smollm2_gguf

pytestmark = pytest.mark.e2e

TOLERANCE = 0.05


def llama_server_binary() -> Path:
    configured = os.environ.get("LLAMA_SERVER_BIN")
    return Path(configured) if configured else local_llama_server()


@pytest.fixture(scope="module")
def smollm2() -> ModelFile:
    path = smollm2_gguf()
    return ModelFile(path=str(path), sha256=sha256_file(path), architecture="llama")


def serve_and_log(service: LlamaServer, tmp_path: Path) -> str:
    """Start the service's llama-server until healthy (so every buffer is allocated), stop it, return its log."""
    argv = service.argv(str(llama_server_binary()))
    log_path = tmp_path / f"{service.name}.log"
    environment = {**os.environ, **server_environment(service)}
    with log_path.open("w+b") as log, local_server(argv, environment, service.port, log):
        pass
    return log_path.read_text(errors="replace")


def kv_buffers(breakdown: MemoryBreakdown) -> list[float]:
    """The logged KV buffers in load order: the target's, then the drafter's."""
    return [mib for kind, _, mib in breakdown.lines if kind == "KV"]


def test_a_separate_drafters_kv_is_priced_at_the_draft_cache_types(smollm2: ModelFile, tmp_path: Path) -> None:
    service = LlamaServer(
        name="smol-drafter",
        model=smollm2,
        model_draft=smollm2,
        spec_type="draft-simple",
        spec_draft_n_max=3,
        spec_draft_ngl=99,
        n_gpu_layers=99,
        ctx_size=4096,
        cache_type_k="q8_0",
        cache_type_v="q8_0",
        flash_attn="on",
        parallel=1,
        port=free_port(),
        extra_args=("-lv", "4"),
    )
    argv = service.argv("llama-server")
    assert "--spec-draft-type-k" not in argv and "--spec-draft-type-v" not in argv  # left at llama-server's f16
    log = serve_and_log(service, tmp_path)
    target_kv, draft_kv = kv_buffers(parse_memory_breakdown(log))
    assert re.search(r"llama_kv_cache: size = .*K \(f16\).*V \(f16\)", log), "the draft KV is not f16"

    header = read_gguf_header(smollm2.path)
    plan = plan_service(service, header, header)
    planned = plan.draft_kv_cache / MIB
    old = kv_cache_split(  # what the planner priced before: the drafter at the main cache types
        model_shape(header), plan.kv_cells, service.cache_type_k, service.cache_type_v, flash_attn=True,
        gpu_layers=header.block_count or 0,
    ).gpu_bytes / MIB  # fmt: skip
    gap, old_gap = (planned - draft_kv) / draft_kv, (old - draft_kv) / draft_kv
    print(
        f"\ndraft KV: planned {planned:.2f} MiB vs logged {draft_kv:.2f} MiB ({gap:+.1%}); "
        f"old pricing at the main types (q8_0/q8_0) {old:.2f} MiB ({old_gap:+.1%}); "
        f"target KV planned {plan.kv_cache / MIB:.2f} vs logged {target_kv:.2f} MiB"
    )
    assert abs(gap) <= TOLERANCE
    assert abs(old_gap) > TOLERANCE
    assert plan.kv_cache / MIB == pytest.approx(target_kv, rel=TOLERANCE)


def test_the_compute_buffer_follows_the_ubatch_size(smollm2: ModelFile, tmp_path: Path) -> None:
    service = LlamaServer(
        name="smol-ub2048", model=smollm2, n_gpu_layers=99, ctx_size=8192, ubatch_size=2048, batch_size=2048,
        flash_attn="on", parallel=1, port=free_port(), extra_args=("-lv", "4"),
    )  # fmt: skip
    log = serve_and_log(service, tmp_path)
    logged = parse_memory_breakdown(log).total("compute")
    header = read_gguf_header(smollm2.path)
    planned = plan_service(service, header).compute / MIB
    default = plan_service(service.model_copy(update={"ubatch_size": None, "batch_size": None}), header).compute / MIB
    print(f"\ncompute at -ub 2048 -b 2048: planned {planned:.2f} MiB, logged {logged:.2f}, at -ub 512 {default:.2f}")
    assert re.search(r"n_ubatch\s+=\s+2048", log)
    assert abs(planned - logged) <= TOLERANCE * logged
    assert abs(default - logged) > TOLERANCE * logged


def test_a_slot_above_the_trained_context_is_capped_yet_its_kv_allocated(smollm2: ModelFile, tmp_path: Path) -> None:
    header = read_gguf_header(smollm2.path)
    trained = header.context_length
    assert trained == 8192
    service = LlamaServer(
        name="smol-overlong", model=smollm2, n_gpu_layers=99, ctx_size=4 * trained, flash_attn="on", parallel=1,
        port=free_port(), extra_args=("-lv", "4"),
    )  # fmt: skip
    log = serve_and_log(service, tmp_path)
    slot = re.search(r"n_ctx_slot = (\d+)", log)
    assert slot is not None and int(slot[1]) == trained  # llama-server caps the slot at the trained context
    logged_kv = parse_memory_breakdown(log).total("KV")
    planned_kv = plan_service(service, header).kv_cache / MIB
    (problem,) = trained_context_problems(service, header, "services.0")
    print(f"\nctx {service.ctx_size}: slot capped at {slot[1]}; KV {logged_kv:.2f} MiB logged, {planned_kv:.2f} plan")
    assert planned_kv == pytest.approx(logged_kv, rel=TOLERANCE)  # ...yet the whole KV cache is allocated
    assert problem.field == "services.0.ctx_size" and f"trained context {trained}" in problem.message
