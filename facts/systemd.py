"""Whether a gpubox service's running process predates its unit, models, key or build.

pyinfra @host fact facts.systemd.StaleProcess unit_name=gemma4.service \
    unit_path=/etc/systemd/system/gemma4.service files=/srv/models/m.gguf binary=/opt/llama.cpp/current/llama-server
"""

from __future__ import annotations

from collections.abc import Sequence

from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox.running import parse_stale_probe, stale_probe_command


class StaleProcess(FactBase[list[str]]):
    """
    Why the service's running process is not running what is on disk (``gpubox.running``): its unit
    or a file it reads changed after it started, systemd has not reloaded the unit, or it runs
    another binary than ``current``. ``[]`` when it is current, or not running.
    """

    @override
    @staticmethod
    def default() -> list[str]:
        return []

    @override
    def command(self, unit_name: str, unit_path: str, files: Sequence[str], binary: str) -> str:
        return stale_probe_command(unit_name, unit_path, files, binary)

    @override
    def process(self, output: list[str]) -> list[str]:
        return parse_stale_probe(output)
