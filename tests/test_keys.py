"""One rule for an API key file (the key on its first line) and one mode, read the same on both sides."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gpubox.cli_client import ApiKeyFileError, _read_api_key
from gpubox.keys import KEY_FILE_MODE, authorization_header_command, chmod_mode, fact_mode, first_line_key


def host_header(path: Path) -> str:
    """What the smoke test on the host sends: the header its command prints for curl's stdin."""
    return subprocess.run(
        ["sh", "-c", authorization_header_command(str(path))], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize(
    ("text", "key"),
    [("k1\n", "k1"), ("k1", "k1"), ("k1\nk2\n", "k1"), ("k1\r\n", "k1"), ("k1\n\n", "k1")],
)
def test_the_controller_and_the_host_read_the_same_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "gemma4.key"
    path.write_text(text, newline="")
    assert first_line_key(text, "x") == key
    assert _read_api_key(str(path)) == key
    assert host_header(path).rstrip("\r\n") == f"Authorization: Bearer {key}"


def test_a_blank_first_line_is_no_key_on_either_side(tmp_path: Path) -> None:
    """It once was the key on the controller (first non-empty line) and nothing on the host (first line)."""
    path = tmp_path / "gemma4.key"
    path.write_text("\nk1\n")
    with pytest.raises(ApiKeyFileError, match="the first line holds no key"):
        _read_api_key(str(path))
    assert host_header(path).strip() == "Authorization: Bearer"


def test_one_mode_in_the_command_and_in_the_fact_comparison() -> None:
    assert KEY_FILE_MODE == 0o640
    assert chmod_mode() == "0640"
    assert fact_mode() == 640  # pyinfra's File fact: the octal digits as a number
