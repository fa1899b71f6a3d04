"""The rule ".en means English-only", parsed once (ModelFile.whisper_size): the rule, the planner, placement."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gpubox.ggml_whisper import WHISPER_SHAPES
from gpubox.models import ModelFormatError, check_head
from gpubox.servers.whisper import WhisperServer
from gpubox.spec import WHISPER_SIZES, ModelFile, WhisperSize
from gpubox.vram import MIB, WHISPER_CUDA_CONTEXT_MIB, WHISPER_STATE_MIB, WHISPER_WEIGHTS_MIB, speech_terms
from tests.testbed.random_whisper import WHISPER_DIMS, header_bytes

SHA = "b" * 64
FIXTURES = Path(__file__).parent / "fixtures" / "whisper"


def whisper_model(architecture: str | None) -> ModelFile:
    return ModelFile(path="/srv/w.bin", sha256=SHA, format="ggml-whisper", architecture=architecture)


@pytest.mark.parametrize(
    ("architecture", "size", "english_only"),
    [("tiny.en", "tiny", True), ("large", "large", False), ("base.en", "base", True), ("medium", "medium", False),
     ("large-v3-turbo", "large-v3-turbo", False)],
)  # fmt: skip
def test_an_architecture_string_is_one_typed_value(architecture: str, size: str, english_only: bool) -> None:
    parsed = whisper_model(architecture).whisper_size
    assert parsed == WhisperSize(size, english_only)
    assert str(parsed) == architecture


def test_no_size_for_other_formats_or_an_undeclared_one() -> None:
    assert whisper_model(None).whisper_size is None
    assert ModelFile(path="/srv/m.gguf", sha256=SHA, architecture="llama").whisper_size is None


def test_an_unknown_size_is_refused_naming_the_sizes() -> None:
    with pytest.raises(ValueError, match="one of tiny, base, small, medium, large, large-v3-turbo "):
        whisper_model("huge.en")
    with pytest.raises(ValueError, match="got 'turbo'"):
        whisper_model("turbo")


def test_every_size_has_its_measured_terms() -> None:
    """A size gpubox accepts is one the planner prices and one a header can be (no size without its row)."""
    assert set(WHISPER_SIZES) == set(WHISPER_WEIGHTS_MIB) == set(WHISPER_STATE_MIB) == set(WHISPER_SHAPES.values())


def test_turbo_is_priced_from_its_own_measured_row() -> None:
    """docs/gpu-validation.md: large-v3-turbo logged 1548.7 MiB of weights and 240.5 of state, and a sampled
    request added 30: its terms are those rounded up, not large-v3's (2952 + 761)."""
    turbo = speech_terms(WhisperServer(name="w", model=whisper_model("large-v3-turbo"), port=8090))
    assert turbo == {"weights": 1549 * MIB, "compute": 271 * MIB, "headroom": WHISPER_CUDA_CONTEXT_MIB * MIB}
    assert sum(turbo.values()) == 2489 * MIB
    large = speech_terms(WhisperServer(name="w", model=whisper_model("large"), port=8090))
    assert sum(large.values()) - sum(turbo.values()) == 1893 * MIB


def test_every_reader_agrees_on_english_only() -> None:
    """The language rule, the planner and the placed file's check all read the one parsed value."""
    with pytest.raises(ValueError, match="English-only"):
        WhisperServer(name="w", model=whisper_model("tiny.en"), language="de", port=8090)
    WhisperServer(name="w", model=whisper_model("tiny"), language="de", port=8090)  # multilingual: fine
    WhisperServer(name="w", model=whisper_model("large-v3-turbo"), language="de", port=8090)
    tiny_en = speech_terms(WhisperServer(name="w", model=whisper_model("tiny.en"), port=8090))
    tiny = speech_terms(WhisperServer(name="w", model=whisper_model("tiny"), port=8090))
    assert tiny_en == tiny  # English-only is the same size on the GPU


def test_placement_names_the_size_it_found() -> None:
    head = (FIXTURES / "ggml-tiny.en.head.bin").read_bytes()  # a real tiny.en head (converted from CTranslate2)
    with pytest.raises(ModelFormatError, match=r"is a whisper tiny\.en model \(.*\), not base\.en: .*='tiny\.en'"):
        check_head("ggml-whisper", "base.en", head, "/srv/w.bin")
    with pytest.raises(ModelFormatError, match=r"is a whisper tiny\.en model \(.*\), not tiny:"):
        check_head("ggml-whisper", "tiny", head, "/srv/w.bin")
    check_head("ggml-whisper", "tiny.en", head, "/srv/w.bin")


def test_placement_tells_turbo_from_large() -> None:
    """whisper.cpp names both `large` (by the encoder): the placed file's check reads the decoder depth too."""
    turbo = header_bytes(WHISPER_DIMS["large-v3-turbo"])
    with pytest.raises(ModelFormatError, match=r"is a whisper large-v3-turbo model \(32 encoder layers, 4 decoder "
                       r"layers of width 1280\), not large: .*set architecture='large-v3-turbo'"):  # fmt: skip
        check_head("ggml-whisper", "large", turbo, "/srv/w.bin")
    with pytest.raises(ModelFormatError, match=r"is a whisper large model .*, not large-v3-turbo"):
        check_head("ggml-whisper", "large-v3-turbo", header_bytes(WHISPER_DIMS["large-v3"]), "/srv/w.bin")
    check_head("ggml-whisper", "large-v3-turbo", turbo, "/srv/w.bin")


def test_a_header_of_no_known_size_is_not_offered_as_the_fix() -> None:
    odd = header_bytes(replace(WHISPER_DIMS["tiny"], n_audio_layer=5, n_text_layer=5))
    with pytest.raises(ModelFormatError, match=r"of no size gpubox knows \(5 encoder layers, 5 decoder") as error:
        check_head("ggml-whisper", "tiny", odd, "/srv/w.bin")
    assert "set architecture" not in str(error.value)
