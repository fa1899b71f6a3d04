"""The header of a GGUF model file on a host, read from the file's head only.

pyinfra @host fact facts.gguf.GgufHeader path=/srv/models/model.gguf
"""

from __future__ import annotations

from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox import gguf_header


class GgufHeader(FactBase[gguf_header.GgufFile | gguf_header.GgufHeaderError | None]):
    """
    Architecture, name, size, metadata and tensor infos of a GGUF (``gpubox.gguf_header.GgufFile``).

    Reads only the first ``head_bytes`` of the file (gzip + base64 on the host), never the whole
    model. None when there is no file at ``path``; a ``gpubox.gguf_header.GgufHeaderError`` record
    (``kind``: ``not_gguf``, ``truncated``, ``head_too_short``, ``invalid``) when it cannot be read
    as a GGUF, for the operation to report with the path.
    """

    @override
    def command(self, path: str, head_bytes: int = gguf_header.DEFAULT_HEAD_BYTES) -> str:
        return gguf_header.gguf_head_command(path, head_bytes)

    @override
    def process(self, output: list[str]) -> gguf_header.GgufFile | gguf_header.GgufHeaderError | None:
        return gguf_header.parse_gguf_head_output(output)
