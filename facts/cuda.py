"""The CUDA toolkit of a host.

pyinfra @host fact facts.cuda.CudaToolkit
"""

from __future__ import annotations

from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox.cuda import Nvcc, nvcc_probe_command, parse_nvcc_probe


class CudaToolkit(FactBase[Nvcc | None]):
    """
    ``nvcc``'s path and release (``gpubox.cuda.Nvcc``), looking on PATH, then in
    ``/usr/local/cuda/bin`` and ``/opt/cuda/bin`` (Arch); None when there is no nvcc.
    """

    @override
    def command(self) -> str:
        return nvcc_probe_command()

    @override
    def process(self, output: list[str]) -> Nvcc | None:
        try:
            return parse_nvcc_probe(output)
        except ValueError as error:
            raise FactProcessError(str(error)) from error
