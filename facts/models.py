"""Model files on a host: the ones gpubox verified (stamped), and the size of a download.

pyinfra @host fact facts.models.VerifiedStamps
pyinfra @host fact facts.models.UrlContentLength url=https://huggingface.co/...
pyinfra @host fact facts.models.FileHead path=/srv/models/ggml-tiny.en.bin
"""

from __future__ import annotations

from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox import models
from gpubox.verified import STAMP_DIR


class VerifiedStamps(FactBase[list[models.StampedModel]]):
    """
    Every model file with a stamp under ``/var/lib/gpubox/verified`` (``gpubox.models.StampedModel``):
    its path (the stamp's first line), its size (None when the file is gone), and the unit files
    (``*.service``, ``*.service.prev`` in ``/etc/systemd/system``) that name it. One command for all.
    """

    @override
    def command(self, stamp_dir: str = STAMP_DIR, unit_dir: str = models.UNIT_DIR) -> str:
        return models.stamps_command(stamp_dir, unit_dir)

    @override
    def process(self, output: list[str]) -> list[models.StampedModel]:
        return models.parse_stamps(output)

    @staticmethod
    @override
    def default() -> list[models.StampedModel]:
        return []


class UrlContentLength(FactBase[int | None]):
    """
    The Content-Length of ``url`` after redirects, from a HEAD request on the host (``curl -sIL``);
    None when the server gives none or the request fails.
    """

    @override
    def command(self, url: str) -> str:
        return models.content_length_command(url)

    @override
    def process(self, output: list[str]) -> int | None:
        return models.parse_content_length(output)


class FileHead(FactBase[bytes | None]):
    """
    The first ``head_bytes`` of a file (base64 on the wire); None when there is no file.
    What the placement reads to tell a ggml whisper model, an ONNX voice or its JSON config apart.
    """

    @override
    def command(self, path: str, head_bytes: int = models.FORMAT_HEAD_BYTES) -> str:
        return models.head_command(path, head_bytes)

    @override
    def process(self, output: list[str]) -> bytes | None:
        return models.parse_head(output)
