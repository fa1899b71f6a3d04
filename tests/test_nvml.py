import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

from gpubox.nvml import MIB, gpus_from_nvml, local_gpus, peak_memory_bandwidth

NVML_JSON = json.loads((Path(__file__).parent / "fixtures" / "nvidia-smi" / "nvml-h200x2.json").read_text())


def test_h200_peak_bandwidth_is_4_8_tb_per_s() -> None:
    gpu = NVML_JSON["gpus"][0]
    bandwidth = peak_memory_bandwidth(gpu["bus_width"], gpu["max_mem_clock_mhz"])
    assert bandwidth == 6016 / 8 * 3201e6 * 2
    assert 4.8e12 < bandwidth < 4.82e12


def test_local_gpus_without_driver_is_empty() -> None:
    """On a machine without a driver (CI's), NVML fails to load and that reads as no GPUs."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert local_gpus() == []
    else:
        pynvml.nvmlShutdown()
        assert local_gpus(), "NVML initialised, so it must list this machine's GPUs"


class FakeNvml:
    """Only what a real pynvml would return for the captured H200 box (nvml.json); no GPU here."""

    NVMLError = pynvml.NVMLError
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, capture: dict[str, Any]) -> None:
        self.capture = capture

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.capture["driver"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self.capture["gpus"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return dict(self.capture["gpus"][index])

    def nvmlDeviceGetMemoryInfo(self, gpu: dict[str, Any], version: int | None = None) -> SimpleNamespace:
        if version is not None:  # the capture holds v1 numbers only
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(total=gpu["mem_total"], used=gpu["mem_used"], free=gpu["mem_free"])

    def nvmlDeviceGetCudaComputeCapability(self, gpu: dict[str, Any]) -> tuple[int, int]:
        major, minor = gpu["cc"]
        return major, minor

    def nvmlDeviceGetUUID(self, gpu: dict[str, Any]) -> str:
        return str(gpu["uuid"])

    def nvmlDeviceGetName(self, gpu: dict[str, Any]) -> str:
        return str(gpu["name"])

    def nvmlDeviceGetPciInfo(self, gpu: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(busId=gpu["pci_bus_id"].encode())  # a char array: bytes

    def nvmlDeviceGetMemoryBusWidth(self, gpu: dict[str, Any]) -> int:
        return int(gpu["bus_width"])

    def nvmlDeviceGetMaxClockInfo(self, gpu: dict[str, Any], clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_MEM
        return int(gpu["max_mem_clock_mhz"])


def test_records_from_nvml_values() -> None:
    gpus = gpus_from_nvml(FakeNvml(NVML_JSON))
    assert [gpu.index for gpu in gpus] == [0, 1]
    gpu = gpus[1]
    assert gpu.uuid == "GPU-b24f7cae-ff51-0892-ffe1-3246cfca6f01"
    assert gpu.name == "NVIDIA H200"
    assert gpu.pci_bus_id == "00000000:00:07.0"
    assert gpu.driver_version == "580.159.04"
    assert gpu.compute_capability == "9.0"
    assert gpu.memory_total_mib == 150754820096 // MIB == 143771  # nvidia-smi's memory.total
    assert gpu.memory_bus_width_bits == 6016
    assert gpu.max_memory_clock_mhz == 3201
    assert round(gpu.peak_memory_bandwidth_bytes_per_s / 1e12, 2) == 4.81
