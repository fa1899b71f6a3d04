"""Whether a service's running process predates what it runs: a deploy cut before its restart.

A deploy restarts a service when this run changed its unit, key, models or build. When a deploy is
cut between such a change and the restart (a laptop that sleeps, a dropped link), the next run sees
nothing to change and would leave the old process running. This probe asks the host instead: the
process started before its unit file, a model or its key was last changed (ctime), systemd has not
reloaded the unit, or the process runs another binary than `current` points at.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpubox.quoting import shell_join, shell_word


def stale_probe_command(unit_name: str, unit_path: str, files: Sequence[str], binary: str) -> str:
    """Prints one reason a line for the running process being stale; nothing when it is current or not running."""
    unit = shell_word(unit_name)
    return "\n".join([
        "pid=0 reload=no",  # one systemctl for both (each costs ~10 ms on a small host): Key=value lines
        f"for property in $(systemctl show --property MainPID --property NeedDaemonReload {unit} 2>/dev/null); do",
        '  case "$property" in MainPID=*) pid=${property#*=} ;; NeedDaemonReload=*) reload=${property#*=} ;; esac',
        "done",
        '[ "${pid:-0}" -gt 0 ] 2>/dev/null || exit 0',
        "started=$(stat -c %Y /proc/$pid)",
        '[ "$reload" != yes ] || echo "unit not reloaded"',
        f"for file in {shell_join([unit_path, *files])}; do",
        '  changed=$(stat -c %Z "$file" 2>/dev/null || echo 0)',
        '  [ "$changed" -le "$started" ] || echo "changed since start: $file"',
        "done",
        f'running=$(readlink /proc/$pid/exe); wanted=$(readlink -f {shell_word(binary)})',
        '[ "$running" = "$wanted" ] || echo "runs $running, not $wanted"',
    ])  # fmt: skip


def parse_stale_probe(lines: Sequence[str]) -> list[str]:
    """The reasons the probe printed (empty: the process runs what is on disk)."""
    return [line.strip() for line in lines if line.strip()]
