"""Convert a CTranslate2 Whisper model (``model.bin`` of a ``WhisperSpec``) to whisper.cpp's ggml file.

Test-host tooling, numpy only (no ctranslate2, no torch). The output is what whisper.cpp's
``models/convert-pt-to-ggml.py`` writes for the openai checkpoint: magic ``0x67676d6c``, 11 int32
hparams (the last is ftype 1: f16), the mel filters (int32 n_mel, n_fft, then float32), the
tokenizer (int32 count, then int32 length + bytes per token, in rank order), then each tensor as
int32 n_dims, name length, ftype (0 f32, 1 f16), the dims innermost first, the name, the data.
Matrices (2-D and conv) are f16; biases, norms, conv biases (as [n, 1]) and positional
embeddings f32, as convert-pt-to-ggml does.

CTranslate2's ``model.bin`` (``ModelSpec._serialize``, binary version 6): uint32 version, string
spec name, uint32 revision, uint32 variable count, then per variable: string name, uint8 rank,
uint32 dims, uint8 dtype (float32, int8, int16, int32, float16, bfloat16), uint32 byte count, the
raw bytes; then uint32 alias count and (alias, target) string pairs. A string is uint16 length
(with the NUL), the UTF-8 bytes and a NUL. All little-endian.

Names: CTranslate2 fuses the self-attention query/key/value into ``self_attention/linear_0``
(rows q, k, v) and the cross-attention key/value into ``attention/linear_1`` (rows k, v); the
key's bias there is zeros (Whisper's key projection has none), so it is dropped. The query is not
pre-scaled (the scale is applied at run time, in both CTranslate2 and whisper.cpp).
"""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import numpy as np

GGML_MAGIC = 0x67676D6C
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 model.bin by name (aliases left out)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return int(value)

    def string() -> str:
        nonlocal pos
        length = take("H")
        text = data[pos : pos + length - 1].decode()
        pos += length
        return text

    version = take("I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (want 5 or 6)")
    spec, _revision = string(), take("I")
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a {spec}, not a WhisperSpec")
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        shape = tuple(take("I") for _ in range(take("B")))
        dtype = _CT2_DTYPES[take("B")]
        n_bytes = take("I")
        if dtype == "bfloat16":
            raise ValueError(f"{path}: bfloat16 variable {name} (convert the model to float16)")
        variables[name] = np.frombuffer(
            data, dtype=np.dtype(dtype).newbyteorder("<"), count=n_bytes // np.dtype(dtype).itemsize, offset=pos
        ).reshape(shape)
        pos += n_bytes
    return variables


def _openai_tensors(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The variables under openai-whisper's state_dict names (what whisper.cpp looks up)."""
    out: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = v[f"{src}/weight"], v[f"{src}/bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def split(dst: str, src: str, parts: tuple[str, ...]) -> None:
        weights = np.split(v[f"{src}/weight"], len(parts))
        biases = np.split(v[f"{src}/bias"], len(parts))
        for part, weight, bias in zip(parts, weights, biases, strict=True):
            out[f"{dst}.{part}.weight"] = weight
            if part == "key":
                if np.any(bias):
                    raise ValueError(f"{src}: non-zero key bias, which whisper.cpp has no tensor for")
            else:
                out[f"{dst}.{part}.bias"] = bias

    out["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for conv in ("conv1", "conv2"):
        linear(f"encoder.{conv}", f"encoder/{conv}")
    for side in ("encoder", "decoder"):
        for i in range(
            sum(1 for name in v if name.startswith(f"{side}/layer_") and name.endswith("/ffn/linear_0/weight"))
        ):
            block, layer = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            norm(f"{block}.attn_ln", f"{layer}/self_attention/layer_norm")
            split(f"{block}.attn", f"{layer}/self_attention/linear_0", ("query", "key", "value"))
            linear(f"{block}.attn.out", f"{layer}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{block}.cross_attn_ln", f"{layer}/attention/layer_norm")
                linear(f"{block}.cross_attn.query", f"{layer}/attention/linear_0")
                split(f"{block}.cross_attn", f"{layer}/attention/linear_1", ("key", "value"))
                linear(f"{block}.cross_attn.out", f"{layer}/attention/linear_2")
            norm(f"{block}.mlp_ln", f"{layer}/ffn/layer_norm")
            linear(f"{block}.mlp.0", f"{layer}/ffn/linear_0")
            linear(f"{block}.mlp.2", f"{layer}/ffn/linear_1")
    norm("encoder.ln_post", "encoder/layer_norm")
    out["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    out["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    norm("decoder.ln", "decoder/layer_norm")
    return out


def convert(ct2_dir: Path, whisper_assets_dir: Path, out: Path) -> None:
    """Write ``out`` (ggml, f16) from ``ct2_dir/model.bin`` and openai-whisper's ``whisper/assets``.

    ``whisper_assets_dir`` holds ``mel_filters.npz`` and ``gpt2.tiktoken`` /
    ``multilingual.tiktoken`` (the ``whisper/assets`` folder of the openai-whisper sdist).
    """
    v = read_ct2(Path(ct2_dir) / "model.bin")
    tensors = _openai_tensors(v)
    n_vocab, n_text_state = v["decoder/embeddings/weight"].shape
    n_audio_ctx, n_audio_state = v["encoder/position_encodings/encodings"].shape
    n_mels = v["encoder/conv1/weight"].shape[1]
    hparams = [
        n_vocab, n_audio_ctx, n_audio_state, int(v["encoder/num_heads"]),
        sum(1 for name in tensors if name.startswith("encoder.") and name.endswith(".mlp.0.weight")),
        v["decoder/position_encodings/encodings"].shape[0], n_text_state, int(v["decoder/num_heads"]),
        sum(1 for name in tensors if name.startswith("decoder.") and name.endswith(".mlp.0.weight")),
        n_mels, 1,
    ]  # fmt: skip
    with np.load(Path(whisper_assets_dir) / "mel_filters.npz") as npz:
        filters = npz[f"mel_{n_mels}"].astype("<f4")
    tokenizer = "multilingual.tiktoken" if n_vocab >= 51865 else "gpt2.tiktoken"
    lines = (Path(whisper_assets_dir) / tokenizer).read_bytes().splitlines()
    tokens = [base64.b64decode(token) for token, _rank in (line.split() for line in lines if line)]
    with open(out, "wb") as fh:
        fh.write(struct.pack("<12i", GGML_MAGIC, *hparams))
        fh.write(struct.pack("<2i", *filters.shape))
        fh.write(filters.tobytes())
        fh.write(struct.pack("<i", len(tokens)))
        for token in tokens:
            fh.write(struct.pack("<i", len(token)) + token)
        for name, array in tensors.items():
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                array = array.reshape(-1, 1)
            f32 = array.ndim < 2 or name.endswith(("conv1.bias", "conv2.bias", "positional_embedding"))
            data = np.ascontiguousarray(array, dtype="<f4" if f32 else "<f2")
            encoded = name.encode()
            fh.write(struct.pack("<3i", data.ndim, len(encoded), 0 if f32 else 1))
            fh.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))
            fh.write(encoded)
            fh.write(data.tobytes())
