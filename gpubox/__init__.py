"""gpubox: typed, declarative pyinfra deploys for GPU boxes that serve LLMs with llama-server."""

from gpubox.spec import Box, ExpectedGpu, LlamaCppBuild, LlamaServer, ModelFile, SmokeThresholds

__all__ = ["Box", "ExpectedGpu", "LlamaCppBuild", "LlamaServer", "ModelFile", "SmokeThresholds"]
