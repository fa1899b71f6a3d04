"""Unit rendering: golden text, systemd quoting, and `systemd-analyze verify` on every rendered unit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gpubox import LlamaServer, ModelFile, PiperServer, WhisperServer
from gpubox.gpu import Gpu
from gpubox.inventory import inventory_boxes
from gpubox.servers.base import binary_path
from gpubox.unit import render_unit, server_environment
from tests.test_hardening import H200X2

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
BINARY = binary_path("/opt/llama.cpp")
SPECIAL_DIR = '/srv/my models/$x `y` "q" 100%'
MODEL = ModelFile(path="/srv/models/smollm2.gguf", sha256="a" * 64, architecture="llama")
# The seed box's RTX 4090 as the NvidiaGpus fact reads it (the record of tests/operations/vram.fits), minor 0.
HOME_GPU_UUID = "GPU-3f1c2a77-5b0e-4c1d-9a8e-2d6f0b7c9e41"
HOME_GPUS = (
    Gpu(
        index=0, uuid=HOME_GPU_UUID, name="NVIDIA GeForce RTX 4090", pci_bus_id="00000000:01:00.0",
        driver_version="580.95.05", memory_total_mib=24564, memory_used_mib=1, memory_free_mib=24080,
        compute_capability="8.9", minor_number=0,
    ),
)


def home_service() -> LlamaServer:
    (host_box,) = inventory_boxes(ROOT / "inventory/home.py")
    assert host_box.box is not None
    return host_box.box.service("gemma4")


def test_home_unit_matches_golden() -> None:
    service = home_service()
    assert render_unit(service, BINARY, HOME_GPUS) == (GOLDEN / "gemma4.service").read_text()


def test_a_changed_field_changes_only_its_line() -> None:
    service = home_service()
    before = render_unit(service, BINARY, HOME_GPUS).splitlines()
    after = render_unit(service.model_copy(update={"spec_draft_n_max": 2}), BINARY, HOME_GPUS).splitlines()
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert changed == [("    --spec-draft-n-max 3 \\", "    --spec-draft-n-max 2 \\")]


def test_home_argv_is_the_seed_recipe_as_the_pinned_llama_cpp_parses_it() -> None:
    argv = home_service().argv(BINARY)
    assert argv[0] == "/opt/llama.cpp/current/llama-server"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[argv.index("--flash-attn") + 1] == "on"  # the seed's bare --flash-attn no longer parses
    assert argv[argv.index("--parallel") + 1] == "1"
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp"
    assert argv[argv.index("--fit") + 1] == "off"
    assert pairs["--model"].endswith("gemma-4-12b-it-qat-q4_0.gguf")
    for flag in ("--cont-batching", "--jinja", "--metrics"):
        assert flag in argv
    assert server_environment(home_service()) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}
    assert server_environment(home_service(), HOME_GPUS)["CUDA_VISIBLE_DEVICES"] == HOME_GPU_UUID


def test_parallel_is_always_rendered() -> None:
    argv = LlamaServer(name="s", model=MODEL).argv(BINARY)
    assert argv[argv.index("--parallel") + 1] == "1"


def test_no_gpus_hides_every_gpu() -> None:
    assert server_environment(LlamaServer(name="s", model=MODEL))["CUDA_VISIBLE_DEVICES"] == ""
    assert server_environment(LlamaServer(name="s", model=MODEL, gpus=(1, 0)))["CUDA_VISIBLE_DEVICES"] == "1,0"


def test_api_key_never_on_the_command_line() -> None:
    service = LlamaServer(
        name="s", model=MODEL, host="0.0.0.0", api_key_file="/etc/gpubox/keys", allow_from=("192.168.1.0/24",)
    )
    argv = service.argv(BINARY)
    assert argv[argv.index("--api-key-file") + 1] == "/etc/gpubox/keys"
    assert "--api-key" not in argv


def test_hardening_keeps_gpus_usable() -> None:
    text = render_unit(home_service(), BINARY, HOME_GPUS)
    assert "PrivateDevices" not in text  # would hide /dev/nvidia*
    assert "DeviceAllow=/dev/nvidia0 rw" in text.splitlines()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=always"):
        assert line in text.splitlines()
    assert "ProtectHome=read-only" in text  # the seed keeps its models under /home/dan
    assert "ReadOnlyPaths=/etc/gpubox/keys /home/dan/models" in text.splitlines()  # its models and its key
    assert "ProtectHome=yes" in render_unit(LlamaServer(name="s", model=MODEL), BINARY)


UNITS = {
    "home": home_service,
    "cpu-only": lambda: LlamaServer(name="cpu", model=MODEL, extra_args=("--alias", "a b %n $x")),
    "special-paths": lambda: LlamaServer(
        name="special",
        model=ModelFile(path=SPECIAL_DIR + "/m.gguf", sha256="a" * 64, architecture="llama"),
        api_key_file="/etc/gpubox keys/$k",
    ),
    "remote": lambda: LlamaServer(
        name="remote", model=MODEL, host="0.0.0.0", api_key_file="/etc/gpubox/keys", gpus=(0, 1),
        allow_from=("192.168.1.0/24",),
    ),
}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    prefix = tmp_path / "llama.cpp"
    (prefix / "current").mkdir(parents=True)
    binary = prefix / "current" / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: scripts/setup installs it"
    service = UNITS[name]()
    unit = tmp_path / service.unit_name
    unit.write_text(render_unit(service, str(binary), H200X2))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert service.unit_name not in result.stderr, result.stderr
    assert "ignoring" not in result.stderr, result.stderr  # e.g. "ReadOnlyPaths= path is not absolute, ignoring"


def test_special_characters_reach_the_unit_intact() -> None:
    service = UNITS["special-paths"]()
    text = render_unit(service, BINARY)
    escaped = SPECIAL_DIR.replace("%", "%%").replace("$", "$$").replace('"', '\\"')
    assert f'    --model "{escaped}/m.gguf"' in text
    read_only = next(line for line in text.splitlines() if line.startswith("ReadOnlyPaths="))
    assert read_only == (
        'ReadOnlyPaths="/etc/gpubox keys" "/srv/my models/$x `y` \\"q\\" 100%%"'
    )


RESTARTING = {
    "llama-server": lambda: LlamaServer(name="llm", model=MODEL),
    "whisper-server": lambda: WhisperServer(
        name="stt", model=ModelFile(path="/srv/m/ggml-tiny.en.bin", sha256="b" * 64, format="ggml-whisper")
    ),
    "piper": lambda: PiperServer(
        name="tts",
        voice=ModelFile(path="/srv/v/joe.onnx", sha256="c" * 64, format="onnx"),
        voice_config=ModelFile(path="/srv/v/joe.onnx.json", sha256="d" * 64, format="json"),
    ),
}


@pytest.mark.parametrize("server_type", sorted(RESTARTING))
def test_every_server_restarts_whatever_its_exit_status_and_says_why(server_type: str) -> None:
    """One policy: `on-failure` takes a SIGTERM for a clean exit, so a `kill -TERM` left llama-server down (e2e:
    tests/e2e/test_keys_and_restarts.py kills each server and times its return)."""
    service = RESTARTING[server_type]()
    assert service.type == server_type
    lines = render_unit(service, BINARY).splitlines()
    service_section = lines[lines.index("[Service]") : lines.index("[Install]")]
    assert [line for line in service_section if line.startswith("Restart")] == ["Restart=always", "RestartSec=3"]
    assert "StartLimitIntervalSec=0" in lines[lines.index("[Unit]") : lines.index("[Service]")]
    why = lines[lines.index("Restart=always") - 3 : lines.index("Restart=always")]
    assert all(line.startswith("# ") for line in why) and "kill -TERM" in " ".join(why)
