"""A gpubox service on its host: whether its running process predates its unit, models, key or
build, and whether its user exists.

pyinfra @host fact facts.systemd.StaleProcess unit_name=gemma4.service \
    unit_path=/etc/systemd/system/gemma4.service files=/srv/models/m.gguf binary=/opt/llama.cpp/current/llama-server
pyinfra @host fact facts.systemd.ExistingUsers names=llama,whisper
"""

from __future__ import annotations

from collections.abc import Sequence

from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox.quoting import shell_word
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


class ExistingUsers(FactBase[list[str]]):
    """
    Which of ``names`` are accounts on the host (``getent passwd``): what a service's user check needs,
    without pyinfra's ``server.Users``, which lists every account with its groups (~0.2 s on a test host).
    """

    @override
    def command(self, names: tuple[str, ...]) -> str:
        checks = [f"getent passwd {shell_word(name)} >/dev/null && echo {shell_word(name)}" for name in names]
        return "; ".join([*checks, "true"])

    @override
    def default(self) -> list[str]:
        return []

    @override
    def process(self, output: list[str]) -> list[str]:
        return [line.strip() for line in output if line.strip()]
