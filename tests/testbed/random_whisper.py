"""Random-weight whisper.cpp ggml models with the real hyperparameters of each Whisper size.

What whisper.cpp allocates beside its weights (``whisper_init_state``: the self/cross/pad KV caches and the
conv/encode/cross/decode compute buffers) depends on the model's dimensions only, so a model of the right
shape with random weights measures it, and costs nothing to ship: the GPU validation writes these on the GPU
machine (tests.testbed.gpu_validate's ``whispersizes`` step), as ``tiny_gemma4`` does for Gemma 4.

The file layout is :mod:`tests.testbed.ct2_whisper_to_ggml`'s (what whisper.cpp's ``convert-pt-to-ggml.py``
writes): magic, 11 int32 hparams (ftype 1: f16), the mel filters, the tokens, then each tensor; matrices f16,
biases, norms, conv biases ([n, 1]) and positional embeddings f32. The tokens are placeholders (``<i>``):
whisper.cpp names the special tokens past them from ``n_vocab`` alone. numpy only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import numpy as np

from gpubox.ggml_whisper import GGML_MAGIC, WhisperModelHeader

F16 = 1  # the ggml ftype these models are written in
N_FFT_BINS = 201  # whisper's n_fft 400 // 2 + 1: the mel filters' width
GPT2_TOKENS = 50256  # the ranks in openai-whisper's gpt2.tiktoken (.en models)
MULTILINGUAL_TOKENS = 50257  # multilingual.tiktoken


WhisperDims = WhisperModelHeader
"""A size's hparams: the ggml whisper header gpubox parses (gpubox.ggml_whisper), always f16 here."""


def _dims(
    n_vocab: int, state: int, heads: int, layers: int, n_mels: int = 80, text_layers: int | None = None
) -> WhisperDims:
    return WhisperDims(n_vocab, 1500, state, heads, layers, 448, state, heads, text_layers or layers, n_mels, F16)


# openai-whisper's ModelDimensions of each checkpoint (whisper/__init__.py _MODELS; large-v3: 128 mels and
# 51866 tokens; large-v3-turbo: large-v3's encoder, 4 decoder layers).
WHISPER_DIMS: dict[str, WhisperDims] = {
    "tiny.en": _dims(51864, 384, 6, 4),
    "tiny": _dims(51865, 384, 6, 4),
    "base": _dims(51865, 512, 8, 6),
    "small": _dims(51865, 768, 12, 12),
    "medium": _dims(51865, 1024, 16, 24),
    "large-v2": _dims(51865, 1280, 20, 32),
    "large-v3": _dims(51866, 1280, 20, 32, n_mels=128),
    "large-v3-turbo": _dims(51866, 1280, 20, 32, n_mels=128, text_layers=4),
}


def planner_size(name: str) -> str:
    """The planner's size key (gpubox.vram.WHISPER_STATE_MIB) of a checkpoint name, by its header's shape
    (gpubox.ggml_whisper.WhisperModelHeader.size): tiny.en -> tiny, large-v3 -> large, large-v3-turbo ->
    large-v3-turbo."""
    return WHISPER_DIMS[name].size


def _attention(prefix: str, n: int, bias_on_key: bool = False) -> Iterator[tuple[str, tuple[int, ...]]]:
    for part in ("query", "key", "value", "out"):
        yield f"{prefix}.{part}.weight", (n, n)
        if part != "key" or bias_on_key:
            yield f"{prefix}.{part}.bias", (n,)


def _block(prefix: str, n: int, cross: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}.attn_ln.weight", (n,)
    yield f"{prefix}.attn_ln.bias", (n,)
    yield from _attention(f"{prefix}.attn", n)
    if cross:
        yield f"{prefix}.cross_attn_ln.weight", (n,)
        yield f"{prefix}.cross_attn_ln.bias", (n,)
        yield from _attention(f"{prefix}.cross_attn", n)
    yield f"{prefix}.mlp_ln.weight", (n,)
    yield f"{prefix}.mlp_ln.bias", (n,)
    yield f"{prefix}.mlp.0.weight", (4 * n, n)
    yield f"{prefix}.mlp.0.bias", (4 * n,)
    yield f"{prefix}.mlp.2.weight", (n, 4 * n)
    yield f"{prefix}.mlp.2.bias", (n,)


