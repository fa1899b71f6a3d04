"""The server types gpubox runs, one module each, beside what they share (`base`)."""

from gpubox.servers.base import Flag, Service
from gpubox.servers.llama import LlamaServer
from gpubox.servers.piper import PiperServer, SpeechSmoke
from gpubox.servers.whisper import TranscriptionSmoke, WhisperServer

__all__ = ["Flag", "LlamaServer", "PiperServer", "Service", "SpeechSmoke", "TranscriptionSmoke", "WhisperServer"]
