"""The local machine's NVIDIA GPUs through NVML (``pynvml`` from ``nvidia-ml-py``).

NVML also gives what nvidia-smi's CSV query does not: the memory bus width and the maximum
memory clock, hence each GPU's peak memory bandwidth, which bounds llama.cpp's decode speed.
"""

from __future__ import annotations

from typing import Any

import pynvml

from gpubox.gpu import Gpu

MIB = 1024 * 1024

# nvmlInit fails with these on a machine without the NVIDIA driver: no GPUs, not an error.
_NO_DRIVER_ERRORS = frozenset({pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED})


class NvmlGpu(Gpu):
    memory_bus_width_bits: int
    max_memory_clock_mhz: int

    @property
    def peak_memory_bandwidth_bytes_per_s(self) -> float:
        return peak_memory_bandwidth(self.memory_bus_width_bits, self.max_memory_clock_mhz)


def peak_memory_bandwidth(bus_width_bits: int, max_memory_clock_mhz: int) -> float:
    """Peak memory bandwidth in bytes/s: bus bytes per transfer x clock x 2 (double data rate).

    An H200 (6016-bit HBM3e bus, 3201 MHz) gives 752 B x 3.201e9 x 2 = 4.81e12 B/s, its 4.8 TB/s.
    """
    return bus_width_bits / 8 * max_memory_clock_mhz * 1e6 * 2


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _used_and_free_bytes(nvml: Any, handle: Any) -> tuple[int, int, int]:
    """Total, used and free memory as nvidia-smi reports them.

    NVML's v1 memory info counts the driver's reserved memory as used (615 MiB on an idle H200,
    where nvidia-smi says 0 MiB); the v2 call reports it apart, so prefer it.
    """
    try:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle, nvml.nvmlMemory_v2)
    except (AttributeError, nvml.NVMLError):
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(memory.total), int(memory.used), int(memory.free)


def gpu_from_nvml(nvml: Any, index: int, driver_version: str) -> NvmlGpu:
    """Read one GPU's record; ``nvml`` is the ``pynvml`` module (or an object shaped like it)."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    total, used, free = _used_and_free_bytes(nvml, handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return NvmlGpu(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        driver_version=driver_version,
        memory_total_mib=total // MIB,
        memory_used_mib=used // MIB,
        memory_free_mib=free // MIB,
        compute_capability=f"{major}.{minor}",
        memory_bus_width_bits=int(nvml.nvmlDeviceGetMemoryBusWidth(handle)),
        max_memory_clock_mhz=int(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM)),
    )


def gpus_from_nvml(nvml: Any) -> list[NvmlGpu]:
    """All GPUs of an initialised NVML."""
    driver_version = _text(nvml.nvmlSystemGetDriverVersion())
    return [gpu_from_nvml(nvml, index, driver_version) for index in range(nvml.nvmlDeviceGetCount())]


def local_gpus() -> list[NvmlGpu]:
    """This machine's GPUs; ``[]`` when NVML cannot start because there is no NVIDIA driver.

    Any other NVML failure (e.g. a driver/library version mismatch) raises ``pynvml.NVMLError``.
    """
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        if error.value in _NO_DRIVER_ERRORS:
            return []
        raise
    try:
        return gpus_from_nvml(pynvml)
    finally:
        pynvml.nvmlShutdown()
