"""The server types gpubox runs, one module each, beside what they share (`base`)."""

from gpubox.servers.base import Flag, Service
from gpubox.servers.llama import LlamaServer

__all__ = ["Flag", "LlamaServer", "Service"]
