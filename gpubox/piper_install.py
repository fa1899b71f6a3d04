"""What a pinned piper install is on a host: its virtualenvs, its stamp and its install script.

The layout under the prefix, like a source build's:

    {prefix}/venvs/{version}-{flavor}   a virtualenv with piper-tts[http] (flavor: cpu, or cuda with
                                        onnxruntime-gpu in place of onnxruntime, the CUDA and cuDNN
                                        libraries it loads as nvidia-* wheels, and GPU_PRELOAD)
    {prefix}/wheelhouse-{version}       the controller's wheels, when the install uses a wheelhouse
    {prefix}/current, {prefix}/previous symlinks to the active and the last venv, switched atomically
    {prefix}/logs/install-{version}-{flavor}.log

Each venv keeps ``gpubox-install.json`` (package, version, flavor, the GPU runtime: what the no-op
check compares) and the server's ``--help`` (``piper.http_server.help``: what the flag check reads).

The cuda flavor: onnxruntime-gpu 1.31.1 is built for CUDA 13 and cuDNN 9 and loads them when it is
imported, by name (its CUDA provider library has no RUNPATH). Its ``[cuda,cudnn]`` extras install them as
nvidia-* wheels into the venv (``nvidia/cu13/lib``, ``nvidia/cudnn/lib``), where nothing looks for them
unless ``onnxruntime.preload_dlls()`` is called, which piper never does: its ``--cuda`` then warns and runs
on the CPU. So the venv gets a start-up hook (GPU_PRELOAD, a ``.pth`` line importing a module beside it)
that loads those libraries first. The smoke test checks that the process holds memory on its GPU.
"""

from __future__ import annotations

import json
from typing import Literal

from gpubox import switch
from gpubox.quoting import shell_join, shell_word
from gpubox.spec import PiperInstall

PiperFlavor = Literal["cpu", "cuda"]
HELP_NAME = "piper.http_server.help"
"""piper.http_server's ``--help``, saved in the install (the flag check reads it)."""
STAMP_NAME = "gpubox-install.json"
GPU_RUNTIME_VERSION = "1.31.1"
GPU_RUNTIME = f"onnxruntime-gpu[cuda,cudnn]=={GPU_RUNTIME_VERSION}"
"""onnxruntime-gpu pinned, with the nvidia-* wheels of the CUDA 13 and cuDNN 9 libraries it loads."""
CUDA_LIBRARIES = (
    "cu13/lib/libcublasLt.so.13", "cu13/lib/libcublas.so.13", "cu13/lib/libnvrtc.so.13", "cu13/lib/libcurand.so.10",
    "cu13/lib/libcufft.so.12", "cu13/lib/libcudart.so.13", "cudnn/lib/libcudnn.so.9",
)  # fmt: skip
"""What onnxruntime-gpu 1.31.1's preload_dlls() loads on Linux, under site-packages/nvidia, in its order."""
GPU_PRELOAD_MODULE = "gpubox_cuda_libs"
GPU_PRELOAD_PTH = "gpubox-cuda-libs.pth"


def venv_name(install: PiperInstall, flavor: PiperFlavor) -> str:
    return f"{install.version}-{flavor}"


def venv_dir(install: PiperInstall, flavor: PiperFlavor) -> str:
    return f"{install.prefix}/venvs/{venv_name(install, flavor)}"


def wheelhouse_dir(install: PiperInstall) -> str:
    return f"{install.prefix}/wheelhouse-{install.version}"


def log_path(install: PiperInstall, flavor: PiperFlavor) -> str:
    return f"{install.prefix}/logs/install-{venv_name(install, flavor)}.log"


def stamp_path(install: PiperInstall, flavor: PiperFlavor) -> str:
    return f"{venv_dir(install, flavor)}/{STAMP_NAME}"


def current_link(install: PiperInstall) -> str:
    return switch.current_link(install.prefix)


def stamp_text(install: PiperInstall, flavor: PiperFlavor) -> str:
    stamp = {"package": install.requirement, "flavor": flavor}
    if flavor == "cuda":
        stamp["gpu_runtime"] = GPU_RUNTIME
    return json.dumps(stamp, sort_keys=True)


