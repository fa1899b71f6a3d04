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

from gpubox.servers.base import Flag, Service, model_path
from gpubox.spec import ModelFile, Spec, Violation

PROGRAM = "bin/python3"
HELP_NAME = "piper.http_server.help"
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

    text: str = Field(default=QUICK_BROWN_FOX, min_length=1, max_length=2000)
    timeout_s: float = Field(default=120, gt=0)


class PiperServer(Service):
    """One piper HTTP server systemd service: text to speech (``POST /synthesize``)."""

    PROGRAM: ClassVar[str] = PROGRAM
    PROGRAM_ARGS: ClassVar[tuple[str, ...]] = ("-m", "piper.http_server")
    FLAGS: ClassVar[tuple[Flag, ...]] = PIPER_SERVER_FLAGS

    type: Literal["piper"] = "piper"
    user: str = "piper"
    port: int = Field(default=5000, ge=1, le=65535)
    voice: ModelFile
    voice_config: ModelFile
    speaker: int | None = Field(default=None, ge=0)
    length_scale: float | None = Field(default=None, gt=0)
    noise_scale: float | None = Field(default=None, ge=0)
    noise_w_scale: float | None = Field(default=None, ge=0)
    sentence_silence: float | None = Field(default=None, ge=0)
    cuda: bool = Field(
        default=False, description="run the voice on the service's GPU (onnxruntime-gpu); set when gpus is"
    )
    smoke: SpeechSmoke | None = None

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
