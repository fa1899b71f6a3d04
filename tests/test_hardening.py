"""Every unit gpubox renders is born hardened: exposure, syscalls, devices, network, by unit type.

`systemd-analyze security --offline=yes` (systemd 252) scores each rendered unit; the GPU units are
rendered with the GPU records of a real 2x H200 box. The local test host (systemd-nspawn) enforces
neither IPAddressAllow/Deny nor DevicePolicy, so those are proven here, by rendering; the e2e test
(tests/e2e/test_deploy.py) proves the capability set, umask, seccomp and no-new-privileges of the
running CPU-only service.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError
from pyinfra.api import OperationError
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState

from gpubox import LlamaServer, ModelFile, PiperServer, RpcServer, WhisperServer
from gpubox.gpu import Gpu
from gpubox.inventory import inventory_boxes
from gpubox.servers.base import Service
from gpubox.spec import problems_from
from gpubox.unit import SCHEDULING_SYSCALLS, render_unit, server_environment, service_gpus
from operations.service import unit
from tests.operations.test_operations import GpuboxFakeHost

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelFile(path="/srv/models/smollm2.gguf", sha256="a" * 64, architecture="llama")
HOME_MODEL = ModelFile(path="/home/dan/models/gemma.gguf", sha256="b" * 64, architecture="gemma4")
MAX_EXPOSURE = 2.0


def h200(index: int, uuid: str, bus_id: str, minor_number: int | None) -> Gpu:
    return Gpu(
        index=index, uuid=uuid, name="NVIDIA H200", pci_bus_id=bus_id, driver_version="580.159.04",
        memory_total_mib=143771, memory_used_mib=0, memory_free_mib=143771, compute_capability="9.0",
        minor_number=minor_number,
    )


WHISPER_MODEL = ModelFile(path="/srv/models/ggml-tiny.en.bin", sha256="c" * 64, format="ggml-whisper")
VOICE = ModelFile(path="/srv/voices/joe.onnx", sha256="d" * 64, format="onnx")
VOICE_CONFIG = ModelFile(path="/srv/voices/joe.onnx.json", sha256="e" * 64, format="json")

# A real 2x H200 box (/work/shared/fixtures/h200x2/nvidia-smi-q.txt: GPU UUID, Minor Number, Bus Id).
GPU0_UUID = "GPU-9221d4eb-2b4d-b7c1-2c6b-7a75ed88edf1"
GPU1_UUID = "GPU-b24f7cae-ff51-0892-ffe1-3246cfca6f01"
H200X2 = (h200(0, GPU0_UUID, "00000000:00:06.0", 0), h200(1, GPU1_UUID, "00000000:00:07.0", 1))

UNIT_TYPES: dict[str, Callable[[], Service]] = {
    "loopback-cpu": lambda: LlamaServer(name="cpu", model=MODEL),
    "loopback-gpu": lambda: LlamaServer(name="gpu", model=MODEL, gpus=(0,)),
    "loopback-two-gpus": lambda: LlamaServer(name="gpus", model=MODEL, gpus=(1, 0)),
    "remote-key-file": lambda: LlamaServer(
        name="remote", model=MODEL, host="0.0.0.0", api_key_file="/etc/gpubox/keys/remote.key",
        allow_from=("192.168.1.0/24", "fd00::/8"),
    ),
    "remote-gpu-any": lambda: LlamaServer(
        name="remote-gpu", model=MODEL, host="0.0.0.0", api_key_file="/etc/gpubox/keys/r.key", gpus=(1,),
        allow_from=("any",),
    ),
    "models-under-home": lambda: LlamaServer(name="home", model=HOME_MODEL, gpus=(0,)),
    "models-under-home-cpu": lambda: LlamaServer(name="home-cpu", model=HOME_MODEL),
    "whisper-gpu": lambda: WhisperServer(name="whisper", model=WHISPER_MODEL, gpus=(1,)),
    "whisper-cpu": lambda: WhisperServer(name="whisper-cpu", model=WHISPER_MODEL, no_gpu=True, convert=True),
    "piper-gpu": lambda: PiperServer(name="piper", voice=VOICE, voice_config=VOICE_CONFIG, gpus=(1,)),
    "piper-cpu": lambda: PiperServer(name="piper-cpu", voice=VOICE, voice_config=VOICE_CONFIG),
    "rpc-cpu": lambda: RpcServer(name="rpc-cpu"),
    "rpc-gpu-lan": lambda: RpcServer(name="rpc-gpu", gpus=(1,), host="192.168.1.21", allow_from=("192.168.1.20/32",)),
}


def lines(text: str) -> list[str]:
    return text.splitlines()


def directive(text: str, key: str) -> list[str]:
    """Every value of `key=` in the unit, in order."""
    return [line.split("=", 1)[1] for line in lines(text) if line.startswith(f"{key}=")]


def exposure(unit: Path) -> float:
    """`systemd-analyze security --offline=yes`'s "Overall exposure level" of a unit file."""
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: scripts/setup installs it"
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure line:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


