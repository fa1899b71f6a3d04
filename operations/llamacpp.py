"""Build llama.cpp at a pinned commit on the host and switch `{prefix}/current` to it atomically."""

from __future__ import annotations

from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, OperationError, deploy, operation
from pyinfra.facts.files import Link
from pyinfra.facts.server import LinuxDistribution, Which
from pyinfra.operations import apt, pacman

from facts.cuda import CudaToolkit
from facts.gpu import NvidiaGpus
from facts.llamacpp import LlamaCppCheckout, LlamaServerVersion
from gpubox import build as plan
from gpubox.quoting import shell_word
from gpubox.spec import LlamaCppBuild

from .host_commands import connector_arguments, run
from .host_facts import fact_once

DEBIAN_PACKAGES = ["git", "cmake", "ninja-build", "build-essential", "ccache", "libssl-dev"]
ARCH_PACKAGES = ["git", "cmake", "ninja", "base-devel", "ccache", "openssl"]


@deploy("llama.cpp build dependencies")
def dependencies() -> None:
    """
    Install git, cmake, ninja, a C++ toolchain and ccache from the distro (apt or pacman); CUDA is
    the user's to install.

    **Example:**

    .. code:: python

        llamacpp.dependencies()
    """
    distro = host.get_fact(LinuxDistribution)
    names = {distro["name"] or "", *(distro["release_meta"].get("ID_LIKE", "") or "").split()}
    ids = {name.lower() for name in names} | {(distro["release_meta"].get("ID") or "").lower()}
    if ids & {"debian", "ubuntu"}:
        apt.packages(name="Install llama.cpp build dependencies (apt)", packages=DEBIAN_PACKAGES)
    elif ids & {"arch", "arch linux", "archlinux"}:
        pacman.packages(name="Install llama.cpp build dependencies (pacman)", packages=ARCH_PACKAGES)
    else:
        raise OperationError(
            f"gpubox installs build dependencies on Debian/Ubuntu and Arch; this host is {distro['name']!r}: "
            f"install {' '.join(DEBIAN_PACKAGES)} (or equivalents) by hand"
        )


@operation()
def source(build: LlamaCppBuild):  # type: ignore[no-untyped-def]
    """
    Fetch the pinned commit shallowly into ``{prefix}/src`` and check it out detached; a dirty tree is refused.

    + build: the ``LlamaCppBuild`` (repo, full commit, prefix)

    **Example:**

    .. code:: python

        llamacpp.source(name="llama.cpp source at 0c1e57098bba", build=box.llama_cpp)
    """
    src = plan.src_dir(build)
    checkout = host.get_fact(LlamaCppCheckout, path=src)
    if checkout is not None and checkout.dirty:
        changes = ", ".join(checkout.changes[:5])
        raise OperationError(
            f"{src} has uncommitted changes ({changes}): gpubox builds only a clean tree at the pinned "
            f"commit; commit or remove them (or delete {src})"
        )
    if checkout is not None and checkout.commit == build.commit and checkout.origin_url == build.repo:
        host.noop(f"{src} is at {build.commit[:12]}")
        return
    yield plan.fetch_script(build)


def _flavor(build: LlamaCppBuild) -> tuple[plan.Flavor, list[str]]:
    """The build's flavor and CUDA architectures on this host, from its GPU and CUDA facts."""
    gpus = fact_once(NvidiaGpus)
    try:
        flavor = plan.resolve_flavor(build, gpus, fact_once(CudaToolkit))
        return flavor, plan.resolve_architectures(build, gpus) if flavor == "cuda" else []
    except plan.BuildRefused as error:
        raise OperationError(str(error)) from error


def _installed(build: LlamaCppBuild, flavor: plan.Flavor) -> tuple[bool, bool]:
    """Whether the pinned build is installed (its llama-server reports the commit), and `current` points at it."""
    version = fact_once(LlamaServerVersion, path=f"{plan.install_dir(build, flavor)}/llama-server")
    current = fact_once(Link, path=plan.current_link(build))
    installed = version is not None and plan.reports_commit(version.commit, build.commit)
    points_here = bool(current) and current["link_target"].rstrip("/") == f"builds/{plan.build_name(build, flavor)}"
    return installed, points_here


@operation()
def install(build: LlamaCppBuild):  # type: ignore[no-untyped-def]
    """
    Configure, build and install into ``builds/{commit}-{flavor}``, then switch ``current`` to it.

    + build: the ``LlamaCppBuild``; ``cuda`` and ``cuda_architectures`` are resolved against the
      host's GPU and CUDA facts

    A no-op when that build is installed, its llama-server reports the pinned commit and ``current``
    points at it. A failed build leaves ``current`` and running services as they were.

    **Example:**

    .. code:: python

        llamacpp.install(name="llama.cpp build 0c1e57098bba -> /opt/llama.cpp/current", build=box.llama_cpp)
    """
    flavor, architectures = _flavor(build)
    installed, points_here = _installed(build, flavor)
    if installed:
        if points_here:
            host.noop(f"llama.cpp {build.commit[:12]} ({flavor}) is installed and current")
            return
        yield plan.switch_script(build, flavor)
        return
    ccache = host.get_fact(Which, command="ccache") is not None
    toolkit = fact_once(CudaToolkit)
    nvcc = toolkit.nvcc_path if (flavor == "cuda" and toolkit is not None) else None
    arch_note = f", CUDA architectures {';'.join(architectures)}" if architectures else ""
    host.log(
        f"building llama.cpp {build.commit[:12]} ({flavor}{arch_note}): progress below, "
        f"the full log in {shell_word(plan.log_path(build, flavor))}"
    )
    script = plan.build_script(build, flavor, architectures, nvcc, ccache)
    yield FunctionCommand(_build_showing_progress, (script, connector_arguments()), {})


def _build_showing_progress(script: str, arguments: dict[str, Any]) -> None:
    """Run the build script, its progress lines (one per 5 % of ninja's steps) shown as they come."""
    output = run(script, arguments, show_output=True)
    if any(line.startswith("pruned builds/") for line in output.stdout_lines):
        host.log("; ".join(line for line in output.stdout_lines if line.startswith("pruned ")))


@deploy("llama.cpp")
def build(spec: LlamaCppBuild, with_dependencies: bool = True) -> list:  # type: ignore[type-arg]
    """
    Dependencies, source at the pinned commit, build + install + switch; returns the op metas.

    + spec: the ``LlamaCppBuild``
    + with_dependencies: install the build dependencies first

    When the pinned build is installed and current, only the (no-op) install check is planned: the
    dependencies and the source checkout are not needed, and not read (a no-op run stays cheap).

    **Example:**

    .. code:: python

        build_metas = llamacpp.build(box.llama_cpp)
    """
    install_name = f"llama.cpp build {spec.commit[:12]} -> {spec.prefix}/current"
    if all(_installed(spec, _flavor(spec)[0])):
        return [install(name=install_name, build=spec)]
    if with_dependencies:
        dependencies()
    return [source(name=f"llama.cpp source at {spec.commit[:12]}", build=spec), install(name=install_name, build=spec)]
