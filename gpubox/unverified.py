"""Services put live that no smoke test has passed yet: a mark on the host, one file per unit.

A deploy marks a service before it restarts (or starts) it, and clears the mark only when the
service's smoke test passes, or when a miss has put the previous unit back. A run cut in between
(the laptop slept, the link dropped, Ctrl-C) leaves the mark, so the next run, which finds nothing
else to change, still smoke-tests the service and rolls it back on a miss, as the cut run would have.

    /var/lib/gpubox/unverified/gemma4.service
        marked=2026-05-01T10:00:00Z         when (the host's clock)
        by=dan@laptop pid 4242              the run that marked it (its deploy lock's holder)
        install=switched                    that run switched the service's install (`current`)

The mark is written whole (staged beside it, renamed over it): a reader sees the old mark, the new
one or none, never half of one.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpubox.quoting import shell_word
from gpubox.records import Record

MARK_DIR = "/var/lib/gpubox/unverified"


class Mark(Record):
    """An unverified service, as the marks fact reads it."""

    unit: str
    marked: str = ""  # when, on the host's clock (ISO 8601, UTC)
    by: str = ""  # the run that marked it
    install_switched: bool = False  # that run switched the install the service runs from

    def describe(self) -> str:
        """`restarted at T by R`, what is known of it."""
        when = f" at {self.marked}" if self.marked else ""
        by = f" by the run of {self.by}" if self.by else ""
        return f"{self.unit} was put live{when}{by}"


def mark_path(unit_name: str, mark_dir: str = MARK_DIR) -> str:
    return f"{mark_dir}/{unit_name}"


def _safe(value: str) -> str:
    """A value on one line of the mark: no line breaks, no control characters."""
    return "".join(character if character.isprintable() else " " for character in value)


def mark_command(unit_name: str, by: str = "", install_switched: bool = False, mark_dir: str = MARK_DIR) -> str:
    """Write the mark whole (staged, renamed over): before the command that puts the service live."""
    path = mark_path(unit_name, mark_dir)
    staged = f"{mark_dir}/.{unit_name}.new"
    lines = [f"by={_safe(by)}", f"install={'switched' if install_switched else 'kept'}"]
    return (
        f"mkdir -p {shell_word(mark_dir)} && "
        f"{{ printf 'marked=%s\\n' \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\" && "
        f"printf '%s\\n' {' '.join(shell_word(line) for line in lines)}; }} > {shell_word(staged)} && "
        f"mv -f {shell_word(staged)} {shell_word(path)}"
    )


def clear_command(unit_name: str, mark_dir: str = MARK_DIR) -> str:
    """Remove the mark: its smoke test passed (or the previous unit is back)."""
    return f"rm -f {shell_word(mark_path(unit_name, mark_dir))}"


MARK_HEADER = "@@gpubox-mark"


def marks_command(mark_dir: str = MARK_DIR) -> str:
    """Every mark: a header line with its unit's name, then the mark's lines."""
    return "; ".join([
        f"for mark in {shell_word(mark_dir)}/*",
        'do [ -f "$mark" ] || continue',
        f"printf '{MARK_HEADER} %s\\n' \"${{mark##*/}}\"",
        'cat "$mark"',
        "echo",
        "done",
    ])  # fmt: skip


def parse_marks(lines: Sequence[str]) -> list[Mark]:
    """The marks `marks_command` printed, by unit; a mark's unknown or broken lines are ignored (the
    unit stays marked: an unreadable mark is still a mark)."""
    found: dict[str, dict[str, str]] = {}
    unit = None
    for line in lines:
        text = line.rstrip("\n")
        if text.startswith(f"{MARK_HEADER} "):
            unit = text.removeprefix(f"{MARK_HEADER} ").strip()
            found[unit] = {}
        elif unit is not None and "=" in text:
            key, _, value = text.partition("=")
            found[unit][key.strip()] = value.strip()
    return [
        Mark(
            unit=unit,
            marked=fields.get("marked", ""),
            by=fields.get("by", ""),
            install_switched=fields.get("install") == "switched",
        )
        for unit, fields in found.items()
        if unit
    ]
