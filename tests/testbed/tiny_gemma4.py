"""A tiny random-weight Gemma 4 target and its Gemma 4 MTP assistant drafter, as GGUF files.

The pair exercises the seed's exact serving path (``llama-server --model T --model-draft D
--spec-type draft-mtp``) on a CPU without real weights. Both files are written directly with
``gguf.GGUFWriter``; the installed ``gguf`` package may predate ``gemma4-assistant``, so the
architecture is passed as a plain string and every key is spelled with the writer's
``add_<type>(key, value)`` methods. All paths below are in the pinned llama.cpp tree
(``~/.cache/gpubox/llama.cpp-0.3.36``).

Keys, and where llama.cpp reads them:

- ``{arch}.context_length``, ``embedding_length``, ``block_count`` (required),
  ``feed_forward_length``, ``attention.head_count``, ``attention.head_count_kv`` (per-layer
  INT32 array, as ``conversion/gemma.py:Gemma4Model.set_gguf_parameters`` writes it when the
  full-attention layers have their own KV head count), ``attention.key_length`` /
  ``value_length`` (the full-attention head size), ``rope.dimension_count``,
  ``rope.freq_base``: ``src/llama-model.cpp:llama_model_base::load_hparams``.
- ``attention.sliding_window_pattern`` (BOOL array, true = sliding layer; required),
  ``attention.shared_kv_layers``, ``rope.freq_base_swa``, ``attention.sliding_window``,
  ``attention.layer_norm_rms_epsilon``, ``embedding_length_per_layer_input`` (required; 0
  disables the per-layer embeddings), ``attention.key_length_swa`` / ``value_length_swa``
  (required), ``final_logit_softcapping``: ``src/models/gemma4.cpp:load_arch_hparams``;
  ``rope.dimension_count_swa``: ``llama_model_base::load_hparams``.
- Assistant: the same per-arch keys (``src/models/gemma4-assistant.cpp:load_arch_hparams``;
  ``shared_kv_layers`` is read there and discarded), plus ``embedding_length_out`` = the target's
  hidden size (``load_arch_tensors`` refuses ``embedding_length_out == embedding_length``; it is
  the width of the target hidden state the drafter consumes, ``n_embd_inp``) and
  ``nextn_predict_layers`` = ``block_count`` (every assistant layer is an MTP layer;
  ``conversion/gemma.py:Gemma4AssistantModel.set_gguf_parameters``).
- ``tokenizer.*``: copied verbatim from ``models/ggml-vocab-gemma-4.gguf``, into both files: the
  assistant converter inherits ``Gemma4Model.set_vocab``, so a real drafter carries the vocab
  too, and ``common/speculative.cpp:common_speculative_are_compatible`` compares them.

Tensors (ggml ``ne`` order; numpy shapes are reversed), from ``create_tensor`` calls in
``src/models/gemma4.cpp:load_arch_tensors`` and ``src/models/gemma4-assistant.cpp:load_arch_tensors``,
names from ``src/llama-arch.cpp:LLM_TENSOR_NAMES``:

- Target: ``token_embd`` {n_embd, n_vocab} (``output`` is optional: tied to it),
  ``output_norm`` {n_embd}, ``rope_freqs`` {head_dim_full/2} (one tensor, duplicated onto every
  full-attention layer), and per layer ``attn_norm``, ``attn_q`` {n_embd, n_head*head_dim},
  ``attn_k`` {n_embd, n_head_kv*head_dim}, ``attn_v`` (optional: absent on the full-attention
  layers, which then use K as V, like Gemma 4 31B's ``attention_k_eq_v``), ``attn_output``,
  ``attn_q_norm`` / ``attn_k_norm`` {head_dim}, ``post_attention_norm``, ``ffn_norm``,
  ``ffn_gate`` / ``ffn_up`` {n_embd, n_ff}, ``ffn_down`` {n_ff, n_embd}, ``post_ffw_norm``,
  ``layer_output_scale`` {1} (optional for the target, written anyway).
- Assistant: ``token_embd`` {n_embd_draft, n_vocab} (also its LM head), ``output_norm``,
  ``nextn.pre_projection`` {2*n_embd_target, n_embd_draft}, ``nextn.post_projection``
  {n_embd_draft, n_embd_target}, ``rope_freqs``, and per layer ``attn_norm``, ``attn_q``,
  ``attn_output``, ``attn_q_norm``, ``post_attention_norm``, ``layer_output_scale`` (required),
  ``ffn_norm``, ``ffn_gate``, ``ffn_up``, ``ffn_down``, ``post_ffw_norm``. It has no K/V: it
  attends over the target's KV cache.

What must match between the two (``src/llama-model.cpp:create_memory``, the
``LLM_ARCH_GEMMA4_ASSISTANT`` share callback, and ``src/llama-kv-cache.cpp:get_k``): each
assistant sliding layer reads the target's layer ``n_layer - 2`` and each full layer the target's
``n_layer - 1``, so the target's last layer is full attention and the one before it sliding; the
assistant's head sizes, KV head counts and sliding window equal the target's for those layers
(the KV views are cut with the assistant's hparams); ``common/speculative.cpp``
(``common_speculative_impl_draft_mtp``) asserts the assistant's ``n_embd_out`` equals the
target's.

Gemma 4 RMS norms multiply by the stored weight (``Gemma4Model.norm_shift`` is 0), so norm
weights are ones; matrices are N(0, 0.02) in f16, 1-D tensors f32 (as the converter keeps them).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUF_MAGIC, GGUFValueType, GGUFWriter

TARGET_ARCH = "gemma4"
ASSISTANT_ARCH = "gemma4-assistant"
TARGET_FILE = "tiny-gemma4.gguf"
ASSISTANT_FILE = "tiny-gemma4-assistant.gguf"
VOCAB_FILE = "models/ggml-vocab-gemma-4.gguf"

WEIGHT_STD = 0.02
FILE_TYPE_MOSTLY_F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16
QUANTIZATION_VERSION = 2  # gguf.GGML_QUANT_VERSION


@dataclass(frozen=True)
class TinyShape:
    """Hyperparameters of one of the two tiny models."""

    n_embd: int
    n_ff: int
    n_head: int
    head_dim_swa: int
    head_dim_full: int
    n_head_kv_swa: int
    n_head_kv_full: int
    sliding: tuple[bool, ...]  # per layer: True = sliding-window attention, False = full attention
    sliding_window: int = 32
    context_length: int = 8192
    partial_rotary_factor_full: float = 0.25  # Gemma 4's "proportional" RoPE on the full layers

    @property
    def n_layer(self) -> int:
        return len(self.sliding)

    def head_dim(self, il: int) -> int:
        return self.head_dim_swa if self.sliding[il] else self.head_dim_full

    def n_head_kv(self, il: int) -> int:
        return self.n_head_kv_swa if self.sliding[il] else self.n_head_kv_full


# Head sizes are multiples of 32 so a q8_0 KV cache (block 32) holds whole blocks per row; the
# full-attention head is twice the sliding one, as in Gemma 4 (512 vs 256).
TARGET = TinyShape(
    n_embd=64, n_ff=128, n_head=4, head_dim_swa=32, head_dim_full=64, n_head_kv_swa=2, n_head_kv_full=1,
    sliding=(True, False, True, False),
)  # fmt: skip
ASSISTANT = TinyShape(
    n_embd=32, n_ff=64, n_head=4, head_dim_swa=32, head_dim_full=64, n_head_kv_swa=2, n_head_kv_full=1,
    sliding=(True, False),
)  # fmt: skip


def default_vocab_gguf() -> Path:
    """The Gemma 4 vocab GGUF of the pinned llama.cpp tree (see tests.testbed.llama_cpp_repo)."""
    from tests.testbed.assets import llama_cpp_repo

    repo, _ = llama_cpp_repo()
    return repo / VOCAB_FILE


@dataclass(frozen=True)
class _KV:
    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None


_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


class _KVReader:
    """The key/values of a little-endian GGUF v3, read sequentially.

    ``gguf.GGUFReader`` builds a numpy view per array element and takes ~20 s on the 262k-token
    vocab (514k merges); this reads the same values in about a second.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        """Raw bytes, so that GGUFWriter writes them back unchanged."""
        n = self.unpack("<Q")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        return self.unpack(_SCALARS[vtype])

    def array(self) -> tuple[GGUFValueType, list[Any]]:
        sub_type = GGUFValueType(self.unpack("<I"))
        n = self.unpack("<Q")
        if sub_type == GGUFValueType.STRING:
            return sub_type, [self.string() for _ in range(n)]
        if sub_type == GGUFValueType.ARRAY:
            raise ValueError("nested GGUF arrays are not supported")
        dtype = np.dtype(_SCALARS[sub_type])
        values = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.pos).tolist()
        self.pos += n * dtype.itemsize
        return sub_type, values


