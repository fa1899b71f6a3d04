"""A long-lived command on a host whose stdin and stdout the controller keeps open: a lock's holder (the deploy
lock of ``operations.deploy_lock``, the fleet's rollout lock of ``gpubox.rollout_io``).

It runs on its own channel of pyinfra's SSH connection to the host (paramiko's client), or on the controller
itself for pyinfra's ``@local``; either way the controller reads its lines, writes to it, and reads its stderr
once it has ended.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import IO, Any, Protocol


class HolderSilent(Exception):
    """The process did not answer (its connection broke, or it timed out)."""


class Process(Protocol):
    """A long-lived command: its stdout to read, its stdin to write, its stderr once ended, its end."""

    def readline(self) -> str: ...
    def send(self, text: str) -> None: ...
    def stderr(self) -> str: ...
    def close(self) -> None: ...


class SshProcess:
    """A command on its own channel of the host's SSH connection (pyinfra's paramiko client)."""

    def __init__(self, client: Any, command: str, timeout_s: float) -> None:
        self._stdin, self._stdout, self._stderr = client.exec_command(command)
        self._stdout.channel.settimeout(timeout_s)

    def readline(self) -> str:
        line: str = self._stdout.readline()
        return line

    def send(self, text: str) -> None:
        self._stdin.write(text)
        self._stdin.flush()

    def stderr(self) -> str:
        channel = self._stdout.channel
        deadline = time.monotonic() + 5
        while not channel.exit_status_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        text: str = self._stderr.read().decode(errors="replace") if channel.exit_status_ready() else ""
        return text

    def close(self) -> None:
        self._stdout.channel.close()


class LocalProcess:
    """A command on the controller itself (pyinfra's ``@local`` connector)."""

    def __init__(self, command: str, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._process = subprocess.Popen(
            command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def _stream(self, name: str) -> IO[str]:
        stream: IO[str] | None = getattr(self._process, name)
        assert stream is not None
        return stream

    def readline(self) -> str:
        return self._stream("stdout").readline()

    def send(self, text: str) -> None:
        self._stream("stdin").write(text)
        self._stream("stdin").flush()

    def stderr(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        return self._stream("stderr").read() if self._process.poll() is not None else ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream("stdin").close()
        try:
            self._process.wait(timeout=self._timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()


def read_until(process: Process, last: str) -> list[str]:
    """The process's lines up to ``last`` (or its end); ``HolderSilent`` when it stops answering."""
    lines = []
    try:
        while True:
            line = process.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.rstrip("\n") == last:
                break
    except (OSError, TimeoutError) as error:  # socket.timeout is a TimeoutError
        raise HolderSilent(str(error)) from error
    return lines
