"""Place a checksummed GGUF on the host: `{path}.part`, verify sha256 and architecture, rename."""

from __future__ import annotations

import hashlib
import shlex
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pyinfra import host, state
from pyinfra.api import FileUploadCommand, FunctionCommand, OperationError, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents, Sha256File

from facts.gguf import GgufHeader
from gpubox import gguf_header
from gpubox.spec import ModelFile
from gpubox.verified import STAMP_DIR, stamp_path, stamp_text, stamp_vouches

# Read the head in growing steps: a small vocab fits in 4 MiB, Gemma's 262k-token vocab does not.
HEAD_STEPS = (4 << 20, 32 << 20, 128 << 20)


@cache
def _local_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def local_source(model: ModelFile) -> Path:
    """The controller file, relative paths taken from the deploy's directory."""
    assert model.source is not None
    source = Path(model.source)
    if not source.is_absolute() and state.cwd:
        source = Path(state.cwd) / source
    return source


def check_local_source(model: ModelFile) -> Path:
    """Refuse a controller file that is missing, has another checksum or another architecture."""
    source = local_source(model)
    if not source.is_file():
        raise OperationError(f"model source {source} does not exist on the controller")
    stat = source.stat()
    found = _local_sha256(str(source), stat.st_size, stat.st_mtime_ns)
    if found != model.sha256:
        raise OperationError(
            f"model source {source} has sha256 {found}, the spec says {model.sha256}: "
            f"nothing was uploaded; fix the spec's sha256 or the source"
        )
    try:
        header = gguf_header.read_gguf_header(source)
        gguf_header.check_architecture(header, model.architecture, path=str(source))
    except (gguf_header.GgufError, gguf_header.GgufArchitectureError) as error:
        raise OperationError(f"model source {source}: {error}") from error
    return source


def remote_header(path: str) -> gguf_header.GgufHeader | None:
    """The GGUF header of a host file, reading only as much of its head as the header needs."""
    for head_bytes in HEAD_STEPS:
        fact = host.get_fact(GgufHeader, path=path, head_bytes=head_bytes)
        if fact is None:
            return None
        if isinstance(fact, dict) and "kind" in fact:
            fact = gguf_header.GgufHeaderError.model_validate(fact)
        if not isinstance(fact, gguf_header.GgufHeaderError):
            return gguf_header.header_from_fact(fact)
        if fact.kind != "head_too_short":
            raise OperationError(f"{path}: {fact.exception(path)}")
    raise OperationError(f"{path}: the GGUF header is larger than {HEAD_STEPS[-1] >> 20} MiB")


def check_remote_architecture(path: str, expected: str) -> None:
    """Refuse a host GGUF of the wrong architecture (its sha256 already matched the spec, so the
    spec names a file of another architecture than it declares)."""
    header = remote_header(path)
    if header is None:
        raise OperationError(f"{path} does not exist on the host")
    try:
        gguf_header.check_architecture(header, expected, path=path)
    except gguf_header.GgufArchitectureError as error:
        raise OperationError(str(error)) from error


def verify_script(model: ModelFile, part: str) -> str:
    """Compare the .part's sha256 with the spec's; on a mismatch delete it and keep the old file."""
    quoted = shlex.quote(part)
    return "\n".join([
        f"found=$(sha256sum {quoted} | cut -d' ' -f1)",
        f'if [ "$found" != {model.sha256} ]; then',
        f"  rm -f {quoted}",
        f'  echo "sha256 mismatch for {model.path}: the source gave $found, the spec says {model.sha256}; '
        f'kept the existing file, deleted the .part" >&2',
        "  exit 1",
        "fi",
    ])  # fmt: skip


def verified_by_stamp(model: ModelFile, info: dict[str, Any] | None | Literal[False]) -> bool:
    """Whether the file (`info`: its File fact) is unchanged (size, mtime, ctime) since its sha256 was verified."""
    if not info:
        return False
    stamp = host.get_fact(FileContents, path=stamp_path(model.path))
    return stamp_vouches(stamp, model.path, model.sha256, info["size"], info["mtime"], info["ctime"])


@operation()
def place(model: ModelFile):  # type: ignore[no-untyped-def]
    """A no-op when the host file's sha256 matches; else upload or download to .part, verify, rename.

    The GGUF never goes through `files.put`: its `--diff` fetches and decodes a changed remote file,
    which breaks on a multi-GB binary. The checksum fact decides instead.
    """
    if verified_by_stamp(model, host.get_fact(File, path=model.path)):
        host.noop(f"{model.path} is unchanged since its sha256 {model.sha256[:12]} was verified")
        return
    found = host.get_fact(Sha256File, path=model.path)
    if found == model.sha256:
        host.noop(f"{model.path} has sha256 {model.sha256[:12]}")
        return
    state_now = "is missing" if found is None else f"has sha256 {found}"
    if model.source is None:
        raise OperationError(
            f"{model.path} {state_now}, the spec says {model.sha256} and has no source: place the file "
            f"by hand, or set source to a controller file or an https URL"
        )
    part = f"{model.path}.part"
    directory = model.path.rsplit("/", 1)[0] or "/"
    # A bad controller file is refused before anything happens on the host.
    source = None if model.source_is_url else check_local_source(model)
    yield f"mkdir -p {shlex.quote(directory)}"
    if source is None:
        yield (
            f"curl -fL --retry 3 --continue-at - --output {shlex.quote(part)} {shlex.quote(model.source)}"
        )
    else:
        # With sudo, pyinfra uploads to its temp dir and copies into place as root.
        yield FileUploadCommand(str(source), part)
    yield verify_script(model, part)
    if model.source_is_url:
        yield FunctionCommand(check_remote_architecture, (part, model.architecture), {})
    yield f"chmod 0644 {shlex.quote(part)} && mv -f {shlex.quote(part)} {shlex.quote(model.path)}"


@operation()
def stamp(model: ModelFile, placed: OperationMeta | None = None):  # type: ignore[no-untyped-def]
    """Record that the file's sha256 is verified, so later runs need not hash it again.

    Separate from `place` so that stamping a file placed by hand restarts nothing. The sha256 is
    taken from `place`'s verification when it just placed the file, else from the Sha256File fact.
    """
    info = host.get_fact(File, path=model.path)
    if not info or verified_by_stamp(model, info):
        host.noop(f"{model.path}: stamp up to date" if info else f"{model.path}: not placed yet")
        return
    just_placed = state.is_executing and placed is not None and placed.did_change()
    if not just_placed and host.get_fact(Sha256File, path=model.path) != model.sha256:
        if state.is_executing:
            raise OperationError(f"{model.path} changed after it was verified: rerun the deploy")
        host.noop(f"{model.path}: stamped once it is placed")
        return
    text = stamp_text(model.path, model.sha256, info["size"], info["mtime"], info["ctime"])
    yield f"mkdir -p {STAMP_DIR} && printf %s {shlex.quote(text)} > {shlex.quote(stamp_path(model.path))}"