@functools.lru_cache(maxsize=2)
def _tokenizer_kv(vocab_gguf: Path) -> tuple[_KV, ...]:
    """Every ``tokenizer.*`` key/value of a vocab GGUF, with its exact GGUF types."""
    reader = _KVReader(vocab_gguf.read_bytes())
    magic, version = reader.unpack("<I"), reader.unpack("<I")
    if magic != GGUF_MAGIC or version != 3:
        raise ValueError(f"{vocab_gguf} is not a little-endian GGUF v3 file")
    reader.unpack("<Q")  # tensor count
    out: list[_KV] = []
    for _ in range(reader.unpack("<Q")):
        key = reader.string().decode()
        vtype = GGUFValueType(reader.unpack("<I"))
        sub_type: GGUFValueType | None = None
        if vtype == GGUFValueType.ARRAY:
            sub_type, value = reader.array()
        else:
            value = reader.value(vtype)
        if key.startswith("tokenizer."):
            out.append(_KV(key, value, vtype, sub_type))
    if not any(kv.key == "tokenizer.ggml.tokens" for kv in out):
        raise ValueError(f"{vocab_gguf} has no tokenizer.ggml.tokens")
    return tuple(out)


def _n_vocab(tokenizer: Sequence[_KV]) -> int:
    (tokens,) = (kv.value for kv in tokenizer if kv.key == "tokenizer.ggml.tokens")
    return len(tokens)


