"""Unit rendering: golden text, systemd quoting, and `systemd-analyze verify` on every rendered unit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gpubox import LlamaServer, ModelFile
from gpubox.inventory import inventory_boxes
from gpubox.unit import render_unit, server_argv, server_environment, systemd_quote

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
MODEL = ModelFile(path="/srv/models/smollm2.gguf", sha256="a" * 64, architecture="llama")


def home_service() -> LlamaServer:
    (host_box,) = inventory_boxes(ROOT / "inventory/home.py")
    assert host_box.box is not None
    return host_box.box.service("gemma4")


def test_home_unit_matches_golden() -> None:
    service = home_service()
    assert render_unit(service, "/opt/llama.cpp") == (GOLDEN / "gemma4.service").read_text()


def test_rendering_is_deterministic() -> None:
    assert render_unit(home_service(), "/opt/llama.cpp") == render_unit(home_service(), "/opt/llama.cpp")


def test_home_argv_is_the_seed_recipe_as_the_pinned_llama_cpp_parses_it() -> None:
    argv = server_argv(home_service(), "/opt/llama.cpp")
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


def test_parallel_is_always_rendered() -> None:
    argv = server_argv(LlamaServer(name="s", model=MODEL), "/opt/llama.cpp")
    assert argv[argv.index("--parallel") + 1] == "1"


def test_no_gpus_hides_every_gpu() -> None:
    assert server_environment(LlamaServer(name="s", model=MODEL))["CUDA_VISIBLE_DEVICES"] == ""
    assert server_environment(LlamaServer(name="s", model=MODEL, gpus=(1, 0)))["CUDA_VISIBLE_DEVICES"] == "1,0"


def test_api_key_never_on_the_command_line() -> None:
    service = LlamaServer(name="s", model=MODEL, host="0.0.0.0", api_key_file="/etc/gpubox/keys")
    argv = server_argv(service, "/opt/llama.cpp")
    assert argv[argv.index("--api-key-file") + 1] == "/etc/gpubox/keys"
    assert "--api-key" not in argv


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("50%", "50%%"),
        ("$HOME", "$$HOME"),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
    ],
)
def test_systemd_quote(word: str, quoted: str) -> None:
    assert systemd_quote(word) == quoted


def test_hardening_keeps_gpus_usable() -> None:
    text = render_unit(home_service(), "/opt/llama.cpp")
    assert "PrivateDevices" not in text  # would hide /dev/nvidia*
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure"):
        assert line in text.splitlines()
    assert "ProtectHome=read-only" in text  # the seed keeps its models under /home/dan
    assert "ReadOnlyPaths=/home/dan/models" in text
    assert "ProtectHome=yes" in render_unit(LlamaServer(name="s", model=MODEL), "/opt/llama.cpp")


UNITS = {
    "home": home_service,
    "cpu-only": lambda: LlamaServer(name="cpu", model=MODEL, extra_args=("--alias", "a b %n $x")),
    "remote": lambda: LlamaServer(
        name="remote", model=MODEL, host="0.0.0.0", api_key_file="/etc/gpubox/keys", gpus=(0, 1)
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
    unit.write_text(render_unit(service, str(prefix)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert service.unit_name not in result.stderr, result.stderr
