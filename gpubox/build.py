"""What a pinned llama.cpp build is on a host: its directories, flavor, CMake flags and build script.

The operation compares facts with these and runs the script; everything here is pure so it can be
tested without a host. The layout under the prefix:

    {prefix}/src                      the git checkout, detached at the pinned commit
    {prefix}/work/{commit}-{flavor}   the CMake build tree (kept: ccache and incremental rebuilds)
    {prefix}/builds/{commit}-{flavor} the installed bin directory (binaries + the shared libraries)
    {prefix}/current                  symlink to the active build, switched atomically
    {prefix}/logs/build-{commit}-{flavor}.log
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Literal

from gpubox.cuda import CudaToolkit
from gpubox.gpu import Gpu, cuda_architectures
from gpubox.spec import LlamaCppBuild

Flavor = Literal["cpu", "cuda"]

CUDA_SEARCH_PATHS = ("PATH", "/usr/local/cuda/bin", "/opt/cuda/bin")


class BuildRefused(ValueError):
    """The build can't go ahead as specified on this host; the message says what to change."""


def src_dir(build: LlamaCppBuild) -> str:
    return f"{build.prefix}/src"


def build_name(build: LlamaCppBuild, flavor: Flavor) -> str:
    return f"{build.commit}-{flavor}"


def install_dir(build: LlamaCppBuild, flavor: Flavor) -> str:
    return f"{build.prefix}/builds/{build_name(build, flavor)}"


def work_dir(build: LlamaCppBuild, flavor: Flavor) -> str:
    return f"{build.prefix}/work/{build_name(build, flavor)}"


def log_path(build: LlamaCppBuild, flavor: Flavor) -> str:
    return f"{build.prefix}/logs/build-{build_name(build, flavor)}.log"


def current_link(build: LlamaCppBuild) -> str:
    return f"{build.prefix}/current"


def previous_link(build: LlamaCppBuild) -> str:
    """What `current` pointed at before the last switch: a failed smoke test switches back to it."""
    return f"{build.prefix}/previous"


def _switch_lines(build: LlamaCppBuild, flavor: Flavor) -> list[str]:
    """Remember the active build as `previous`, then point `current` at this one (renames only)."""
    current = shlex.quote(current_link(build))
    previous = shlex.quote(previous_link(build))
    target = f"builds/{build_name(build, flavor)}"
    return [
        f'if [ -L {current} ] && [ "$(readlink {current})" != {target} ]; then '
        f'ln -sfn "$(readlink {current})" {previous}.new && mv -T {previous}.new {previous}; fi',
        f"ln -sfn {target} {current}.new && mv -T {current}.new {current}",
    ]


def rollback_script(build: LlamaCppBuild) -> str:
    """Point `current` back at `previous` (after a smoke test missed on a new build)."""
    current = shlex.quote(current_link(build))
    previous = shlex.quote(previous_link(build))
    return (
        f'if [ -L {previous} ]; then ln -sfn "$(readlink {previous})" {current}.new '
        f"&& mv -T {current}.new {current}; fi"
    )


def resolve_flavor(build: LlamaCppBuild, gpus: Sequence[Gpu], toolkit: CudaToolkit | None) -> Flavor:
    """CUDA when asked (`on`), or when `auto` finds both GPUs and nvcc; refuse `on` without nvcc."""
    if build.cuda == "off":
        return "cpu"
    if build.cuda == "on":
        if toolkit is None:
            raise BuildRefused(
                "cuda='on' but the host has no nvcc: looked on PATH, in /usr/local/cuda/bin and in "
                "/opt/cuda/bin. gpubox does not install CUDA: install the CUDA toolkit, or set cuda='auto' "
                "or 'off' for a CPU build"
            )
        return "cuda"
    return "cuda" if gpus and toolkit is not None else "cpu"


def resolve_architectures(build: LlamaCppBuild, gpus: Sequence[Gpu]) -> list[str]:
    """The CUDA architectures to compile for: the spec's, or the GPUs' compute capabilities."""
    if build.cuda_architectures != "auto":
        return list(build.cuda_architectures)
    architectures = cuda_architectures(gpus)
    if not architectures:
        raise BuildRefused(
            "cuda_architectures='auto' needs GPUs to read compute capabilities from, and nvidia-smi "
            "lists none: set cuda_architectures explicitly, e.g. ['89'] for an RTX 4090"
        )
    return architectures


