"""piper TTS's HTTP server (``python -m piper.http_server`` of ``piper-tts[http]``): spec, flags, rules.

Field names are the server's long flags in snake_case. The pinned piper-tts (1.8.0) listens on
``0.0.0.0`` unless told (gpubox always renders ``--host``), has no authentication (it stays on
loopback), answers ``POST /synthesize`` (``Content-Type: application/json``, ``{"text": ...}``) with
a WAV, ``GET /info`` with the voice once it is loaded, and runs on a GPU with ``--cuda``
(onnxruntime-gpu's CUDA provider). Its voice is an ``.onnx`` file with its ``.onnx.json`` beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from gpubox import vram as planner
from gpubox.piper_install import HELP_NAME
from gpubox.servers.base import Flag, Service, model_path
from gpubox.servers.registry import register_server_type
from gpubox.spec import ModelFile, Spec, Violation

PROGRAM = "bin/python3"
QUICK_BROWN_FOX = "The quick brown fox jumps over the lazy dog."


PIPER_SERVER_FLAGS: tuple[Flag, ...] = (
    Flag("voice", "--model", ("-m",), render=model_path),
    Flag("speaker", "--speaker", ("-s",)),
    Flag("length_scale", "--length-scale", ("--length_scale",)),
    Flag("noise_scale", "--noise-scale", ("--noise_scale",)),
    Flag("noise_w_scale", "--noise-w-scale", ("--noise_w_scale", "--noise-w", "--noise_w")),
    Flag("sentence_silence", "--sentence-silence", ("--sentence_silence",)),
    Flag("cuda", "--cuda", style="switch"),
    Flag("host", "--host"),
    Flag("port", "--port"),
)


class SpeechSmoke(Spec):
    """What a freshly restarted piper service must do: speak a sentence as a WAV of plausible length."""

    text: str = Field(
        default=QUICK_BROWN_FOX,
        min_length=1,
        max_length=2000,
        description="The sentence it speaks; with a whisper-server's smoke test too, the box's first whisper-server "
        "must hear it back (the round trip).",
    )
    timeout_s: float = Field(
        default=120, gt=0, description="Seconds to wait for the server to be ready, and for the speech."
    )


class PiperServer(Service):
    """One piper HTTP server systemd service: text to speech (``POST /synthesize``)."""

    PROGRAM: ClassVar[str] = PROGRAM
    PROGRAM_ARGS: ClassVar[tuple[str, ...]] = ("-m", "piper.http_server")
    FLAGS: ClassVar[tuple[Flag, ...]] = PIPER_SERVER_FLAGS
    INSTALL: ClassVar[str | None] = "piper"
    INSTALL_EXAMPLE: ClassVar[str] = "piper=PiperInstall(version='1.8.0')"
    PINNED: ClassVar[str] = "piper version"
    CPU_SETTING: ClassVar[str] = "cuda=False"
    READY_PATH: ClassVar[str] = "/info"
    """piper has no /health: /info answers once the voice is loaded."""
    SMOKE_KIND: ClassVar[str] = "speak"

    type: Literal["piper"] = Field(default="piper", description="The server type, which tells a box's services apart.")
    user: str = Field(
        default="piper", description="The dedicated system account the unit runs as (not root); the deploy creates it."
    )
    port: int = Field(default=5000, ge=1, le=65535, description="The port it listens on; unique per box.")
    voice: ModelFile = Field(
        description="The voice, an `.onnx` file (`format='onnx'`, refused otherwise); its file name without "
        "`.onnx` is the voice's name (`en_US-joe-medium`)."
    )
    voice_config: ModelFile = Field(
        description="The voice's config (`format='json'`), where piper reads it: the voice's path and `.json`; "
        "refused elsewhere. No flag renders it."
    )
    speaker: int | None = Field(
        default=None, ge=0, description="The speaker of a multi-speaker voice; None leaves it to piper."
    )
    length_scale: float | None = Field(
        default=None, gt=0, description="Phoneme length: above 1 speaks slower, below 1 faster."
    )
    noise_scale: float | None = Field(default=None, ge=0, description="Generator noise: how much the voice varies.")
    noise_w_scale: float | None = Field(
        default=None, ge=0, description="Phoneme width noise: how much the timing varies."
    )
    sentence_silence: float | None = Field(
        default=None, ge=0, description="Seconds of silence after each sentence."
    )
    cuda: bool = Field(
        default=False,
        description="Run the voice on the service's GPU (onnxruntime-gpu: the piper install gets a CUDA "
        "virtualenv); set when `gpus` is, unless given. Refused without `gpus`, and `gpus` are refused without it.",
    )
    smoke: SpeechSmoke | None = Field(
        default=None,
        description="What the server must do after a restart, or the deploy rolls back; None: no smoke test.",
    )

    def help_file(self, prefix: str) -> str:
        return f"{prefix}/current/{HELP_NAME}"

    @property
    def voice_name(self) -> str:
        """The voice as piper names it: its file name without ``.onnx`` (``en_US-joe-medium``)."""
        return self.voice.path.rsplit("/", 1)[-1].removesuffix(".onnx")

    @property
    def server_name(self) -> str:
        """``piper``: its program is the install's bin/python3, running ``-m piper.http_server``."""
        return "piper"

    def description_details(self) -> list[str]:
        return [f"voice {self.voice_name}"]

    @property
    def gpu_work(self) -> bool:
        return self.cuda

    @property
    def smoke_tested(self) -> bool:
        return self.smoke is not None

    def vram_gpus(self) -> tuple[int, ...]:
        """The one GPU its ONNX session runs on: the first pinned."""
        return self.placement[:1]

    def vram(self, inputs: planner.VramInputs, where: str) -> planner.ServiceVram:
        """Its voice (the file's size when known), onnxruntime's arena, the CUDA context."""
        return planner.ServiceVram(per_gpu=planner.piper_terms(inputs.model_sizes.get(self.voice.path)))

    def summary(self) -> str:
        return "CUDA" if self.placement else "CPU"

    @model_validator(mode="before")
    @classmethod
    def _cuda_follows_gpus(cls, data: Any) -> Any:
        """A piper service with GPUs runs on them unless ``cuda`` says otherwise."""
        if isinstance(data, dict) and "cuda" not in data and data.get("gpus"):
            return {**data, "cuda": True}
        return data


