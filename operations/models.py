"""Place a checksummed model file on the host: `{path}.part`, verify sha256 and format, rename."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from io import StringIO
from pathlib import Path
from typing import Any, Literal

from pyinfra import host, state
from pyinfra.api import DeployError, FileUploadCommand, OperationError, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents, Sha256File

from facts.gguf import GgufHeader
from facts.models import FileHead, UrlContentLength, VerifiedStamps
from gpubox import gguf_header, hf
from gpubox.box import Box
from gpubox.models import (
    FORMAT_HEAD_BYTES,
    ModelFormatError,
    StampedModel,
    check_head,
    controller_source,
    missing_source_problem,
    missing_sources,
    size_mib,
    transfer_plan,
)
from gpubox.quoting import shell_word
from gpubox.spec import HuggingFace, ModelFile, ModelFormat
from gpubox.verified import STAMP_DIR, stamp_path, stamp_text, stamped_sha256

from .failures import python_step, refusals_fail_cleanly
from .host_commands import connector_arguments
from .host_facts import FactRead, forget, once, read
from .preflight import inventory_base

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
    """The controller file, relative paths taken from the inventory file's directory (``inventory_base``)."""
    source = controller_source(model, inventory_base())
    assert source is not None, f"{model.path}: its source is no controller file"
    return source


def check_sources(box: Box) -> None:
    """Refuse the deploy before any operation runs (a ``DeployError``, one message) when a model the host
    lacks comes from a controller file that is not there: every such model, by field. A model the host
    has (its stamp's word, else its hash) needs no source, so a missing one is no reason to stop."""
    needed = [found for found in missing_sources(box, inventory_base()) if not has_sha256(found[1])]
    if needed:
        problems = [missing_source_problem(*found) for found in needed]
        raise DeployError(
            f"{host.name}: the host lacks {len(problems)} model(s) whose source is not on this machine; nothing "
            "was changed:\n" + "\n".join(f"    {problem.field}: {problem.message}" for problem in problems)
        )


def check_local_source(model: ModelFile) -> Path:
    """Refuse a controller file that is missing, has another checksum or another architecture."""
    source = local_source(model)
    if not source.is_file():
        raise OperationError(
            f"model source {source} of {model.path} is not a file on the controller (this machine): fix the "
            f"model's source (a relative one is taken from the inventory file's directory) or put the file there"
        )
    stat = source.stat()
    found = _local_sha256(str(source), stat.st_size, stat.st_mtime_ns)
    if found != model.sha256:
        raise OperationError(
            f"model source {source} has sha256 {found}, the spec says {model.sha256}: "
            f"nothing was uploaded; fix the spec's sha256 or the source"
        )
    if model.format != "gguf":
        with open(source, "rb") as stream:
            head = stream.read(FORMAT_HEAD_BYTES)
        try:
            check_head(model.format, model.architecture, head, f"model source {source}")
        except ModelFormatError as error:
            raise OperationError(str(error)) from error
        return source
    assert model.architecture is not None
    try:
        header = gguf_header.read_gguf_header(source)
        gguf_header.check_architecture(header, model.architecture, path=str(source))
    except (gguf_header.GgufError, gguf_header.GgufArchitectureError) as error:
        raise OperationError(f"model source {source}: {error}") from error
    return source


def remote_header(path: str) -> gguf_header.GgufFile | None:
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


