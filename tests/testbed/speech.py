"""The speech services of the test host's box: what inventory/testbed.py reads to add whisper-server
(built from the local whisper.cpp repo bound at WHISPER_REPO_MOUNT, with Whisper tiny.en converted to
ggml) and piper (from the controller's wheelhouse, with the joe voice)."""

from __future__ import annotations

from gpubox.bench import free_port
from tests.testbed.assets import sha256_file
from tests.testbed.piper_assets import PIPER_VERSION, piper_voice, piper_wheelhouse
from tests.testbed.whisper_assets import whisper_cpp_repo, whisper_tiny_en_ggml

WHISPER_REPO_MOUNT = "/srv/whisper.cpp.git"


def speech_config() -> dict[str, object]:
    """The speech keys of the test host's config (downloads and converts the assets on first use)."""
    _, whisper_commit = whisper_cpp_repo()
    model = whisper_tiny_en_ggml()
    voice, voice_config = piper_voice()
    return {
        "whisper_repo": f"file://{WHISPER_REPO_MOUNT}",
        "whisper_commit": whisper_commit,
        "whisper_model_sha256": sha256_file(model),
        "whisper_model_source": str(model),
        "whisper_port": free_port(),
        "piper_version": PIPER_VERSION,
        "piper_wheelhouse": str(piper_wheelhouse()),
        "voice_sha256": sha256_file(voice),
        "voice_source": str(voice),
        "voice_config_sha256": sha256_file(voice_config),
        "voice_config_source": str(voice_config),
        "piper_port": free_port(),
    }
