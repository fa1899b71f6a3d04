"""The atomic switch every install shares (a source build, a piper venv): `{prefix}/current` and
`{prefix}/previous` are symlinks to a directory under `{prefix}/{kind}/`, changed by renames only.

    {prefix}/{kind}/{name}   complete installs, each made beside the others, never edited in place
    {prefix}/current         the active one: what the units run
    {prefix}/previous        the one before the last switch: what a failed smoke test switches back to
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from gpubox.quoting import shell_word
from gpubox.records import Record


def current_link(prefix: str) -> str:
    return f"{prefix}/current"


def switch_lines(prefix: str, target: str) -> list[str]:
    """Remember the active install as `previous`, then point `current` at `target` (`builds/NAME`)."""
    current = shell_word(current_link(prefix))
    current_new = shell_word(f"{prefix}/current.new")
    previous = shell_word(f"{prefix}/previous")
    previous_new = shell_word(f"{prefix}/previous.new")
    quoted_target = shell_word(target)
    return [
        f'if [ -L {current} ] && [ "$(readlink {current})" != {quoted_target} ]; then '
        f'ln -sfn "$(readlink {current})" {previous_new} && mv -T {previous_new} {previous}; fi',
        f"ln -sfn {quoted_target} {current_new} && mv -T {current_new} {current}",
    ]


def rollback_script(prefix: str) -> str:
    """Point `current` back at `previous` (after a smoke test missed on a new install)."""
    current = shell_word(f"{prefix}/current")
    current_new = shell_word(f"{prefix}/current.new")
    previous = shell_word(f"{prefix}/previous")
    return (
        f'if [ -L {previous} ]; then ln -sfn "$(readlink {previous})" {current_new} '
        f"&& mv -T {current_new} {current}; fi"
    )


def prune_lines(prefix: str, kind: str, keep: int, also: Sequence[str] = ()) -> list[str]:
    """Remove installs under `{prefix}/{kind}/` beyond `keep`, newest kept first; `current` and
    `previous` are always kept. `also`: more paths to remove with one, `$name` standing for its name
    (a build's work tree and log). One directory a line (a newline is refused in paths)."""
    quoted = shell_word(prefix)
    extra = "".join(f" {path}" for path in also)
    return [
        f'current=$(readlink {quoted}/current || true); previous=$(readlink {quoted}/previous || true); kept=0',
        f"ls -1td {quoted}/{kind}/*/ 2>/dev/null | while IFS= read -r dir; do",
        '  name=$(basename "$dir")',
        f'  if [ "{kind}/$name" = "$current" ] || [ "{kind}/$name" = "$previous" ]; then continue; fi',
        f"  if [ $kept -lt {keep - 2} ]; then kept=$((kept + 1)); continue; fi",
        f'  rm -rf "$dir"{extra} && echo "pruned {kind}/$name"',
        "done",
    ]


def stamp_matches(found: str | None, expected: str) -> bool:
    """Whether an install's stamp (its text; None when missing) records what `expected` does (JSON)."""
    if not found:
        return False
    try:
        return bool(json.loads(found) == json.loads(expected))
    except ValueError:
        return False


class InstalledBuild(Record):
    """What the host has of an install: its stamp's text (None: not installed, or made before stamps)
    and where ``current`` points (None: no link)."""

    stamp: str | None
    current: str | None


_CURRENT_MARK = "@@current"


def installed_command(stamp: str, current: str) -> str:
    """One round trip for the no-op check: an install's stamp, then the `current` link's target."""
    # the stamp read by the shell itself, a line at a time (no `cat`: a process less on every host, every run)
    read_stamp = 'while IFS= read -r line || [ -n "$line" ]; do printf "%s\\n" "$line"; done'
    read_stamp += f" 2>/dev/null <{shell_word(stamp)}"
    return f"{read_stamp}; echo; echo {_CURRENT_MARK}; readlink {shell_word(current)} || true"


def parse_installed(lines: Sequence[str]) -> InstalledBuild:
    """The output of :func:`installed_command`."""
    marker = lines.index(_CURRENT_MARK) if _CURRENT_MARK in lines else len(lines)
    stamp = "\n".join(line for line in lines[:marker] if line.strip()).strip()
    current = "".join(lines[marker + 1 :]).strip()
    return InstalledBuild(stamp=stamp or None, current=current or None)


def installed_here(found: InstalledBuild, expected_stamp: str, target: str) -> tuple[bool, bool]:
    """Whether the install is there (its stamp records `expected_stamp`), and `current` points at
    `target` (`builds/NAME`, `venvs/NAME`)."""
    return stamp_matches(found.stamp, expected_stamp), (found.current or "").rstrip("/") == target