def check_remote_format(path: str, model_format: ModelFormat, architecture: str | None) -> None:
    """Refuse a host file (a download's .part) that is not the model's format and architecture."""
    if model_format == "gguf":
        assert architecture is not None
        check_remote_architecture(path, architecture)
        return
    head = host.get_fact(FileHead, path=path)
    if head is None:
        raise OperationError(f"{path} does not exist on the host")
    try:
        check_head(model_format, architecture, head, path)
    except ModelFormatError as error:
        raise OperationError(str(error)) from error


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
    quoted = shell_word(part)
    sha256 = shell_word(model.sha256)
    return "\n".join([
        # From stdin: for a file name with a backslash or newline, sha256sum puts a backslash before the hash.
        f"found=$(sha256sum < {quoted} | cut -d' ' -f1)",
        f'if [ "$found" != {sha256} ]; then',
        f"  rm -f {quoted}",
        "  printf 'sha256 mismatch for %s: the source gave %s, the spec says %s; "
        f"kept the existing file, deleted the .part\\n' {shell_word(model.path)} \"$found\" {sha256} >&2",
        "  exit 1",
        "fi",
    ])  # fmt: skip


FileInfo = dict[str, Any] | None | Literal[False]

def host_sha256(path: str, info: FileInfo) -> str | None:
    """The sha256 of a host file (`info`: its File fact), hashed at most once per run for one stat;
    None when there is no file.

    `place` and `stamp` both ask for a file the stamp does not vouch for (and the surgical deploy's
    drafter check too), and pyinfra runs each operation's checks twice in a run without -y; a file
    that changed since has another stat, so it is hashed again.
    """
    if not info:
        return None
    stat_key = ("sha256", path, info["size"], info["mtime"], info["ctime"])
    return once(stat_key, lambda: host.get_fact(Sha256File, path=path))


def file_read(model: ModelFile) -> FactRead:
    """The model file's stat (`place`, `stamp`, and `vram.fits` for a non-GGUF model's size)."""
    return File, {"path": model.path}


def _stamp_read(model: ModelFile) -> FactRead:
    return FileContents, {"path": stamp_path(model.path)}


def stamps_read() -> FactRead:
    """What `unused` reads: every stamp gpubox wrote, with its file's stat."""
    return VerifiedStamps, {}


def facts_read(model: ModelFile) -> list[FactRead]:
    """What `place` and `stamp` read of a model on a host where it is placed (for `host_facts.prefetch`):
    each built by the function they read it with (`host_facts.read`)."""
    return [file_read(model), _stamp_read(model)]


def stamp_sha256(model: ModelFile, info: FileInfo) -> str | None:
    """The sha256 the file's stamp records while the file (`info`: its File fact) is unchanged (size,
    mtime, ctime) since it was verified, whether or not it is the spec's; None: no stamp to trust."""
    if not info:
        return None
    stamp = read(_stamp_read(model))
    return stamped_sha256(stamp, model.path, info["size"], info["mtime"], info["ctime"])


def verified_by_stamp(model: ModelFile, info: FileInfo) -> bool:
    """Whether the file (`info`: its File fact) is unchanged since the spec's sha256 was verified."""
    return stamp_sha256(model, info) == model.sha256


def known_sha256(model: ModelFile, info: FileInfo) -> str | None:
    """The host file's sha256: its stamp's word where the stamp still matches the file (a changed
    spec's old file too: no need to hash what is replaced), else one hash per run; None: no file."""
    return stamp_sha256(model, info) or host_sha256(model.path, info)


def has_sha256(model: ModelFile) -> bool:
    """Whether the host file has the spec's sha256: the stamp's word where it still matches, else one hash per run."""
    return known_sha256(model, read(file_read(model))) == model.sha256


def log_transfer(model: ModelFile, found: str | None, source: Path | None, url: str | None) -> None:
    """Say what placing the file will change and transfer (a dry run shows it): sha256 old -> new,
    the source, the bytes (a download's Content-Length from a HEAD request on the host; what is
    left when it resumes a cut run's .part)."""
    assert model.source is not None
    part = host.get_fact(File, path=f"{model.path}.part")
    part_bytes = part["size"] if part else None
    if source is not None:
        source_bytes: int | None = source.stat().st_size
    else:  # a gated file answers 401 to a HEAD without the token: its size is then unknown
        source_bytes = host.get_fact(UrlContentLength, url=url)
    plan = transfer_plan(
        path=model.path,
        found=found,
        sha256=model.sha256,
        source=str(source) if source is not None else model.source,
        is_url=source is None,
        source_bytes=source_bytes,
        part_bytes=part_bytes,
    )
    for line in plan:
        host.log(line)