@pytest.mark.parametrize("name", sorted(UNIT_TYPES))
def test_every_unit_type_is_exposure_2_or_less(name: str, tmp_path: Path) -> None:
    service = UNIT_TYPES[name]()
    unit = tmp_path / service.unit_name
    unit.write_text(render_unit(service, "/opt/llama.cpp/current/llama-server", H200X2))
    assert exposure(unit) <= MAX_EXPOSURE


def test_the_scorer_is_real(tmp_path: Path) -> None:
    """A unit with no sandboxing scores as systemd's worst (the unit before this hardening scored 7.7)."""
    unit = tmp_path / "bare.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(unit) > 9


@pytest.mark.parametrize("name", sorted(UNIT_TYPES))
def test_every_unit_drops_privileges_and_filters_syscalls(name: str) -> None:
    text = render_unit(UNIT_TYPES[name](), "/opt/llama.cpp/current/llama-server", H200X2)
    for line in (
        "NoNewPrivileges=yes", "CapabilityBoundingSet=", "AmbientCapabilities=", "UMask=0077",
        "ProtectSystem=strict", "PrivateTmp=yes", "PrivateMounts=yes", "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes", "ProtectKernelLogs=yes", "ProtectControlGroups=yes", "ProtectClock=yes",
        "ProtectHostname=yes", "ProtectProc=invisible", "DevicePolicy=closed",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces=yes", "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes", "LockPersonality=yes", "RemoveIPC=yes", "KeyringMode=private",
        "SystemCallArchitectures=native", "SystemCallErrorNumber=EPERM", "IPAddressDeny=any",
    ):
        assert line in lines(text), line
    # allow-list first, then the deny list, then llama.cpp's scheduling calls back (systemd applies them in order)
    assert directive(text, "SystemCallFilter") == [
        "@system-service", "~@privileged @resources", " ".join(SCHEDULING_SYSCALLS)
    ]


