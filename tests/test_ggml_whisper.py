from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest

from gpubox import ggml_whisper
from gpubox.ggml_whisper import (
    GGML_MAGIC,
    HEADER_SIZE,
    WhisperHeaderError,
    WhisperModelHeader,
    looks_like_ggml_whisper,
    parse_header,
    read_header,
)
from tests.testbed.random_whisper import WHISPER_DIMS, header_bytes

FIXTURES = Path(__file__).parent / "fixtures" / "whisper"
# The first 64 bytes of tests/testbed/whisper_assets.whisper_tiny_en_ggml() (converted from CTranslate2)
CONVERTED_TINY_EN = (FIXTURES / "ggml-tiny.en.head.bin").read_bytes()
# The first 64 bytes of models/for-tests-ggml-tiny.en.bin of whisper.cpp f24588a
FOR_TESTS_TINY_EN = (FIXTURES / "for-tests-ggml-tiny.en.head.bin").read_bytes()

TINY_EN = WhisperModelHeader(
    n_vocab=51864, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
    n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4, n_mels=80, ftype=1,
)  # fmt: skip


def _header(**changes: int) -> bytes:
    fields = {**TINY_EN.__dict__, **changes}
    return struct.pack("<I11i", GGML_MAGIC, *fields.values())


@pytest.mark.parametrize("head", [CONVERTED_TINY_EN, FOR_TESTS_TINY_EN], ids=["converted", "for-tests"])
def test_real_tiny_en_heads(head: bytes) -> None:
    assert len(head) == 64
    assert head[:4] == b"lmgg"
    header = parse_header(head)
    assert header == TINY_EN
    assert header.model_type == "tiny"
    assert header.english_only is True
    assert looks_like_ggml_whisper(head)
    # The mel filters follow the hparams: n_mel, n_fft (what the converter wrote after them).
    assert struct.unpack_from("<2i", head, HEADER_SIZE) == (80, 201)


def test_exactly_the_header_is_enough() -> None:
    assert parse_header(CONVERTED_TINY_EN[:HEADER_SIZE]) == TINY_EN


def test_fields_are_in_file_order() -> None:
    header = parse_header(struct.pack("<I11i", GGML_MAGIC, *range(1, 12)))
    assert [header.n_vocab, header.n_audio_ctx, header.n_audio_state, header.n_audio_head] == [1, 2, 3, 4]
    assert [header.n_audio_layer, header.n_text_ctx, header.n_text_state, header.n_text_head] == [5, 6, 7, 8]
    assert [header.n_text_layer, header.n_mels, header.ftype] == [9, 10, 11]


@pytest.mark.parametrize(
    ("layers", "vocab", "model_type", "english"),
    [(4, 51864, "tiny", True), (6, 51865, "base", False), (12, 51864, "small", True),
     (24, 51865, "medium", False), (32, 51866, "large", False), (5, 51865, "unknown", False)],
)  # fmt: skip
def test_model_type_and_language(layers: int, vocab: int, model_type: str, english: bool) -> None:
    header = parse_header(_header(n_audio_layer=layers, n_vocab=vocab))
    assert header.model_type == model_type
    assert header.english_only is english


def test_quantized_ftype_is_kept_as_stored() -> None:
    assert parse_header(_header(ftype=2008)).ftype == 2008  # q5_0 with quantization version 2


def test_wrong_magic() -> None:
    gguf = b"GGUF" + CONVERTED_TINY_EN[4:]
    assert not looks_like_ggml_whisper(gguf)
    with pytest.raises(WhisperHeaderError, match=r"not a ggml whisper model.*b'GGUF'"):
        parse_header(gguf)
    big_endian = struct.pack(">I", GGML_MAGIC) + CONVERTED_TINY_EN[4:]
    with pytest.raises(WhisperHeaderError, match="not a ggml whisper model"):
        parse_header(big_endian)


@pytest.mark.parametrize("size", [0, 3, 4, 20, HEADER_SIZE - 1])
def test_truncated(size: int) -> None:
    head = CONVERTED_TINY_EN[:size]
    with pytest.raises(WhisperHeaderError, match=f"truncated ggml whisper header: {size} bytes"):
        parse_header(head)
    assert looks_like_ggml_whisper(head) is (size >= 4)


def test_nonsense_sizes_are_refused() -> None:
    with pytest.raises(WhisperHeaderError, match="non-positive"):
        parse_header(_header(n_audio_layer=0))


def test_error_is_a_value_error() -> None:
    assert issubclass(WhisperHeaderError, ValueError)
    with pytest.raises(ValueError):
        parse_header(b"")


@pytest.mark.parametrize(
    ("checkpoint", "size"),
    [("tiny.en", "tiny"), ("tiny", "tiny"), ("base", "base"), ("small", "small"), ("medium", "medium"),
     ("large-v2", "large"), ("large-v3", "large"), ("large-v3-turbo", "large-v3-turbo")],
)  # fmt: skip
def test_each_checkpoint_is_its_size_by_its_shape(checkpoint: str, size: str) -> None:
    """openai-whisper's real dimensions: large-v3-turbo is told from large-v3 by its 4 decoder layers alone."""
    header = parse_header(header_bytes(WHISPER_DIMS[checkpoint]))
    assert header.size == size
    assert header.model_type == size.removesuffix("-v3-turbo")  # whisper.cpp calls the turbo `large`


def test_a_shape_of_no_known_checkpoint_is_named_as_whisper_cpp_names_it() -> None:
    distil = parse_header(_header(n_audio_layer=32, n_text_layer=2, n_text_state=1280))  # distil-large-v3's
    assert distil.size == "large" and distil.shape == "32 encoder layers, 2 decoder layers of width 1280"
    assert parse_header(_header(n_audio_layer=5)).size == "unknown"


def test_read_header_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ggml-tiny.en.bin"
    path.write_bytes(CONVERTED_TINY_EN + bytes(1 << 20))  # the header, then a MiB standing for the rest
    sizes: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, stream: io.BufferedReader) -> None:
            self.stream = stream

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            self.stream.close()

        def read(self, size: int = -1) -> bytes:
            sizes.append(size)
            return self.stream.read(size)

    monkeypatch.setattr(ggml_whisper, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    assert read_header(path) == TINY_EN
    assert sizes == [HEADER_SIZE]
    with pytest.raises(WhisperHeaderError, match="truncated"):
        (tmp_path / "short.bin").write_bytes(CONVERTED_TINY_EN[:20])
        read_header(tmp_path / "short.bin")
