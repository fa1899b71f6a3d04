"""One deploy at a time per host: a named lock on the host, held by a process the deploy's own SSH
connection keeps alive, with a record of who holds it.

The lock is a kernel `flock` on ``/var/lib/gpubox/locks/<name>.lock``, taken by a small shell
process (`holder_script`) that the deploy starts over its SSH connection at the top of the run and
that lives as long as that connection: it waits on its stdin, which is the SSH channel. It ends,
and the kernel frees the lock, when the deploy says ``release`` (every exit path of pyinfra: done,
failed, rolled back, Ctrl-C), or when its stdin reaches end of file because the connection is
gone (the controller was killed, crashed, or lost the host). No lease, no clock: the lock is held
for exactly as long as the deploy can still change the host over that connection. A lease that
expires would free the lock under a controller that is only slow or asleep and that then wakes
and carries on over its still-open connection: two deploys at once, the bug the lock exists for.

Beside the lock, ``<name>.holder`` records the holder (controller host, pid, user, start time; the
holder's pid and the time on the host), written whole once the lock is taken and removed by a
release. A second deploy is refused at once, with the record. A record whose lock is free was
left by a run that ended without releasing (its connection dropped): the lock is taken over and
the run says whose it was. Only a half-open connection (the controller's machine vanished without
closing it) keeps a dead run's lock, until sshd or TCP drops the connection: sshd's
``ClientAliveInterval`` bounds that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from gpubox.quoting import shell_word

LOCK_DIR = "/var/lib/gpubox/locks"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
MARK = "gpubox-lock"
RELEASE = "release"
HELD_EXIT = 75  # EX_TEMPFAIL: another run holds it


def check_name(name: str) -> str:
    """A lock's name: lowercase letters, digits, `_`, `.`, `-` (it names two files)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"lock name {name!r}: lowercase letters, digits, '_', '.', '-' (at most 63), e.g. 'deploy'")
    return name


def lock_file(name: str, lock_dir: str = LOCK_DIR) -> str:
    return f"{lock_dir}/{check_name(name)}.lock"


def record_file(name: str, lock_dir: str = LOCK_DIR) -> str:
    return f"{lock_dir}/{check_name(name)}.holder"


def _one_line(value: str) -> str:
    return "".join(character if character.isprintable() else " " for character in value).strip()


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: the controller's side, and the host's (once it is taken)."""

    controller: str  # the controller's host name
    pid: int  # the controller's pyinfra process
    user: str  # who ran it, on the controller
    started: str  # when it took the lock, on the controller's clock (ISO 8601, UTC)
    holder_pid: int | None = None  # the process on the host that holds the lock
    since: int | None = None  # when it took the lock, on the host's clock (Unix seconds)

    def controller_lines(self) -> list[str]:
        """The record's lines the controller knows (the host adds `holder_pid` and `since`)."""
        return [
            f"controller={_one_line(self.controller)}",
            f"pid={self.pid}",
            f"user={_one_line(self.user)}",
            f"started={_one_line(self.started)}",
        ]

    def who(self) -> str:
        """`dan@laptop pid 4242`"""
        return f"{self.user}@{self.controller} pid {self.pid}"

    def describe(self, now: int | None = None) -> str:
        """`dan@laptop pid 4242, started 2026-05-01T10:00:00Z (35 s ago)`: the age by the host's clock."""
        age = f" ({now - self.since} s ago)" if now is not None and self.since is not None else ""
        return f"{self.who()}, started {self.started}{age}"

    @classmethod
    def parse(cls, lines: Sequence[str]) -> Holder | None:
        """A record's lines; None when it is missing or unreadable (a partial or foreign file)."""
        fields = dict(line.rstrip("\n").partition("=")[::2] for line in lines if "=" in line)

        def number(key: str) -> int | None:
            value = fields.get(key, "").strip()
            return int(value) if value.isdigit() else None

        pid = number("pid")
        if not fields.get("controller") or pid is None:
            return None
        return cls(
            controller=fields["controller"].strip(),
            pid=pid,
            user=fields.get("user", "?").strip() or "?",
            started=fields.get("started", "?").strip() or "?",
            holder_pid=number("holder_pid"),
            since=number("since"),
        )


