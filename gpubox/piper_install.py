"""What a pinned piper install is on a host: its virtualenvs, its stamp and its install script.

The layout under the prefix, like a source build's:

    {prefix}/venvs/{version}-{flavor}   a virtualenv with piper-tts[http] (flavor: cpu, or cuda with
                                        onnxruntime-gpu in place of onnxruntime)
    {prefix}/wheelhouse-{version}       the controller's wheels, when the install uses a wheelhouse
    {prefix}/current, {prefix}/previous symlinks to the active and the last venv, switched atomically
    {prefix}/logs/install-{version}-{flavor}.log

Each venv keeps ``gpubox-install.json`` (package, version, flavor: what the no-op check compares)
and the server's ``--help`` (``piper.http_server.help``: what the flag check reads).
"""

from __future__ import annotations

import json
from typing import Literal

from gpubox import switch
from gpubox.quoting import shell_join, shell_word
from gpubox.servers.piper import HELP_NAME
from gpubox.spec import PiperInstall

PiperFlavor = Literal["cpu", "cuda"]
STAMP_NAME = "gpubox-install.json"
GPU_RUNTIME = "onnxruntime-gpu"


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
    return json.dumps({"package": install.requirement, "flavor": flavor}, sort_keys=True)


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