def test_resources_holds_what_llama_cpp_needs_back() -> None:
    """systemd 252's @resources holds llama.cpp's affinity and priority calls: they are allowed back."""
    listed = subprocess.run(
        ["systemd-analyze", "syscall-filter", "@resources"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(SCHEDULING_SYSCALLS) <= set(listed)
    assert {"setrlimit", "mbind", "set_mempolicy", "sched_setattr"} <= set(listed) - set(SCHEDULING_SYSCALLS)


def test_cpu_only_gets_what_cuda_would_break() -> None:
    text = render_unit(UNIT_TYPES["loopback-cpu"](), "/b", H200X2)
    for line in ("MemoryDenyWriteExecute=yes", "ProcSubset=pid", "PrivateDevices=yes", "DevicePolicy=closed"):
        assert line in lines(text)
    assert "nvidia" not in text
    assert directive(text, "Environment")[-1] == "CUDA_VISIBLE_DEVICES="


@pytest.mark.parametrize("name", ["loopback-gpu", "loopback-two-gpus", "remote-gpu-any", "models-under-home"])
def test_gpu_units_leave_out_what_breaks_cuda(name: str) -> None:
    text = render_unit(UNIT_TYPES[name](), "/b", H200X2)
    for key in ("MemoryDenyWriteExecute", "ProcSubset", "PrivateDevices"):
        assert not directive(text, key), key


def test_a_two_gpu_box_gives_each_service_only_its_gpu() -> None:
    gemma4 = LlamaServer(name="gemma4", model=HOME_MODEL, gpus=(0,))
    other = LlamaServer(name="other", model=MODEL, gpus=(1,), port=8081)
    shared = ["/dev/nvidiactl rw", "/dev/nvidia-uvm rw"]
    gemma4_unit, other_unit = (render_unit(service, "/b", H200X2) for service in (gemma4, other))
    assert directive(gemma4_unit, "DeviceAllow") == [*shared, "/dev/nvidia0 rw"]
    assert directive(other_unit, "DeviceAllow") == [*shared, "/dev/nvidia1 rw"]
    assert f"CUDA_VISIBLE_DEVICES={GPU0_UUID}" in directive(gemma4_unit, "Environment")
    assert f"CUDA_VISIBLE_DEVICES={GPU1_UUID}" in directive(other_unit, "Environment")
    both = render_unit(UNIT_TYPES["loopback-two-gpus"](), "/b", H200X2)
    assert directive(both, "DeviceAllow") == [*shared, "/dev/nvidia1 rw", "/dev/nvidia0 rw"]
    assert f"CUDA_VISIBLE_DEVICES={GPU1_UUID},{GPU0_UUID}" in directive(both, "Environment")


def test_the_device_node_is_the_minor_number_not_the_index() -> None:
    swapped = (h200(0, GPU0_UUID, "00000000:00:06.0", 1), h200(1, GPU1_UUID, "00000000:00:07.0", 0))
    text = render_unit(LlamaServer(name="s", model=MODEL, gpus=(0,)), "/b", swapped)
    assert directive(text, "DeviceAllow")[-1] == "/dev/nvidia1 rw"
    assert f"CUDA_VISIBLE_DEVICES={GPU0_UUID}" in directive(text, "Environment")


def test_without_records_the_environment_pins_indices() -> None:
    """A process started outside a unit (the bench's) has no device wall: nvidia-smi indices work there."""
    service = LlamaServer(name="s", model=MODEL, gpus=(1,))
    assert server_environment(service)["CUDA_VISIBLE_DEVICES"] == "1"
    assert server_environment(service, H200X2)["CUDA_VISIBLE_DEVICES"] == GPU1_UUID


@pytest.mark.parametrize(
    ("gpus", "records", "says"),
    [
        ((2,), H200X2, "GPU 2 is not on the host"),
        ((0,), (), "GPU 0 is not on the host"),
        ((1,), (H200X2[0], h200(1, GPU1_UUID, "00000000:00:07.0", None)), "GPU 1's minor number"),
        ((0,), (h200(0, "", "00000000:00:06.0", 0),), "GPU 0 has no UUID"),
    ],
)
def test_a_gpu_without_a_full_record_is_refused(gpus: tuple[int, ...], records: tuple[Gpu, ...], says: str) -> None:
    service = LlamaServer(name="s", model=MODEL, gpus=gpus)
    with pytest.raises(ValueError, match=re.escape(says)) as caught:
        service_gpus(service, records, field="services.3.gpus")
    assert str(caught.value).startswith(f"services.3.gpus={list(gpus)}: ")
    if records == H200X2:
        assert f"0 ({GPU0_UUID}, /dev/nvidia0), 1 ({GPU1_UUID}, /dev/nvidia1)" in str(caught.value)
    with pytest.raises(ValueError, match=re.escape(says)):
        render_unit(service, "/b", records)


def test_loopback_listener_talks_to_localhost_only() -> None:
    text = render_unit(UNIT_TYPES["loopback-gpu"](), "/b", H200X2)
    assert directive(text, "IPAddressDeny") == ["any"]
    assert directive(text, "IPAddressAllow") == ["localhost"]


def test_remote_listener_talks_to_its_allowed_networks() -> None:
    text = render_unit(UNIT_TYPES["remote-key-file"](), "/b", H200X2)
    assert directive(text, "IPAddressDeny") == ["any"]
    assert directive(text, "IPAddressAllow") == ["localhost 192.168.1.0/24 fd00::/8"]
    assert directive(render_unit(UNIT_TYPES["remote-gpu-any"](), "/b", H200X2), "IPAddressAllow") == ["localhost any"]


def refused(**fields: object) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        LlamaServer.model_validate({"name": "s", "model": MODEL, **fields})
    return {problem.field: problem.message for problem in problems_from(caught.value)}


def test_a_remote_listener_must_say_who_may_connect() -> None:
    problems = refused(host="0.0.0.0", api_key_file="/etc/gpubox/keys/s.key")
    assert set(problems) == {"allow_from"}
    assert "allow_from=('192.168.1.0/24',)" in problems["allow_from"] and "'any'" in problems["allow_from"]
    # both refusals at once, each on its field
    assert set(refused(host="0.0.0.0")) == {"api_key_file", "allow_from"}


def test_allow_from_takes_networks_or_any() -> None:
    service = LlamaServer(
        name="s", model=MODEL, host="0.0.0.0", api_key_file="/k", allow_from=("10.0.0.5", "FD00::/8", "::1")
    )
    assert service.allow_from == ("10.0.0.5/32", "fd00::/8", "::1/128")
    problems = refused(host="0.0.0.0", api_key_file="/k", allow_from=("10.0.0.0/8", "192.168.1.5/24", "lan"))
    assert set(problems) == {"allow_from.1", "allow_from.2"}
    assert "did you mean 192.168.1.0/24" in problems["allow_from.1"]
    assert "not an IP network" in problems["allow_from.2"]
    assert set(refused(host="0.0.0.0", api_key_file="/k", allow_from=("any", "10.0.0.0/8"))) == {"allow_from"}


def test_allow_from_on_a_loopback_listener_is_refused() -> None:
    problems = refused(allow_from=("10.0.0.0/8",))
    assert set(problems) == {"allow_from"} and "loopback" in problems["allow_from"]


@pytest.mark.parametrize("name", sorted(UNIT_TYPES))
def test_systemd_analyze_verify_every_unit_type(name: str, tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    service = UNIT_TYPES[name]()
    unit = tmp_path / service.unit_name
    unit.write_text(render_unit(service, str(binary), H200X2))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert service.unit_name not in result.stderr, result.stderr
    assert "ignoring" not in result.stderr.lower(), result.stderr


def test_the_unit_operation_names_the_services_field_and_the_hosts_gpus() -> None:
    """The home box (gemma4 on GPU 0) deployed to a host without GPUs: refused before the unit is written."""
    (home,) = inventory_boxes(ROOT / "inventory/home.py")
    assert home.box is not None
    state = FakeState()
    host = GpuboxFakeHost(state, facts={"gpu.NvidiaGpus": []})
    host.data = {"box": home.box}
    with ctx_state.use(state), ctx_host.use(host), pytest.raises(OperationError) as caught:
        list(unit._inner(server=home.box.service("gemma4"), prefix="/opt/llama.cpp"))
    assert str(caught.value) == (
        "gemma4.service: services.0.gpus=[0]: GPU 0 is not on the host. The unit allows only its GPUs' device "
        "nodes and pins them by UUID. The host's GPUs: none (no nvidia-smi)"
    )
