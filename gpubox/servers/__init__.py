"""The server types gpubox runs, one module each, beside what they share (`base`)."""

from gpubox.servers.base import Flag, Scrape, Service
from gpubox.servers.llama import LlamaServer
from gpubox.servers.piper import PiperServer, SpeechSmoke
from gpubox.servers.registry import register_server_type, server_types
from gpubox.servers.rpc import RpcRef, RpcServer
from gpubox.servers.whisper import TranscriptionSmoke, WhisperServer

__all__ = [
    "Flag",
    "LlamaServer",
    "PiperServer",
    "RpcRef",
    "RpcServer",
    "Scrape",
    "Service",
    "SpeechSmoke",
    "TranscriptionSmoke",
    "WhisperServer",
    "register_server_type",
    "server_types",
]
