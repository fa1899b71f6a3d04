"""A record on disk of every test host booted here, so that the hosts of a killed run can be reaped.

One JSON file per host in :func:`registry_dir` (``<cache>/testbed-hosts`` unless
``GPUBOX_TESTBED_REGISTRY`` names another), written before the host's overlay is mounted and
updated at each boot: its directory, its mount points, the process that owns it (pid and start
time: the pytest or CLI process that booted it; none once ``up`` detached it) and the nspawn
process and container PID 1 of its last boot.

:func:`reap` stops such a host (SIGKILL to the container's PID 1 takes its whole PID namespace,
llama-server included; then nspawn), lazily unmounts its mounts, deletes its directory and its
record.  ``python -m tests.testbed down`` reaps the hosts no running process owns (the one ``up``
booted, and the orphans: hosts whose owner is gone), ``down --all`` every recorded host; each boot first
reaps the orphans.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.testbed.assets import cache_dir

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot): a pid that can't be reused unnoticed


def registry_dir() -> Path:
    env = os.environ.get("GPUBOX_TESTBED_REGISTRY")
    path = Path(env) if env else cache_dir() / "testbed-hosts"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- processes and mounts ------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the comm), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_id(pid: int) -> Proc | None:
    """``(pid, start time)`` of a running process, or None."""
    fields = _stat(pid)
    return (pid, int(fields[19])) if fields else None


def alive(proc: Proc | list[int] | None) -> bool:
    """Whether the process recorded as ``(pid, start time)`` still runs (a zombie doesn't)."""
    if not proc:
        return False
    fields = _stat(proc[0])
    return fields is not None and int(fields[19]) == proc[1] and fields[0] != "Z"


def children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def ns_pid_is_one(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of a nested PID namespace (a container's init)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                return len(ids) > 1 and ids[-1] == "1"
    except OSError:
        pass
    return False


def container_leader(nspawn_pid: int) -> int | None:
    """The container's PID 1 among the descendants of an nspawn process, or None."""
    todo = children(nspawn_pid)
    while todo:
        pid = todo.pop()
        if ns_pid_is_one(pid):
            return pid
        todo.extend(children(pid))
    return None


def mount_points() -> list[str]:
    """Mount points of this mount namespace (/proc/self/mountinfo, octal escapes decoded)."""
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4].encode().decode("unicode_escape") for line in fh]


def umount_below(path: Path | str) -> list[str]:
    """Lazily unmount ``path`` and anything mounted below it; returns what was unmounted."""
    top = os.path.realpath(path)
    targets = [t for t in mount_points() if t == top or t.startswith(top + "/")]
    for target in sorted(set(targets), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, stderr=subprocess.DEVNULL)
    return sorted(set(targets))


# -- records ---------------------------------------------------------------------------------------
@dataclass
class HostRecord:
    base: str  # the host's directory: overlay root (mounted), upper, work, SSH key, console log
    mounts: list[str] = field(default_factory=list)
    owner: list[int] | None = None  # (pid, start time) of the booting process; None once detached
    machine: str = ""
    nspawn: list[int] | None = None  # (pid, start time) of the last boot's systemd-nspawn
    leader: list[int] | None = None  # (pid, start time) of the last boot's container PID 1

    @classmethod
    def new(cls, base: Path) -> HostRecord:
        owner = proc_id(os.getpid())
        return cls(base=str(base), mounts=[str(base / "root")], owner=list(owner) if owner else None)

    @property
    def path(self) -> Path:
        return registry_dir() / f"{Path(self.base).name}.json"

    def save(self) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

    def orphaned(self) -> bool:
        return self.owner is not None and not alive(self.owner)

    def owned(self) -> bool:
        """Whether a running process (a pytest, a bench) booted it and still uses it."""
        return self.owner is not None and alive(self.owner)


def records() -> list[HostRecord]:
    out = []
    for path in sorted(registry_dir().glob("*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            out.append(HostRecord(**json.loads(path.read_text())))
    return out


# -- reaping ---------------------------------------------------------------------------------------
def _nspawns_on(root: str) -> list[int]:
    """systemd-nspawn processes running with ``-D root`` (found even if their pid was never recorded)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and argv[0].endswith("systemd-nspawn") and any(
            a == root and prev == "-D" for prev, a in zip(argv, argv[1:], strict=False)
        ):
            out.append(int(entry))
    return out


def _wait_gone(procs: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill_all(pids: set[int], grace: float = 0.0) -> None:
    """SIGKILL ``pids`` (those still running after ``grace`` seconds) and wait until they are gone."""
    procs = [p for p in map(proc_id, pids) if p]
    _wait_gone(procs, grace)
    for proc in procs:
        if alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc[0], signal.SIGKILL)
    _wait_gone(procs, 10.0)


def reap_host(record: HostRecord) -> str:
    """Stop the host of ``record``, unmount its mounts, delete its directory and the record."""
    nspawns = set(_nspawns_on(str(Path(record.base) / "root")))
    if record.nspawn and alive(record.nspawn):
        nspawns.add(record.nspawn[0])
    leaders = {pid for pid in map(container_leader, nspawns) if pid}
    if record.leader and alive(record.leader) and ns_pid_is_one(record.leader[0]):
        leaders.add(record.leader[0])
    # PID 1 first: that kills every process in the container, and nspawn then exits on its own.
    _kill_all(leaders)
    _kill_all(nspawns, grace=5.0 if leaders else 0.0)
    unmounted = [m for path in [*record.mounts, record.base] for m in umount_below(path)]
    existed = os.path.lexists(record.base)
    shutil.rmtree(record.base, ignore_errors=True)
    record.forget()
    killed = sorted(leaders | nspawns)
    return (f"reaped {record.machine or Path(record.base).name}: killed {killed or 'nothing'}, "
            f"unmounted {sorted(set(unmounted)) or 'nothing'}, "
            f"{'removed' if existed else 'no'} {record.base}")


def reap(orphans_only: bool, spare_owned: bool = False) -> list[str]:
    """Reap every recorded host, or only those whose owner is gone (``orphans_only``), or all but those a
    running process owns (``spare_owned``); one line per reaped host."""
    with open(registry_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if orphans_only:
            chosen = [record for record in records() if record.orphaned()]
        else:
            chosen = [record for record in records() if not (spare_owned and record.owned())]
        return [reap_host(record) for record in chosen]


def owned_hosts() -> list[HostRecord]:
    """The recorded hosts a running process owns (what ``down`` leaves to ``down --all``)."""
    return [record for record in records() if record.owned()]
