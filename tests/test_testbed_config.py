"""The test host's typed config (tests/testbed/config.py): refusals by key, changes on top, the inventory's box."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpubox import LlamaServer, PiperServer, WhisperServer
from tests.testbed.config import FleetHost, TestbedConfig, parse_assignments

ROOT = Path(__file__).resolve().parents[1]
SHA = "a" * 64


def base(**keys: object) -> TestbedConfig:
    return TestbedConfig.model_validate({
        "host_name": "testbed-2222", "host_data": {"ssh_port": 2222}, "repo": "file:///srv/llama.cpp.git",
        "commit": "c" * 40, "port": 18080, "model_sha256": SHA, "model_source": "/tmp/m.gguf", **keys,
    })  # fmt: skip


SPEECH = {
    "whisper_repo": "file:///srv/whisper.cpp.git", "whisper_commit": "d" * 40, "whisper_model_sha256": SHA,
    "whisper_model_source": "/tmp/w.bin", "whisper_port": 18090, "piper_version": "1.8.0",
    "piper_wheelhouse": "/tmp/wheels", "voice_sha256": SHA, "voice_source": "/tmp/v.onnx",
    "voice_config_sha256": SHA, "voice_config_source": "/tmp/v.onnx.json", "piper_port": 15000,
}  # fmt: skip


def test_a_wrong_key_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match=r"spec_draft_nmax\n  Extra inputs are not permitted"):
        base(spec_draft_nmax=2)
    with pytest.raises(ValidationError, match=r"fleet\.0\.prot"):
        base(fleet=[{"host_name": "b", "host_data": {}, "prot": 1}])


def test_a_service_s_speech_keys_come_together() -> None:
    with pytest.raises(ValidationError, match="whisper: whisper_port missing"):
        base(**{key: value for key, value in SPEECH.items() if key != "whisper_port"})
    assert base(**SPEECH).has_whisper and base(**SPEECH).has_piper
    assert not base().has_whisper


def test_a_change_keeps_every_other_key_and_the_earlier_changes() -> None:
    config = base(**SPEECH, monitoring={"monitor": "testbed-2222", "port": 19090})
    first = config.changed(spec_draft_n_max=2)
    second = first.changed(min_tokens_per_second=0.5)
    assert second.spec_draft_n_max == 2 and second.min_tokens_per_second == 0.5
    assert second.model_dump() == {**config.model_dump(), "spec_draft_n_max": 2, "min_tokens_per_second": 0.5}
    with pytest.raises(ValidationError, match="spec_draft_n_max"):
        config.changed(spec_draft_n_max="many")


def test_written_and_read_back_whole(tmp_path: Path) -> None:
    config = base(**SPEECH, fleet=[FleetHost(host_name="b", host_data={}, port=1, api_key_file=None)])
    config.write(tmp_path / "c.json")
    assert TestbedConfig.read(tmp_path / "c.json") == config
    assert [path.name for path in tmp_path.iterdir()] == ["c.json"]  # nothing staged is left


def test_fleet_hosts_change_the_first_host_s_keys_only_where_they_say() -> None:
    config = base(api_key_file="generate", fleet=[
        FleetHost(host_name="b", host_data={"ssh_port": 2}, port=2),
        FleetHost(host_name="c", host_data={"ssh_port": 3}, api_key_file=None),
    ])  # fmt: skip
    first, second, third = config.hosts()
    assert (first.host_name, first.port, first.api_key_file) == ("testbed-2222", 18080, "generate")
    assert (second.host_name, second.port, second.api_key_file) == ("b", 2, "generate")
    assert (third.host_name, third.port, third.api_key_file) == ("c", 18080, None)


def test_assignments_take_json_or_a_bare_string() -> None:
    assert parse_assignments(["spec_draft_n_max=2", "spec_type=draft-simple", "min_acceptance=null"]) == {
        "spec_draft_n_max": 2, "spec_type": "draft-simple", "min_acceptance": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match="give KEY=VALUE"):
        parse_assignments(["spec_draft_n_max"])


def _testbed_config(path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/testbed_config.py", *arguments], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "GPUBOX_TESTBED_CONFIG": str(path)}, check=False,
    )  # fmt: skip


def test_the_script_changes_the_existing_config_in_place(tmp_path: Path) -> None:
    """The demo's printed line: ports and earlier changes kept (it once rebuilt the config on new ports)."""
    path = tmp_path / "testbed.json"
    config = base(**SPEECH, monitoring={"monitor": "testbed-2222", "port": 19090})
    config.write(path)
    result = _testbed_config(path, "spec_draft_n_max=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "spec_draft_n_max: 3 -> 2\n"
    result = _testbed_config(path, "min_tokens_per_second=0.5")
    assert result.returncode == 0, result.stderr
    assert TestbedConfig.read(path) == config.changed(spec_draft_n_max=2, min_tokens_per_second=0.5)


def test_the_script_refuses_a_wrong_key_and_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "testbed.json"
    base().write(path)
    before = path.read_text()
    result = _testbed_config(path, "spec_draft_nmax=2")
    assert result.returncode == 2
    assert "spec_draft_nmax" in result.stderr and "Extra inputs are not permitted" in result.stderr
    assert path.read_text() == before
    result = _testbed_config(tmp_path / "none.json", "spec_draft_n_max=2")
    assert result.returncode == 2 and "--fresh" in result.stderr


def test_the_inventory_says_the_test_host_has_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU work left implicit: no pinned GPUs, no offloaded layers, whisper no_gpu, piper without CUDA."""
    path = tmp_path / "testbed.json"
    base(**SPEECH).write(path)
    monkeypatch.setenv("GPUBOX_TESTBED_CONFIG", str(path))
    ((name, data),) = runpy.run_path(str(ROOT / "inventory" / "testbed.py"))["testbed"]
    llama, whisper, piper = data["box"].services
    assert name == "testbed-2222"
    assert isinstance(llama, LlamaServer) and llama.n_gpu_layers == 0 and llama.gpus == ()
    assert isinstance(whisper, WhisperServer) and whisper.no_gpu and whisper.gpus == ()
    assert isinstance(piper, PiperServer) and not piper.cuda and piper.gpus == ()
