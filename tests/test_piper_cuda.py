"""piper on a GPU: the cuda flavor's pinned onnxruntime-gpu, its CUDA/cuDNN wheels and preload hook, and the
smoke test's check that onnxruntime did not fall back to the CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from gpubox import piper_install
from gpubox.gpu import ComputeApp
from gpubox.servers.piper import QUICK_BROWN_FOX
from gpubox.spec import PiperInstall
from gpubox.speech import SpeechCheck, WavInfo, piper_gpu_failures, speech_table

GPU0 = "GPU-1862889f-b8ab-b7db-4080-71edc24071a4"
GPU1 = "GPU-0534a528-b87a-5385-7563-c5b4853f4762"
INSTALL = PiperInstall(version="1.8.0", prefix="/opt/piper")


def test_the_cuda_flavor_pins_onnxruntime_gpu_with_its_cuda_and_cudnn_wheels() -> None:
    script = piper_install.install_script(INSTALL, "cuda")
    assert "'onnxruntime-gpu[cuda,cudnn]==1.31.1'" in script
    assert "uninstall --yes onnxruntime" in script.split("onnxruntime-gpu[cuda,cudnn]")[0]  # the CPU build first
    assert "gpubox_cuda_libs.py" in script and "gpubox-cuda-libs.pth" in script
    cpu = piper_install.install_script(INSTALL, "cpu")
    assert "onnxruntime-gpu" not in cpu and "gpubox_cuda_libs" not in cpu
    assert json.loads(piper_install.stamp_text(INSTALL, "cuda"))["gpu_runtime"] == piper_install.GPU_RUNTIME
    assert "gpu_runtime" not in json.loads(piper_install.stamp_text(INSTALL, "cpu"))


def test_the_preload_hook_loads_the_venvs_cuda_libraries_at_start_up(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python3")
    done = subprocess.run(["sh", "-c", "\n".join(["set -eu", *piper_install.gpu_preload_lines(python)])],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    assert (site / "gpubox-cuda-libs.pth").read_text() == "import gpubox_cuda_libs\n"
    maps = "import pathlib; print(pathlib.Path('/proc/self/maps').read_text())"
    without = subprocess.run([python, "-c", maps], check=True, capture_output=True, text=True).stdout
    assert "nvidia/cu13/lib" not in without  # no wheels: nothing loaded, and no error
    # A stand-in for the nvidia-cuda-runtime wheel's library: any shared library loads the same way.
    libz = next(
        p for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1") if Path(p).exists()
    )
    (site / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    shutil.copy(libz, site / "nvidia" / "cu13" / "lib" / "libcudart.so.13")
    loaded = subprocess.run([python, "-c", maps], check=True, capture_output=True, text=True).stdout
    assert f"{site}/nvidia/cu13/lib/libcudart.so.13" in loaded


def test_piper_on_the_cpu_fails_the_smoke_tests_gpu_check() -> None:
    wav = WavInfo(sample_rate=22050, channels=1, sample_width=2, data_bytes=22050 * 2 * 3)
    on_gpu = [ComputeApp(pid=42, gpu_uuid=GPU1, used_memory_mib=900)]
    assert piper_gpu_failures(42, {GPU1}, on_gpu) == []
    (fallback,) = piper_gpu_failures(42, {GPU1}, [])
    assert fallback.startswith(f"piper (pid 42) holds no memory on its GPU {GPU1}: it runs on the CPU")
    assert "onnxruntime fell back to the CPU" in fallback
    (elsewhere, *_) = piper_gpu_failures(42, {GPU1}, [ComputeApp(pid=42, gpu_uuid=GPU0, used_memory_mib=900)])
    assert "holds no memory on its GPU" in elsewhere
    spoken = SpeechCheck.judge(QUICK_BROWN_FOX, wav, 0.2, 200, "text/html", gpu_failures=[fallback])
    assert not spoken.passed and spoken.failures == [fallback]  # the WAV itself was fine
    assert SpeechCheck.judge(QUICK_BROWN_FOX, wav, 0.2, 200, "text/html", gpu_failures=[]).passed
    unchecked = SpeechCheck.judge(QUICK_BROWN_FOX, wav, 0.2, 200, "text/html")
    assert unchecked.passed and unchecked.gpu_failures is None
    from rich.console import Console

    def text(check: SpeechCheck) -> str:
        console = Console(record=True, width=300, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(speech_table((), (check,)))
        return console.export_text()

    assert "speech 1: GPU" in text(spoken) and "fell back to the CPU" in text(spoken) and "failed" in text(spoken)
    assert "speech 1: GPU" not in text(unchecked)
