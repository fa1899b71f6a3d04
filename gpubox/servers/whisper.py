"""whisper.cpp's ``whisper-server``: its spec, its flag table and its rules.

Field names are whisper-server's long flags in snake_case. The pinned whisper-server
(f24588a272ae) exits 0 on an unknown flag, and when ``--convert`` finds no ffmpeg: its exit status
says nothing, so the deploy checks every flag against the binary's saved ``--help`` before the unit
is written, and the unit restarts it whatever the status (``Restart=always``). It has ``/health``
(measured: it refuses connections until the model is loaded, then answers 200; a 503 only while
``POST /load`` swaps models) and no ``/metrics``, and no authentication: it stays on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from gpubox import vram as planner
from gpubox.models import whisper_size_mismatch, whisper_size_of
from gpubox.servers.base import Flag, Service, model_path
from gpubox.servers.registry import register_server_type
from gpubox.spec import ModelFile, Problem, Spec, Violation

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
    """What a freshly restarted whisper-server must do: transcribe a WAV well enough, fast enough."""

    audio: str | None = Field(
        default=None,
        description="A WAV on the host to transcribe; None: `samples/jfk.wav` of the whisper.cpp build's source "
        "tree.",
    )
    expected_text: str = Field(default=JFK_TEXT, description="What is said in `audio`.")
    max_word_error_rate: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="The most words substituted, dropped or added, over the expected words.",
    )
    max_real_time_factor: float = Field(
        default=1.0,
        gt=0,
        description="The most request seconds per second of audio, upload included (below 1: faster than real "
        "time).",
    )
    timeout_s: float = Field(
        default=300, gt=0, description="Seconds to wait for the server to be ready, and for the transcription."
    )


class WhisperServer(Service):
    """One whisper-server systemd service: speech to text over HTTP (``POST /inference``)."""

    PROGRAM: ClassVar[str] = PROGRAM
    FLAGS: ClassVar[tuple[Flag, ...]] = WHISPER_SERVER_FLAGS
    INSTALL: ClassVar[str | None] = "whisper_cpp"
    INSTALL_EXAMPLE: ClassVar[str] = "whisper_cpp=WhisperCppBuild(commit=...)"
    PINNED: ClassVar[str] = "whisper.cpp commit"
    CPU_SETTING: ClassVar[str] = "no_gpu=True"
    SMOKE_KIND: ClassVar[str] = "transcribe"

    type: Literal["whisper-server"] = Field(
        default="whisper-server", description="The server type, which tells a box's services apart."
    )
    user: str = Field(
        default="whisper",
        description="The dedicated system account the unit runs as (not root); the deploy creates it.",
    )
    port: int = Field(default=8090, ge=1, le=65535, description="The port it listens on; unique per box.")
    model: ModelFile = Field(
        description="The ggml whisper model it serves (`format='ggml-whisper'`, refused otherwise); its "
        "`architecture`, the model's size, sizes its VRAM plan."
    )
    threads: int | None = Field(
        default=None, ge=1, le=512, description="CPU threads per request; None leaves it to whisper-server."
    )
    processors: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Processors that share one request's audio, each transcribing a part; None leaves it to "
        "whisper-server.",
    )
    language: str = Field(
        default="en",
        pattern=r"^([a-z]{2,3}|auto)$",
        description="The spoken language, a 2- or 3-letter code, or `auto` to detect it; with an English-only "
        "model (`tiny.en`) any but `en` is refused.",
    )
    flash_attn: bool = Field(default=True, description="Flash attention; always rendered.")
    no_gpu: bool = Field(
        default=False,
        description="Run on the CPU (a box with `expected_gpus` refuses a whisper-server with neither `gpus` nor "
        "this); refused with pinned `gpus`, which would be reserved for nothing.",
    )
    device: int | None = Field(
        default=None,
        ge=0,
        description="The CUDA device among the service's own GPUs: the unit pins them by UUID, so the first "
        "pinned GPU is device 0 whatever its nvidia-smi index. Refused beyond the pinned GPUs, and with `no_gpu`.",
    )
    convert: bool = Field(
        default=False,
        description="Convert uploads to WAV with ffmpeg (needs ffmpeg on the host); `tmp_dir` is then the unit's "
        "private /tmp unless set.",
    )
    tmp_dir: str | None = Field(
        default=None,
        description="Where `convert` writes ffmpeg's files; whisper-server's default, the working directory, is "
        "read-only in the unit. Refused without `convert`.",
    )
    smoke: TranscriptionSmoke | None = Field(
        default=None,
        description="What the server must do after a restart, or the deploy rolls back; None: no smoke test. With "
        "a piper service's smoke test too, the box's first whisper-server transcribes what its first piper says.",
    )

    @model_validator(mode="before")
    @classmethod
    def _convert_writes_to_tmp(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("convert") and data.get("tmp_dir") is None:
            return {**data, "tmp_dir": "/tmp"}
        return data

    def host_programs(self) -> list[str]:
        return ["ffmpeg"] if self.convert else []

    def ready(self, status: int, body: str) -> bool:
        """``/health`` answers 200 ``{"status": "ok"}`` once the model is loaded."""
        try:
            answer = json.loads(body)
        except ValueError:
            return False
        return status == 200 and isinstance(answer, dict) and answer.get("status") == "ok"

    @property
    def smoke_tested(self) -> bool:
        return self.smoke is not None

    def smoke_audio(self, prefix: str | None) -> str | None:
        """Its smoke's ``audio``, else the sample in its whisper.cpp source tree (``{prefix}/src``)."""
        if self.smoke is None:
            return None
        if self.smoke.audio is not None:
            return self.smoke.audio
        return f"{prefix}/src/{JFK_SAMPLE}" if prefix is not None else None

    @property
    def gpu_work(self) -> bool:
        return not self.no_gpu

    def vram_gpus(self) -> tuple[int, ...]:
        """The one GPU it loads on: ``device`` among its pinned GPUs (the first by default)."""
        return self.placement[self.device or 0 :][:1]

    def vram(self, inputs: planner.VramInputs, where: str) -> planner.ServiceVram:
        """Its model (the file's size when known), whisper.cpp's state for its declared size, the CUDA context;
        refused at ``model.architecture`` when the model's header (read from its source) says another size."""
        header = inputs.whisper_headers.get(self.model.path)
        if self.model.architecture is None:
            found = whisper_size_of(header) if header is not None else None
            value = f"={str(found)!r}, its header's size," if found is not None else " (tiny, base, ...)"
            return planner.ServiceVram(problems=(f"{self.name}: set model.architecture{value} to plan its VRAM",))
        mismatch = (
            whisper_size_mismatch(self.model.architecture, header, f"model source {self.model.source}")
            if header is not None
            else None
        )
        field = f"{where}.model.architecture" if where else "model.architecture"
        refused = (Problem(field=field, message=mismatch),) if mismatch is not None else ()
        size = inputs.model_sizes.get(self.model.path)
        return planner.ServiceVram(per_gpu=planner.whisper_terms(self.model.whisper_size, size), refused=refused)

    def summary(self) -> str:
        where = f"device {self.device or 0}" if self.placement else "CPU"
        return f"language {self.language}, {where}, FA {'on' if self.flash_attn else 'off'}"


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

register_server_type(WhisperServer)
