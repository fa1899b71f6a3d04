"""An install on a host (a llama.cpp or whisper.cpp build, a piper venv): its stamp and the ``current`` link.

pyinfra @host fact facts.build.InstalledBuild \
    stamp=/opt/llama.cpp/builds/COMMIT-cuda/gpubox-build.json current=/opt/llama.cpp/current
"""

from __future__ import annotations

from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox import switch


class InstalledBuild(FactBase[switch.InstalledBuild]):
    """
    The text of a build's stamp (``stamp``: what ``builds/{commit}-{flavor}`` was built as) and
    where the ``current`` link points (``gpubox.switch.InstalledBuild``), in one round trip.
    """

    @override
    def command(self, stamp: str, current: str) -> str:
        return switch.installed_command(stamp, current)

    @override
    def process(self, output: list[str]) -> switch.InstalledBuild:
        return switch.parse_installed(output)
