"""Build a ggml project (llama.cpp, whisper.cpp) at a pinned commit on the host and switch
`{prefix}/current` to it atomically: one code path, the project's differences in its spec."""

from __future__ import annotations

from typing import Any

from pyinfra import host
from pyinfra.api import OperationError, deploy, operation
from pyinfra.facts.server import Which

from facts.build import InstalledBuild
from facts.cuda import CudaToolkit
from facts.gpu import NvidiaGpus
from facts.llamacpp import LlamaCppCheckout
from gpubox import build as plan
from gpubox import switch
from gpubox.quoting import shell_word
from gpubox.spec import AnySourceBuild, SourceBuild

from .distro import distro_name, package_manager
from .failures import python_step
from .host_commands import connector_arguments, run
from .host_facts import FactRead, read

DEBIAN_PACKAGES = ["git", "cmake", "ninja-build", "build-essential", "ccache", "libssl-dev"]
ARCH_PACKAGES = ["git", "cmake", "ninja", "base-devel", "ccache", "openssl"]


@deploy("Source build dependencies")
def dependencies() -> None:
    """
    Install git, cmake, ninja, a C++ toolchain and ccache from the distro (apt or pacman); CUDA is
    the user's to install.

    **Example:**

    .. code:: python

        source_build.dependencies()
    """
    # Here, not at the top: pyinfra's package operations take ~0.1 s to import, which a converged
    # host's deploy (the common case: nothing to install) should not pay.
    from pyinfra.operations import apt, pacman

    manager = package_manager()
    if manager == "apt":
        apt.packages(name="Install build dependencies (apt)", packages=DEBIAN_PACKAGES)
    elif manager == "pacman":
        pacman.packages(name="Install build dependencies (pacman)", packages=ARCH_PACKAGES)
    else:
        raise OperationError(
            f"gpubox installs build dependencies on Debian/Ubuntu and Arch; this host is {distro_name()!r}: "
            f"install {' '.join(DEBIAN_PACKAGES)} (or equivalents) by hand"
        )


@operation()
def source(build: AnySourceBuild):  # type: ignore[no-untyped-def]
    """
    Fetch the pinned commit shallowly into ``{prefix}/src`` and check it out detached; a dirty tree is refused.

    + build: the ``SourceBuild`` (repo, full commit, prefix)

    **Example:**

    .. code:: python

        source_build.source(name="llama.cpp source at 0c1e57098bba", build=box.llama_cpp)
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


def _flavor(build: SourceBuild) -> tuple[plan.Flavor, list[str]]:
    """The build's flavor and CUDA architectures on this host, from its GPU and CUDA facts."""
    gpus = read(_gpus_read())
    try:
        flavor = plan.resolve_flavor(build, gpus, read(_toolkit_read()))
        return flavor, plan.resolve_architectures(build, gpus) if flavor == "cuda" else []
    except plan.BuildRefused as error:
        raise OperationError(str(error)) from error


def _gpus_read() -> FactRead:
    return NvidiaGpus, {}


def _toolkit_read() -> FactRead:
    return CudaToolkit, {}


def _installed_read(build: SourceBuild, flavor: plan.Flavor) -> FactRead:
    return InstalledBuild, {"stamp": plan.stamp_path(build, flavor), "current": plan.current_link(build)}


def facts_read(build: SourceBuild) -> list[FactRead]:
    """What `build(...)` reads on a host where the build is installed (for `host_facts.prefetch`):
    the GPUs, the toolkit and the stamp of either flavor (which one is the host's depends on the first two).
    Each is built by the function its operation reads it with (`host_facts.read`)."""
    flavors: tuple[plan.Flavor, ...] = ("cpu", "cuda")
    return [_gpus_read(), _toolkit_read(), *(_installed_read(build, flavor) for flavor in flavors)]


def _installed(build: SourceBuild, flavor: plan.Flavor) -> tuple[bool, bool]:
    """Whether the pinned build is installed (its stamp records this project, commit, flavor and
    targets), and `current` points at it: one fact, no binary run."""
    fact = read(_installed_read(build, flavor))
    found = switch.InstalledBuild.model_validate(fact)
    return plan.is_installed(found, build, flavor)


@operation()
def install(build: AnySourceBuild):  # type: ignore[no-untyped-def]
    """
    Configure, build and install into ``builds/{commit}-{flavor}``, then switch ``current`` to it.

    + build: the ``SourceBuild``; ``cuda`` and ``cuda_architectures`` are resolved against the
      host's GPU and CUDA facts

    A no-op when that build is installed (its ``gpubox-build.json`` stamp records the project, the
    pinned commit, the flavor and the targets) and ``current`` points at it. A failed build leaves
    ``current`` and running services as they were.

    **Example:**

    .. code:: python

        source_build.install(name="llama.cpp build 0c1e57098bba -> /opt/llama.cpp/current", build=box.llama_cpp)
    """
    flavor, architectures = _flavor(build)
    installed, points_here = _installed(build, flavor)
    if installed:
        if points_here:
            host.noop(f"{build.PROJECT.name} {build.commit[:12]} ({flavor}) is installed and current")
            return
        yield plan.switch_script(build, flavor)
        return
    ccache = host.get_fact(Which, command="ccache") is not None
    toolkit = read(_toolkit_read())
    nvcc = toolkit.nvcc_path if (flavor == "cuda" and toolkit is not None) else None
    arch_note = f", CUDA architectures {';'.join(architectures)}" if architectures else ""
    host.log(
        f"building {build.PROJECT.name} {build.commit[:12]} ({flavor}{arch_note}): progress below, "
        f"the full log in {shell_word(plan.log_path(build, flavor))}"
    )
    script = plan.build_script(build, flavor, architectures, nvcc, ccache)
    yield python_step(_build_showing_progress, script, connector_arguments())  # a failed build: its message only


def _build_showing_progress(script: str, arguments: dict[str, Any]) -> None:
    """Run the build script, its progress lines (one per 5 % of ninja's steps) shown as they come."""
    output = run(script, arguments, show_output=True)
    if any(line.startswith("pruned builds/") for line in output.stdout_lines):
        host.log("; ".join(line for line in output.stdout_lines if line.startswith("pruned ")))


@deploy("Source build")
def build(spec: SourceBuild, with_dependencies: bool = True) -> list:  # type: ignore[type-arg]
    """
    Dependencies, source at the pinned commit, build + install + switch; returns the op metas.

    + spec: the ``SourceBuild``
    + with_dependencies: install the build dependencies first

    When the pinned build is installed and current, only the (no-op) install check is planned: the
    dependencies and the source checkout are not needed, and not read (a no-op run stays cheap).

    **Example:**

    .. code:: python

        build_metas = source_build.build(box.llama_cpp)
    """
    project = spec.PROJECT.name
    install_name = f"{project} build {spec.commit[:12]} -> {spec.prefix}/current"
    if all(_installed(spec, _flavor(spec)[0])):
        return [install(name=install_name, build=spec)]
    if with_dependencies:
        dependencies()
    return [source(name=f"{project} source at {spec.commit[:12]}", build=spec), install(name=install_name, build=spec)]
