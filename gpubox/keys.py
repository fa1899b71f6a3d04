"""API key files: what one holds, its mode, and the two places that read it.

The rule: **a key file holds the key on its first line** (a trailing newline or not). gpubox generates
exactly that (operations/service.py: 64 hex digits and a newline). llama-server reads every line that is
not empty and not a ``#`` comment as a key, so more lines are more keys to it; every gpubox reader takes
the first line only: the smoke test on the host (``authorization_header_command``), ``gpubox smoke`` and
``gpubox bench --api-key-file`` on the controller (``first_line_key``), and Prometheus's copy (one key
per file). An empty first line is no key.

The mode, 0640 (root writes, the service's group reads), is ``KEY_FILE_MODE`` everywhere: in the
command that sets it and in the comparison with what pyinfra's File fact reads.
"""

from __future__ import annotations

from gpubox.quoting import shell_join

KEY_FILE_MODE = 0o640
"""A key file's mode: read-write for root, read-only for the group that uses it (the service, or prometheus)."""


def chmod_mode(mode: int = KEY_FILE_MODE) -> str:
    """The mode as ``chmod``/``install -m`` take it: ``0640``."""
    return f"{mode:04o}"


def fact_mode(mode: int = KEY_FILE_MODE) -> int:
    """The mode as pyinfra's File fact reports it: the octal digits read as a decimal number (``640``)."""
    return int(f"{mode:o}")


class KeyFileError(ValueError):
    """A key file whose first line holds no key."""


def first_line_key(text: str, where: str) -> str:
    """The key of a key file's text: its first line (KeyFileError naming ``where`` when it is empty)."""
    key = text.split("\n", 1)[0].removesuffix("\r")
    if not key:
        raise KeyFileError(f"{where}: the first line holds no key: a gpubox key file has the key on its first line")
    return key


def authorization_header_command(key_file: str) -> str:
    """A shell command printing ``Authorization: Bearer <the first line of key_file>`` (for ``curl -H @-``):
    the key goes through a pipe, never into an argv."""
    return shell_join(["sed", "-n", "1s/^/Authorization: Bearer /p", key_file])
