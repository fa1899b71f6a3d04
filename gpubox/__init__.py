"""gpubox: typed, declarative pyinfra deploys for GPU boxes that serve LLMs with llama-server, and speech."""

from gpubox.box import Box
from gpubox.gateway import BackendRef, Gateway, GatewayTimeouts, ModelGroup
from gpubox.monitoring.spec import Monitoring
from gpubox.servers.base import Flag, Scrape, Service
from gpubox.servers.llama import LlamaServer
from gpubox.servers.piper import PiperServer, SpeechSmoke
from gpubox.servers.registry import register_server_type
from gpubox.servers.rpc import RpcRef, RpcServer
from gpubox.servers.whisper import TranscriptionSmoke, WhisperServer
from gpubox.spec import (
    ExpectedGpu,
    HostMonitoring,
    HuggingFace,
    LlamaCppBuild,
    ModelFile,
    PiperInstall,
    SmokeThresholds,
    WhisperCppBuild,
)

__all__ = [
    "BackendRef",
    "Box",
    "ExpectedGpu",
    "Flag",
    "Gateway",
    "GatewayTimeouts",
    "HostMonitoring",
    "HuggingFace",
    "LlamaCppBuild",
    "LlamaServer",
    "ModelFile",
    "ModelGroup",
    "Monitoring",
    "PiperInstall",
    "PiperServer",
    "RpcRef",
    "RpcServer",
    "Scrape",
    "Service",
    "SmokeThresholds",
    "SpeechSmoke",
    "TranscriptionSmoke",
    "WhisperCppBuild",
    "WhisperServer",
    "register_server_type",
]
