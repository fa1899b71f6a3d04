"""gpubox.models: the stamps fact's command (run by /bin/sh here), the Content-Length parser, the transfer plan."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gpubox.models import (
    StampedModel,
    parse_content_length,
    parse_stamps,
    stamps_command,
    transfer_plan,
)
from gpubox.quoting import exec_word
from gpubox.verified import stamp_path, stamp_text


def _stamp(stamps: Path, model: Path) -> Path:
    from datetime import datetime

    stamp = stamps / Path(stamp_path(str(model))).name
    stamp.write_text(stamp_text(str(model), "0" * 64, 1, datetime(2026, 1, 1), datetime(2026, 1, 1)))
    return stamp


def test_stamps_command_lists_each_stamped_file_its_size_and_the_units_naming_it(tmp_path: Path) -> None:
    stamps, units, models = tmp_path / "verified", tmp_path / "units", tmp_path / "my models"
    for directory in (stamps, units, models):
        directory.mkdir()
    plain = models / "plain.gguf"
    special = models / 'odd $HOME `id` "q" 100%\\n.gguf'
    gone = models / "gone.gguf"
    plain.write_bytes(b"x" * 10)
    special.write_bytes(b"y" * 20)
    stamped = {path: _stamp(stamps, path) for path in (plain, special, gone)}
    # A unit names a model as gpubox.unit renders it: an ExecStart word.
    (units / "a.service").write_text(f"ExecStart=/opt/llama-server --model {exec_word(str(plain))}\n")
    (units / "a.service.prev").write_text(f"ExecStart=/opt/llama-server --model {exec_word(str(special))}\n")
    (units / "b.service").write_text("ExecStart=/opt/llama-server --model /elsewhere.gguf\n")
    output = subprocess.run(
        ["/bin/sh", "-c", stamps_command(str(stamps), str(units))], capture_output=True, text=True, check=True
    ).stdout
    found = {item.path: item for item in parse_stamps(output.splitlines())}
    assert found == {
        str(plain): StampedModel(stamp=str(stamped[plain]), path=str(plain), size=10, units=(f"{units}/a.service",)),
        str(special): StampedModel(
            stamp=str(stamped[special]), path=str(special), size=20, units=(f"{units}/a.service.prev",)
        ),
        str(gone): StampedModel(stamp=str(stamped[gone]), path=str(gone), size=None, units=()),
    }


def test_stamps_command_without_a_stamp_directory_lists_nothing(tmp_path: Path) -> None:
    command = stamps_command(str(tmp_path / "none"), str(tmp_path / "units"))
    result = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, check=True)
    assert (result.stdout, result.returncode) == ("", 0)


def test_content_length_is_the_last_responses() -> None:
    """`curl -sIL` prints every response of a redirect chain: the last one's length is the file's."""
    headers = [
        "HTTP/2 302",
        "content-type: text/plain; charset=utf-8",
        "content-length: 1296",
        "location: https://cas-bridge.xethub.hf.co/xet-bridge-us/...",
        "",
        "HTTP/2 200",
        "Content-Length: 7730941536",
        "accept-ranges: bytes",
        "",
    ]
    assert parse_content_length(headers) == 7730941536
    assert parse_content_length(headers[:5] + ["HTTP/2 200", "accept-ranges: bytes"]) is None
    assert parse_content_length([]) is None


def test_transfer_plan_of_a_resumed_download() -> None:
    plan = transfer_plan(
        path="/m/x.gguf", found=None, sha256="a" * 64, source="https://h/x.gguf", is_url=True,
        source_bytes=3 << 30, part_bytes=1 << 30,
    )  # fmt: skip
    assert plan == [
        f"/m/x.gguf: sha256 missing -> {'a' * 64}",
        "  from https://h/x.gguf: 2,147,483,648 bytes (2.0 GiB) left to download of 3,221,225,472 bytes "
        "(3.0 GiB), resuming /m/x.gguf.part",
    ]
