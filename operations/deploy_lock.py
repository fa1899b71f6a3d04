"""One deploy at a time per host: take the host's named lock at the top of a deploy, for the whole run.

    from operations import deploy_lock

    deploy_lock.acquire()            # the top of a deploy file: before it reads the host
    ...
    deploy_lock.release("rollout")   # a lock taken for part of a run (a gateway's rollout)

The lock and its record are `gpubox.deploy_lock`'s: a `flock` held on the host by a process that
this run starts over its own SSH connection and that lives as long as that connection. `acquire`
refuses the run at once (before it reads or changes anything) when another run holds the lock,
naming it: controller, pid, user, start time. Every way a run ends releases it: pyinfra disconnects
from each host at the end of every run (done, failed, a smoke test's rollback, an error while the
deploy file ran, Ctrl-C), and each lock still held is released then; a controller killed outright
drops its connection, the host's holder sees its stdin end and the kernel frees the lock: the next
run takes it over and says whose it was.

Dry runs take it too: a plan read while another deploy changes the host is a plan of half a change.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime

from pyinfra import host, logger, state
from pyinfra.api.exceptions import DeployError
from pyinfra.api.host import Host
from pyinfra.api.state import State

from gpubox import deploy_lock
from gpubox.deploy_lock import Holder, Verdict
from gpubox.held_process import HolderSilent, LocalProcess, Process, SshProcess, read_until

from .pyinfra_internals import host_command, on_host_disconnect

DEPLOY = "deploy"  # the lock every deploy of a box takes
ANSWER_TIMEOUT_S = 60.0
_HELD = "_gpubox_deploy_locks"  # on the run's State: {(host name, lock name): _Held}


class DeployLockError(DeployError):
    """Another run holds the host's lock (or it could not be taken): this run stops before it starts."""


@dataclass
class _Held:
    name: str
    holder: Holder
    process: Process


def _held(run_state: State, create: bool = False) -> dict[tuple[str, str], _Held]:
    """The locks this run holds; `create`: start the run's registry, and release them all at its end."""
    held: dict[tuple[str, str], _Held] | None = getattr(run_state, _HELD, None)
    if held is None:
        if not create:
            return {}
        held = {}
        setattr(run_state, _HELD, held)
        on_host_disconnect(run_state, _release_at_disconnect)
    return held


def _start(command: str) -> Process:
    """Run the holder over this host's connection, as the run's operations run their commands (sudo & co.)."""
    raw = host_command(state, host, command, drop=("_get_pty", "_timeout", "_stdin", "_success_exit_codes"))
    client = getattr(host.connector, "client", None)
    if client is not None:
        return SshProcess(client, raw, ANSWER_TIMEOUT_S)
    if type(host.connector).__name__ == "LocalConnector":
        return LocalProcess(raw, ANSWER_TIMEOUT_S)
    raise DeployLockError(f"{host.name}: the deploy lock needs an SSH (or @local) connection, not {host.connector!r}")


def _read_until(process: Process, last: str, where: str) -> list[str]:
    """The holder's lines up to `last` (or its end); `where`: the host, for an error."""
    try:
        return read_until(process, last)
    except HolderSilent as error:
        raise DeployLockError(f"{where}: no answer from the lock holder: {error}") from error


def this_run() -> Holder:
    """Who this run is, as the lock's record names it."""
    return Holder(
        controller=socket.gethostname(),
        pid=os.getpid(),
        user=getpass.getuser(),
        started=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def holding(name: str = DEPLOY) -> Holder | None:
    """This run's record of the lock it holds on the current host, or None."""
    held = _held(state).get((host.name, deploy_lock.check_name(name)))
    return held.holder if held is not None else None


def acquire(name: str = DEPLOY) -> None:
    """Take the current host's lock `name` for this run, or refuse the run naming who holds it.

    Call it at the top of a deploy file, before the host is read. Taking a lock this run holds
    already does nothing. A lock left by a run that ended without releasing it is taken over, and
    the run logs whose it was.
    """
    held = _held(state, create=True)
    key = (host.name, deploy_lock.check_name(name))
    if key in held:
        return
    holder = this_run()
    process = _start(deploy_lock.holder_script(name, holder, deploy_lock.LOCK_DIR))
    lines = _read_until(process, f"{deploy_lock.MARK} end", host.name)
    try:
        probe = deploy_lock.parse_probe(lines)
    except ValueError:
        error = process.stderr().strip() or "\n".join(lines) or "no output"
        process.close()
        raise DeployLockError(f"{host.name}: the {name!r} lock could not be taken: {error}") from None
    verdict = deploy_lock.decide(probe)
    if verdict in (Verdict.HELD, Verdict.HELD_STARTING):
        process.close()
        raise DeployLockError(deploy_lock.refusal(name, host.name, probe))
    taken = _read_until(process, f"{deploy_lock.MARK} acquired", host.name)
    if f"{deploy_lock.MARK} acquired" not in taken:
        error = process.stderr().strip() or "the holder ended"
        process.close()
        raise DeployLockError(f"{host.name}: the {name!r} lock could not be taken: {error}")
    held[key] = _Held(name, holder, process)
    if verdict is Verdict.TAKEN_OVER:
        logger.warning(deploy_lock.takeover(name, host.name, probe))
    else:
        logger.info(f"{host.print_prefix}holds the {name!r} lock ({holder.who()})")


def _release(run_state: State, lock_host: Host, name: str) -> None:
    held = _held(run_state).pop((lock_host.name, name), None)
    if held is None:
        return
    try:
        held.process.send(f"{deploy_lock.RELEASE}\n")
        answer = _read_until(held.process, f"{deploy_lock.MARK} released", lock_host.name)
        if f"{deploy_lock.MARK} released" not in answer:
            logger.warning(f"{lock_host.print_prefix}the {name!r} lock's holder ended before its release")
    except (OSError, EOFError, DeployLockError) as error:
        # The connection is gone: so is the holder, and with it the lock (its record stays).
        logger.warning(f"{lock_host.print_prefix}could not release the {name!r} lock cleanly: {error}")
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            held.process.close()


def release(name: str = DEPLOY) -> None:
    """Release the current host's lock `name`, if this run holds it (its record goes with it)."""
    _release(state, host, deploy_lock.check_name(name))


def _release_at_disconnect(run_state: State, disconnected: Host) -> None:
    """pyinfra disconnects every host at the end of every run, whatever ended it: release its locks then."""
    for lock_host, name in list(_held(run_state)):
        if lock_host == disconnected.name:
            _release(run_state, disconnected, name)
