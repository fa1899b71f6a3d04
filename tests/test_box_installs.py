"""One VRAM budget per GPU with speech beside the LLM; build stamps; the piper install script, run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from gpubox import Box, ExpectedGpu, PiperInstall
from gpubox.build import is_installed, stamp_matches, stamp_text
from gpubox.piper_install import install_script, rollback_script, stamp_path
from gpubox.spec import LlamaCppBuild, WhisperCppBuild
from gpubox.switch import InstalledBuild, installed_command, parse_installed
from gpubox.vram import MIB, WHISPER_CUDA_CONTEXT_MIB, WHISPER_STATE_MIB, WHISPER_WEIGHTS_MIB, moves, plan_box
from tests.test_speech_services import three_services

# --- one budget per GPU ------------------------------------------------------------------------------


def speech_box(whisper_gpu: int, reserve_mib: int = 0, gpu0_mib: int = 24564) -> Box:
    data = three_services(
        expected_gpus=[
            ExpectedGpu(index=0, name="4090", memory_total_mib=gpu0_mib, reserve_mib=reserve_mib),
            ExpectedGpu(index=1, name="second", memory_total_mib=8192),
        ]
    )
    data["services"] = data["services"][1:]  # speech only: no GGUF header needed
    data["services"][0]["gpus"] = (whisper_gpu,)
    return Box.model_validate(data)


def test_each_speech_service_is_budgeted_on_its_own_gpu() -> None:
    box = speech_box(whisper_gpu=1)
    plan = plan_box(box, {}, [(0, 24564), (1, 8192)], model_sizes={"/srv/voices/joe.onnx": 63 * MIB})
    gpu0, gpu1 = plan.gpus
    assert gpu0.shares == () and [share.service for share in gpu1.shares] == ["whisper", "piper"]
    whisper_terms = gpu1.shares[0].terms
    assert whisper_terms == {
        "weights": WHISPER_WEIGHTS_MIB["tiny"] * MIB,
        "compute": WHISPER_STATE_MIB["tiny"] * MIB,
        "headroom": WHISPER_CUDA_CONTEXT_MIB * MIB,
    }
    assert gpu1.shares[1].terms["weights"] == 63 * MIB  # the voice's size on the host, when known
    assert gpu1.used_bytes == sum(share.total for share in gpu1.shares) and plan.fits


def test_speech_moved_beside_a_reserved_llm_is_refused_naming_the_service_to_move() -> None:
    # GPU 0 keeps 24 GB minus a reserve too small for whisper's ~900 MiB: whisper must go back to GPU 1.
    box = speech_box(whisper_gpu=0, reserve_mib=24000)
    plan = plan_box(box, {}, [(0, 24564), (1, 8192)])
    assert not plan.fits and not plan.gpus[0].fits and plan.gpus[0].reserve_bytes == 24000 * MIB
    (move,) = moves(box, plan)
    assert move.field == "services.0.gpus"
    assert "move whisper" in move.message and "to GPU 1" in move.message and "gpus=(1,)" in move.message


# --- build stamps ------------------------------------------------------------------------------------


def test_a_stamp_names_project_commit_flavor_and_targets() -> None:
    llama = LlamaCppBuild(commit="0" * 40)
    whisper = WhisperCppBuild(commit="0" * 40)
    stamp = stamp_text(llama, "cuda")
    assert json.loads(stamp) == {
        "project": "llama.cpp",
        "commit": "0" * 40,
        "flavor": "cuda",
        "targets": ["llama-server", "llama-bench"],
    }
    assert stamp_matches(stamp, llama, "cuda")
    assert not stamp_matches(stamp, llama, "cpu")
    assert not stamp_matches(stamp, whisper, "cuda")  # same commit, another project
    assert not stamp_matches(stamp, llama.model_copy(update={"targets": ("llama-server",)}), "cuda")
    assert not stamp_matches("{garbage", llama, "cuda") and not stamp_matches(None, llama, "cuda")


def test_the_installed_probe_reads_stamp_and_link_in_one_command(tmp_path: Path) -> None:
    build = WhisperCppBuild(commit="1" * 40, prefix=str(tmp_path))
    stamp = tmp_path / "builds" / f"{'1' * 40}-cpu" / "gpubox-build.json"
    probe = installed_command(str(stamp), str(tmp_path / "current"))

    def found() -> InstalledBuild:
        out = subprocess.run(["sh", "-c", probe], capture_output=True, text=True, check=True).stdout
        return parse_installed(out.splitlines())

    assert found() == InstalledBuild(stamp=None, current=None)
    stamp.parent.mkdir(parents=True)
    stamp.write_text(stamp_text(build, "cpu") + "\n")
    os.symlink(f"builds/{'1' * 40}-cpu", tmp_path / "current")
    assert is_installed(found(), build, "cpu") == (True, True)
    assert is_installed(found(), build, "cuda") == (False, False)
    stamp.write_text(stamp_text(build, "cpu").rstrip("\n"))  # the shell reads a last line without its newline too
    assert is_installed(found(), build, "cpu") == (True, True)


# --- the piper install script, run against a stand-in python3 ----------------------------------------

FAKE_PYTHON = r"""#!/bin/sh
# A stand-in for python3: `-m venv DIR` makes DIR/bin/python3 (this script), `-m pip ...` records its
# arguments, `-m piper.http_server --help` prints a usage text.
here=$(cd "$(dirname "$0")" && pwd)
case "$1 $2" in
  "-m venv") mkdir -p "$3/bin" && cp "$0" "$3/bin/python3" ;;
  "-m pip") echo "$*" >> "$here/../pip-calls"
            if [ -n "${FAIL_PIP:-}" ]; then echo 'no matching distribution'; exit 1; fi ;;
  "-m piper.http_server") echo 'usage: http_server.py [-h]'; echo '  -m MODEL, --model MODEL' ;;