def voice_is_onnx(server: PiperServer) -> Iterator[Violation]:
    """A piper voice is an ONNX model with its JSON config beside it, where piper looks for it."""
    if server.voice.format != "onnx":
        yield (("voice", "format"), "a piper voice is an .onnx file: set format='onnx'", server.voice.format)
    if server.voice_config.format != "json":
        yield (
            ("voice_config", "format"),
            "a piper voice's config is its .onnx.json: set format='json'",
            server.voice_config.format,
        )
    expected = f"{server.voice.path}.json"
    if server.voice_config.path != expected:
        yield (
            ("voice_config", "path"),
            f"piper reads the voice's config from {expected} (the voice's path + '.json'): place it there",
            server.voice_config.path,
        )


def cuda_needs_gpus(server: PiperServer) -> Iterator[Violation]:
    """``--cuda`` runs on the service's pinned GPU; pinned GPUs without it are reserved for nothing."""
    if server.cuda and not server.gpus:
        yield (("cuda",), "cuda=True runs the voice on a GPU: pin one with gpus=(N,), or set cuda=False", True)
    if server.gpus and not server.cuda:
        yield (
            ("gpus",),
            f"gpus={list(server.gpus)} pins GPUs, but cuda=False runs on the CPU: remove gpus, or set cuda=True",
            list(server.gpus),
        )


PiperServer.RULES = (voice_is_onnx, cuda_needs_gpus)

register_server_type(PiperServer)
