"""Gated model sources on the Hugging Face hub: a reference pinned to a revision, and a token that never leaks.

A ``ModelFile.source`` of ``hf://<org>/<repo>/<path in the repo>@<40-hex commit>`` is downloaded from
``{endpoint}/<org>/<repo>/resolve/<commit>/<path>`` (``HuggingFace.endpoint``, default the public hub).
A branch or tag moves; a commit does not, so only a full commit is accepted.

The token (gated repos: accept the licence on the model page first) is read on the controller from a
file only its owner can read (``HuggingFace.token_file`` or ``$HF_TOKEN_FILE``), reaches the host as a
curl header file in a root-only directory for the length of the download (``curl -H @file``: never in
an argv, a script's text, a log or ``--diff``), and is deleted when curl ends, whatever happened.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from gpubox.quoting import shell_word

HF_SCHEME = "hf://"
DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_FILE_ENV = "HF_TOKEN_FILE"
REFERENCE = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<file>[^@\n\r\x00]+)@(?P<revision>[^@\s]*)$"
)
REVISION = re.compile(r"^[0-9a-f]{40}$")
# What a hub token is made of: anything else could end the header line curl reads it from.
TOKEN = re.compile(r"^[A-Za-z0-9_.-]{8,256}$")
GATED = "gated: accept the licence on the model page and set a token"


@dataclass(frozen=True)
class HfReference:
    """``repo`` (``org/name``), ``file`` (its path in the repo) and ``revision`` (a full commit)."""

    repo: str
    file: str
    revision: str

    def url(self, endpoint: str = DEFAULT_ENDPOINT) -> str:
        """The hub's resolve URL of the file at the revision."""
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{self.revision}/{quote(self.file)}"

    @property
    def page(self) -> str:
        """The model page on the public hub, where a gated repo's licence is accepted."""
        return f"{DEFAULT_ENDPOINT}/{self.repo}"


def parse_reference(value: str) -> HfReference:
    """``hf://org/repo/file@<40-hex>``; ValueError saying what to write instead."""
    match = REFERENCE.match(value)
    if match is None:
        raise ValueError(
            f"a Hugging Face source is hf://<org>/<repo>/<file in the repo>@<40-hex commit>, got {value!r}"
        )
    revision = match["revision"]
    if not REVISION.match(revision):
        raise ValueError(
            f"pin the revision to a full 40-hex commit (the model page's 'Files' history), got {revision!r} in "
            f"{value!r}: a branch or tag moves, and the sha256 would stop matching"
        )
    if ".." in match["file"].split("/"):
        raise ValueError(f"the file in the repo must not have a '..' part, got {value!r}")
    return HfReference(repo=match["repo"], file=match["file"], revision=revision)


class TokenFileError(ValueError):
    """The token file is missing, readable by others, empty or holds no token."""


def token_file(configured: str | None, environ: dict[str, str] | None = None) -> Path | None:
    """The controller's token file: the box's ``huggingface.token_file``, else ``$HF_TOKEN_FILE``, else none."""
    value = configured or (environ if environ is not None else dict(os.environ)).get(TOKEN_FILE_ENV)
    return Path(value).expanduser() if value else None


def read_token(path: Path) -> str:
    """The token in ``path`` (its first line); refused unless only its owner can read it (0600 or 0400)."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise TokenFileError(f"{path}: {error.strerror}: write the hub token there (mode 0600)") from error
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}): `chmod 600 {path}`, a token is a password"
        )
    lines = path.read_text().splitlines()
    token = lines[0].strip() if lines else ""
    if not TOKEN.match(token):
        raise TokenFileError(
            f"{path} holds no token on its first line (letters, digits, '_', '.', '-'): write it there"
        )
    return token


def header_file_text(token: str) -> str:
    """What curl reads with ``-H @file``: the one header that carries the token."""
    if not TOKEN.match(token):
        raise TokenFileError("the token has characters a header can't carry")
    return f"Authorization: Bearer {token}\n"


def download_script(url: str, part: str, auth_dir: str | None) -> str:
    """Download ``url`` into ``part`` (resuming it), with the header file in ``auth_dir`` when there is a token.

    The header directory is removed when the script exits, whatever happened. A 401 or 403 is said as
    "gated: ..." (the old file and the .part are left alone); a 404 names the URL.
    """
    lines = ["set -u"]
    header = []
    if auth_dir is not None:
        lines.append(f"trap 'rm -rf {shell_word(auth_dir)}' EXIT")
        header = ["-H", f"@{auth_dir}/header"]
    curl = " ".join(
        shell_word(word)
        for word in ["curl", "-fsSL", "--retry", "3", "--continue-at", "-", "-w", "%{http_code}", *header,
                     "--output", part, url]
    )  # fmt: skip
    lines += [
        f"status=$({curl})",
        "code=$?",
        '[ "$code" -eq 0 ] && exit 0',
        'case "$status" in',
        f"  401|403) printf '%s (HTTP %s from %s); kept the existing file\\n' {shell_word(GATED)} \"$status\" "
        f"{shell_word(url)} >&2; exit 1 ;;",
        "  404) printf 'not found (HTTP 404): %s: check the source (repo, file, revision)\\n' "
        f"{shell_word(url)} >&2; exit 1 ;;",
        "esac",
        "exit \"$code\"",
    ]
    return "\n".join(lines)
