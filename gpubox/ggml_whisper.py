"""The header of a ggml whisper model (whisper.cpp's ``ggml-*.bin``), read from its first bytes.

Layout (whisper.cpp ``whisper_model_load``, ``models/convert-pt-to-ggml.py``): uint32 magic
``0x67676d6c`` ("ggml" as a little-endian int: the file starts ``lmgg``), then 11 int32 hparams:
n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx, n_text_state,
n_text_head, n_text_layer, n_mels, ftype; then the mel filters, the vocabulary and the tensors.
The first 48 bytes are all this module needs: :func:`read_header` reads no more of a file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

GGML_MAGIC = 0x67676D6C
HEADER_SIZE = 48
"""Magic + 11 int32 hparams."""

_MODEL_TYPES = {4: "tiny", 6: "base", 12: "small", 24: "medium", 32: "large"}
WHISPER_SHAPES: dict[tuple[int, int, int], str] = {
    (4, 4, 384): "tiny",
    (6, 6, 512): "base",
    (12, 12, 768): "small",
    (24, 24, 1024): "medium",
    (32, 32, 1280): "large",
    (32, 4, 1280): "large-v3-turbo",
}
"""The sizes gpubox knows, by (n_audio_layer, n_text_layer, n_text_state): openai-whisper's checkpoints
(``ModelDimensions``). large-v3-turbo is large-v3's encoder with 4 decoder layers instead of 32; whisper.cpp
names it ``large`` (it names a model by its encoder depth alone)."""
_ENGLISH_ONLY_VOCAB = 51864
_HEADER = struct.Struct("<I11i")


class WhisperHeaderError(ValueError):
    """The bytes are not the start of a ggml whisper model."""


@dataclass(frozen=True)
class WhisperModelHeader:
    n_vocab: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int
    n_mels: int
    ftype: int
    """As stored: the ggml ftype (0 f32, 1 f16, 2+ quantized) plus 1000 x the quantization version."""

    @property
    def model_type(self) -> str:
        """tiny, base, small, medium or large, by the encoder depth (as whisper.cpp names it);
        ``unknown`` for another depth (whisper.cpp loads it and calls it so)."""
        return _MODEL_TYPES.get(self.n_audio_layer, "unknown")

    @property
    def size(self) -> str:
        """The size gpubox knows it as (``ModelFile.architecture`` without ``.en``): its shape's in
        :data:`WHISPER_SHAPES`, else :attr:`model_type` (a shape of no known checkpoint, named as whisper.cpp
        names it)."""
        return WHISPER_SHAPES.get((self.n_audio_layer, self.n_text_layer, self.n_text_state), self.model_type)

    @property
    def shape(self) -> str:
        """Its dimensions in words: ``32 encoder layers, 4 decoder layers of width 1280``."""
        return f"{self.n_audio_layer} encoder layers, {self.n_text_layer} decoder layers of width {self.n_text_state}"

    @property
    def english_only(self) -> bool:
        """An ``.en`` model: the GPT-2 vocabulary (51864 tokens); multilingual ones have 51865+."""
        return self.n_vocab == _ENGLISH_ONLY_VOCAB


def looks_like_ggml_whisper(head: bytes) -> bool:
    """Whether `head` starts with the ggml magic (a GGUF file starts ``GGUF`` and is not one)."""
    return len(head) >= 4 and struct.unpack_from("<I", head)[0] == GGML_MAGIC


def parse_header(data: bytes) -> WhisperModelHeader:
    """The hparams of a ggml whisper model from at least its first :data:`HEADER_SIZE` bytes."""
    if len(data) >= 4 and not looks_like_ggml_whisper(data):
        raise WhisperHeaderError(
            f"not a ggml whisper model: the file starts {bytes(data[:4])!r}, a ggml model starts "
            f"{struct.pack('<I', GGML_MAGIC)!r} (magic 0x{GGML_MAGIC:08x})"
        )
    if len(data) < HEADER_SIZE:
        raise WhisperHeaderError(
            f"truncated ggml whisper header: {len(data)} bytes, the magic and hparams take {HEADER_SIZE}"
        )
    _magic, *hparams = _HEADER.unpack_from(data)
    header = WhisperModelHeader(*hparams)
    if min(hparams[:10]) <= 0:
        raise WhisperHeaderError(f"ggml whisper header with a non-positive size: {header}")
    return header


def read_header(path: str | Path) -> WhisperModelHeader:
    """The hparams of a ggml whisper model file, reading only its first :data:`HEADER_SIZE` bytes."""
    with open(path, "rb") as stream:
        return parse_header(stream.read(HEADER_SIZE))
