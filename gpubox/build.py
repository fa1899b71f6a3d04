"""What a pinned source build (llama.cpp, whisper.cpp) is on a host: directories, flavor, CMake flags, script.

The operation compares facts with these and runs the script; everything here is pure so it can be
tested without a host. The layout under the prefix:

    {prefix}/src                      the git checkout, detached at the pinned commit
    {prefix}/work/{commit}-{flavor}   the CMake build tree (kept: ccache and incremental rebuilds)
    {prefix}/builds/{commit}-{flavor} the installed bin directory (binaries + the shared libraries)
    {prefix}/current                  symlink to the active build, switched atomically
    {prefix}/logs/build-{commit}-{flavor}.log

Each build keeps `gpubox-build.json` (project, commit, flavor, targets: what the no-op check
compares, for every project alike), `{server}.help` and, where the server has a version flag,
`{server}.version` beside its binary (the facts read them instead of running the binary on every
deploy); a switch prunes all but `keep_builds`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal

from gpubox import switch
from gpubox.binaries import HELP_CACHE_SUFFIX, VERSION_CACHE_SUFFIX
from gpubox.cuda import Nvcc
from gpubox.gpu import Gpu, cuda_architectures
from gpubox.quoting import shell_join, shell_word
from gpubox.spec import SourceBuild

Flavor = Literal["cpu", "cuda"]


class BuildRefused(ValueError):
    """The build can't go ahead as specified on this host; the message says what to change."""


def src_dir(build: SourceBuild) -> str:
    return f"{build.prefix}/src"


def options_fingerprint(build: SourceBuild) -> str | None:
    """A short hash of the CPU and CMake options a spec sets beyond the defaults (``native``, ``cpu_features``,
    ``extra_cmake_args``); None when it sets none. Part of the build's name: a changed option is a new build,
    never a silent reuse of one built without it."""
    defaults = {name: type(build).model_fields[name].default for name in ("native", "cpu_features", "extra_cmake_args")}
    chosen = {name: getattr(build, name) for name in defaults}
    if chosen == defaults:
        return None
    record = json.dumps({name: list(value) if isinstance(value, tuple) else value for name, value in chosen.items()},
                        sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()[:8]


def build_name(build: SourceBuild, flavor: Flavor) -> str:
    """``{commit}-{flavor}``, then the project's options (``-rpc``) and the others' fingerprint (``-o1a2b3c4d``)."""
    fingerprint = options_fingerprint(build)
    suffix = "".join(f"-{option}" for option in build.variant) + (f"-o{fingerprint}" if fingerprint else "")
    return f"{build.commit}-{flavor}{suffix}"


def install_dir(build: SourceBuild, flavor: Flavor) -> str:
    return f"{build.prefix}/builds/{build_name(build, flavor)}"


def work_dir(build: SourceBuild, flavor: Flavor) -> str:
    return f"{build.prefix}/work/{build_name(build, flavor)}"


def log_path(build: SourceBuild, flavor: Flavor) -> str:
    return f"{build.prefix}/logs/build-{build_name(build, flavor)}.log"


def current_link(build: SourceBuild) -> str:
    return switch.current_link(build.prefix)


STAMP_NAME = "gpubox-build.json"


def stamp_path(build: SourceBuild, flavor: Flavor) -> str:
    return f"{install_dir(build, flavor)}/{STAMP_NAME}"


def stamp_text(build: SourceBuild, flavor: Flavor) -> str:
    """What a build is, recorded beside it: the install check compares it (no binary runs)."""
    record: dict[str, object] = {
        "project": build.PROJECT.name, "commit": build.commit, "flavor": flavor, "targets": list(build.targets),
    }  # fmt: skip
    if build.variant:
        record["options"] = list(build.variant)
    if options_fingerprint(build) is not None:
        record["extra_cmake_args"] = list(build.extra_cmake_args)
        record["cpu"] = "native" if build.native else list(build.cpu_features)
    return json.dumps(record, sort_keys=True)


def stamp_matches(found: str | None, build: SourceBuild, flavor: Flavor) -> bool:
    """Whether a build's stamp (its text, None when missing) records this project, commit, flavor and targets."""
    return switch.stamp_matches(found, stamp_text(build, flavor))


def _progress_awk(project: str) -> str:
    """ninja prints `[n/N] ...` per step; print a line per 5 % of them, so the controller shows progress."""
    return (
        "awk -F'[][/]' '/^\\[[0-9]+\\/[0-9]+\\]/ { step = int($2 * 20 / $3); if (step > shown) "
        f"{{ shown = step; printf \"{project} build: %d/%d steps (%d%%)\\n\", $2, $3, step * 5; fflush() }} }}'"
    )


def prune_lines(build: SourceBuild) -> list[str]:
    """Remove installed builds (and their work trees and logs) beyond `keep_builds`, newest kept first."""
    prefix = shell_word(build.prefix)
    also = (f'{prefix}/work/"$name"', f'{prefix}/logs/build-"$name".log')
    return switch.prune_lines(build.prefix, "builds", build.keep_builds, also)


def _switch_lines(build: SourceBuild, flavor: Flavor) -> list[str]:
    return switch.switch_lines(build.prefix, f"builds/{build_name(build, flavor)}")


def rollback_script(build: SourceBuild) -> str:
    """Point `current` back at `previous` (after a smoke test missed on a new build)."""
    return switch.rollback_script(build.prefix)


def resolve_flavor(build: SourceBuild, gpus: Sequence[Gpu], toolkit: Nvcc | None) -> Flavor:
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


def resolve_architectures(build: SourceBuild, gpus: Sequence[Gpu]) -> list[str]:
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
    build: SourceBuild,
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
        *build.project_cmake_options(),
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


def fetch_script(build: SourceBuild) -> str:
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
    build: SourceBuild,
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
        f"  printf '%s build failed: %s; full log: %s\\n' {shell_word(build.PROJECT.name)} \"$1\" {log} >&2",
        f"  tail -n 25 {log} >&2",
        "  exit 1",
        "}",
        f"{configure} >> {log} 2>&1 || fail configure",
        f"rm -f {failed}",
        f"{{ cmake --build {work} --target {targets}{parallel} 2>&1 || echo $? > {failed}; }} "
        f"| tee -a {log} | {_progress_awk(build.PROJECT.name)}",
        f"if [ -e {failed} ]; then rm -f {failed}; fail build; fi",
        f"rm -rf {staging} && mkdir -p {staging}",
        f"cp -a {shell_word(f'{work_dir(build, flavor)}/bin/.')} {shell_word(f'{staging_dir}/')}",
        *_describe_lines(build, staging_dir),
        f"printf '%s\\n' {shell_word(stamp_text(build, flavor))} > {shell_word(f'{staging_dir}/{STAMP_NAME}')}",
        f"rm -rf {final} && mv -T {staging} {final}",
        *_switch_lines(build, flavor),
        f"printf 'installed %s; current -> %s\\n' {final} {current}",
        *prune_lines(build),
    ])  # fmt: skip