def hub_token(model: ModelFile, hub: HuggingFace | None) -> str | None:
    """The token for a hub download, read on the controller (refused unless its file is 0600); None: no token."""
    if model.hf_reference is None:
        return None
    path = hf.token_file(hub.token_file if hub is not None else None)
    if path is None:
        return None
    try:
        return hf.read_token(path)
    except hf.TokenFileError as error:
        field = "huggingface.token_file" if hub is not None and hub.token_file else f"${hf.TOKEN_FILE_ENV}"
        raise OperationError(f"{field}: {error}") from error


def token_upload(model: ModelFile, token: str) -> tuple[str, list[object]]:
    """The header file's directory (root-only) and the commands that put the token there.

    With sudo, pyinfra uploads as the SSH user to a temporary file and copies it in as root: that
    temporary file is put in a directory only the SSH user can read, and pyinfra deletes it.
    """
    auth_dir = f"{model.path}.auth"
    commands: list[object] = [f"rm -rf {shell_word(auth_dir)} && install -d -m 0700 {shell_word(auth_dir)}"]
    staging = None
    ssh_user = host.data.get("ssh_user")
    if connector_arguments().get("_sudo") and ssh_user:
        staging = f"{model.path}.auth-upload"
        commands.append(
            f"rm -rf {shell_word(staging)} && install -d -m 0700 -o {shell_word(ssh_user)} {shell_word(staging)}"
        )
    commands.append(
        FileUploadCommand(
            StringIO(hf.header_file_text(token)),
            f"{auth_dir}/header",
            remote_temp_filename=f"{staging}/header" if staging else None,
        )
    )
    if staging:
        commands.append(f"rm -rf {shell_word(staging)}")
    return auth_dir, commands


@operation()
@refusals_fail_cleanly
def place(model: ModelFile, hub: HuggingFace | None = None):  # type: ignore[no-untyped-def]
    """
    Place a checksummed model file: a no-op when the host file's sha256 matches (its verified stamp's
    word, else one hash per run); else upload or download to ``{path}.part``, verify, rename. A file
    whose stamp still matches it and records another sha256 (the spec's sha256 changed) is known to
    be the old content: it is replaced without being hashed.

    + model: the ``ModelFile`` (host path, sha256, source: a controller file, an https URL or an
      ``hf://org/repo/file@<commit>`` reference, architecture)
    + hub: the box's ``HuggingFace`` settings for an ``hf://`` source (endpoint, token file); None: the
      public hub, with ``$HF_TOKEN_FILE``'s token when it is set

    The GGUF never goes through ``files.put``: its ``--diff`` fetches and decodes a changed remote file,
    which breaks on a multi-GB binary. The checksum decides instead; a dry run logs the sha256 change,
    the source and the bytes to transfer. A gated file's token is read on the controller (its file must be
    0600) and is on the host only in a root-only header file for curl (``-H @file``), deleted when curl ends;
    a 401 or 403 fails with "gated: accept the licence ..." and leaves the old file in place.

    **Example:**

    .. code:: python

        placed = models.place(
            name="Model /srv/models/m.gguf", model=box.service("gemma4").model, hub=box.huggingface
        )
    """
    info = read(file_read(model))
    if verified_by_stamp(model, info):
        host.noop(f"{model.path} is unchanged since its sha256 {model.sha256[:12]} was verified")
        return
    found = known_sha256(model, info)  # a stamp of the old sha256 saves hashing the file being replaced
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
    # A bad controller file (or token file) is refused before anything happens on the host.
    source = None if model.source_is_url else check_local_source(model)
    url = model.download_url(hub) if model.source_is_url else None
    token = hub_token(model, hub)
    log_transfer(model, found, source, url)
    forget(file_read(model))  # replaced below: `stamp` must stat the new file
    yield f"mkdir -p {shell_word(directory)}"
    if url is not None:
        auth_dir = None
        if token is not None:
            auth_dir, commands = token_upload(model, token)
            yield from commands
        yield hf.download_script(url, part, auth_dir)
    else:
        # With sudo, pyinfra uploads to its temp dir and copies into place as root.
        yield FileUploadCommand(str(source), part)
    yield verify_script(model, part)
    if model.source_is_url:
        yield python_step(check_remote_format, part, model.format, model.architecture)
    yield f"chmod 0644 {shell_word(part)} && mv -f {shell_word(part)} {shell_word(model.path)}"


