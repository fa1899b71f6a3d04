"""whisper.cpp's ``whisper-server``: its spec, its flag table and its rules.

Field names are whisper-server's long flags in snake_case. The pinned whisper-server
(f24588a272ae) exits 0 on an unknown flag, and when ``--convert`` finds no ffmpeg: its exit status
says nothing, so the deploy checks every flag against the binary's saved ``--help`` before the unit
is written, and the unit restarts it whatever the status (``Restart=always``). It has ``/health``
(measured: it refuses connections until the model is loaded, then answers 200; a 503 only while
``POST /load`` swaps models) and no ``/metrics``, and no authentication: it stays on loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from gpubox.servers.base import Flag, Service, model_path
from gpubox.spec import ModelFile, Spec, Violation

PROGRAM = "whisper-server"
# samples/jfk.wav of the whisper.cpp source tree: 11 s of JFK's inaugural address.
JFK_SAMPLE = "samples/jfk.wav"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
)


WHISPER_SERVER_FLAGS: tuple[Flag, ...] = (
    Flag("model", "--model", ("-m",), render=model_path),
    Flag("threads", "--threads", ("-t",)),
    Flag("processors", "--processors", ("-p",)),
    Flag("language", "--language", ("-l",)),
    Flag("flash_attn", "--flash-attn", ("-fa", "-nfa"), style="toggle", negative="--no-flash-attn"),
    Flag("no_gpu", "--no-gpu", ("-ng",), style="switch"),
    Flag("device", "--device", ("-dev",)),
    Flag("convert", "--convert", style="switch"),
    Flag("tmp_dir", "--tmp-dir"),
    Flag("host", "--host"),
    Flag("port", "--port"),
)


class TranscriptionSmoke(Spec):
    """What a freshly restarted whisper-server must do: transcribe a WAV well enough, fast enough.

    + audio: a WAV on the host; None: ``samples/jfk.wav`` of the whisper.cpp build's source tree
    + expected_text: what is said in it
    + max_word_error_rate: words substituted, dropped or added, over the expected words
    + max_real_time_factor: request seconds over audio seconds (below 1: faster than real time)
    """

    audio: str | None = None
    expected_text: str = JFK_TEXT
    max_word_error_rate: float = Field(default=0.2, ge=0, le=1)
    max_real_time_factor: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=300, gt=0)


class WhisperServer(Service):
    """One whisper-server systemd service: speech to text over HTTP (``POST /inference``)."""

    PROGRAM: ClassVar[str] = PROGRAM
    FLAGS: ClassVar[tuple[Flag, ...]] = WHISPER_SERVER_FLAGS

    type: Literal["whisper-server"] = "whisper-server"
    user: str = "whisper"
    port: int = Field(default=8090, ge=1, le=65535)
    model: ModelFile
    threads: int | None = Field(default=None, ge=1, le=512)
    processors: int | None = Field(default=None, ge=1, le=64)
    language: str = Field(default="en", pattern=r"^([a-z]{2,3}|auto)$")
    flash_attn: bool = Field(default=True, description="whisper-server's default; always rendered")
    no_gpu: bool = False
    device: int | None = Field(
        default=None,
        ge=0,
        description="the CUDA device among the service's own GPUs: the unit pins them by UUID, so the "
        "first pinned GPU is device 0 whatever its nvidia-smi index",
    )
    convert: bool = Field(default=False, description="convert uploads with ffmpeg (needs ffmpeg on the host)")
    tmp_dir: str | None = Field(
        default=None,
        description="where --convert writes ffmpeg's files; its default is the working directory, which the "
        "unit's read-only file system refuses: with convert it is the unit's private /tmp",
    )
    smoke: TranscriptionSmoke | None = None

    @model_validator(mode="before")
    @classmethod
    def _convert_writes_to_tmp(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("convert") and data.get("tmp_dir") is None:
            return {**data, "tmp_dir": "/tmp"}
        return data

    def host_programs(self) -> list[str]:
        return ["ffmpeg"] if self.convert else []


def model_is_ggml_whisper(server: WhisperServer) -> Iterator[Violation]:
    """whisper-server loads ggml whisper models, not GGUFs."""
    if server.model.format != "ggml-whisper":
        yield (
            ("model", "format"),
            f"whisper-server loads a ggml whisper model (ggml-*.bin), not a {server.model.format!r} file: set "
            f"format='ggml-whisper' for a whisper model",
            server.model.format,
        )


def no_gpu_means_no_gpus(server: WhisperServer) -> Iterator[Violation]:
    """``no_gpu`` with pinned GPUs: the GPUs are reserved (and budgeted) for nothing."""
    if server.no_gpu and server.gpus:
        yield (
            ("no_gpu",),
            f"no_gpu=True runs on the CPU, but gpus={list(server.gpus)} pins GPUs for it: remove gpus, "
            f"or no_gpu to run on them",
            True,
        )


def device_among_pinned_gpus(server: WhisperServer) -> Iterator[Violation]:
    """The pinned GPUs are the only ones the service sees, numbered from 0."""
    if server.device is not None and server.gpus and server.device >= len(server.gpus):
        yield (
            ("device",),
            f"device={server.device}, but the service sees only its {len(server.gpus)} pinned GPU(s), numbered "
            f"from 0 (gpus={list(server.gpus)}): use device=0 (or leave it unset) and choose the GPU with gpus",
            server.device,
        )
    if server.device is not None and server.no_gpu:
        yield (("device",), "device picks a GPU, but no_gpu=True runs on the CPU: remove one", server.device)


def tmp_dir_is_for_convert(server: WhisperServer) -> Iterator[Violation]:
    """``tmp_dir`` holds ffmpeg's files, written only with ``convert``."""
    if server.tmp_dir is not None and not server.convert:
        yield (("tmp_dir",), "tmp_dir is where --convert writes: remove it, or set convert=True", server.tmp_dir)


def english_only_model_speaks_english(server: WhisperServer) -> Iterator[Violation]:
    """An English-only model (``tiny.en``) transcribes English only."""
    size = server.model.whisper_size
    if size is not None and size.english_only and server.language != "en":
        yield (
            ("language",),
            f"model {str(size)!r} is English-only: set language='en', or use a multilingual model "
            f"(architecture {size.size!r}) for language={server.language!r}",
            server.language,
        )


WhisperServer.RULES = (
    model_is_ggml_whisper,
    no_gpu_means_no_gpus,
    device_among_pinned_gpus,
    english_only_model_speaks_english,
    tmp_dir_is_for_convert,
)
