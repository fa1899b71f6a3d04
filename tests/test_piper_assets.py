"""The piper TTS test assets: the offline wheelhouse and the joe voice (downloads ~140 MB on first run)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.testbed.piper_assets import PIPER_VERSION, piper_voice, piper_voice_sha256, piper_wheelhouse

FIXTURES = Path(__file__).parent / "fixtures" / "piper"


def _wheel(wheelhouse: Path, dist: str) -> Path:
    found = sorted(wheelhouse.glob(f"{dist}-*.whl"))
    assert len(found) == 1, f"{dist}: {found}"
    return found[0]


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return zf.read(name).decode()


def test_wheelhouse_holds_piper_and_the_http_extra() -> None:
    wh = piper_wheelhouse()
    assert wh == piper_wheelhouse()  # reused, not downloaded again
    files = sorted(p.name for p in wh.iterdir())
    assert files and all(f.endswith(".whl") for f in files), files  # nothing for the host to build
    piper = _wheel(wh, "piper_tts")
    assert piper.name.startswith(f"piper_tts-{PIPER_VERSION}-") and "x86_64" in piper.name
    meta = _metadata(piper)
    assert f"Version: {PIPER_VERSION}" in meta
    assert 'Requires-Dist: flask<4,>=3; extra == "http"' in meta
    flask = _wheel(wh, "flask")
    assert int(flask.name.split("-")[1].split(".")[0]) == 3
    # onnxruntime is the CPU build for cp311: no onnxruntime_gpu, and every binary wheel fits bookworm's cp311
    ort = _wheel(wh, "onnxruntime")
    assert "cp311-cp311-manylinux" in ort.name
    assert not any(f.startswith("onnxruntime_gpu") for f in files)
    for f in files:
        py, abi, plat = f.removesuffix(".whl").split("-")[-3:]
        assert plat == "any" or "manylinux" in plat and plat.endswith("x86_64"), f
        assert abi in ("none", "abi3", "cp311"), f
    # every dependency of piper-tts[http] (and theirs) on cp311 Linux has a wheel here, in a matching version
    versions = {canonicalize_name(f.split("-")[0]): Version(f.split("-")[1]) for f in files}
    for wheel in wh.glob("*.whl"):
        extra = "http" if wheel == piper else ""
        for line in _metadata(wheel).splitlines():
            if not line.startswith("Requires-Dist: "):
                continue
            req = Requirement(line.removeprefix("Requires-Dist: "))
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                name = canonicalize_name(req.name)
                assert name in versions and versions[name] in req.specifier, (wheel.name, line)


def test_voice_is_unpacked_and_its_config_names_the_sample_rate() -> None:
    onnx, config = piper_voice()
    assert onnx.name == "en_US-joe-medium.onnx" and config.name == "en_US-joe-medium.onnx.json"
    assert onnx.stat().st_size > 50_000_000
    assert len(piper_voice_sha256()) == 64
    voice = json.loads(config.read_text())
    assert voice["audio"]["sample_rate"] == 22050
    assert voice["audio"]["quality"] == "medium"
    assert voice["espeak"]["voice"] == "en-us"
    assert voice["num_speakers"] == 1
    assert voice["language"]["code"] == "en_US"


def test_help_fixture_matches_the_wheel_http_server() -> None:
    """Every option piper.http_server declares in the wheel appears in the recorded --help."""
    help_text = (FIXTURES / f"http-server-help-{PIPER_VERSION}.txt").read_text()
    with zipfile.ZipFile(_wheel(piper_wheelhouse(), "piper_tts")) as zf:
        source = zf.read("piper/http_server.py").decode()
    options = set(re.findall(r'"(--[a-z][a-z-]*)"', source))
    assert {"--host", "--port", "--model", "--cuda", "--data-dir", "--download-dir"} <= options
    for option in options:
        assert option in help_text, option
    assert help_text.startswith("usage: http_server.py ")
