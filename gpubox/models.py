"""Model files on a host, beyond placing one: what a change would transfer, and the files gpubox
placed that have left the box.

Pure functions (no pyinfra): the facts in `facts/models.py` run the commands built here and parse
their output here; `operations/models.py` words what it plans with `transfer_plan`.

Which files are gpubox's: those with a stamp under `gpubox.verified.STAMP_DIR` (a stamp is written
only after gpubox verified the file's sha256; its first line is the model's path).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpubox import ggml_whisper
from gpubox.quoting import shell_word
from gpubox.records import Record
from gpubox.spec import WHISPER_SIZES, ModelFile, ModelFormat, Problem, WhisperSize
from gpubox.verified import STAMP_DIR

if TYPE_CHECKING:
    from gpubox.box import Box

UNIT_DIR = "/etc/systemd/system"
MIB = 1 << 20
GIB = 1 << 30


class StampedModel(Record):
    """A model file gpubox verified on the host (it has a stamp), as the stamps fact finds it."""

    stamp: str
    path: str
    size: int | None  # None: the file is gone (the stamp outlived it)
    units: tuple[str, ...] = ()  # unit files (`*.service`, `*.service.prev`) that name the path


def stamps_command(stamp_dir: str = STAMP_DIR, unit_dir: str = UNIT_DIR) -> str:
    """One line per stamp: the stamp's path, the model's size (`-`: gone), the unit files naming
    the model (space-separated), and the model's path (last: it may hold a tab).

    A unit names a path as `gpubox.quoting.exec_word` writes it (`%` and `$` doubled; inside
    double quotes `\\` and `"` escaped): both the plain and the escaped spellings are looked for.
    """
    stamps = shell_word(f"{stamp_dir}/")
    units = f"{shell_word(unit_dir)}/*.service {shell_word(unit_dir)}/*.service.prev"
    return "; ".join([
        f"for stamp in {stamps}*.stamp",
        'do [ -f "$stamp" ] || continue',
        'IFS= read -r model < "$stamp"',  # its first line, by the shell itself (no process)
        # a path a unit spells otherwise (`%`, `$`, `\`, `"`) is escaped by sed; any other is its own spelling
        r'case "$model" in *[%\$\\\"]*) '
        "escaped=$(printf '%s\\n' \"$model\" | sed -e 's/%/%%/g' -e 's/[$]/$$/g' -e 's/[\\\\\"]/\\\\&/g') ;; "
        '*) escaped=$model ;; esac',
        'size=$(stat -L -c %s -- "$model" 2>/dev/null) || size=-',
        f'users=$(grep -lF -e "$model" -e "$escaped" -- {units} 2>/dev/null | tr "\\n" " ")',
        "printf '%s\\t%s\\t%s\\t%s\\n' \"$stamp\" \"$size\" \"$users\" \"$model\"",
        "done",
    ])  # fmt: skip


def parse_stamps(lines: Sequence[str]) -> list[StampedModel]:
    stamped = []
    for line in lines:
        fields = line.rstrip("\n").split("\t", 3)
        if len(fields) != 4 or not fields[3]:
            continue
        stamp, size, units, path = fields
        stamped.append(
            StampedModel(stamp=stamp, path=path, size=int(size) if size.isdigit() else None, units=tuple(units.split()))
        )
    return stamped


def content_length_command(url: str) -> str:
    """The response headers of a HEAD request, redirects followed (`curl -sIL`); nothing when it fails."""
    return f"curl -sIL --max-time 20 {shell_word(url)} 2>/dev/null || true"


def parse_content_length(lines: Sequence[str]) -> int | None:
    """The Content-Length of the last response (after redirects); None when it has none."""
    length: int | None = None
    for line in lines:
        text = line.strip()
        if text.upper().startswith("HTTP/"):
            length = None  # a new response (a redirect's target)
            continue
        name, _, value = text.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    return length


def human_bytes(count: int) -> str:
    """`98,190,016 bytes (93.6 MiB)`: exact, and readable."""
    unit, name = (GIB, "GiB") if count >= GIB else (MIB, "MiB")
    return f"{count:,} bytes ({count / unit:.1f} {name})"


def transfer_plan(
    *,
    path: str,
    found: str | None,
    sha256: str,
    source: str,
    is_url: bool,
    source_bytes: int | None = None,
    part_bytes: int | None = None,
) -> list[str]:
    """What placing a changed model does, for the log (a dry run shows it): the sha256 change,
    the source and the bytes to transfer.

    `source_bytes`: the controller file's size, or the URL's Content-Length (None: unknown);
    `part_bytes`: the size of a `{path}.part` on the host (a cut run's), None when there is none.
    A download resumes its .part (`curl --continue-at -`); an upload starts over.
    """
    lines = [f"{path}: sha256 {found or 'missing'} -> {sha256}"]
    part = f"{path}.part"
    if not is_url:
        size = "an unknown size" if source_bytes is None else human_bytes(source_bytes)
        lines.append(f"  from controller file {source}: {size} to upload")
        if part_bytes is not None:
            lines.append(
                f"  a cut upload left {part} at {human_bytes(part_bytes)}: uploads start over, this one replaces it"
            )
        return lines
    if part_bytes is None:
        size = "an unknown size (no Content-Length)" if source_bytes is None else human_bytes(source_bytes)
        lines.append(f"  from {source}: {size} to download")
    elif source_bytes is None:
        lines.append(f"  from {source}: an unknown size to download, resuming {part} at {human_bytes(part_bytes)}")
    elif part_bytes > source_bytes:
        lines.append(
            f"  from {source}: an unknown size to download: {part} ({human_bytes(part_bytes)}) is larger than "
            f"the Content-Length ({human_bytes(source_bytes)})"
        )
    else:
        lines.append(
            f"  from {source}: {human_bytes(source_bytes - part_bytes)} left to download of "
            f"{human_bytes(source_bytes)}, resuming {part}"
        )
    return lines


def size_mib(count: int) -> str:
    return f"{count / MIB:,.0f} MiB" if count >= 10 * MIB else f"{count / MIB:.1f} MiB"


# --- formats other than GGUF (a GGUF's header is read by gpubox.gguf_header) ----------------------

FORMAT_HEAD_BYTES = 64
"""Enough of a file's head to tell its format: a ggml whisper header is 4 + 11 x 4 bytes."""


class ModelFormatError(ValueError):
    """A model file is not what its spec's ``format`` (and ``architecture``) say."""


def check_head(model_format: ModelFormat, architecture: str | None, head: bytes, where: str) -> None:
    """Refuse a file whose head is not the spec's format: a ggml whisper model of another size, an
    ONNX file that does not start like one, a JSON config that is not a JSON object. A GGUF is
    checked from its whole header elsewhere; this says nothing of one."""
    if model_format == "ggml-whisper":
        try:
            header = ggml_whisper.parse_header(head)
        except ggml_whisper.WhisperHeaderError as error:
            raise ModelFormatError(f"{where} is not a ggml whisper model: {error}") from None
        mismatch = whisper_size_mismatch(architecture, header, where) if architecture is not None else None
        if mismatch is not None:
            raise ModelFormatError(mismatch)
    elif model_format == "onnx" and head[:1] != b"\x08":
        # An ONNX ModelProto starts with field 1 (ir_version), a varint: the byte 0x08.
        raise ModelFormatError(f"{where} is not an ONNX model (it does not start with ir_version)")
    elif model_format == "json" and head.lstrip()[:1] != b"{":
        raise ModelFormatError(f"{where} is not a JSON object (a piper voice config starts with '{{')")


def whisper_size_of(header: ggml_whisper.WhisperModelHeader) -> WhisperSize | None:
    """The size a ggml whisper header says (by its shape; ``.en`` by its vocabulary); None for a shape of no
    size gpubox knows."""
    return WhisperSize(header.size, header.english_only) if header.size in WHISPER_SIZES else None


def whisper_size_mismatch(architecture: str, header: ggml_whisper.WhisperModelHeader, where: str) -> str | None:
    """Why a ggml whisper model whose header is `header` (`where`: the file) is not the declared `architecture`,
    with the fix; None when its header says that size (:func:`whisper_size_of`)."""
    found = whisper_size_of(header)
    if found == WhisperSize.parse(architecture):
        return None
    if found is None:
        return (
            f"{where} is a whisper model of no size gpubox knows ({header.shape}), not {architecture}: use a "
            f"{architecture} model"
        )
    return (
        f"{where} is a whisper {found} model ({header.shape}), not {architecture}: use a {architecture} model, "
        f"or set architecture={str(found)!r}"
    )


def head_command(path: str, head_bytes: int = FORMAT_HEAD_BYTES) -> str:
    """The first bytes of a host file as base64 on one line; nothing when there is no file."""
    quoted = shell_word(path)
    return f"! test -e {quoted} || head -c {int(head_bytes)} {quoted} | base64 -w0"


def parse_head(lines: Sequence[str]) -> bytes | None:
    text = "".join(line.strip() for line in lines)
    return base64.b64decode(text) if text else None


def controller_source(model: ModelFile, base: Path) -> Path | None:
    """The file on the controller a model is uploaded from (a relative ``source`` is taken from ``base``,
    the inventory file's directory); None when it is downloaded (a URL) or has no source."""
    if model.source is None or model.source_is_url:
        return None
    source = Path(model.source)
    return source if source.is_absolute() else base / source


def missing_sources(box: Box, base: Path) -> list[tuple[str, ModelFile, Path]]:
    """The models whose controller source is not a file here: (field, model, where it was looked for)."""
    missing = []
    for field, model in box.model_files():
        source = controller_source(model, base)
        if source is not None and not source.is_file():
            missing.append((field, model, source))
    return missing


def missing_source_problem(field: str, model: ModelFile, source: Path) -> Problem:
    """A controller source that is not there, at its field (``services.0.model.source``), with the fixes."""
    return Problem(
        field=f"{field}.source",
        message=(
            f"{source} is not a file on this machine (the controller), and a deploy uploads {model.path} from "
            f"there when the host lacks it: fix the path (a relative one is taken from the inventory file's "
            f"directory), put the file there, or give an https:// or hf:// source"
        ),
    )