@operation()
@refusals_fail_cleanly
def stamp(model: ModelFile, placed: OperationMeta | None = None):  # type: ignore[no-untyped-def]
    """
    Record that the file's sha256 is verified (its size, mtime and ctime in a stamp), so later runs
    need not hash it again.

    + model: the ``ModelFile``
    + placed: ``place``'s op meta: when it just placed the file, its verification is the sha256's proof

    Separate from ``place`` so that stamping a file placed by hand restarts nothing. Otherwise the
    sha256 is the hash ``place`` took of this very file in this run: a file is hashed at most once.

    **Example:**

    .. code:: python

        models.stamp(name="Model /srv/models/m.gguf verified", model=model, placed=placed)
    """
    info = read(file_read(model))
    if not info or verified_by_stamp(model, info):
        host.noop(f"{model.path}: stamp up to date" if info else f"{model.path}: not placed yet")
        return
    just_placed = state.is_executing and placed is not None and placed.did_change()
    if not just_placed and known_sha256(model, info) != model.sha256:
        if state.is_executing:
            raise OperationError(f"{model.path} changed after it was verified: rerun the deploy")
        host.noop(f"{model.path}: stamped once it is placed")
        return
    text = stamp_text(model.path, model.sha256, info["size"], info["mtime"], info["ctime"])
    yield f"mkdir -p {shell_word(STAMP_DIR)} && printf %s {shell_word(text)} > {shell_word(stamp_path(model.path))}"


@operation()
def unused(in_box: Sequence[str], remove: bool = False):  # type: ignore[no-untyped-def]
    """Report the model files gpubox placed (they have a stamp) that are no longer in the box; delete
    them, with their stamps, when ``remove``.

    + in_box: the host paths of the box's models
    + remove: delete them (host data ``gpubox_remove_unused_models``); else only report them

    A file that a unit (``*.service``) or a kept previous unit (``*.service.prev``: what a failed
    smoke test restores) still names is kept: deleting it would break that unit's start.

    **Example:**

    .. code:: python

        models.unused(name="Models no longer in the box", in_box=[model.path for _, model in box.models()])
    """
    keep = set(in_box)
    stamped = [StampedModel.model_validate(item) for item in read(stamps_read()) or []]
    kept, removed = [], 0
    for item in stamped:
        if item.path in keep:
            continue
        if item.size is None:
            if remove:  # the file is gone: only its stamp is left
                removed += 1
                yield f"rm -f {shell_word(item.stamp)}"
            continue
        gone = f"{item.path} is no longer in the box ({size_mib(item.size)})"
        if not remove:
            host.log(f"{gone}: set remove_unused_models to delete it (pyinfra --data gpubox_remove_unused_models=true)")
        elif item.units:
            host.log(f"{gone}, but {', '.join(item.units)} still names it (a rollback would start it): kept")
        else:
            host.log(f"{gone}: deleting it and its stamp")
            removed += 1
            yield f"rm -f {shell_word(item.path)} {shell_word(item.stamp)}"
            continue
        kept.append(item.path)
    if not removed:
        host.noop(
            f"kept {len(kept)} model file(s) no longer in the box: {', '.join(kept)}"
            if kept
            else "every model file gpubox placed is in the box"
        )