def tensor_shapes(dims: WhisperDims) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor whisper.cpp loads for `dims`, with its numpy shape (outermost first), as the converter
    writes them (conv biases as [n, 1])."""
    a, t = dims.n_audio_state, dims.n_text_state
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("encoder.positional_embedding", (dims.n_audio_ctx, a)),
        ("encoder.conv1.weight", (a, dims.n_mels, 3)),
        ("encoder.conv1.bias", (a, 1)),
        ("encoder.conv2.weight", (a, a, 3)),
        ("encoder.conv2.bias", (a, 1)),
    ]
    for i in range(dims.n_audio_layer):
        shapes.extend(_block(f"encoder.blocks.{i}", a, cross=False))
    shapes += [("encoder.ln_post.weight", (a,)), ("encoder.ln_post.bias", (a,))]
    shapes += [
        ("decoder.token_embedding.weight", (dims.n_vocab, t)),
        ("decoder.positional_embedding", (dims.n_text_ctx, t)),
    ]
    for i in range(dims.n_text_layer):
        shapes.extend(_block(f"decoder.blocks.{i}", t, cross=True))
    shapes += [("decoder.ln.weight", (t,)), ("decoder.ln.bias", (t,))]
    return shapes


def is_f32(name: str, shape: tuple[int, ...]) -> bool:
    """The converter's rule: vectors, the conv biases and the positional embeddings stay f32."""
    return len(shape) < 2 or name.endswith(("conv1.bias", "conv2.bias", "positional_embedding"))


def _values(name: str, shape: tuple[int, ...], block: np.ndarray) -> np.ndarray:
    """Norm gains 1, biases 0, everything else the random block repeated (values do not change the memory)."""
    count = int(np.prod(shape))
    if name.endswith(("_ln.weight", "ln_post.weight", "decoder.ln.weight")):
        return np.ones(count, dtype=np.float32)
    if name.endswith(".bias"):
        return np.zeros(count, dtype=np.float32)
    return np.resize(block, count)


def header_bytes(dims: WhisperDims) -> bytes:
    """The file's first bytes: the magic and the 11 int32 hparams (what gpubox.ggml_whisper reads)."""
    return struct.pack("<I11i", GGML_MAGIC, *astuple(dims))


def write_random_whisper(dims: WhisperDims, out: Path, seed: int = 0) -> int:
    """Write a random-weight f16 ggml whisper model of `dims` to `out`; its size in bytes."""
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 20) * 0.02).astype(np.float32)
    tokens = GPT2_TOKENS if dims.n_vocab < 51865 else MULTILINGUAL_TOKENS
    filters = np.abs(rng.standard_normal((dims.n_mels, N_FFT_BINS))).astype("<f4") * 0.01
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(header_bytes(dims))
        fh.write(struct.pack("<2i", *filters.shape))
        fh.write(filters.tobytes())
        fh.write(struct.pack("<i", tokens))
        for i in range(tokens):
            token = f"<{i}>".encode()
            fh.write(struct.pack("<i", len(token)) + token)
        for name, shape in tensor_shapes(dims):
            f32 = is_f32(name, shape)
            data = _values(name, shape, block).astype("<f4" if f32 else "<f2")
            encoded = name.encode()
            fh.write(struct.pack("<3i", len(shape), len(encoded), 0 if f32 else 1))
            fh.write(struct.pack(f"<{len(shape)}i", *reversed(shape)))
            fh.write(encoded)
            fh.write(data.tobytes())
    partial.replace(out)
    return out.stat().st_size


def read_tensor_index(path: Path) -> tuple[tuple[int, ...], dict[str, tuple[tuple[int, ...], int]]]:
    """(hparams, {tensor name: (numpy shape, ftype)}) of a ggml whisper file, its data skipped."""
    with open(path, "rb") as fh:
        magic, *hparams = struct.unpack("<12i", fh.read(48))
        if magic != GGML_MAGIC:
            raise ValueError(f"{path}: not a ggml whisper model")
        n_mel, n_fft = struct.unpack("<2i", fh.read(8))
        fh.seek(4 * n_mel * n_fft, 1)
        (n_tokens,) = struct.unpack("<i", fh.read(4))
        for _ in range(n_tokens):
            (length,) = struct.unpack("<i", fh.read(4))
            fh.seek(length, 1)
        index: dict[str, tuple[tuple[int, ...], int]] = {}
        while head := fh.read(12):
            n_dims, name_length, ftype = struct.unpack("<3i", head)
            ne = struct.unpack(f"<{n_dims}i", fh.read(4 * n_dims))
            name = fh.read(name_length).decode()
            shape = tuple(reversed(ne))
            index[name] = (shape, ftype)
            fh.seek(int(np.prod(shape)) * (4 if ftype == 0 else 2), 1)
    return tuple(hparams), index
