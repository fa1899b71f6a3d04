"""What systemd says of a host's units, read once for all of them: running, enabled, and for a gpubox
service whether its running process predates what it runs (a deploy cut before its restart).

A deploy restarts a service when this run changed its unit, key, models or build. When a deploy is
cut between such a change and the restart (a laptop that sleeps, a dropped link), the next run sees
nothing to change and would leave the old process running. The probe asks the host instead: the
process started before its unit file, a model or its key was last changed (ctime), systemd has not
reloaded the unit, or the process runs another binary than `current` points at.

Every unit of a run is read with one ``systemctl show`` (each ``systemctl`` costs ~10 ms on a small
host, 9 of them were a third of the demo box's no-op round trip); the host only gathers (the records,
each running process's start and program, the files' ctimes, the programs ``current`` resolves to), and
`parse_unit_states` decides here, where it is tested without a host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpubox.quoting import shell_join

PROPERTIES = ("Id", "SubState", "UnitFileState", "MainPID", "NeedDaemonReload")
ACTIVE_SUB_STATES = ("running", "waiting", "exited", "listening", "mounted")
"""The ``SubState``s counted as active: pyinfra's ``SystemdStatus.state_values`` (a test holds them equal)."""
ENABLED_FILE_STATES = ("enabled", "static")
"""The ``UnitFileState``s counted as enabled: pyinfra's ``SystemdEnabled.state_values``."""
_PROCESSES, _FILES, _PROGRAMS = "@@processes", "@@files", "@@programs"


@dataclass(frozen=True)
class StaleProbe:
    """What a service's running process must not predate: its unit file and the files it reads, and the
    program it must run (``{prefix}/current``'s, resolved on the host)."""

    unit_name: str
    unit_path: str
    files: tuple[str, ...]
    binary: str


@dataclass(frozen=True)
class UnitState:
    """One unit as systemd reports it; ``stale``: why its running process is not running what is on
    disk (probed units only; empty when it is current or not running)."""

    active: bool
    enabled: bool
    stale: tuple[str, ...] = ()


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def probed_units(units: Iterable[str], probes: Iterable[StaleProbe]) -> list[str]:
    """Every unit a read names, once, in order: ``units``, then the probes' units."""
    return _unique([*units, *(probe.unit_name for probe in probes)])


def unit_states_command(units: Sequence[str], probes: Sequence[StaleProbe] = ()) -> str:
    """One ``systemctl show`` of every unit, then, for the probes: each running main process's start
    (``/proc/PID``'s mtime) and program, the ctime of every file, and what each ``binary`` resolves to."""
    properties = " ".join(f"--property {name}" for name in PROPERTIES)
    lines = [
        f"states=$(systemctl show {properties} -- {shell_join(probed_units(units, probes))} 2>/dev/null)",
        'printf "%s\\n" "$states"',
    ]
    if probes:
        files = _unique(path for probe in probes for path in (probe.unit_path, *probe.files))
        lines += [
            f"echo {_PROCESSES}",
            "for line in $states; do",
            '  case "$line" in MainPID=*) pid=${line#MainPID=}',
            '    [ "$pid" -gt 0 ] 2>/dev/null && echo "$pid $(stat -c %Y /proc/$pid) $(readlink /proc/$pid/exe)" ;;',
            "  esac",
            "done",
            f"echo {_FILES}",
            f"stat -c '%Z %n' -- {shell_join(files)} 2>/dev/null",  # a file gone prints nothing: nothing to compare
            f"echo {_PROGRAMS}",
            f"for program in {shell_join(_unique(probe.binary for probe in probes))}; do",
            '  readlink -f -- "$program" || echo',  # one line each, in order
            "done",
        ]
    return "\n".join(lines)


def _sections(lines: Sequence[str]) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines:
        if line.strip() in (_PROCESSES, _FILES, _PROGRAMS):
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def _records(lines: Sequence[str]) -> list[dict[str, str]]:
    """``systemctl show``'s Key=value lines, one record per unit (blank lines between them)."""
    records: list[dict[str, str]] = [{}]
    for line in lines:
        key, equals, value = line.strip().partition("=")
        if not equals:
            records.append({})
        else:
            records[-1][key] = value
    return [record for record in records if record.get("Id")]


def _stale(
    record: dict[str, str], probe: StaleProbe, processes: dict[int, tuple[int, str]], ctimes: dict[str, int],
    programs: dict[str, str],
) -> tuple[str, ...]:  # fmt: skip
    pid = int(record.get("MainPID") or 0)
    if pid not in processes:  # not running (or gone since): nothing to restart
        return ()
    started, running = processes[pid]
    reasons = ["unit not reloaded"] if record.get("NeedDaemonReload") == "yes" else []
    reasons += [
        f"changed since start: {path}"
        for path in (probe.unit_path, *probe.files)
        if ctimes.get(path, 0) > started  # whole seconds: a change in the start's second is no change
    ]
    wanted = programs.get(probe.binary, "")
    if running != wanted:
        reasons.append(f"runs {running}, not {wanted}")
    return tuple(reasons)


def parse_unit_states(lines: Sequence[str], probes: Sequence[StaleProbe] = ()) -> dict[str, UnitState]:
    """`unit_states_command`'s output: each unit's state by its ``Id``."""
    sections = _sections(lines)
    processes: dict[int, tuple[int, str]] = {}
    for line in sections.get(_PROCESSES, []):
        pid, started, *program = line.strip().split(" ", 2)
        if pid.isdigit() and started.isdigit():
            processes[int(pid)] = (int(started), program[0] if program else "")
    ctimes: dict[str, int] = {}
    for line in sections.get(_FILES, []):
        changed, _, path = line.strip().partition(" ")
        if changed.isdigit():
            ctimes[path] = int(changed)
    binaries = _unique(probe.binary for probe in probes)
    resolved = [line.strip() for line in sections.get(_PROGRAMS, [])]
    programs = dict(zip(binaries, resolved, strict=False))
    probe_of = {probe.unit_name: probe for probe in probes}
    states: dict[str, UnitState] = {}
    for record in _records(sections[""]):
        unit = record["Id"]
        probe = probe_of.get(unit)
        states[unit] = UnitState(
            active=record.get("SubState") in ACTIVE_SUB_STATES,
            enabled=record.get("UnitFileState") in ENABLED_FILE_STATES,
            stale=_stale(record, probe, processes, ctimes, programs) if probe else (),
        )
    return states