def cmake_configure_args(
    build: LlamaCppBuild,
    flavor: Flavor,
    architectures: Sequence[str] = (),
    nvcc: str | None = None,
    ccache: bool = True,
) -> list[str]:
    """`cmake -S src -B work ...` for this build: CUDA, CPU features, rpath, ccache, no UI download."""
    args = [
        "cmake", "-S", src_dir(build), "-B", work_dir(build, flavor), "-G", "Ninja",
        "-DCMAKE_BUILD_TYPE=Release",
        # The binaries find the shared libraries installed next to them, wherever the bin dir is.
        "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        f"-DLLAMA_USE_PREBUILT_UI={'ON' if build.prebuilt_ui else 'OFF'}",
        f"-DGGML_NATIVE={'ON' if build.native else 'OFF'}",
    ]  # fmt: skip
    if not build.native:
        args += [f"-DGGML_{feature}=ON" for feature in build.cpu_features]
    if flavor == "cuda":
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(architectures)}"]
        if nvcc is not None:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    else:
        args.append("-DGGML_CUDA=OFF")
    if ccache:
        launchers = ["C", "CXX"] + (["CUDA"] if flavor == "cuda" else [])
        args += [f"-DCMAKE_{language}_COMPILER_LAUNCHER=ccache" for language in launchers]
    args += list(build.extra_cmake_args)
    return args


def fetch_script(build: LlamaCppBuild) -> str:
    """Clone or fetch the pinned commit shallowly into src and check it out detached.

    A full sha can be fetched with `--depth 1`; the origin URL is (re)set to the spec's repo.
    """
    src = shlex.quote(src_dir(build))
    repo = shlex.quote(build.repo)
    commit = shlex.quote(build.commit)
    return "\n".join([
        "set -eu",
        f"mkdir -p {src}",
        f"if [ ! -d {src}/.git ]; then git init -q {src}; fi",
        f"git -C {src} remote add origin {repo} 2>/dev/null || git -C {src} remote set-url origin {repo}",
        f"git -C {src} fetch -q --depth 1 origin {commit}",
        f"git -C {src} -c advice.detachedHead=false checkout -q --detach {commit}",
        f'test "$(git -C {src} rev-parse HEAD)" = {commit}',
    ])  # fmt: skip


def build_script(
    build: LlamaCppBuild,
    flavor: Flavor,
    architectures: Sequence[str] = (),
    nvcc: str | None = None,
    ccache: bool = True,
) -> str:
    """Configure, build and install into a fresh builds/ directory, then switch `current`.

    Output goes to the log (ninja's [N/M] lines show progress); on failure the last lines are
    printed with the log's path, and neither `current` nor the running services are touched:
    the install is a rename of a complete directory and the switch a rename of a symlink.
    """
    log = shlex.quote(log_path(build, flavor))
    work = shlex.quote(work_dir(build, flavor))
    final = shlex.quote(install_dir(build, flavor))
    staging = shlex.quote(f"{install_dir(build, flavor)}.partial")
    configure = shlex.join(cmake_configure_args(build, flavor, architectures, nvcc, ccache))
    parallel = f" -j {build.jobs}" if build.jobs else ""
    targets = " ".join(shlex.quote(target) for target in build.targets)
    # Paths under the prefix are hashed relative to it, so the same commit built under another
    # prefix (another host's, a test machine's) hits the same ccache entries.
    env = f"export CCACHE_COMPILERCHECK=content CCACHE_BASEDIR={shlex.quote(build.prefix)}"
    if build.ccache_dir is not None:
        env += f" CCACHE_DIR={shlex.quote(build.ccache_dir)}"
    if nvcc is not None:
        env += f" PATH={shlex.quote(nvcc.rsplit('/', 1)[0])}:$PATH"
    return "\n".join([
        "set -eu",
        env,
        "mkdir -p " + " ".join(shlex.quote(f"{build.prefix}/{part}") for part in ("logs", "builds", "work")),
        f": > {log}",
        "fail() {",
        f"  echo \"llama.cpp build failed: $1; full log: {log_path(build, flavor)}\" >&2",
        f"  tail -n 25 {log} >&2",
        "  exit 1",
        "}",
        f"{configure} >> {log} 2>&1 || fail configure",
        f"cmake --build {work} --target {targets}{parallel} >> {log} 2>&1 || fail build",
        f"rm -rf {staging} && mkdir -p {staging}",
        f"cp -a {work}/bin/. {staging}/",
        f"{staging}/llama-server --version >> {log} 2>&1 || fail 'the built llama-server does not run'",
        f"rm -rf {final} && mv -T {staging} {final}",
        *_switch_lines(build, flavor),
        f"echo \"installed {install_dir(build, flavor)}; current -> builds/{build_name(build, flavor)}\"",
    ])  # fmt: skip


def switch_script(build: LlamaCppBuild, flavor: Flavor) -> str:
    """Point `current` at an already installed build (a rollback or a flavor switch)."""
    return "\n".join(_switch_lines(build, flavor))


def reports_commit(reported: str | None, commit: str) -> bool:
    """Whether a `--version` short commit names the pinned full commit."""
    return reported is not None and len(reported) >= 7 and commit.startswith(reported.lower())
