"""gpubox: typed, declarative pyinfra deploys for GPU boxes that serve LLMs with llama-server."""

from gpubox.box import Box
from gpubox.servers.llama import LlamaServer
from gpubox.spec import ExpectedGpu, LlamaCppBuild, ModelFile, SmokeThresholds

__all__ = ["Box", "ExpectedGpu", "LlamaCppBuild", "LlamaServer", "ModelFile", "SmokeThresholds"]
