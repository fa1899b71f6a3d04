"""The piper unit and its flag check name piper, not the program that runs it (the install's bin/python3)."""

from __future__ import annotations

from typing import Any

import pytest
from pyinfra.api import OperationError
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState

from gpubox import ModelFile, PiperServer
from gpubox.binaries import ServerFlags, parse_usage_options
from gpubox.unit import render_unit
from operations import service
from tests.operations.test_operations import GpuboxFakeHost
from tests.test_speech_services import PIPER_HELP, VOICE_CONFIG

PREFIX = "/opt/piper"
VOICE = ModelFile(path="/srv/voices/en_US-joe-medium.onnx", sha256="b" * 64, format="onnx")


def piper(**fields: Any) -> PiperServer:
    config = VOICE_CONFIG.model_copy(update={"path": f"{fields.get('voice', VOICE).path}.json"})
    return PiperServer(**{"name": "piper", "voice": VOICE, "voice_config": config, **fields})


def description(unit: str) -> str:
    return next(line for line in unit.splitlines() if line.startswith("Description="))


def test_the_piper_unit_describes_piper_and_its_voice() -> None:
    unit = render_unit(piper(), piper().binary(PREFIX))
    assert description(unit) == "Description=piper piper (gpubox; voice en_US-joe-medium; GPUs: cpu)"
    assert "bin/python3" not in description(unit)


def test_a_voice_s_percent_is_not_a_systemd_specifier_in_the_description() -> None:
    voice = VOICE.model_copy(update={"path": "/srv/voices/joe-100%.onnx"})
    unit = render_unit(piper(voice=voice), piper().binary(PREFIX))
    assert description(unit) == "Description=piper piper (gpubox; voice joe-100%%; GPUs: cpu)"


def _flags_supported(server: PiperServer, flags: ServerFlags) -> GpuboxFakeHost:
    state = FakeState()
    host = GpuboxFakeHost(state, {"llamacpp.ServerOptions": {f"path={server.help_file(PREFIX)}": flags.model_dump()}})
    with ctx_state.use(state), ctx_host.use(host):
        assert list(service.flags_supported._inner(server=server, prefix=PREFIX)) == []
    return host


def test_the_piper_flag_check_names_piper_s_saved_help() -> None:
    host = _flags_supported(piper(), parse_usage_options(PIPER_HELP))
    assert host.noop_description == (
        "every flag of piper.service is in piper's --help (saved at /opt/piper/current/piper.http_server.help)"
    )


def test_a_flag_piper_lacks_is_refused_naming_piper() -> None:
    flags = parse_usage_options(line for line in PIPER_HELP if "--length" not in line)
    with pytest.raises(OperationError) as refused:
        _flags_supported(piper(length_scale=1.2), flags)
    assert str(refused.value).startswith("piper.service: piper as installed does not support --length-scale")
