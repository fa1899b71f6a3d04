"""Stamps of verified model files: hash a multi-GB GGUF once, not on every run.

After a model's sha256 is verified on the host, gpubox records it in a stamp with the file's size,
mtime and ctime (`stat`). A later run trusts the stamp while all three are unchanged and hashes
the file again otherwise. ctime cannot be set from user space, so a rewrite of the file in place
(even one that restores size and mtime) invalidates the stamp. rsync's quick check is the same idea.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

STAMP_DIR = "/var/lib/gpubox/verified"


def stamp_path(model_path: str) -> str:
    """One stamp per host path, outside the model directory (which may be a user's home)."""
    return f"{STAMP_DIR}/{hashlib.sha1(model_path.encode()).hexdigest()}.stamp"


def stamp_lines(model_path: str, sha256: str, size: int, mtime: datetime, ctime: datetime) -> list[str]:
    return [model_path, sha256, str(size), mtime.isoformat(), ctime.isoformat()]


def stamp_text(model_path: str, sha256: str, size: int, mtime: datetime, ctime: datetime) -> str:
    return "\n".join(stamp_lines(model_path, sha256, size, mtime, ctime)) + "\n"


def stamp_vouches(
    stamp: Sequence[str] | None, model_path: str, sha256: str, size: int, mtime: datetime, ctime: datetime
) -> bool:
    """Whether a stamp (its lines) says this very file, unchanged since, has this sha256."""
    if stamp is None:
        return False
    return [line.strip() for line in stamp] == stamp_lines(model_path, sha256, size, mtime, ctime)
