"""NVIDIA GPUs of a host, from ``nvidia-smi``'s CSV queries.

pyinfra @host fact facts.gpu.NvidiaGpus
"""

from __future__ import annotations

from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox.gpu import (
    ComputeApp,
    Gpu,
    NvidiaSmiError,
    compute_apps_probe_command,
    gpu_probe_command,
    parse_compute_apps_probe,
    parse_gpu_probe,
)


class NvidiaGpus(FactBase[list[Gpu]]):
    """
    The host's NVIDIA GPUs as ``gpubox.gpu.Gpu`` records; ``[]`` when it has no ``nvidia-smi``.

    When ``nvidia-smi`` is there but fails (the driver is not loaded), the fact fails with
    nvidia-smi's message rather than returning ``[]``, which would read as "no GPUs".
    """

    @override
    @staticmethod
    def default() -> list[Gpu]:
        return []

    @override
    def command(self) -> str:
        return gpu_probe_command()

    @override
    def process(self, output: list[str]) -> list[Gpu]:
        try:
            return parse_gpu_probe(output)
        except NvidiaSmiError as error:
            raise FactProcessError(str(error)) from error


class NvidiaComputeApps(FactBase[list[ComputeApp]]):
    """
    Processes holding GPU memory, with the GPU (uuid) and MiB each holds; ``[]`` without nvidia-smi.
    """

    @override
    @staticmethod
    def default() -> list[ComputeApp]:
        return []

    @override
    def command(self) -> str:
        return compute_apps_probe_command()

    @override
    def process(self, output: list[str]) -> list[ComputeApp]:
        try:
            return parse_compute_apps_probe(output)
        except NvidiaSmiError as error:
            raise FactProcessError(str(error)) from error