def holder_script(name: str, holder: Holder, lock_dir: str = LOCK_DIR) -> str:
    """The process that takes and holds the lock, run over the deploy's SSH connection.

    It prints a probe: `gpubox-lock state=free|held alive=1|0 now=SECONDS`, the record found (if
    any), `gpubox-lock end`. Held: it exits 75. Free (it now holds the lock): it writes its own
    record, prints `gpubox-lock acquired`, and holds the lock until a `release` line (it removes its
    record, prints `gpubox-lock released`) or the end of its stdin (the connection is gone: the
    record stays, for the next run to say whose lock it took over).
    """
    lock, record = shell_word(lock_file(name, lock_dir)), shell_word(record_file(name, lock_dir))
    staged = shell_word(f"{record_file(name, lock_dir)}.new")
    mine = " ".join(shell_word(line) for line in holder.controller_lines())
    return "\n".join([
        "set -u",
        "umask 077",
        f"mkdir -p {shell_word(lock_dir)} || exit 70",
        f"exec 9>>{lock} || exit 70",
        "if flock -n 9; then state=free; else state=held; fi",
        "alive=0",
        # A run that just took the lock writes its record a moment later: wait for it, briefly.
        "i=0",
        'while [ "$state" = held ] && [ $i -lt 20 ]; do',
        f'  pid=$(sed -n "s/^holder_pid=//p" {record} 2>/dev/null)',
        '  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then alive=1; break; fi',
        "  i=$((i + 1)); sleep 0.1",
        "done",
        f'echo "{MARK} state=$state alive=$alive now=$(date +%s)"',
        f"cat {record} 2>/dev/null",
        f"echo; echo '{MARK} end'",
        f'[ "$state" = free ] || exit {HELD_EXIT}',
        f'printf \'%s\\n\' {mine} "holder_pid=$$" "since=$(date +%s)" > {staged} && mv -f {staged} {record} || exit 70',
        f"echo '{MARK} acquired'",
        "while IFS= read -r line; do",
        f'  if [ "$line" = {RELEASE} ]; then rm -f {record}; echo \'{MARK} released\'; exit 0; fi',
        "done",
    ])  # fmt: skip


class Verdict(Enum):
    ACQUIRED = "acquired"  # free, and no record: the last run released it
    TAKEN_OVER = "taken over"  # free, with a record: its run ended without releasing (cut, killed)
    HELD = "held"  # another run holds it, and its holder runs on the host
    HELD_STARTING = "held, no record yet"  # held by a run that has not written its record (yet)


@dataclass(frozen=True)
class Probe:
    """What the holder script found, before it took the lock (or refused)."""

    free: bool
    record: Holder | None = None
    alive: bool = False  # the record's holder process runs on the host
    now: int | None = None  # the host's clock
    lines: tuple[str, ...] = field(default=(), compare=False)


def parse_probe(lines: Sequence[str]) -> Probe:
    """The probe from the holder's output; ValueError when there is none (the script did not run)."""
    texts = [line.rstrip("\n") for line in lines]
    start = next((index for index, text in enumerate(texts) if text.startswith(f"{MARK} state=")), None)
    if start is None:
        raise ValueError("no lock probe in the output")
    fields = dict(word.partition("=")[::2] for word in texts[start].split()[1:])
    end = next((index for index in range(start + 1, len(texts)) if texts[index] == f"{MARK} end"), len(texts))
    record_lines = [text for text in texts[start + 1 : end] if text]
    now = fields.get("now", "")
    return Probe(
        free=fields.get("state") == "free",
        record=Holder.parse(record_lines),
        alive=fields.get("alive") == "1",
        now=int(now) if now.isdigit() else None,
        lines=tuple(record_lines),
    )


def decide(probe: Probe) -> Verdict:
    """Live or stale. The kernel's lock decides: a free lock has no live holder (a record left
    beside it is a dead run's); a held one is live, whatever its record says."""
    if probe.free:
        return Verdict.TAKEN_OVER if probe.lines else Verdict.ACQUIRED
    return Verdict.HELD if probe.record is not None and probe.alive else Verdict.HELD_STARTING


def refusal(name: str, host: str, probe: Probe) -> str:
    """Why this run stops: who holds the lock, and what to do."""
    if decide(probe) is Verdict.HELD and probe.record is not None:
        holder = probe.record
        where = f" (its lock holder is pid {holder.holder_pid} on {host})" if holder.holder_pid else ""
        return (
            f"{host}: another deploy holds the {name!r} lock: {holder.describe(probe.now)}{where}. One deploy at "
            f"a time per host: wait for it to finish and run again. Its lock ends with its SSH connection; if "
            f"that controller is gone and the lock stays, end its SSH session on {host} (or let sshd's "
            f"ClientAliveInterval do it)."
        )
    return (
        f"{host}: another deploy holds the {name!r} lock and is starting (its record is not written yet). "
        f"One deploy at a time per host: run again once it is done."
    )


def takeover(name: str, host: str, probe: Probe) -> str:
    """What the run says when it takes over a lock whose run ended without releasing it."""
    previous = probe.record.describe(probe.now) if probe.record is not None else "an unreadable record"
    return (
        f"{host}: took over the {name!r} lock left by a deploy that ended without releasing it "
        f"({previous}): its controller was killed or lost its connection; what it left half-done, this run "
        f"puts right."
    )
