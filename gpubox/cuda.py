"""The CUDA toolkit (``nvcc``) of a host: where it is and which release."""

from __future__ import annotations

import re
from collections.abc import Sequence

from gpubox.records import Record

# Where CUDA installs nvcc when it is not on PATH: NVIDIA's packages, and Arch's cuda package.
NVCC_CANDIDATES = ("/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc")

_RELEASE_RE = re.compile(r"Cuda compilation tools, release (\d+\.\d+), (V[\w.]+)")
_BUILD_RE = re.compile(r"^Build (\S+)")


class Nvcc(Record):
    nvcc_path: str
    release: str
    """``major.minor``, e.g. ``"13.0"``."""
    version: str
    """The full nvcc version, e.g. ``"13.0.88"``."""
    build: str | None
    """e.g. ``"cuda_13.0.r13.0/compiler.36424714_0"``."""

    @property
    def release_tuple(self) -> tuple[int, int]:
        major, minor = self.release.split(".")
        return int(major), int(minor)


def nvcc_probe_command() -> str:
    """Print the first nvcc found (PATH, then the usual install prefixes) and its ``--version``."""
    candidates = " ".join(NVCC_CANDIDATES)
    return (
        "nvcc_path=$(command -v nvcc 2>/dev/null); "
        f'if [ -z "$nvcc_path" ]; then for c in {candidates}; do '
        'if [ -x "$c" ]; then nvcc_path=$c; break; fi; done; fi; '
        'if [ -n "$nvcc_path" ]; then echo "$nvcc_path"; "$nvcc_path" --version 2>&1 || true; fi'
    )


def parse_nvcc_version(nvcc_path: str, lines: Sequence[str]) -> Nvcc:
    """Parse ``nvcc --version``, whose last lines are like
    ``Cuda compilation tools, release 13.0, V13.0.88`` and ``Build cuda_13.0.r13.0/compiler.36424714_0``.
    """
    release_match = None
    build = None
    for line in lines:
        release_match = release_match or _RELEASE_RE.search(line)
        build_match = _BUILD_RE.match(line.strip())
        if build_match is not None:
            build = build_match.group(1)
    if release_match is None:
        output = "\n".join(lines).strip() or "(no output)"
        raise ValueError(f"{nvcc_path} --version printed no CUDA release: {output}")
    return Nvcc(
        nvcc_path=nvcc_path,
        release=release_match.group(1),
        version=release_match.group(2).removeprefix("V"),
        build=build,
    )


def parse_nvcc_probe(lines: Sequence[str]) -> Nvcc | None:
    """Output of :func:`nvcc_probe_command`: None when no nvcc was found."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        return None
    return parse_nvcc_version(lines[0].strip(), lines[1:])
