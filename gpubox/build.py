"""What a pinned llama.cpp build is on a host: its directories, flavor, CMake flags and build script.

The operation compares facts with these and runs the script; everything here is pure so it can be
tested without a host. The layout under the prefix:

    {prefix}/src                      the git checkout, detached at the pinned commit
    {prefix}/work/{commit}-{flavor}   the CMake build tree (kept: ccache and incremental rebuilds)
    {prefix}/builds/{commit}-{flavor} the installed bin directory (binaries + the shared libraries)
    {prefix}/current                  symlink to the active build, switched atomically
    {prefix}/logs/build-{commit}-{flavor}.log

Each build keeps `llama-server.version` and `llama-server.help` beside its binary (the facts read
them instead of running the binary on every deploy), and a switch prunes all but `keep_builds`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from gpubox.cuda import Nvcc
from gpubox.gpu import Gpu, cuda_architectures
from gpubox.llamacpp import HELP_CACHE_SUFFIX, VERSION_CACHE_SUFFIX
from gpubox.quoting import shell_join, shell_word
from gpubox.spec import LlamaCppBuild

Flavor = Literal["cpu", "cuda"]


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


# ninja prints `[n/N] ...` per step; print a line per 5 % of them, so the controller shows progress.
_PROGRESS_AWK = (
    "awk -F'[][/]' '/^\\[[0-9]+\\/[0-9]+\\]/ { step = int($2 * 20 / $3); if (step > shown) "
    "{ shown = step; printf \"llama.cpp build: %d/%d steps (%d%%)\\n\", $2, $3, step * 5; fflush() } }'"
)


def prune_lines(build: LlamaCppBuild) -> list[str]:
    """Remove installed builds (and their work trees and logs) beyond `keep_builds`, newest kept first.

    `current` and `previous` are always kept. One directory a line (a newline is refused in paths).
    """
    prefix = shell_word(build.prefix)
    others = build.keep_builds - 2
    return [
        f'current=$(readlink {prefix}/current || true); previous=$(readlink {prefix}/previous || true); kept=0',
        f"ls -1td {prefix}/builds/*/ 2>/dev/null | while IFS= read -r dir; do",
        '  name=$(basename "$dir")',
        '  if [ "builds/$name" = "$current" ] || [ "builds/$name" = "$previous" ]; then continue; fi',
        f"  if [ $kept -lt {others} ]; then kept=$((kept + 1)); continue; fi",
        f'  rm -rf "$dir" {prefix}/work/"$name" {prefix}/logs/build-"$name".log && echo "pruned builds/$name"',
        "done",
    ]


def _switch_lines(build: LlamaCppBuild, flavor: Flavor) -> list[str]:
    """Remember the active build as `previous`, then point `current` at this one (renames only)."""
    current = shell_word(current_link(build))
    current_new = shell_word(f"{current_link(build)}.new")
    previous = shell_word(previous_link(build))
    previous_new = shell_word(f"{previous_link(build)}.new")
    target = shell_word(f"builds/{build_name(build, flavor)}")
    return [
        f'if [ -L {current} ] && [ "$(readlink {current})" != {target} ]; then '
        f'ln -sfn "$(readlink {current})" {previous_new} && mv -T {previous_new} {previous}; fi',
        f"ln -sfn {target} {current_new} && mv -T {current_new} {current}",
    ]


def rollback_script(build: LlamaCppBuild) -> str:
    """Point `current` back at `previous` (after a smoke test missed on a new build)."""
    current = shell_word(current_link(build))
    current_new = shell_word(f"{current_link(build)}.new")
    previous = shell_word(previous_link(build))
    return (
        f'if [ -L {previous} ]; then ln -sfn "$(readlink {previous})" {current_new} '
        f"&& mv -T {current_new} {current}; fi"
    )


def resolve_flavor(build: LlamaCppBuild, gpus: Sequence[Gpu], toolkit: Nvcc | None) -> Flavor:
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
    src = shell_word(src_dir(build))
    repo = shell_word(build.repo)
    commit = shell_word(build.commit)
    return "\n".join([
        "set -eu",
        f"mkdir -p {src}",
        f"if [ ! -d {shell_word(f'{src_dir(build)}/.git')} ]; then git init -q {src}; fi",
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

    Output goes to the log; a line per 5 % of ninja's steps goes to stdout, for the controller to
    show while the build runs. On failure the last lines are printed with the log's path, and
    neither `current` nor the running services are touched: the install is a rename of a complete
    directory and the switch a rename of a symlink. Older builds are pruned after the switch.
    """
    log = shell_word(log_path(build, flavor))
    failed = shell_word(f"{log_path(build, flavor)}.failed")  # the pipe to the progress filter hides cmake's status
    work = shell_word(work_dir(build, flavor))
    final = shell_word(install_dir(build, flavor))
    staging_dir = f"{install_dir(build, flavor)}.partial"
    staging = shell_word(staging_dir)
    configure = shell_join(cmake_configure_args(build, flavor, architectures, nvcc, ccache))
    parallel = f" -j {int(build.jobs)}" if build.jobs else ""
    targets = shell_join(build.targets)
    current = shell_word(f"builds/{build_name(build, flavor)}")
    # Paths under the prefix are hashed relative to it, so the same commit built under another
    # prefix (another host's, a test machine's) hits the same ccache entries.
    env = f"export CCACHE_COMPILERCHECK=content CCACHE_BASEDIR={shell_word(build.prefix)}"
    if build.ccache_dir is not None:
        env += f" CCACHE_DIR={shell_word(build.ccache_dir)}"
    if nvcc is not None:
        env += f" PATH={shell_word(nvcc.rsplit('/', 1)[0])}:$PATH"
    return "\n".join([
        "set -eu",
        env,
        "mkdir -p " + shell_join(f"{build.prefix}/{part}" for part in ("logs", "builds", "work")),
        f": > {log}",
        "fail() {",
        f"  printf 'llama.cpp build failed: %s; full log: %s\\n' \"$1\" {log} >&2",
        f"  tail -n 25 {log} >&2",
        "  exit 1",
        "}",
        f"{configure} >> {log} 2>&1 || fail configure",
        f"rm -f {failed}",
        f"{{ cmake --build {work} --target {targets}{parallel} 2>&1 || echo $? > {failed}; }} "
        f"| tee -a {log} | {_PROGRESS_AWK}",
        f"if [ -e {failed} ]; then rm -f {failed}; fail build; fi",
        f"rm -rf {staging} && mkdir -p {staging}",
        f"cp -a {shell_word(f'{work_dir(build, flavor)}/bin/.')} {shell_word(f'{staging_dir}/')}",
        f"{shell_word(f'{staging_dir}/llama-server')} --version > "
        f"{shell_word(f'{staging_dir}/llama-server{VERSION_CACHE_SUFFIX}')} 2>&1 "
        "|| fail 'the built llama-server does not run'",
        f"{shell_word(f'{staging_dir}/llama-server')} --help > "
        f"{shell_word(f'{staging_dir}/llama-server{HELP_CACHE_SUFFIX}')} 2>&1 "
        "|| fail 'the built llama-server --help failed'",
        f"rm -rf {final} && mv -T {staging} {final}",
        *_switch_lines(build, flavor),
        f"printf 'installed %s; current -> %s\\n' {final} {current}",
        *prune_lines(build),
    ])  # fmt: skip


def switch_script(build: LlamaCppBuild, flavor: Flavor) -> str:
    """Point `current` at an already installed build (a rollback or a flavor switch), then prune."""
    return "\n".join([*_switch_lines(build, flavor), *prune_lines(build)])


def reports_commit(reported: str | None, commit: str) -> bool:
    """Whether a `--version` short commit names the pinned full commit."""
    return reported is not None and len(reported) >= 7 and commit.startswith(reported.lower())
