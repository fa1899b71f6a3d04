"""The rule ".en means English-only", parsed once (ModelFile.whisper_size): the rule, the planner, placement."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpubox.models import ModelFormatError, check_head
from gpubox.servers.whisper import WhisperServer
from gpubox.spec import ModelFile, WhisperSize
from gpubox.vram import speech_terms

SHA = "b" * 64
FIXTURES = Path(__file__).parent / "fixtures" / "whisper"


def whisper_model(architecture: str | None) -> ModelFile:
    return ModelFile(path="/srv/w.bin", sha256=SHA, format="ggml-whisper", architecture=architecture)


@pytest.mark.parametrize(
    ("architecture", "size", "english_only"),
    [("tiny.en", "tiny", True), ("large", "large", False), ("base.en", "base", True), ("medium", "medium", False)],
)
def test_an_architecture_string_is_one_typed_value(architecture: str, size: str, english_only: bool) -> None:
    parsed = whisper_model(architecture).whisper_size
    assert parsed == WhisperSize(size, english_only)
    assert str(parsed) == architecture


def test_no_size_for_other_formats_or_an_undeclared_one() -> None:
    assert whisper_model(None).whisper_size is None
    assert ModelFile(path="/srv/m.gguf", sha256=SHA, architecture="llama").whisper_size is None


def test_an_unknown_size_is_refused_naming_the_sizes() -> None:
    with pytest.raises(ValueError, match="one of tiny, base, small, medium, large"):
        whisper_model("huge.en")


def test_every_reader_agrees_on_english_only() -> None:
    """The language rule, the planner and the placed file's check all read the one parsed value."""
    with pytest.raises(ValueError, match="English-only"):
        WhisperServer(name="w", model=whisper_model("tiny.en"), language="de", port=8090)
    WhisperServer(name="w", model=whisper_model("tiny"), language="de", port=8090)  # multilingual: fine
    tiny_en = speech_terms(WhisperServer(name="w", model=whisper_model("tiny.en"), port=8090))
    tiny = speech_terms(WhisperServer(name="w", model=whisper_model("tiny"), port=8090))
    assert tiny_en == tiny  # English-only is the same size on the GPU


def test_placement_names_the_size_it_found() -> None:
    head = (FIXTURES / "ggml-tiny.en.head.bin").read_bytes()  # a real tiny.en head (converted from CTranslate2)
    with pytest.raises(ModelFormatError, match=r"is a whisper tiny\.en model, not base\.en: .*architecture='tiny\.en'"):
        check_head("ggml-whisper", "base.en", head, "/srv/w.bin")
    with pytest.raises(ModelFormatError, match=r"is a whisper tiny\.en model, not tiny:"):
        check_head("ggml-whisper", "tiny", head, "/srv/w.bin")
    check_head("ggml-whisper", "tiny.en", head, "/srv/w.bin")