def _describe_lines(build: SourceBuild, staging_dir: str) -> list[str]:
    """Save the server's `--help` (and `--version`, when it has one) beside it: the facts read these.

    whisper-server exits 0 on any flag and prints usage for `--help` (its exit status says nothing),
    so a help text without a single option line fails the build as well.
    """
    server = build.PROJECT.server
    lines = []
    if build.PROJECT.version_flag is not None:
        binary = shell_word(f"{staging_dir}/{server}")
        lines.append(
            f"{binary} {build.PROJECT.version_flag} > {shell_word(f'{staging_dir}/{server}{VERSION_CACHE_SUFFIX}')} "
            f"2>&1 || fail {shell_word(f'the built {server} does not run')}"
        )
    for program in build.programs:  # ggml-rpc-server, like whisper-server, exits 0 on any flag
        binary = shell_word(f"{staging_dir}/{program}")
        help_file = shell_word(f"{staging_dir}/{program}{HELP_CACHE_SUFFIX}")
        lines += [
            f"{binary} --help > {help_file} 2>&1 "
            f"|| fail {shell_word(f'the built {program} --help failed')}",
            f"grep -q -- '^ *--\\?[a-z]' {help_file} "
            f"|| fail {shell_word(f'the built {program} --help lists no options')}",
        ]
    return lines


def switch_script(build: SourceBuild, flavor: Flavor) -> str:
    """Point `current` at an already installed build (a rollback or a flavor switch), then prune."""
    return "\n".join([*_switch_lines(build, flavor), *prune_lines(build)])


def is_installed(found: switch.InstalledBuild, build: SourceBuild, flavor: Flavor) -> tuple[bool, bool]:
    """Whether this build is installed (its stamp matches), and whether `current` points at it."""
    return switch.installed_here(found, stamp_text(build, flavor), f"builds/{build_name(build, flavor)}")
