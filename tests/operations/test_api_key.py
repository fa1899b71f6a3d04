"""The generated API key: made once on the host, never in a command's text, kept on a rerun."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from gpubox import LlamaServer, ModelFile
from gpubox.spec import problems_from
from operations.service import api_key_script

MODEL = ModelFile(path="/m.gguf", sha256="a" * 64, architecture="llama")


def test_generate_is_a_key_file_of_the_services_own() -> None:
    service = LlamaServer(name="gemma4", model=MODEL, api_key_file="generate")
    assert (service.api_key_file, service.generate_api_key) == ("/etc/gpubox/keys/gemma4.key", True)
    argv = service.argv("/bin/llama-server")
    assert argv[argv.index("--api-key-file") + 1] == "/etc/gpubox/keys/gemma4.key"
    assert service.warnings() == []


def test_a_loopback_service_without_a_key_is_warned_about_not_refused() -> None:
    ((field, why),) = LlamaServer(name="s", model=MODEL).warnings()
    assert field == "api_key_file" and "any web page" in why and 'api_key_file="generate"' in why


def test_generate_api_key_needs_a_path() -> None:
    with pytest.raises(ValidationError) as error:
        LlamaServer(name="s", model=MODEL, generate_api_key=True)
    assert [problem.field for problem in problems_from(error.value)] == ["generate_api_key"]


def test_the_script_makes_one_key_keeps_it_and_never_holds_it(tmp_path: Path) -> None:
    key_file = tmp_path / "gpubox" / "keys" / "s.key"
    script = api_key_script(str(key_file), "root")
    subprocess.run(["sh", "-c", script], check=True)
    key = key_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", key)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o640
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o711
    assert stat.S_IMODE(key_file.parent.parent.stat().st_mode) & 0o011 == 0o011, "the service must reach it"
    assert key.strip() not in script
    key_file.chmod(0o644)
    subprocess.run(["sh", "-c", script], check=True)
    assert key_file.read_text() == key, "a rerun must keep the key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o640, "and put its mode right"
    assert os.stat(key_file).st_uid == 0
