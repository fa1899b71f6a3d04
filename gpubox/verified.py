"""Stamps of verified model files: hash a multi-GB GGUF once, not on every run.

After a model's sha256 is verified on the host, gpubox records it in a stamp with the file's size,
mtime and ctime (`stat`). A later run trusts the stamp while all three are unchanged and hashes
the file again otherwise. ctime cannot be set from user space, so a rewrite of the file in place
(even one that restores size and mtime) invalidates the stamp. rsync's quick check is the same idea.

A stamp is the file's sha256 whatever the spec now says: when the spec moves to another sha256, an
unchanged stamped file is known to be the old content, and is replaced without hashing it first.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime

STAMP_DIR = "/var/lib/gpubox/verified"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def stamp_path(model_path: str) -> str:
    """One stamp per host path, outside the model directory (which may be a user's home)."""
    return f"{STAMP_DIR}/{hashlib.sha1(model_path.encode()).hexdigest()}.stamp"


def stamp_lines(model_path: str, sha256: str, size: int, mtime: datetime, ctime: datetime) -> list[str]:
    return [model_path, sha256, str(size), mtime.isoformat(), ctime.isoformat()]


def stamp_text(model_path: str, sha256: str, size: int, mtime: datetime, ctime: datetime) -> str:
    return "\n".join(stamp_lines(model_path, sha256, size, mtime, ctime)) + "\n"


def stamped_sha256(
    stamp: Sequence[str] | None, model_path: str, size: int, mtime: datetime, ctime: datetime
) -> str | None:
    """The sha256 a stamp (its lines) records for this very file, unchanged since; None when there is
    no stamp, it is another file's or unreadable, or the file changed after it was written."""
    if stamp is None or len(stamp) != len(stamp_lines(model_path, "", size, mtime, ctime)):
        return None
    lines = [line.strip() for line in stamp]
    sha256 = lines[1]
    if not _SHA256.fullmatch(sha256) or lines != stamp_lines(model_path, sha256, size, mtime, ctime):
        return None
    return sha256


def stamp_vouches(
    stamp: Sequence[str] | None, model_path: str, sha256: str, size: int, mtime: datetime, ctime: datetime
) -> bool:
    """Whether a stamp (its lines) says this very file, unchanged since, has this sha256."""
    return stamped_sha256(stamp, model_path, size, mtime, ctime) == sha256
