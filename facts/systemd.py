"""The host's units as systemd reports them, every unit of a run in one ``systemctl show``, and which
of a service's users exist.

pyinfra @host fact facts.systemd.UnitStates units=gemma4.service,prometheus.service
pyinfra @host fact facts.systemd.ExistingUsers names=llama,whisper
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pyinfra.api.facts import FactBase
from typing_extensions import override

from gpubox.quoting import shell_word
from gpubox.running import StaleProbe, UnitState, parse_unit_states, probed_units, unit_states_command


class UnitStates(FactBase[dict[str, UnitState]]):
    """
    Each unit's ``gpubox.running.UnitState``: active and enabled (as pyinfra's ``SystemdStatus`` and
    ``SystemdEnabled`` count them) and, for each of ``probes`` (a gpubox service), why its running
    process is not running what is on disk (``gpubox.running``). One ``systemctl show`` for all of them;
    ``operations.host_facts.prefetch`` merges a run's reads of it into one (``merged``, ``share``).
    """

    _probes: tuple[StaleProbe, ...] = ()

    @override
    @staticmethod
    def default() -> dict[str, UnitState]:
        return {}

    @override
    def command(self, units: Sequence[str] = (), probes: Sequence[StaleProbe] = ()) -> str:
        self._probes = tuple(probes)  # what `process` compares the host's answers with
        return unit_states_command(units, self._probes)

    @override
    def process(self, output: list[str]) -> dict[str, UnitState]:
        return parse_unit_states(output, self._probes)

    @staticmethod
    def merged(reads: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One read's arguments for all of ``reads``: every unit and every probe, once."""
        units = dict.fromkeys(unit for read in reads for unit in read.get("units", ()))
        probes = dict.fromkeys(probe for read in reads for probe in read.get("probes", ()))
        return {"units": tuple(units), "probes": tuple(probes)}

    @staticmethod
    def share(value: dict[str, UnitState], read: Mapping[str, Any]) -> dict[str, UnitState]:
        """The part of the merged read's value that ``read`` asked for."""
        wanted = probed_units(read.get("units", ()), read.get("probes", ()))
        return {unit: value[unit] for unit in wanted if unit in value}


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
