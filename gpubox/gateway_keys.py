"""The keys between a gateway and its backends: made on the controller, placed on both hosts, never shown.

A backend llama-server checks the keys in its ``api_key_file`` (every line is a key to llama-server; gpubox's
own readers take the first line only: ``gpubox.keys``), and a key never leaves the host it was made on. So
the gateway gets its own key per model group: the controller makes it once, into a store only its user reads
(``~/.config/gpubox/gateway-keys/<gateway host>/<group>.key``, directory 0700, file 0600; ``$GPUBOX_KEY_STORE``
moves it), and the deploy places it

- on each backend's host, as another line of the backend's key file (the backend restarts to read it), and
- on the gateway's host, in the ``EnvironmentFile=`` of HAProxy's unit (``GPUBOX_GROUP_KEY_<n>=<key>``, root
  only), which the config names as ``${GPUBOX_GROUP_KEY_<n>}``.

Each is uploaded by a step that prints nothing of it: the key is in no argv, no diff and no log; the deploy
compares sha256 digests to decide whether to write.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

STORE_ENV = "GPUBOX_KEY_STORE"


def store_dir() -> Path:
    """The controller's key store (``$GPUBOX_KEY_STORE``, else ``~/.config/gpubox/gateway-keys``)."""
    given = os.environ.get(STORE_ENV)
    return Path(given) if given else Path.home() / ".config" / "gpubox" / "gateway-keys"


def group_key(gateway_host: str, group: str, store: Path | None = None) -> str:
    """The gateway's key for ``group``'s backends, made (64 hex digits) the first time it is asked for."""
    directory = (store or store_dir()) / gateway_host
    path = directory / f"{group}.key"
    if path.is_file():
        key = path.read_text().split("\n", 1)[0]
        if key:
            return key
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    key = secrets.token_hex(32)
    staged = path.with_suffix(".new")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{key}\n")
    os.replace(staged, path)
    return key


def digest(text: str) -> str:
    """What the deploy compares instead of a key: its sha256."""
    return hashlib.sha256(text.encode()).hexdigest()


def environment_text(keys: list[str]) -> str:
    """HAProxy's ``EnvironmentFile=``: ``GPUBOX_GROUP_KEY_<n>=<key>``, group by group (hex: no quoting)."""
    from gpubox.haproxy import key_variable

    return "".join(f"{key_variable(index)}={key}\n" for index, key in enumerate(keys))
