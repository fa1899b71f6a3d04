"""The rollout's I/O: shells on the gateway hosts, the fleet's rollout lock, and the per-host deploys.

- ``PyinfraConnections``: the inventory's hosts through pyinfra's own API, in this process: the connection
  (SSH, or ``@local``) and the command wrapping (``_sudo`` & co. from the host's data) a deploy would use.
  pyinfra is imported lazily, as ``gpubox.inventory`` does: the rest of ``gpubox`` imports none of it.
- ``LocalShell``: this machine (the real-HAProxy test drives its runtime API through it).
- ``FleetLock``: one rollout at a time per fleet: ``gpubox.deploy_lock``'s lock, named ``rollout``, on the
  gateway host, held by a process that lives as long as this controller's connection (a dead controller's
  lock is taken over, saying whose it was).
- ``PyinfraDeployer``: ``pyinfra INVENTORY DEPLOY --limit HOST... -y``, its output streamed line by line.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from gpubox import deploy_lock
from gpubox.deploy_lock import Holder, Verdict
from gpubox.held_process import HolderSilent, LocalProcess, Process, SshProcess, read_until
from gpubox.rollout import LOCK_NAME, RolloutError

COMMAND_TIMEOUT_S = 60.0
_DROP = ("_get_pty", "_timeout", "_stdin", "_success_exit_codes")


class LockShell(Protocol):
    def run(self, command: str) -> tuple[int, str, str]: ...
    def start(self, command: str) -> Process: ...


class LocalShell:
    """Commands on this machine (``/bin/sh -c``)."""

    def __init__(self, wrap: Callable[[str], str] = lambda command: command) -> None:
        self._wrap = wrap

    def run(self, command: str) -> tuple[int, str, str]:
        done = subprocess.run(
            self._wrap(command), shell=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
        return done.returncode, done.stdout, done.stderr

    def start(self, command: str) -> Process:
        return LocalProcess(self._wrap(command), COMMAND_TIMEOUT_S)


class PyinfraShell:
    """Commands on an inventory host over pyinfra's connection to it, wrapped as a deploy's are (sudo & co.)."""

    def __init__(self, state: Any, host: Any) -> None:
        self.state, self.host = state, host

    def _raw(self, command: str) -> str:
        # pyinfra's internals in one place, checked against the installed pyinfra (tests/test_pyinfra_internals.py);
        # imported by name: mypy checks gpubox, not the pyinfra side
        internals = importlib.import_module("operations.pyinfra_internals")
        raw: str = internals.host_command(self.state, self.host, command, drop=_DROP)
        return raw

    def run(self, command: str) -> tuple[int, str, str]:
        raw = self._raw(command)
        client = getattr(self.host.connector, "client", None)
        if client is None:
            return LocalShell().run(raw)
        _, stdout, stderr = client.exec_command(raw, timeout=COMMAND_TIMEOUT_S)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), out, err

    def start(self, command: str) -> Process:
        raw = self._raw(command)
        client = getattr(self.host.connector, "client", None)
        if client is not None:
            return SshProcess(client, raw, COMMAND_TIMEOUT_S)
        return LocalProcess(raw, COMMAND_TIMEOUT_S)


class PyinfraConnections:
    """The inventory file's hosts, connected on demand with pyinfra's API in this process (not its CLI)."""

    def __init__(self, inventory_path: str) -> None:
        from gpubox.inventory import import_pyinfra_cli_without_gevent_patching

        import_pyinfra_cli_without_gevent_patching()
        from pyinfra.api.config import Config
        from pyinfra.api.state import State
        from pyinfra.context import ctx_state
        from pyinfra_cli.inventory import make_inventory_from_files

        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.append(cwd)
        with ctx_state.use(State()):
            inventory = make_inventory_from_files(inventory_path, cwd=cwd)
        self.state = State(inventory, Config())  # type: ignore[no-untyped-call]
        self._connected: list[Any] = []

    def shell(self, name: str) -> PyinfraShell:
        host = self.state.inventory.get_host(name)
        if not host.connected:
            try:
                host.connect(raise_exceptions=True, show_errors=False)
            except Exception as error:  # noqa: BLE001 - pyinfra's ConnectError and whatever the connector raised
                raise RolloutError(f"{name}: could not connect: {error}") from error
            self._connected.append(host)
        return PyinfraShell(self.state, host)

    def close(self) -> None:
        for host in self._connected:
            with contextlib.suppress(Exception):
                host.disconnect()
        self._connected.clear()


def _read_until(process: Process, last: str, where: str) -> list[str]:
    try:
        return read_until(process, last)
    except HolderSilent as error:
        raise RolloutError(f"{where}: no answer from the rollout lock's holder: {error}") from error


class FleetLock:
    """The fleet's rollout lock on ``host``: one rollout at a time, on top of each host's deploy lock."""

    def __init__(self, shell: LockShell, host: str, holder: Holder, name: str = LOCK_NAME,
                 lock_dir: str = deploy_lock.LOCK_DIR) -> None:  # fmt: skip
        self.shell, self.host, self.holder, self.name, self.lock_dir = shell, host, holder, name, lock_dir
        self._process: Process | None = None

    def acquire(self) -> str:
        """Take it, or ``RolloutError`` naming who holds it and since when; what to say (taken, taken over)."""
        process = self.shell.start(deploy_lock.holder_script(self.name, self.holder, self.lock_dir))
        lines = _read_until(process, f"{deploy_lock.MARK} end", self.host)
        try:
            probe = deploy_lock.parse_probe(lines)
        except ValueError:
            process.close()
            raise RolloutError(f"{self.host}: the {self.name!r} lock could not be taken: "
                               f"{' '.join(lines) or 'no output'}") from None  # fmt: skip
        verdict = deploy_lock.decide(probe)
        if verdict in (Verdict.HELD, Verdict.HELD_STARTING):
            process.close()
            holder = probe.record
            who = holder.describe(probe.now) if holder is not None else "a rollout that has not written its record yet"
            raise RolloutError(
                f"another rollout of this fleet holds the {self.name!r} lock on {self.host}: {who}. One rollout at a "
                f"time: wait for it to end. Its lock ends with its SSH connection to {self.host}"
            )
        taken = _read_until(process, f"{deploy_lock.MARK} acquired", self.host)
        if f"{deploy_lock.MARK} acquired" not in taken:
            process.close()
            raise RolloutError(f"{self.host}: the {self.name!r} lock could not be taken: the holder ended")
        self._process = process
        if verdict is Verdict.TAKEN_OVER:
            previous = probe.record.describe(probe.now) if probe.record is not None else "an unreadable record"
            return (f"took over the {self.name!r} lock on {self.host} left by a rollout that ended without "
                    f"releasing it ({previous}): its controller was killed or lost its connection; a backend it "
                    "left drained is still drained: the gateway's `show stat` says which")  # fmt: skip
        return f"holds the {self.name!r} lock on {self.host} ({self.holder.who()})"

    def release(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.send(f"{deploy_lock.RELEASE}\n")
            _read_until(process, f"{deploy_lock.MARK} released", self.host)
        except (OSError, EOFError, RolloutError):
            pass  # the connection is gone: so is the holder, and with it the lock
        finally:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                process.close()


def this_controller() -> Holder:
    """Who this rollout is, as the lock's record names it."""
    return Holder(
        controller=socket.gethostname(),
        pid=os.getpid(),
        user=getpass.getuser(),
        started=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def pyinfra_executable() -> str:
    """The ``pyinfra`` beside this Python (the virtualenv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "pyinfra"
    return str(beside) if beside.exists() else "pyinfra"


class PyinfraDeployer:
    """``pyinfra INVENTORY DEPLOY --limit HOST... -y`` from the working directory (its ``config.py``)."""

    def __init__(self, inventory: str, deploy: str, extra: Sequence[str] = (), pyinfra: str | None = None) -> None:
        self.inventory, self.deploy_file, self.extra = inventory, deploy, tuple(extra)
        self.pyinfra = pyinfra or pyinfra_executable()

    def argv(self, hosts: Sequence[str]) -> list[str]:
        limits = [word for host in hosts for word in ("--limit", host)]
        return [self.pyinfra, self.inventory, self.deploy_file, *limits, "-y", *self.extra]

    def deploy(self, hosts: Sequence[str], say: Callable[[str], None]) -> int:
        process = subprocess.Popen(
            self.argv(hosts), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert process.stdout is not None
        for line in process.stdout:
            say(line.rstrip("\n"))
        return process.wait()
