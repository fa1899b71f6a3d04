"""VRAM planner: what each service puts on each GPU, from its models' GGUF headers (llama-server),
its model size (whisper-server, piper); one budget per GPU.

Pure core (no pyinfra): the deploy passes headers read on the host (the ``GgufFile`` fact) and
GPU totals from its GPU facts; ``gpubox plan`` passes headers read on the controller and the
box's ``expected_gpus``. Every term follows what the pinned llama.cpp allocates at load, read in
its source (paths relative to the llama.cpp tree):

* weights (``src/llama-model.cpp``, ``load_tensors``): with ``-ngl N`` the *last* ``N`` of the
  ``n_layer + 1`` "layers" go to the GPU, the output head counting as the last one
  (``i_gpu_start = n_layer + 1 - N``); the first layers stay on the CPU. ``token_embd`` is always
  on the CPU input buffer. A model without ``output.weight`` ties its head to ``token_embd``
  (``TENSOR_DUPLICATED``): a second copy of the embedding table is loaded on the output device.
* KV cache (``src/llama-kv-cache.cpp``, ``src/llama-kv-cache-iswa.cpp``): per layer
  ``cells x (n_embd_k_gqa x bytes(type_k) + n_embd_v_gqa x bytes(type_v))``; ``n_ctx`` is padded to
  256 and split into ``parallel`` streams unless the cache is unified; a sliding-window layer holds
  ``GGML_PAD(min(n_ctx_seq, n_swa * (unified ? n_seq : 1) + n_ubatch), 256)`` cells per stream
  (``--swa-full`` off); Gemma 3n/4 layers past ``n_layer - shared_kv_layers`` reuse earlier layers'
  cache and a ``gemma4-assistant`` drafter shares every KV layer with its target (the ``share``
  callback in ``src/llama-model.cpp``), so both cost nothing. Any other drafter's KV is typed by
  ``--spec-draft-type-k/-v`` (default f16), not by the target's ``--cache-type-k/-v``
  (``common_base_params_to_speculative`` in ``common/speculative.cpp``).
* compute buffer: see :class:`ComputeCalibration`; one ``n_ubatch`` batch, ``n_ubatch =
  min(ctx_size, batch_size, ubatch_size)`` (``src/llama-context.cpp``).
* headroom: see :data:`CUDA_CONTEXT_MIB`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from gpubox.ggml_whisper import WhisperHeaderError, WhisperModelHeader, read_header
from gpubox.gguf_header import (
    ArraySummary,
    GgufError,
    GgufFile,
    MetadataValue,
    TruncatedGgufError,
    parse_gguf_header,
    read_gguf_header,
)
from gpubox.models import controller_source
from gpubox.servers.base import flag_of
from gpubox.spec import ModelFile, Problem, WhisperSize

if TYPE_CHECKING:
    from gpubox.box import Box
    from gpubox.servers.base import Service
    from gpubox.servers.llama import GpuLayers, LlamaServer

MIB = 1024 * 1024

CACHE_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
    "iq4_nl": 18 / 32,
}
"""Bytes per cached element: ggml block size / block bytes (``ggml/src/ggml.c`` type_traits)."""

CTX_PAD = 256
"""``cparams.n_ctx = GGML_PAD(n_ctx, 256)`` (``src/llama-context.cpp``); n_ctx_seq is padded too."""

SWA_PAD = 256
"""``the SWA cache is always padded to 256`` (``src/llama-kv-cache-iswa.cpp``)."""

DEFAULT_N_UBATCH: int = 512
"""llama-server's default ``--ubatch-size`` (from the pinned ``--help``; its flag table's default reads it)."""

CONTEXT_OVERRIDE_FLAGS = frozenset(
    {"--rope-scaling", "--rope-scale", "--rope-freq-scale", "--yarn-orig-ctx", "--override-kv"}
)
"""``extra_args`` flags that extend or restate the trained context. LlamaServer has no typed RoPE
fields, so these in ``extra_args`` count as the user's explicit context override. (In the pinned
source only YaRN with a custom scale re-adjusts ``n_ctx_train``, in ``llama_init_from_model``,
and ``--override-kv <arch>.context_length=int:N`` replaces it; a linear ``--rope-scale`` is taken
as stated intent.) ``--override-kv`` counts only when it overrides ``context_length``."""

CUDA_CONTEXT_MIB = 600
"""Headroom per llama-server process on each GPU it uses, outside llama.cpp's logged buffers: the
CUDA context, cuBLAS workspace and the CUDA memory pool that flash attention fills with F16 copies
of a quantized K/V. Measured by `scripts/gpu-validate` (docs/gpu-validation.md): nvidia-smi's
per-process usage minus llama-server's logged CUDA0 buffers was 589-595 MiB on an H200 with CUDA
13.0 and driver 580 (SmolLM2, ctx 4096 and 65536, with and without a drafter); rounded up."""

HEADER_ONLY_KEY = "gpubox.header_only"
"""Metadata flag of a header-only GGUF (header, KV and tensor infos, no tensor data)."""

HEADERS_DIR_NAME = "gguf-headers"
"""The directory next to the inventory file where ``gpubox plan``, ``gpubox monitoring`` and the
monitoring deploy look for ``<basename of the model path>`` header-only GGUFs (``--headers`` unset)."""

LogicalGpu = tuple[int, int]
"""``(index, total MiB)`` of a GPU."""


@dataclass(frozen=True)
class ComputeCalibration:
    """The compute-buffer model: the graph allocator's peak for one ``n_ubatch`` worst-case batch.

    llama.cpp reserves its compute buffers at load for a full ubatch (``graph_reserve`` in
    ``src/llama-context.cpp``); llama-server sets ``n_outputs_max`` to its slots (1 per slot, logged
    as ``n_outputs_max = 1``), so the f32 logits are a few rows, not ``n_ubatch`` of them. What is
    left is linear in things a header gives::

        flash attention:  n_ubatch * 4 * (embd_factor * n_embd + ff_factor * n_ff)   # activations
                          + n_ubatch * n_kv * fa_bytes_per_cell                       # F16 KQ mask
        without:          n_ubatch * 4 * no_fa_embd_factor * n_embd                   # activations
                          + n_ubatch * n_kv * (n_head * kq_bytes_per_head_cell        # F32 KQ
                                               + no_fa_mask_bytes_per_cell)           # F32 mask
        both:             + n_outputs * 4 * n_vocab * logits_factor + fixed_mib MiB

    (Without flash attention the FFN's intermediates are dead by the time KQ peaks, so the
    activation term is smaller.) ``n_kv`` is the largest layer's KV cell count. The defaults were
    fitted to llama-server's logged ``CPU compute buffer size`` for SmolLM2-135M at 2048, 8192 and
    32768 cells (tests/fixtures/llama-server-logs/): FA slope 1024 B per cell = 512 tokens x 2 B,
    no-FA slope 20480 B per cell = 512 x (9 heads x 4 B + 4 B), intercepts 13.5 MiB (FA) and
    6.4 MiB (no FA). The CUDA graph places the same tensors, so the terms hold there, but the GPU
    validation run should refit them against ``CUDA0 compute buffer size`` with
    :func:`fit_compute_calibration`.
    """

    fixed_mib: float = 0.0
    logits_factor: float = 1.0
    embd_factor: float = 4.0
    ff_factor: float = 3.0
    fa_bytes_per_cell: float = 2.0
    no_fa_embd_factor: float = 5.6
    kq_bytes_per_head_cell: float = 4.0
    no_fa_mask_bytes_per_cell: float = 4.0


DEFAULT_COMPUTE = ComputeCalibration()


# --------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class LayerKv:
    """One layer's KV row width (elements per cell) and whether it holds its own cache."""

    index: int
    is_swa: bool
    n_embd_k: int
    n_embd_v: int
    owns_cache: bool


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters the planner needs, read from a GGUF header's metadata."""

    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    n_swa: int
    layers: tuple[LayerKv, ...]