esac
"""


def test_piper_installs_into_a_new_venv_switches_and_rolls_back(tmp_path: Path) -> None:
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    prefix = tmp_path / "opt piper"  # the spec refuses a space; the script must not rely on that
    first = PiperInstall.model_construct(
        version="1.8.0", prefix=str(prefix), wheelhouse="/wh", python=str(python), keep_installs=2
    )
    second = first.model_copy(update={"version": "1.9.0", "wheelhouse": None})

    def run(script: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={**os.environ, **env})

    for install in (first, second):
        done = run(install_script(install, "cpu"))
        assert done.returncode == 0, done.stderr
        venv = prefix / "venvs" / f"{install.version}-cpu"
        assert os.readlink(prefix / "current") == f"venvs/{install.version}-cpu"
        assert json.loads(Path(stamp_path(install, "cpu")).read_text()) == {
            "package": f"piper-tts[http]=={install.version}",
            "flavor": "cpu",
        }
        assert "--model" in (venv / "piper.http_server.help").read_text()
    assert os.readlink(prefix / "previous") == "venvs/1.8.0-cpu"
    pip_calls = (prefix / "venvs" / "1.8.0-cpu" / "pip-calls").read_text()
    assert "--no-index --find-links" in pip_calls and f"{prefix}/wheelhouse-1.8.0" in pip_calls
    assert "--no-index" not in (prefix / "venvs" / "1.9.0-cpu" / "pip-calls").read_text()

    failed = run(install_script(second.model_copy(update={"version": "2.0.0"}), "cpu"), FAIL_PIP="1")
    assert failed.returncode == 1 and "piper install failed: pip install" in failed.stderr
    assert os.readlink(prefix / "current") == "venvs/1.9.0-cpu"  # untouched by a failed install

    assert run(rollback_script(second)).returncode == 0
    assert os.readlink(prefix / "current") == "venvs/1.8.0-cpu"


def test_a_host_without_gpus_budgets_nothing_and_plans_every_service() -> None:
    from gpubox.gguf_header import read_gguf_header
    from tests.testbed import smollm2_gguf

    data = three_services()
    data["services"][0] = dict(data["services"][0], gpus=())
    data["services"][1] = dict(data["services"][1], gpus=(), no_gpu=True)
    data["services"][2] = dict(data["services"][2], gpus=())
    box = Box.model_validate(data)
    plan = plan_box(box, {"/srv/models/m.gguf": read_gguf_header(smollm2_gguf())}, [])
    assert plan.gpus == () and plan.problems == () and [p.service for p in plan.services] == ["gemma4"]
