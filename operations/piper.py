"""Install piper TTS at a pinned version in a virtualenv on the host; switch `{prefix}/current` to it."""

from __future__ import annotations

from pathlib import Path

from pyinfra import host, state
from pyinfra.api import FileUploadCommand, OperationError, deploy, operation

from facts.build import InstalledBuild
from gpubox import piper_install as plan
from gpubox import switch
from gpubox.quoting import shell_word
from gpubox.spec import PiperInstall

from .distro import package_manager
from .host_facts import FactRead, read


def _installed_read(install: PiperInstall, flavor: plan.PiperFlavor) -> FactRead:
    return InstalledBuild, {"stamp": plan.stamp_path(install, flavor), "current": plan.current_link(install)}


def facts_read(install: PiperInstall, flavor: plan.PiperFlavor) -> list[FactRead]:
    """What `piper(...)` reads on a host where piper is installed (for `host_facts.prefetch`)."""
    return [_installed_read(install, flavor)]


def _installed(install: PiperInstall, flavor: plan.PiperFlavor) -> tuple[bool, bool]:
    """Whether this version and flavor is installed (its stamp says so), and `current` points at it."""
    found = switch.InstalledBuild.model_validate(read(_installed_read(install, flavor)))
    return plan.is_installed(found, install, flavor)


def _wheels(install: PiperInstall) -> list[Path]:
    assert install.wheelhouse is not None
    directory = Path(install.wheelhouse)
    if not directory.is_absolute() and state.cwd:
        directory = Path(state.cwd) / directory
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise OperationError(f"piper.wheelhouse {directory} holds no wheels: build it with `pip download` first")
    return wheels


@operation()
def install(install: PiperInstall, flavor: plan.PiperFlavor = "cpu"):  # type: ignore[no-untyped-def]
    """
    Install ``piper-tts[http]`` at the pinned version into ``venvs/{version}-{flavor}``, save its
    ``--help`` and stamp, and switch ``current`` to it (the previous venv is kept for rollback).

    + install: the ``PiperInstall`` (version, prefix, wheelhouse)
    + flavor: ``cuda`` puts onnxruntime-gpu in place of onnxruntime (for ``--cuda``), else ``cpu``

    A no-op when that venv's stamp records the version and flavor and ``current`` points at it.
    With a wheelhouse its wheels are uploaded and installed with ``--no-index``.

    **Example:**

    .. code:: python

        piper.install(name="piper-tts 1.8.0 -> /opt/piper/current", install=box.piper)
    """
    installed, points_here = _installed(install, flavor)
    if installed and points_here:
        host.noop(f"{install.requirement} ({flavor}) is installed and current")
        return
    if installed:
        yield "\n".join(["set -eu", *plan.switch_lines(install, flavor)])
        return
    if install.wheelhouse is not None:
        wheels = _wheels(install)
        host.log(f"uploading {len(wheels)} wheels ({sum(w.stat().st_size for w in wheels) >> 20} MiB) for piper")
        yield f"mkdir -p {shell_word(plan.wheelhouse_dir(install))}"
        for wheel in wheels:
            yield FileUploadCommand(str(wheel), f"{plan.wheelhouse_dir(install)}/{wheel.name}")
    yield plan.install_script(install, flavor)


@deploy("piper")
def piper(install_spec: PiperInstall, flavor: plan.PiperFlavor = "cpu") -> list:  # type: ignore[type-arg]
    """
    python3-venv (Debian) and the pinned piper install; returns the op metas.

    + install_spec: the ``PiperInstall``
    + flavor: ``cuda`` when a piper service runs on a GPU

    **Example:**

    .. code:: python

        piper_metas = piper.piper(box.piper, "cpu")
    """
    name = f"{install_spec.requirement} ({flavor}) -> {install_spec.prefix}/current"
    if all(_installed(install_spec, flavor)):
        return [install(name=name, install=install_spec, flavor=flavor)]
    from pyinfra.operations import apt  # here: only an install pays for importing it (see source_build)

    if package_manager() == "apt":
        apt.packages(name="Install python3-venv (apt)", packages=["python3-venv"])
    return [install(name=name, install=install_spec, flavor=flavor)]