def _int_list(value: MetadataValue | None, count: int, default: int) -> list[int]:
    """A per-layer int key that may be a scalar or an array (Gemma 4's head_count_kv)."""
    if isinstance(value, list):
        ints = [int(item) for item in value if isinstance(item, int | float)]
        return (ints + [ints[-1] if ints else default] * count)[:count]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [int(value)] * count
    return [default] * count


def _swa_layers(value: MetadataValue | None, n_layer: int, n_swa: int) -> list[bool]:
    """``sliding_window_pattern``: a bool per layer (Gemma 4), or a period (``set_swa_pattern``)."""
    if n_swa <= 0:
        return [False] * n_layer
    if isinstance(value, list):
        flags = [bool(item) for item in value]
        return (flags + [False] * n_layer)[:n_layer]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return [value == 0 or il % value < value - 1 for il in range(n_layer)]
    return [False] * n_layer


def _vocab_size(header: GgufFile) -> int:
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArraySummary):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    embd = header.tensor("token_embd.weight")
    return embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0


def model_shape(header: GgufFile) -> ModelShape:
    """Hyperparameters from ``{arch}.*`` keys, with llama.cpp's defaults where a key is absent."""
    arch = header.architecture or "unknown"
    n_layer = header.block_count or 0
    n_embd = header.arch_int("embedding_length") or 0
    n_heads = _int_list(header.arch_get("attention.head_count"), n_layer, 0)
    n_head = max(n_heads, default=0)
    n_head_kv = _int_list(header.arch_get("attention.head_count_kv"), n_layer, n_head)
    head_dim_default = n_embd // n_head if n_head else 0
    key_length = header.arch_int("attention.key_length") or head_dim_default
    value_length = header.arch_int("attention.value_length") or head_dim_default
    key_length_swa = header.arch_int("attention.key_length_swa") or key_length
    value_length_swa = header.arch_int("attention.value_length_swa") or value_length
    n_swa = header.arch_int("attention.sliding_window") or 0
    is_swa = _swa_layers(header.arch_get("attention.sliding_window_pattern"), n_layer, n_swa)
    shared_kv = header.arch_int("attention.shared_kv_layers") or 0
    n_layer_kv = n_layer - shared_kv if arch in ("gemma3n", "gemma4") else n_layer
    layers = tuple(
        LayerKv(
            index=il,
            is_swa=is_swa[il],
            n_embd_k=(key_length_swa if is_swa[il] else key_length) * n_head_kv[il],
            n_embd_v=(value_length_swa if is_swa[il] else value_length) * n_head_kv[il],
            owns_cache=il < n_layer_kv,
        )
        for il in range(n_layer)
    )
    return ModelShape(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=max(_int_list(header.arch_get("feed_forward_length"), n_layer, 0), default=0),
        n_head=n_head,
        n_vocab=_vocab_size(header),
        n_swa=n_swa,
        layers=layers,
    )


# --------------------------------------------------------------------------- weights

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
INPUT_TENSORS = frozenset({"token_embd.weight", "per_layer_token_embd.weight"})
"""Tensors on llama.cpp's CPU input buffer whatever ``-ngl`` says (``pimpl->dev_input`` is the CPU)."""


def gpu_layer_count(n_gpu_layers: GpuLayers | None, n_layer: int) -> int:
    """``-ngl`` as llama.cpp resolves it: ``all``/``auto``/unset offload every layer and the head.

    ``auto`` lets llama-server's fit step pick a smaller value when memory is short; the plan
    assumes the full offload it tries first, so it shows what would not fit.
    """
    if n_gpu_layers is None or isinstance(n_gpu_layers, str):
        return n_layer + 1
    return min(n_gpu_layers, n_layer + 1)


@dataclass(frozen=True)
class WeightSplit:
    gpu_bytes: int
    cpu_bytes: int
    gpu_layers: int
    """Repeating layers on the GPU (the head is not counted here)."""
    tied_output: bool
    """No ``output.weight``: the head is a GPU copy of ``token_embd``."""


def weight_split(header: GgufFile, n_gpu_layers: GpuLayers | None) -> WeightSplit:
    """Weight bytes on the GPU and on the CPU for ``-ngl n_gpu_layers``."""
    n_layer = header.block_count or 0
    offloaded = gpu_layer_count(n_gpu_layers, n_layer)
    first_gpu_layer = n_layer + 1 - offloaded
    head_on_gpu = offloaded >= 1
    gpu = cpu = 0
    for tensor in header.tensors:
        size = tensor.n_bytes or 0
        match = _BLOCK_TENSOR.match(tensor.name)
        if tensor.name in INPUT_TENSORS:
            on_gpu = False
        elif match is not None:
            on_gpu = int(match.group(1)) >= first_gpu_layer
        else:
            on_gpu = head_on_gpu
        if on_gpu:
            gpu += size
        else:
            cpu += size
    tied = header.tensor("output.weight") is None and header.tensor("token_embd.weight") is not None
    if tied:
        embd = header.tensor("token_embd.weight")
        duplicate = (embd.n_bytes or 0) if embd is not None else 0
        if head_on_gpu:  # on the CPU the "duplicate" is the same tensor in the same buffer
            gpu += duplicate
    return WeightSplit(
        gpu_bytes=gpu, cpu_bytes=cpu, gpu_layers=n_layer - min(n_layer, first_gpu_layer), tied_output=tied
    )