def preload_module_text() -> str:
    """The module GPU_PRELOAD_PTH imports at every start of the venv's Python: it loads CUDA_LIBRARIES from
    the venv's nvidia-* wheels (those present; a failure is left to onnxruntime, which then warns)."""
    names = ", ".join(repr(name) for name in CUDA_LIBRARIES)
    return (
        '"""Written by gpubox: load the CUDA and cuDNN libraries of this venv\'s nvidia-* wheels before\n'
        'onnxruntime looks for them (piper does not call onnxruntime.preload_dlls())."""\n'
        "import ctypes\nimport os\n\n"
        "_NVIDIA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nvidia')\n"
        f"for _name in ({names},):\n"
        "    _path = os.path.join(_NVIDIA, _name)\n"
        "    if os.path.isfile(_path):\n"
        "        try:\n"
        "            ctypes.CDLL(_path)\n"
        "        except OSError:\n"
        "            pass\n"
    )


def gpu_preload_lines(python: str) -> list[str]:
    """Shell lines that put the preload module and its ``.pth`` into the site-packages of `python`'s venv."""
    site = '"$(' + shell_join([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]) + ')"'
    return [
        f"site={site}",
        f"printf '%s' {shell_word(preload_module_text())} > \"$site/{GPU_PRELOAD_MODULE}.py\"",
        f"printf 'import {GPU_PRELOAD_MODULE}\\n' > \"$site/{GPU_PRELOAD_PTH}\"",
    ]


def is_installed(found: switch.InstalledBuild, install: PiperInstall, flavor: PiperFlavor) -> tuple[bool, bool]:
    """Whether this version and flavor is installed (its stamp matches), and `current` points at it."""
    return switch.installed_here(found, stamp_text(install, flavor), f"venvs/{venv_name(install, flavor)}")


def install_script(install: PiperInstall, flavor: PiperFlavor) -> str:
    """Make a venv beside the active one, install piper into it, save its ``--help`` and stamp, switch.

    From the uploaded wheelhouse with ``--no-index`` when the spec has one, else from the host's
    index. A failed install prints its log's tail and leaves ``current`` as it was.
    """
    final = venv_dir(install, flavor)
    staging = f"{final}.partial"
    log = shell_word(log_path(install, flavor))
    pip = [f"{staging}/bin/python3", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    if install.wheelhouse is not None:
        pip += ["--no-index", "--find-links", wheelhouse_dir(install)]
    lines = [
        "set -eu",
        "mkdir -p " + shell_join(f"{install.prefix}/{part}" for part in ("venvs", "logs")),
        f": > {log}",
        "fail() {",
        f"  printf 'piper install failed: %s; full log: %s\\n' \"$1\" {log} >&2",
        f"  tail -n 25 {log} >&2",
        "  exit 1",
        "}",
        f"rm -rf {shell_word(staging)}",
        f"{shell_join([install.python, '-m', 'venv', staging])} >> {log} 2>&1 "
        "|| fail 'python3 -m venv (on Debian it needs python3-venv)'",
        f"{shell_join([*pip, install.requirement])} >> {log} 2>&1 || fail 'pip install'",
    ]
    if flavor == "cuda":
        lines += [
            f"{shell_join([f'{staging}/bin/python3', '-m', 'pip', 'uninstall', '--yes', 'onnxruntime'])} >> {log} 2>&1",
            f"{shell_join([*pip, GPU_RUNTIME])} >> {log} 2>&1 || fail {shell_word(f'pip install {GPU_RUNTIME}')}",
            *gpu_preload_lines(f"{staging}/bin/python3"),
        ]
    help_file = shell_word(f"{staging}/{HELP_NAME}")
    lines += [
        f"{shell_join([f'{staging}/bin/python3', '-m', 'piper.http_server', '--help'])} > {help_file} 2>&1 "
        "|| fail 'python3 -m piper.http_server --help'",
        f"printf '%s\\n' {shell_word(stamp_text(install, flavor))} > {shell_word(f'{staging}/{STAMP_NAME}')}",
        f"rm -rf {shell_word(final)} && mv -T {shell_word(staging)} {shell_word(final)}",
        *switch_lines(install, flavor),
        f"printf 'installed %s; current -> venvs/%s\\n' {shell_word(install.requirement)} "
        f"{shell_word(venv_name(install, flavor))}",
    ]
    return "\n".join(lines)


def switch_lines(install: PiperInstall, flavor: PiperFlavor) -> list[str]:
    """Remember the active venv as `previous`, point `current` at this one (renames only), prune."""
    return [
        *switch.switch_lines(install.prefix, f"venvs/{venv_name(install, flavor)}"),
        *switch.prune_lines(install.prefix, "venvs", install.keep_installs),
    ]


def rollback_script(install: PiperInstall) -> str:
    """Point `current` back at `previous` (after a smoke test missed on a new install)."""
    return switch.rollback_script(install.prefix)
