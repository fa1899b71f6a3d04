"""GPU placement: one answer (``Service.placement``) that the unit, the planner, `gpubox check` and the
smoke test read. A box that declares its GPUs refuses GPU work without pinned ``gpus``; on one that
doesn't, an unpinned service runs on the CPU: its unit hides every GPU and the planner prices it on none."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gpubox import Box, ExpectedGpu
from gpubox.gguf_header import GgufFile, read_gguf_header
from gpubox.gpu import Gpu
from gpubox.spec import problems_from
from gpubox.unit import render_unit
from gpubox.vram import plan_box
from tests.test_speech_services import three_services
from tests.test_vram import _smollm2_path

GPUS = [(0, 24564), (1, 24564)]
RECORDS = [
    Gpu(index=index, uuid=f"GPU-{index}", name="RTX 4090", pci_bus_id=f"0{index}", driver_version="1",
        memory_total_mib=24564, memory_used_mib=0, memory_free_mib=24564, compute_capability="8.9",
        minor_number=index)
    for index in (0, 1)
]
EXPECTED = [ExpectedGpu(index=index, name="RTX 4090", memory_total_mib=mib).model_dump() for index, mib in GPUS]


@pytest.fixture(scope="module")
def header() -> GgufFile:
    return read_gguf_header(_smollm2_path())


def _box(position: int, **service: Any) -> dict[str, Any]:
    """three_services with only the service at ``position``, changed by ``service``."""
    data = three_services()
    data["services"] = [dict(data["services"][position], **service)]
    return data


def _shares(box: Box, headers: dict[str, GgufFile]) -> list[int]:
    plan = plan_box(box, headers, GPUS)
    assert not plan.problems, plan.problems
    return [len(gpu.shares) for gpu in plan.gpus]


def test_an_unpinned_llama_server_runs_and_is_priced_on_the_cpu(header: GgufFile) -> None:
    box = Box.model_validate(_box(0, gpus=(), n_gpu_layers=99))
    (server,) = box.services
    headers = {server.models()[0].path: header}
    assert server.placement == ()
    assert _shares(box, headers) == [0, 0]  # was priced on both GPUs (699 MiB each) while running on the CPU
    unit = render_unit(server, "/opt/llama.cpp/current/llama-server", RECORDS)
    assert "CUDA_VISIBLE_DEVICES=" in unit and "PrivateDevices=yes" in unit
    assert server.summary().startswith("spec none")


def test_a_pinned_llama_server_is_priced_and_unit_pinned_on_the_same_gpus(header: GgufFile) -> None:
    box = Box.model_validate(_box(0, gpus=(1,), n_gpu_layers=99))
    (server,) = box.services
    assert _shares(box, {server.models()[0].path: header}) == [0, 1]
    assert "CUDA_VISIBLE_DEVICES=GPU-1" in render_unit(server, "/opt/llama.cpp/current/llama-server", RECORDS)


def test_an_unpinned_whisper_server_is_priced_on_no_gpu_and_shown_as_cpu() -> None:
    box = Box.model_validate(_box(1, gpus=()))
    (whisper,) = box.services
    assert _shares(box, {}) == [0, 0]  # was priced on CUDA device 0
    assert "CPU" in whisper.summary()


def test_a_cpu_only_whisper_server_is_shown_as_cpu_not_device_0() -> None:
    (whisper,) = Box.model_validate(_box(1, gpus=(), no_gpu=True)).services
    assert whisper.summary() == "language en, CPU, FA on"


def test_a_pinned_whisper_server_is_priced_on_its_device() -> None:
    box = Box.model_validate(_box(1, gpus=(0, 1), device=1))
    assert _shares(box, {}) == [0, 1]
    assert "device 1" in box.services[0].summary()


@pytest.mark.parametrize(
    ("position", "service", "cpu_setting"),
    [(0, {"gpus": ()}, "n_gpu_layers=0"), (1, {"gpus": ()}, "no_gpu=True")],
)
def test_a_box_with_expected_gpus_refuses_unpinned_gpu_work(
    position: int, service: dict[str, Any], cpu_setting: str
) -> None:
    with pytest.raises(ValidationError) as error:
        Box.model_validate(dict(_box(position, **service), expected_gpus=EXPECTED))
    (problem,) = problems_from(error.value)
    assert problem.field == "services.0.gpus"
    assert "gpus=(0,)" in problem.message and cpu_setting in problem.message


@pytest.mark.parametrize(
    ("position", "service"),
    [(0, {"gpus": (), "n_gpu_layers": 0}), (1, {"gpus": (), "no_gpu": True}), (2, {"gpus": (), "cuda": False})],
)
def test_a_box_with_expected_gpus_accepts_unpinned_cpu_work(
    position: int, service: dict[str, Any], header: GgufFile
) -> None:
    box = Box.model_validate(dict(_box(position, **service), expected_gpus=EXPECTED))
    assert box.services[0].placement == ()
    assert _shares(box, {path: header for path in (model.path for _, model in box.models())}) == [0, 0]