def layer_devices(n_layer: int, n_gpu_layers: GpuLayers | None, tensor_split: Sequence[float]) -> list[int | None]:
    """The device (an index into ``tensor_split``'s devices) of each layer ``0..n_layer``, the last being the
    output head; None: the CPU. As ``llama_model::load_tensors`` assigns them: the offloaded layers are the
    last ones, and layer ``il`` goes to the first device whose cumulative share exceeds its position."""
    offloaded = gpu_layer_count(n_gpu_layers, n_layer)
    first = max(n_layer + 1 - offloaded, 0)
    total = sum(tensor_split)
    cumulative = list(itertools.accumulate(share / total for share in tensor_split))
    return [
        None if il < first else min(bisect.bisect_right(cumulative, (il - first) / offloaded), len(cumulative) - 1)
        for il in range(n_layer + 1)
    ]


def weights_by_device(header: GgufFile, devices: list[int | None]) -> dict[int | None, int]:
    """Weight bytes on each device (None: the CPU) for a layer-to-device map from :func:`layer_devices`."""
    n_layer = len(devices) - 1
    placed: dict[int | None, int] = {}
    for tensor in header.tensors:
        match = _BLOCK_TENSOR.match(tensor.name)
        if tensor.name in INPUT_TENSORS:
            device = None
        elif match is not None:
            device = devices[min(int(match.group(1)), n_layer)]
        else:
            device = devices[n_layer]
        placed[device] = placed.get(device, 0) + (tensor.n_bytes or 0)
    embd = header.tensor("token_embd.weight")
    if header.tensor("output.weight") is None and embd is not None and devices[n_layer] is not None:
        placed[devices[n_layer]] = placed.get(devices[n_layer], 0) + (embd.n_bytes or 0)  # the head's copy
    return placed


# --------------------------------------------------------------------------- KV cache


