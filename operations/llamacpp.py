"""Build llama.cpp at a pinned commit on the host and switch `{prefix}/current` to it atomically."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import OperationError, deploy, operation
from pyinfra.facts.files import Link
from pyinfra.facts.server import LinuxDistribution, Which
from pyinfra.operations import apt, pacman

from facts.cuda import CudaToolkit
from facts.gpu import NvidiaGpus
from facts.llamacpp import LlamaCppCheckout, LlamaServerVersion
from gpubox import build as plan
from gpubox.spec import LlamaCppBuild

DEBIAN_PACKAGES = ["git", "cmake", "ninja-build", "build-essential", "ccache", "libssl-dev"]
ARCH_PACKAGES = ["git", "cmake", "ninja", "base-devel", "ccache", "openssl"]


@deploy("llama.cpp build dependencies")
def dependencies() -> None:
    """git, cmake, ninja, a C++ toolchain and ccache from the distro; CUDA is the user's to install."""
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
    """The checkout in `{prefix}/src`, detached at the pinned commit; a dirty tree is refused."""
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


@operation()
def install(build: LlamaCppBuild):  # type: ignore[no-untyped-def]
    """Configure, build and install into builds/{commit}-{flavor}, then switch `current` to it.

    A no-op when that build is installed, its llama-server reports the pinned commit and `current`
    points at it. A failed build leaves `current` and running services as they were.
    """
    gpus = host.get_fact(NvidiaGpus)
    toolkit = host.get_fact(CudaToolkit)
    try:
        flavor = plan.resolve_flavor(build, gpus, toolkit)
        architectures = plan.resolve_architectures(build, gpus) if flavor == "cuda" else []
    except plan.BuildRefused as error:
        raise OperationError(str(error)) from error
    name = plan.build_name(build, flavor)
    version = host.get_fact(LlamaServerVersion, path=f"{plan.install_dir(build, flavor)}/llama-server")
    current = host.get_fact(Link, path=plan.current_link(build))
    points_here = bool(current) and current["link_target"].rstrip("/") == f"builds/{name}"
    if version is not None and plan.reports_commit(version.commit, build.commit):
        if points_here:
            host.noop(f"llama.cpp {build.commit[:12]} ({flavor}) is installed and current")
            return
        yield plan.switch_script(build, flavor)
        return
    ccache = host.get_fact(Which, command="ccache") is not None
    nvcc = toolkit.nvcc_path if (flavor == "cuda" and toolkit is not None) else None
    arch_note = f", CUDA architectures {';'.join(architectures)}" if architectures else ""
    host.log(
        f"building llama.cpp {build.commit[:12]} ({flavor}{arch_note}); progress: "
        f"tail -f {shlex.quote(plan.log_path(build, flavor))}"
    )
    yield plan.build_script(build, flavor, architectures, nvcc, ccache)


@deploy("llama.cpp")
def build(spec: LlamaCppBuild, with_dependencies: bool = True) -> list:  # type: ignore[type-arg]
    """Dependencies, source at the pinned commit, build + install + switch; returns the op metas."""
    if with_dependencies:
        dependencies()
    return [
        source(name=f"llama.cpp source at {spec.commit[:12]}", build=spec),
        install(name=f"llama.cpp build {spec.commit[:12]} -> {spec.prefix}/current", build=spec),
    ]