class _Weights:
    """Seeded random tensors: f16 matrices, f32 vectors."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def matrix(self, ne0: int, ne1: int) -> npt.NDArray[np.float16]:
        """A ggml {ne0, ne1} matrix (numpy shape (ne1, ne0))."""
        return (self.rng.standard_normal((ne1, ne0), dtype=np.float32) * WEIGHT_STD).astype(np.float16)

    @staticmethod
    def ones(n: int) -> npt.NDArray[np.float32]:
        return np.ones(n, dtype=np.float32)


def _rope_freqs(shape: TinyShape) -> npt.NDArray[np.float32]:
    """Proportional RoPE factors of the full layers (conversion/gemma.py:Gemma4Model.generate_extra_tensors)."""
    n_rot = int(shape.head_dim_full * shape.partial_rotary_factor_full / 2)
    n_unrot = shape.head_dim_full // 2 - n_rot
    return np.array([1.0] * n_rot + [1e30] * n_unrot, dtype=np.float32)


def _add_hparams(writer: GGUFWriter, arch: str, shape: TinyShape, name: str) -> None:
    writer.add_string("general.name", name)
    writer.add_uint32("general.file_type", FILE_TYPE_MOSTLY_F16)
    writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
    writer.add_uint32(f"{arch}.context_length", shape.context_length)
    writer.add_uint32(f"{arch}.embedding_length", shape.n_embd)
    writer.add_uint32(f"{arch}.block_count", shape.n_layer)
    writer.add_uint32(f"{arch}.feed_forward_length", shape.n_ff)
    writer.add_uint32(f"{arch}.attention.head_count", shape.n_head)
    writer.add_array(f"{arch}.attention.head_count_kv", [shape.n_head_kv(il) for il in range(shape.n_layer)])
    writer.add_float32(f"{arch}.rope.freq_base", 1_000_000.0)
    writer.add_float32(f"{arch}.rope.freq_base_swa", 10_000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_uint32(f"{arch}.attention.key_length", shape.head_dim_full)
    writer.add_uint32(f"{arch}.attention.value_length", shape.head_dim_full)
    writer.add_uint32(f"{arch}.attention.key_length_swa", shape.head_dim_swa)
    writer.add_uint32(f"{arch}.attention.value_length_swa", shape.head_dim_swa)
    writer.add_float32(f"{arch}.final_logit_softcapping", 30.0)
    writer.add_uint32(f"{arch}.attention.sliding_window", shape.sliding_window)
    writer.add_uint32(f"{arch}.attention.shared_kv_layers", 0)
    writer.add_uint32(f"{arch}.embedding_length_per_layer_input", 0)
    writer.add_array(f"{arch}.attention.sliding_window_pattern", list(shape.sliding))
    writer.add_uint32(f"{arch}.rope.dimension_count", shape.head_dim_full)
    writer.add_uint32(f"{arch}.rope.dimension_count_swa", shape.head_dim_swa)


def _add_tokenizer(writer: GGUFWriter, tokenizer: Sequence[_KV]) -> None:
    for kv in tokenizer:
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)


def _write(path: Path, writer: GGUFWriter) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _target(path: Path, shape: TinyShape, tokenizer: Sequence[_KV], w: _Weights) -> None:
    arch = TARGET_ARCH
    writer = GGUFWriter(None, arch)
    _add_hparams(writer, arch, shape, "tiny-gemma4")
    _add_tokenizer(writer, tokenizer)
    n_vocab = _n_vocab(tokenizer)
    writer.add_tensor("token_embd.weight", w.matrix(shape.n_embd, n_vocab))
    writer.add_tensor("output_norm.weight", w.ones(shape.n_embd))
    writer.add_tensor("rope_freqs.weight", _rope_freqs(shape))
    for il in range(shape.n_layer):
        hd, n_kv = shape.head_dim(il), shape.n_head_kv(il)
        blk = f"blk.{il}"
        writer.add_tensor(f"{blk}.attn_norm.weight", w.ones(shape.n_embd))
        writer.add_tensor(f"{blk}.attn_q.weight", w.matrix(shape.n_embd, shape.n_head * hd))
        writer.add_tensor(f"{blk}.attn_k.weight", w.matrix(shape.n_embd, n_kv * hd))
        if shape.sliding[il]:  # full layers: no V projection, K is used as V (attention_k_eq_v)
            writer.add_tensor(f"{blk}.attn_v.weight", w.matrix(shape.n_embd, n_kv * hd))
        writer.add_tensor(f"{blk}.attn_output.weight", w.matrix(shape.n_head * hd, shape.n_embd))
        writer.add_tensor(f"{blk}.attn_q_norm.weight", w.ones(hd))
        writer.add_tensor(f"{blk}.attn_k_norm.weight", w.ones(hd))
        writer.add_tensor(f"{blk}.post_attention_norm.weight", w.ones(shape.n_embd))
        writer.add_tensor(f"{blk}.layer_output_scale.weight", w.ones(1))
        _add_ffn(writer, blk, shape, w)
    _write(path, writer)


def _add_ffn(writer: GGUFWriter, blk: str, shape: TinyShape, w: _Weights) -> None:
    writer.add_tensor(f"{blk}.ffn_norm.weight", w.ones(shape.n_embd))
    writer.add_tensor(f"{blk}.ffn_gate.weight", w.matrix(shape.n_embd, shape.n_ff))
    writer.add_tensor(f"{blk}.ffn_up.weight", w.matrix(shape.n_embd, shape.n_ff))
    writer.add_tensor(f"{blk}.ffn_down.weight", w.matrix(shape.n_ff, shape.n_embd))
    writer.add_tensor(f"{blk}.post_ffw_norm.weight", w.ones(shape.n_embd))


def _assistant(path: Path, shape: TinyShape, target: TinyShape, tokenizer: Sequence[_KV], w: _Weights) -> None:
    arch = ASSISTANT_ARCH
    writer = GGUFWriter(None, arch)
    _add_hparams(writer, arch, shape, "tiny-gemma4-assistant")
    writer.add_uint32(f"{arch}.embedding_length_out", target.n_embd)
    writer.add_uint32(f"{arch}.nextn_predict_layers", shape.n_layer)
    _add_tokenizer(writer, tokenizer)
    n_vocab = _n_vocab(tokenizer)
    writer.add_tensor("token_embd.weight", w.matrix(shape.n_embd, n_vocab))
    writer.add_tensor("output_norm.weight", w.ones(shape.n_embd))
    writer.add_tensor("nextn.pre_projection.weight", w.matrix(2 * target.n_embd, shape.n_embd))
    writer.add_tensor("nextn.post_projection.weight", w.matrix(shape.n_embd, target.n_embd))
    writer.add_tensor("rope_freqs.weight", _rope_freqs(shape))
    for il in range(shape.n_layer):
        hd = shape.head_dim(il)
        blk = f"blk.{il}"
        writer.add_tensor(f"{blk}.attn_norm.weight", w.ones(shape.n_embd))
        writer.add_tensor(f"{blk}.attn_q.weight", w.matrix(shape.n_embd, shape.n_head * hd))
        writer.add_tensor(f"{blk}.attn_output.weight", w.matrix(shape.n_head * hd, shape.n_embd))
        writer.add_tensor(f"{blk}.attn_q_norm.weight", w.ones(hd))
        writer.add_tensor(f"{blk}.post_attention_norm.weight", w.ones(shape.n_embd))
        writer.add_tensor(f"{blk}.layer_output_scale.weight", w.ones(1))
        _add_ffn(writer, blk, shape, w)
    _write(path, writer)


def _check_pair(target: TinyShape, assistant: TinyShape) -> None:
    """The pairing rules of llama.cpp's Gemma 4 assistant (see the module docstring)."""
    if target.n_layer < 2 or target.sliding[-1] or not target.sliding[-2]:
        raise ValueError("the target's last layer must be full attention and the one before it sliding")
    if assistant.n_embd == target.n_embd:
        raise ValueError("the assistant's hidden size must differ from the target's (embedding_length_out)")
    for il in range(assistant.n_layer):
        shared = target.n_layer - 2 if assistant.sliding[il] else target.n_layer - 1
        if (assistant.head_dim(il), assistant.n_head_kv(il)) != (target.head_dim(shared), target.n_head_kv(shared)):
            raise ValueError(f"assistant layer {il} must match target layer {shared}'s head size and KV heads")
    if assistant.sliding_window != target.sliding_window:
        raise ValueError("the assistant's sliding window must equal the target's (shared SWA cache)")


def write_tiny_gemma4(directory: Path, seed: int = 0, *, vocab_gguf: Path | None = None) -> tuple[Path, Path]:
    """Write ``tiny-gemma4.gguf`` and ``tiny-gemma4-assistant.gguf`` into ``directory``.

    Deterministic for a given ``seed`` and vocab. ``vocab_gguf`` defaults to the pinned llama.cpp
    tree's ``models/ggml-vocab-gemma-4.gguf``. Returns ``(target, assistant)``.
    """
    _check_pair(TARGET, ASSISTANT)
    tokenizer = _tokenizer_kv((vocab_gguf or default_vocab_gguf()).resolve())
    directory.mkdir(parents=True, exist_ok=True)
    target_path = directory / TARGET_FILE
    assistant_path = directory / ASSISTANT_FILE
    _target(target_path, TARGET, tokenizer, _Weights(seed))
    _assistant(assistant_path, ASSISTANT, TARGET, tokenizer, _Weights(seed + 1))
    return target_path, assistant_path