def _pad(value: int, to: int) -> int:
    return -(-value // to) * to


@dataclass(frozen=True)
class KvCells:
    """Cells (token slots) a full-attention and a sliding-window layer hold, over all streams."""

    full: int
    swa: int
    n_ctx: int
    n_ctx_seq: int


def kv_cells(
    ctx_size: int,
    parallel: int,
    n_swa: int,
    *,
    n_ubatch: int = DEFAULT_N_UBATCH,
    kv_unified: bool = False,
    swa_full: bool = False,
) -> KvCells:
    """Cell counts as ``llama_context`` and ``llama_kv_cache_iswa`` size them."""
    n_ctx = _pad(ctx_size, CTX_PAD)
    if kv_unified:
        n_ctx_seq, streams = n_ctx, 1
    else:
        n_ctx_seq, streams = _pad(n_ctx // parallel, CTX_PAD), parallel
        n_ctx = n_ctx_seq * parallel
    swa_per_stream = n_ctx_seq
    if n_swa > 0 and not swa_full:
        swa_per_stream = _pad(min(n_ctx_seq, n_swa * (parallel if kv_unified else 1) + n_ubatch), SWA_PAD)
    return KvCells(full=n_ctx, swa=swa_per_stream * streams, n_ctx=n_ctx, n_ctx_seq=n_ctx_seq)


@dataclass(frozen=True)
class KvSplit:
    gpu_bytes: int
    cpu_bytes: int
    cells: KvCells
    layers_with_cache: int


def kv_cache_split(
    shape: ModelShape,
    cells: KvCells,
    cache_type_k: str,
    cache_type_v: str,
    *,
    flash_attn: bool,
    gpu_layers: int,
    shares_target_cache: bool = False,
) -> KvSplit:
    """KV bytes per device. Without flash attention V is stored transposed, padded to the widest layer."""
    if shares_target_cache:
        return KvSplit(gpu_bytes=0, cpu_bytes=0, cells=cells, layers_with_cache=0)
    first_gpu_layer = shape.n_layer - gpu_layers
    gpu = cpu = 0.0
    layers = kv_layer_bytes(shape, cells, cache_type_k, cache_type_v, flash_attn=flash_attn)
    for index, size in layers:
        if index >= first_gpu_layer:
            gpu += size
        else:
            cpu += size
    return KvSplit(gpu_bytes=int(gpu), cpu_bytes=int(cpu), cells=cells, layers_with_cache=len(layers))


def kv_layer_bytes(
    shape: ModelShape, cells: KvCells, cache_type_k: str, cache_type_v: str, *, flash_attn: bool
) -> list[tuple[int, float]]:
    """Each layer with a cache of its own, and its KV bytes. Without flash attention V is stored transposed,
    padded to the widest layer."""
    bytes_k = CACHE_TYPE_BYTES[cache_type_k]
    bytes_v = CACHE_TYPE_BYTES[cache_type_v]
    widest_v = max((layer.n_embd_v for layer in shape.layers), default=0)
    sizes = []
    for layer in shape.layers:
        if not layer.owns_cache or layer.n_embd_k == 0:
            continue
        n_cells = cells.swa if layer.is_swa else cells.full
        n_embd_v = layer.n_embd_v if flash_attn else widest_v
        sizes.append((layer.index, n_cells * (layer.n_embd_k * bytes_k + n_embd_v * bytes_v)))
    return sizes


# --------------------------------------------------------------------------- batch sizes, trained context


def effective_n_ubatch(server: LlamaServer) -> int:
    """The micro-batch llama.cpp reserves its compute buffers for.

    ``n_batch = min(n_ctx, batch_size)`` (causal models), ``n_ubatch = min(n_batch, ubatch_size)``
    (``llama_context`` ctor); the reserve uses ``min(n_ctx, n_ubatch)`` tokens.
    """
    n_batch: int = min(server.ctx_size, server.setting("batch_size"))
    n_ubatch: int = server.setting("ubatch_size")
    return max(1, min(n_batch, n_ubatch))


def overrides_trained_context(server: LlamaServer) -> bool:
    """``extra_args`` that scale RoPE or override ``<arch>.context_length`` (see CONTEXT_OVERRIDE_FLAGS)."""
    words = list(server.extra_args)
    for position, word in enumerate(words):
        flag = flag_of(word)
        if flag not in CONTEXT_OVERRIDE_FLAGS:
            continue
        if flag != "--override-kv":
            return True
        value = word.split("=", 1)[1] if "=" in word else (words[position + 1] if position + 1 < len(words) else "")
        if ".context_length=" in value:
            return True
    return False


def _uses_kv_unified(server: LlamaServer) -> bool:
    return any(arg in ("-kvu", "--kv-unified") for arg in server.extra_args)


def trained_context_problems(server: LlamaServer, target_header: GgufFile, where: str = "") -> list[Problem]:
    """Refuse a per-slot context above the model's trained context (``<arch>.context_length``).

    llama-server caps every slot at ``n_ctx_train`` (``n_ctx_slot()`` in
    ``tools/server/server-context.cpp``) but ``llama_context`` still allocates KV for the whole
    ``n_ctx``: the cells above the cap are never used (SmolLM2 on an H200: 3.7 GB instead of 0.9).
    Not refused when ``extra_args`` scale RoPE or override the context (:func:`overrides_trained_context`).
    ``where`` prefixes the field (``services.0``).
    """
    trained = target_header.context_length
    if not trained or overrides_trained_context(server):
        return []
    unified = _uses_kv_unified(server)
    shape = model_shape(target_header)
    cells = kv_cells(server.ctx_size, server.parallel, shape.n_swa, kv_unified=unified)
    # a unified cache is one pool the slots share, each capped at n_ctx_train
    usable = trained * server.parallel if unified else trained
    allocated = cells.n_ctx if unified else cells.n_ctx_seq
    if allocated <= usable:
        return []
    used = kv_cells(usable * (1 if unified else server.parallel), server.parallel, shape.n_swa, kv_unified=unified)
    n_layer = shape.n_layer

    def kv_mib(of: KvCells) -> float:
        split = kv_cache_split(
            shape, of, server.cache_type_k, server.cache_type_v, flash_attn=server.flash_attn != "off",
            gpu_layers=n_layer,
        )  # fmt: skip
        return (split.gpu_bytes + split.cpu_bytes) / MIB

    field_name = f"{where}.ctx_size" if where else "ctx_size"
    per_slot = "the shared KV pool" if unified else f"the per-slot context {cells.n_ctx_seq}"
    return [
        Problem(
            field=field_name,
            message=(
                f"{per_slot} (ctx_size={server.ctx_size} / parallel={server.parallel}) is above the model's "
                f"trained context {trained} ({target_header.architecture}.context_length): llama-server caps "
                f"each slot at {trained} tokens but still allocates KV for all {cells.n_ctx} cells "
                f"({kv_mib(cells):,.0f} MiB of KV instead of {kv_mib(used):,.0f}). Set ctx_size="
                f"{trained * server.parallel} (trained context x parallel), or extend the context on purpose "
                f"with RoPE scaling in extra_args (e.g. --rope-scaling yarn --rope-scale 4 --yarn-orig-ctx "
                f"{trained})"
            ),
        )
    ]


# --------------------------------------------------------------------------- compute buffer


def compute_buffer_bytes(
    shape: ModelShape, n_kv: int, *, flash_attn: bool, n_ubatch: int = DEFAULT_N_UBATCH, n_outputs: int = 1,
    calibration: ComputeCalibration = DEFAULT_COMPUTE,
) -> int:
    """The compute buffer of one context (see :class:`ComputeCalibration` for the model)."""
    cal = calibration
    if flash_attn:
        activations = n_ubatch * 4 * (cal.embd_factor * shape.n_embd + cal.ff_factor * shape.n_ff)
        attention = n_ubatch * n_kv * cal.fa_bytes_per_cell
    else:
        activations = n_ubatch * 4 * cal.no_fa_embd_factor * shape.n_embd
        per_cell = shape.n_head * cal.kq_bytes_per_head_cell + cal.no_fa_mask_bytes_per_cell
        attention = n_ubatch * n_kv * per_cell
    logits = n_outputs * 4 * shape.n_vocab * cal.logits_factor
    return int(cal.fixed_mib * MIB + activations + attention + logits)


@dataclass(frozen=True)
class ComputeSample:
    """One measured compute buffer: the model's shape, the context's cells, and the logged size."""

    shape: ModelShape
    n_kv: int
    flash_attn: bool
    n_ubatch: int
    measured_bytes: int


def fit_compute_calibration(
    samples: list[ComputeSample], base: ComputeCalibration = DEFAULT_COMPUTE
) -> ComputeCalibration:
    """Refit the per-cell terms and the fixed term from measured buffers (least squares on each FA mode).

    With samples of one model at two or more contexts per flash-attention mode, the slope in
    ``n_kv`` gives ``fa_bytes_per_cell`` / ``kq_bytes_per_head_cell`` and the mean residual gives
    ``fixed_mib``; the vocab/activation factors stay as given.
    """
    calibration = base
    residuals: list[float] = []
    for flash_attn in (True, False):
        group = [s for s in samples if s.flash_attn == flash_attn]
        if len({s.n_kv for s in group}) >= 2:
            xs = [s.n_ubatch * s.n_kv * (1 if flash_attn else s.shape.n_head) for s in group]
            mask = 0.0 if flash_attn else calibration.no_fa_mask_bytes_per_cell
            ys = [float(s.measured_bytes) - s.n_ubatch * s.n_kv * mask for s in group]
            mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
                (x - mean_x) ** 2 for x in xs
            )
            if flash_attn:
                calibration = replace(calibration, fa_bytes_per_cell=slope)
            else:
                calibration = replace(calibration, kq_bytes_per_head_cell=slope)
    for sample in samples:
        predicted = compute_buffer_bytes(
            sample.shape,
            sample.n_kv,
            flash_attn=sample.flash_attn,
            n_ubatch=sample.n_ubatch,
            calibration=replace(calibration, fixed_mib=0.0),
        )
        residuals.append(sample.measured_bytes - predicted)
    if residuals:
        calibration = replace(calibration, fixed_mib=max(0.0, sum(residuals) / len(residuals) / MIB))
    return calibration


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ServicePlan:
    """Bytes one service puts on its GPUs (summed over them) and on the CPU, term by term."""

    service: str
    gpus: tuple[int, ...]
    target_weights: int
    draft_weights: int
    kv_cache: int
    draft_kv_cache: int
    compute: int
    headroom: int
    cpu_weights: int
    cpu_kv_cache: int
    kv_cells: KvCells
    notes: tuple[str, ...] = ()

    @property
    def gpu_total(self) -> int:
        return (
            self.target_weights
            + self.draft_weights
            + self.kv_cache
            + self.draft_kv_cache
            + self.compute
            + self.headroom
        )

    def terms(self) -> dict[str, int]:
        return {
            "weights": self.target_weights,
            "draft weights": self.draft_weights,
            "KV cache": self.kv_cache,
            "draft KV": self.draft_kv_cache,
            "compute": self.compute,
            "headroom": self.headroom,
        }


def _drafter_shares_target_kv(draft_header: GgufFile | None) -> bool:
    return draft_header is not None and draft_header.architecture == "gemma4-assistant"


def plan_service(
    server: LlamaServer,
    target_header: GgufFile,
    draft_header: GgufFile | None = None,
    *,
    n_ubatch: int | None = None,
    calibration: ComputeCalibration = DEFAULT_COMPUTE,
    kv_unified: bool | None = None,
    swa_full: bool | None = None,
) -> ServicePlan:
    """What ``server`` allocates, from its models' headers.

    ``n_ubatch`` defaults to the server's own (:func:`effective_n_ubatch`); ``kv_unified``/``swa_full``
    default to whether ``extra_args`` passes ``--kv-unified`` / ``--swa-full`` (llama-server's
    defaults are off when ``--parallel`` is given, which gpubox always renders).
    """
    if n_ubatch is None:
        n_ubatch = effective_n_ubatch(server)
    unified = kv_unified if kv_unified is not None else _uses_kv_unified(server)
    full_swa = swa_full if swa_full is not None else "--swa-full" in server.extra_args
    flash_attn = server.flash_attn != "off"
    notes: list[str] = []
    if server.flash_attn == "auto":
        notes.append("flash_attn=auto: planned as on (llama.cpp turns it on where the backend supports it)")
    shape = model_shape(target_header)
    # one output row per slot, and a drafting slot verifies n_max drafted tokens + 1
    n_outputs = server.parallel * (1 + (server.setting("spec_draft_n_max") if server.drafts else 0))
    weights = weight_split(target_header, server.n_gpu_layers)
    cells = kv_cells(
        server.ctx_size, server.parallel, shape.n_swa, n_ubatch=n_ubatch, kv_unified=unified, swa_full=full_swa
    )
    kv = kv_cache_split(
        shape,
        cells,
        server.cache_type_k,
        server.cache_type_v,
        flash_attn=flash_attn,
        gpu_layers=weights.gpu_layers,
    )
    on_gpu = weights.gpu_layers > 0 or weights.gpu_bytes > 0
    compute = (
        compute_buffer_bytes(
            shape, cells.full, flash_attn=flash_attn, n_ubatch=n_ubatch, n_outputs=n_outputs, calibration=calibration
        )
        if on_gpu
        else 0
    )
    draft_weights = draft_kv = 0
    cpu_weights, cpu_kv = weights.cpu_bytes, kv.cpu_bytes
    if draft_header is not None:
        draft_shape = model_shape(draft_header)
        draft_split = weight_split(draft_header, server.spec_draft_ngl)
        shares = _drafter_shares_target_kv(draft_header)
        # a separate drafter's context has its own cache types (default f16), not the target's
        draft_kv_split = kv_cache_split(
            draft_shape,
            cells,
            server.setting("spec_draft_type_k"),
            server.setting("spec_draft_type_v"),
            flash_attn=flash_attn,
            gpu_layers=draft_split.gpu_layers,
            shares_target_cache=shares,
        )
        draft_weights, draft_kv = draft_split.gpu_bytes, draft_kv_split.gpu_bytes
        cpu_weights += draft_split.cpu_bytes
        cpu_kv += draft_kv_split.cpu_bytes
        if draft_split.gpu_bytes:
            compute += compute_buffer_bytes(
                draft_shape, cells.full, flash_attn=flash_attn, n_ubatch=n_ubatch, n_outputs=n_outputs,
                calibration=calibration,
            )
        if shares:
            notes.append(
                "gemma4-assistant drafter: its KV layers share the target's last full/SWA layers, its input "
                "embeddings are the target's token_embd (CPU); only its own output head goes to the GPU"
            )
    headroom = CUDA_CONTEXT_MIB * MIB * max(1, len(server.placement)) if on_gpu else 0
    return ServicePlan(
        service=server.name,
        gpus=server.placement,
        target_weights=weights.gpu_bytes,
        draft_weights=draft_weights,
        kv_cache=kv.gpu_bytes,
        draft_kv_cache=draft_kv,
        compute=compute,
        headroom=headroom,
        cpu_weights=cpu_weights,
        cpu_kv_cache=cpu_kv,
        kv_cells=cells,
        notes=tuple(notes),
    )


def device_terms(
    server: LlamaServer, target_header: GgufFile, *, calibration: ComputeCalibration = DEFAULT_COMPUTE
) -> list[dict[str, int]]:
    """What a llama-server with a ``tensor_split`` puts on each of its devices (its ``rpc`` endpoints, then its
    GPUs): the weights and KV of the layers :func:`layer_devices` gives each, the output head on the last
    device that holds layers, a whole compute buffer on every device that holds layers (an upper bound for
    all but the head's), and the CUDA context on each local GPU (an RPC server's own is its host's term).
    A drafter is refused beside ``rpc`` (its placement is not planned)."""
    assert server.tensor_split is not None, f"{server.name}: no tensor_split"
    shape = model_shape(target_header)
    devices = layer_devices(shape.n_layer, server.n_gpu_layers, server.tensor_split)
    n_ubatch = effective_n_ubatch(server)
    flash_attn = server.flash_attn != "off"
    cells = kv_cells(
        server.ctx_size, server.parallel, shape.n_swa, n_ubatch=n_ubatch, kv_unified=_uses_kv_unified(server),
        swa_full="--swa-full" in server.extra_args,
    )  # fmt: skip
    weights = weights_by_device(target_header, devices)
    kv: dict[int | None, float] = {}
    for index, size in kv_layer_bytes(shape, cells, server.cache_type_k, server.cache_type_v, flash_attn=flash_attn):
        kv[devices[index]] = kv.get(devices[index], 0) + size
    n_outputs = server.parallel * (1 + (server.setting("spec_draft_n_max") if server.drafts else 0))
    compute = compute_buffer_bytes(
        shape, cells.full, flash_attn=flash_attn, n_ubatch=n_ubatch, n_outputs=n_outputs, calibration=calibration
    )
    local_from = len(server.rpc)
    terms = []
    for device in range(len(server.tensor_split)):
        holds = device in devices
        terms.append({
            "weights": weights.get(device, 0),
            "KV cache": int(kv.get(device, 0)),
            "compute": compute if holds else 0,
            "headroom": CUDA_CONTEXT_MIB * MIB if device >= local_from else 0,
        })  # fmt: skip
    return terms


@dataclass(frozen=True)
class GpuShare:
    """A service's share of one GPU: its terms divided evenly over the GPUs it is pinned to."""

    service: str
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass(frozen=True)
class GpuBudget:
    index: int
    total_bytes: int
    shares: tuple[GpuShare, ...]
    reserve_bytes: int = 0
    """Kept free by the box's word (``ExpectedGpu.reserve_mib``): counted as used."""

    @property
    def used_bytes(self) -> int:
        return sum(share.total for share in self.shares) + self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes

    @property
    def fits(self) -> bool:
        return self.free_bytes >= 0


@dataclass(frozen=True)
class BoxPlan:
    services: tuple[ServicePlan, ...]
    gpus: tuple[GpuBudget, ...]
    problems: tuple[str, ...] = field(default=())
    """What kept the plan from being made (a missing header, a GPU the box lacks)."""
    refused: tuple[Problem, ...] = field(default=())
    """Fields the headers refuse (a per-slot context above the trained context), named like check's."""

    @property
    def fits(self) -> bool:
        return not self.problems and not self.refused and all(gpu.fits for gpu in self.gpus)


# whisper.cpp's ggml models by size, MiB, measured on an H100 with CUDA 13 (docs/gpu-validation.md,
# "whisper-server at every size"): each size a random-weight f16 model with the real hyperparameters
# (large: large-v3's; large-v3-turbo: large-v3's encoder, 4 decoder layers), served by whisper-server from its
# unit and sent jfk.wav twice. Weights: whisper.cpp's logged `model size`, rounded up. State: what
# whisper_init_state logs (KV self + cross + pad, the conv/encode/cross/decode compute buffers) plus what a
# temperature fallback adds (2 decoders, whisper-server's best_of: the self-attention KV cache re-created 4 x as
# big), rounded up (large-v3-turbo: 240.5 logged + 30 = 271).
WHISPER_WEIGHTS_MIB: dict[str, int] = {
    "tiny": 74, "base": 141, "small": 465, "medium": 1463, "large": 2952, "large-v3-turbo": 1549,
}  # fmt: skip
WHISPER_STATE_MIB: dict[str, int] = {
    "tiny": 149, "base": 181, "small": 285, "medium": 515, "large": 761, "large-v3-turbo": 271,
}  # fmt: skip
WHISPER_CUDA_CONTEXT_MIB = 669
"""whisper-server's memory beyond its logged buffers (CUDA context, cuBLAS, the pool): nvidia-smi's process
memory minus the logged buffers after a greedy transcription, 657.8 (tiny.en) to 668.8 MiB (large-v3) on an
H100; 659.7 for the real tiny.en on an H200."""
PIPER_CUDA_CONTEXT_MIB = 666
"""onnxruntime-gpu 1.31.1's CUDA provider running a one-Conv model (cuDNN and cuBLAS loaded): its process
memory on an H100, nvidia-smi (docs/gpu-validation.md, "piper on CUDA")."""
PIPER_SESSION_FACTOR = 4.6
"""piper's session beyond the voice file and the context, per byte of voice: the en_US-joe-medium voice
(63,201,294 bytes) held 998 MiB on an H100 after its second synthesis (onnxruntime's arena grown; a 53-word
paragraph added nothing): (998 - 666 - 60.3) / 60.3 = 4.51, rounded up. One voice measured: the other
qualities (x_low, low, high) are priced by their file size with this factor, unmeasured."""


def whisper_terms(size: WhisperSize | None, model_bytes: int | None = None) -> dict[str, int]:
    """What a whisper-server puts on its GPU: its model, whisper.cpp's state, the CUDA context.

    ``model_bytes``: the model file's size when known (a quantized whisper model is smaller than f16);
    an undeclared size is priced as the largest.
    """
    name = (size or WhisperSize("large")).size
    weights = model_bytes if model_bytes is not None else WHISPER_WEIGHTS_MIB[name] * MIB
    return {"weights": weights, "compute": WHISPER_STATE_MIB[name] * MIB, "headroom": WHISPER_CUDA_CONTEXT_MIB * MIB}


def piper_terms(model_bytes: int | None = None) -> dict[str, int]:
    """What a piper service puts on its GPU: its voice (its size when known), onnxruntime's arena, the CUDA
    context."""
    weights = model_bytes if model_bytes is not None else 64 * MIB
    return {
        "weights": weights,
        "compute": int(weights * PIPER_SESSION_FACTOR),
        "headroom": PIPER_CUDA_CONTEXT_MIB * MIB,
    }


@dataclass(frozen=True)
class VramInputs:
    """What the planner knows of a box's model files, by host path: GGUF headers, other files' sizes, ggml
    whisper headers."""

    headers: dict[str, GgufFile] = field(default_factory=dict)
    model_sizes: dict[str, int] = field(default_factory=dict)
    calibration: ComputeCalibration = DEFAULT_COMPUTE
    whisper_headers: dict[str, WhisperModelHeader] = field(default_factory=dict)
    """ggml whisper headers read from the models' controller sources (:func:`whisper_headers_for_box`)."""


@dataclass(frozen=True)
class RemoteShare:
    """What a llama-server puts on a device another host lends it (an RPC server)."""

    host: str
    service: str
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


@dataclass(frozen=True)
class ServiceVram:
    """What one service puts on each GPU its memory lands on (``Service.vram_gpus``), or why it can't be said.

    + per_gpu: the terms each of those GPUs holds
    + plan: a llama-server's breakdown (``gpubox plan``'s per-service table)
    + problems: what kept it from being priced (a missing header)
    + refused: fields its models' headers refuse
    """

    per_gpu: dict[str, int] = field(default_factory=dict)
    plan: ServicePlan | None = None
    problems: tuple[str, ...] = ()
    refused: tuple[Problem, ...] = ()
    by_gpu: dict[int, dict[str, int]] | None = None
    """Terms per GPU when they differ by GPU (a ``tensor_split``); None: ``per_gpu`` on each."""
    remote: tuple[RemoteShare, ...] = ()
    """What it puts on devices other hosts lend it (``rpc``), in ``--rpc`` order."""


def speech_terms(service: Service, model_bytes: int | None = None) -> dict[str, int]:
    """What one service puts on each of its GPUs, its first model file ``model_bytes`` long when known."""
    sizes = {} if model_bytes is None else {service.models()[0].path: model_bytes}
    priced = service.vram(VramInputs(model_sizes=sizes), "")
    return dict(priced.per_gpu) if priced is not None else {}


def plan_box(
    box: Box,
    headers: dict[str, GgufFile],
    gpus: list[LogicalGpu],
    *,
    calibration: ComputeCalibration = DEFAULT_COMPUTE,
    model_sizes: dict[str, int] | None = None,
    whisper_headers: dict[str, WhisperModelHeader] | None = None,
    lent: Sequence[tuple[int, GpuShare]] = (),
) -> BoxPlan:
    """Plan every service of ``box`` against ``gpus`` (``(index, total MiB)``): one budget per GPU.

    ``headers`` maps a GGUF's path on the host to its header; ``model_sizes`` other model files'
    sizes (whisper, piper), when known; ``whisper_headers`` ggml whisper headers, when read (a
    whisper-server refuses a declared size its header contradicts). Each service prices itself
    (``Service.vram``) on the GPUs its memory lands on (``Service.vram_gpus``, from its ``placement``): a
    llama-server pinned to several splits its terms evenly, which is how ``--split-mode layer`` spreads
    layers over GPUs of equal size; a whisper-server or piper service loads on one. A service pinned to no
    GPU runs on the CPU and is priced on none. ``lent``: what llama-servers on other hosts put on this
    box's GPUs through its RPC servers (:func:`lent_shares`), by GPU index.
    """
    problems: list[str] = []
    refused: list[Problem] = []
    plans: list[ServicePlan] = []
    shares: dict[int, list[GpuShare]] = {index: [] for index, _ in gpus}
    inputs = VramInputs(
        headers=headers, model_sizes=model_sizes or {}, calibration=calibration, whisper_headers=whisper_headers or {}
    )

    for position, server in enumerate(box.services):
        priced = server.vram(inputs, f"services.{position}")
        if priced is None:
            continue
        problems += priced.problems
        refused += priced.refused
        if priced.plan is not None:
            plans.append(priced.plan)
        if priced.problems:
            continue
        for index in server.vram_gpus():
            if index not in shares:
                problems.append(f"{server.name}: pinned to GPU {index}, which the box does not have")
                continue
            terms = priced.by_gpu[index] if priced.by_gpu is not None else priced.per_gpu
            shares[index].append(GpuShare(service=server.name, terms=dict(terms)))
    for index, share in lent:
        if index in shares:
            shares[index].append(share)
    reserves = {gpu.index: gpu.reserve_mib * MIB for gpu in box.expected_gpus or ()}
    budgets = tuple(
        GpuBudget(
            index=index, total_bytes=total_mib * MIB, shares=tuple(shares[index]), reserve_bytes=reserves.get(index, 0)
        )
        for index, total_mib in gpus
    )
    return BoxPlan(services=tuple(plans), gpus=budgets, problems=tuple(problems), refused=tuple(refused))


@dataclass(frozen=True)
class LentDevice:
    """What a llama-server (``service`` on ``client``) puts on a device another host lends it: ``rpc`` on
    ``lender``, its GPU (None: the CPU, no VRAM), the terms the client puts there."""

    client: str
    service: str
    lender: str
    rpc: str
    gpu: int | None
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def lent_devices(boxes: Mapping[str, Box], inputs: Mapping[str, VramInputs]) -> list[LentDevice]:
    """Every device the inventory's hosts lend to llama-servers on other hosts, priced once from each client
    host's ``inputs`` (its headers)."""
    devices: list[LentDevice] = []
    for client, box in boxes.items():
        for position, server in enumerate(box.services):
            if not server.peer_refs() or client not in inputs:
                continue
            priced = server.vram(inputs[client], f"services.{position}")
            for remote in priced.remote if priced is not None else ():
                lender = boxes.get(remote.host)
                served = [s for s in lender.services if s.name == remote.service] if lender is not None else []
                gpu = served[0].placement[0] if served and served[0].placement else None
                devices.append(LentDevice(client=client, service=server.name, lender=remote.host,
                                          rpc=remote.service, gpu=gpu, terms=dict(remote.terms)))  # fmt: skip
    return devices


def lent_shares(devices: Sequence[LentDevice]) -> dict[str, list[tuple[int, GpuShare]]]:
    """What each lending host's GPUs hold for llama-servers on other hosts: (GPU index, share named
    ``client@host via rpc``), the RPC server's own CUDA context included. An RPC server on the CPU lends no
    GPU: nothing is budgeted there."""
    lent: dict[str, list[tuple[int, GpuShare]]] = {}
    for device in devices:
        if device.gpu is None:
            continue
        terms = {**device.terms, "headroom": CUDA_CONTEXT_MIB * MIB}
        share = GpuShare(service=f"{device.service}@{device.client} via {device.rpc}", terms=terms)
        lent.setdefault(device.lender, []).append((device.gpu, share))
    return lent


def moves(box: Box, plan: BoxPlan) -> list[Problem]:
    """For each GPU over budget, each service on it that another GPU has room for: move it there.

    The seed's box keeps speech on GPU 1 so that gemma4 has all of GPU 0: a whisper-server put
    beside it is named, with the GPU that would take it (``services.N.gpus``).
    """
    positions = {service.name: position for position, service in enumerate(box.services)}
    suggestions: list[Problem] = []
    for gpu in plan.gpus:
        if gpu.fits:
            continue
        for share in gpu.shares:
            if share.service not in positions:  # lent through an RPC server: the client's split decides it
                client, rpc = share.service.split(" via ", 1)
                suggestions.append(Problem(
                    field=f"services.{positions.get(rpc, 0)}",
                    message=f"GPU {gpu.index} is over budget by {-gpu.free_bytes / MIB:,.0f} MiB, "
                    f"{share.total / MIB:,.0f} MiB of it {client}'s through {rpc}: lower {rpc}'s share in "
                    f"{client}'s tensor_split, or lend "
                    f"another GPU (a second RPC server)",
                ))  # fmt: skip
                continue
            for other in plan.gpus:
                if other.index != gpu.index and other.free_bytes >= share.total:
                    suggestions.append(Problem(
                        field=f"services.{positions[share.service]}.gpus",
                        message=f"GPU {gpu.index} is over budget by {-gpu.free_bytes / MIB:,.0f} MiB: move "
                        f"{share.service} ({share.total / MIB:,.0f} MiB) to GPU {other.index} "
                        f"({other.free_bytes / MIB:,.0f} MiB free), gpus=({other.index},)",
                    ))
                    break
    return suggestions


def what_to_change(server: LlamaServer, target: GgufFile, draft: GgufFile | None, over_bytes: int) -> list[str]:
    """Concrete changes that would each free ``over_bytes`` on the service's GPU, computed, not guessed."""
    plan = plan_service(server, target, draft)
    suggestions: list[str] = []
    own_draft_kv = plan.draft_kv_cache > 0
    draft_k = server.setting("spec_draft_type_k")
    for cache_type in ("q8_0", "q4_0"):
        if CACHE_TYPE_BYTES[cache_type] < CACHE_TYPE_BYTES[server.cache_type_k] or (
            own_draft_kv and CACHE_TYPE_BYTES[cache_type] < CACHE_TYPE_BYTES[draft_k]
        ):
            update: dict[str, object] = {"cache_type_k": cache_type, "cache_type_v": cache_type, "flash_attn": "on"}
            names = "cache_type_k/cache_type_v"
            if own_draft_kv:  # a separate drafter's cache has its own types (default f16)
                update |= {"spec_draft_type_k": cache_type, "spec_draft_type_v": cache_type}
                names += "/spec_draft_type_k/spec_draft_type_v"
            cheaper = server.model_copy(update=update)
            saved = plan.gpu_total - plan_service(cheaper, target, draft).gpu_total
            if saved >= over_bytes:
                suggestions.append(f"{names}={cache_type!r} (with flash_attn='on') saves {saved / MIB:.0f} MiB")
                break
    low, high = CTX_PAD * server.parallel, server.ctx_size
    while high - low > CTX_PAD * server.parallel:
        middle = _pad((low + high) // 2, CTX_PAD * server.parallel)
        smaller = server.model_copy(update={"ctx_size": min(middle, high)})
        if plan.gpu_total - plan_service(smaller, target, draft).gpu_total >= over_bytes:
            low = middle
        else:
            high = middle
    smaller = server.model_copy(update={"ctx_size": low})
    if plan.gpu_total - plan_service(smaller, target, draft).gpu_total >= over_bytes:
        suggestions.append(f"ctx_size={low} (from {server.ctx_size}) fits")
    n_layer = target.block_count or 0
    for layers in range(n_layer, -1, -1):
        fewer = server.model_copy(update={"n_gpu_layers": layers})
        if plan.gpu_total - plan_service(fewer, target, draft).gpu_total >= over_bytes:
            suggestions.append(
                f"n_gpu_layers={layers} fits (the first {n_layer + 1 - layers} layers then run on the CPU, slower)"
            )
            break
    if not suggestions:
        suggestions.append("no single change fits: use a smaller quantization of the model or a bigger GPU")
    return suggestions


# --------------------------------------------------------------------------- headers on the controller


def load_model_header(path: str | Path) -> GgufFile:
    """The header of a local GGUF: a full model, or a header-only copy flagged ``gpubox.header_only``.

    A header-only copy's file ends before the tensor data its header describes; it reports the
    size the full file would have (``tensor_data_end``). A file is parsed once per process while its
    size and mtime stay the same (a drafter is often the target's own file).
    """
    stat = Path(path).stat()
    return _load_model_header(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _load_model_header(path: str, size: int, mtime_ns: int) -> GgufFile:
    try:
        return read_gguf_header(path)
    except TruncatedGgufError:
        data = Path(path).read_bytes()
        header = parse_gguf_header(data, file_size=len(data) + (1 << 50))
        if header.get(HEADER_ONLY_KEY) is not True:
            raise
        return header.model_copy(update={"file_size": header.tensor_data_end})


def default_headers_dir(inventory_dir: Path) -> Path:
    """Where the header-only GGUFs are when no ``--headers`` names them: ``gguf-headers`` next to the inventory."""
    return inventory_dir / HEADERS_DIR_NAME


def header_path_for(model: ModelFile, headers_dir: Path, base: Path) -> Path | None:
    """Where the controller finds a model's header: its local ``source`` file (a relative one taken from
    ``base``, the inventory file's directory), else ``headers_dir/<basename>``."""
    source = controller_source(model, base)
    if source is not None and source.is_file():
        return source
    candidate = headers_dir / Path(model.path).name
    return candidate if candidate.is_file() else None


# --------------------------------------------------------------------------- llama-server's own numbers

_BUFFER_LINE = re.compile(
    r"(?P<device>(?:RPC\d+\[[^\]\s]+\]|[A-Za-z0-9_]+)(?:_Mapped|_Host|_REPACK)?)\s+"
    r"(?P<kind>model|KV|compute|output|RS)\s+buffer size\s*=\s*(?P<mib>[0-9.]+)\s*MiB"
)


@dataclass(frozen=True)
class MemoryBreakdown:
    """llama-server's logged buffers, MiB by (kind, device): kinds model, KV, compute, output, RS.

    A server with a drafter logs two sets (target first): ``total`` sums them by kind (and device
    prefix), ``lines`` keeps them in order.
    """

    lines: tuple[tuple[str, str, float], ...]

    def total(self, kind: str, device_prefix: str | None = None) -> float:
        return sum(
            mib
            for k, device, mib in self.lines
            if k == kind and (device_prefix is None or device.startswith(device_prefix))
        )


def parse_memory_breakdown(log_text: str) -> MemoryBreakdown:
    """Parse ``<device> model|KV|compute|output buffer size = N MiB`` lines of a llama-server log."""
    return MemoryBreakdown(
        lines=tuple((match["kind"], match["device"], float(match["mib"])) for match in _BUFFER_LINE.finditer(log_text))
    )


def headers_for_box(box: Box, headers_dir: Path, base: Path) -> tuple[dict[str, GgufFile], list[str]]:
    """Read each model's header on the controller (a relative ``source`` taken from ``base``, the inventory
    file's directory); return them by host path, and what was missing."""
    headers: dict[str, GgufFile] = {}
    missing: list[str] = []
    for service, model in box.models():
        if model.format != "gguf":
            continue
        path = header_path_for(model, headers_dir, base)
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


def whisper_headers_for_box(box: Box, base: Path) -> tuple[dict[str, WhisperModelHeader], list[str]]:
    """Read the header of each ggml whisper model whose ``source`` is a file on the controller (a relative one
    taken from ``base``, the inventory file's directory), its first bytes only; return them by host path, and
    the sources that are no ggml whisper model. A model without such a source is planned by its declared size."""
    headers: dict[str, WhisperModelHeader] = {}
    unreadable: list[str] = []
    for service, model in box.models():
        source = controller_source(model, base) if model.format == "ggml-whisper" else None
        if source is None or not source.is_file():
            continue
        try:
            headers[model.path] = read_header(source)
        except (OSError, WhisperHeaderError) as error:
            unreadable.append(f"{service.name}: {source}: {error}")
    return headers, unreadable
