"""Debian's HAProxy 2.6 running gpubox's rendered gateway config on loopback, in front of fake llama-servers.

The config is ``gpubox.haproxy.haproxy_config``'s for the gateway of tests/fixtures/inventories/
gateway_monitoring.py, with what only a deployed host has moved into a temporary directory (the runtime
socket, the state file, the client keys) and every address on 127.0.0.1. Run as a script it records
tests/fixtures/haproxy/exporter-metrics.txt: the exporter's output while ``llama1:chat`` serves one request
with two queued (parallel 1) and ``llama2:chat``, which answered 500s, is down::

    .venv/bin/python -m tests.haproxy_harness
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from gpubox.bench import free_port
from gpubox.gateway import Backend
from gpubox.haproxy import ADMIN_SOCKET, CLIENT_KEYS_FILE, STATE_FILE, client_keys_text, haproxy_config, key_variable
from gpubox.monitoring.fleet import Fleet, fleet_from_inventory

ROOT = Path(__file__).resolve().parent
INVENTORY = ROOT / "fixtures" / "inventories" / "gateway_monitoring.py"
FIXTURE = ROOT / "fixtures" / "haproxy" / "exporter-metrics.txt"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT_KEY = "test-client-key"
GROUP = "gemma"


class FakeLlama(ThreadingHTTPServer):
    """A llama-server as HAProxy sees it: ``/health`` 200; a POST answered ``status`` after ``delay_s``."""

    daemon_threads = True

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.delay_s = 0.0
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeLlama

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        with suppress(ConnectionError):  # HAProxy's health check hangs up after the status line
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200, b'{"status":"ok"}')

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(self.server.delay_s)
        self._answer(self.server.status, b"{}")

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Running:
    port: int
    stats_port: int
    backends: dict[str, FakeLlama]

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.stats_port}/metrics", timeout=10).text

    def chat(self, timeout_s: float = 30) -> int:
        response = requests.post(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            json={"model": GROUP, "messages": []},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            timeout=timeout_s,
        )
        return response.status_code


def local_config(fleet: Fleet, tmp: Path, ports: dict[str, int]) -> tuple[str, int, int]:
    """The gateway host's rendered config, runnable here: loopback addresses, free ports, tmp paths."""
    gw = next(host for host in fleet.hosts if host.gateway is not None)
    assert gw.gateway is not None
    gateway = gw.gateway.model_copy(update={
        "host": "127.0.0.1", "port": free_port(), "stats_port": free_port(), "allow_from": (),
        "timeouts": gw.gateway.timeouts.model_copy(update={"check_interval_s": 0.5}),
    })  # fmt: skip
    backends: dict[str, tuple[Backend, ...]] = {
        group: tuple(replace(b, address="127.0.0.1", port=ports[b.server_name]) for b in found)
        for group, found in gw.backends.items()
    }
    text = haproxy_config(gateway, backends, keyed_groups={GROUP})
    (tmp / "client-keys.acl").write_text(client_keys_text([CLIENT_KEY]))
    for old, new in ((ADMIN_SOCKET, str(tmp / "admin.sock")), (STATE_FILE, str(tmp / "state")),
                     (CLIENT_KEYS_FILE, str(tmp / "client-keys.acl"))):  # fmt: skip
        text = text.replace(old, new)
    kept = [line for line in text.splitlines() if line.strip() not in ("user haproxy", "group haproxy")]
    kept = [line for line in kept if not line.strip().startswith("log /dev/log")]
    return "\n".join(kept) + "\n", gateway.port, gateway.stats_port


@contextmanager
def running_gateway(tmp: Path) -> Iterator[Running]:
    """HAProxy with the fixture's gateway config in front of one FakeLlama per backend (llama2's answers 500)."""
    fleet = fleet_from_inventory(INVENTORY)
    fakes = {"llama1:chat": FakeLlama(), "llama2:chat": FakeLlama(status=500)}
    text, port, stats_port = local_config(fleet, tmp, {name: fake.port for name, fake in fakes.items()})
    (tmp / "haproxy.cfg").write_text(text)
    checked = subprocess.run([HAPROXY, "-c", "-f", str(tmp / "haproxy.cfg")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = (tmp / "haproxy.log").open("wb")
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(tmp / "haproxy.cfg")], stdout=log, stderr=subprocess.STDOUT,
        env={key_variable(0): "backend-key"},
    )  # fmt: skip
    running = Running(port=port, stats_port=stats_port, backends=fakes)
    try:
        deadline = time.monotonic() + 20
        while 'state="UP"} 1' not in _or_empty(running):
            assert time.monotonic() < deadline and process.poll() is None, (tmp / "haproxy.log").read_text()
            time.sleep(0.2)
        yield running
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        for fake in fakes.values():
            fake.stop()


def _or_empty(running: Running) -> str:
    try:
        return running.metrics()
    except requests.ConnectionError:
        return ""


def wait_for(running: Running, needle: str, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = running.metrics()
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"no {needle!r} in the exporter's output"
        time.sleep(0.2)


def busy_and_degraded(running: Running) -> str:
    """The exporter's output with llama2 down (after answering 500s) and llama1 serving 1 request, 2 queued."""
    statuses = [running.chat() for _ in range(6)]  # leastconn alternates: llama2's are 500s
    assert sorted(set(statuses)) == [200, 500], statuses
    running.backends["llama2:chat"].stop()
    wait_for(running, 'haproxy_server_status{proxy="group_gemma",server="llama2:chat",state="DOWN"} 1')
    running.backends["llama1:chat"].delay_s = 4
    threads = [threading.Thread(target=running.chat) for _ in range(3)]
    for thread in threads:
        thread.start()
    text = wait_for(running, 'haproxy_backend_current_queue{proxy="group_gemma"} 2')
    for thread in threads:
        thread.join()
    return text


def excerpt(text: str, proxy: str = f"group_{GROUP}") -> str:
    """The ``haproxy_backend_*`` and ``haproxy_server_*`` families of one proxy, with their HELP and TYPE."""
    kept = []
    for line in text.splitlines():
        name = line.split()[2] if line.startswith("#") else line.split("{")[0]
        if not name.startswith(("haproxy_backend_", "haproxy_server_")):
            continue
        if line.startswith("#") or f'proxy="{proxy}"' in line:
            kept.append(line)
    return "\n".join(kept) + "\n"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as directory, running_gateway(Path(directory)) as gateway:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        header = "# HAProxy 2.6.12 (Debian 12)'s Prometheus exporter, recorded by tests/haproxy_harness.py\n"
        FIXTURE.write_text(header + excerpt(busy_and_degraded(gateway)))
        print(f"wrote {FIXTURE}")
