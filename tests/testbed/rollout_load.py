"""What tests/e2e/test_gateway.py, tests/e2e/test_rollout.py and the rollout benchmark
(tests/testbed/bench_rollout.py) share: the three-host gateway fleet (``fleet_hosts``, booted; its settings for
tests/fixtures/inventories/gateway_fleet.py, ``GPUBOX_GATEWAY_FLEET``), a bounded load generator through the
gateway, and a watcher that samples each node's llama-server MainPID and HAProxy's ``show stat`` while a rollout
runs.

- ``Load``: a few client threads, each looping over chat completions through the gateway with its client key,
  streamed and not in turn, each request on a new connection; every request is recorded (start, seconds, ok,
  why not). A request is ok when it answers 200 and, streamed, ends with ``data: [DONE]`` and no error event.
- ``Watch``: each node's ``systemctl show -p MainPID`` every ``interval_s``, and the gateway's servers'
  statuses every ``stat_interval_s`` (over its admin socket; both through ``nsenter``: no SSH per sample).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

from gpubox.bench import free_port
from gpubox.gateway_keys import STORE_ENV
from gpubox.haproxy import ADMIN_SOCKET
from gpubox.rollout import SHOW_STAT, parse_show_stat
from tests.testbed.assets import cache_dir
from tests.testbed.host import TestHost, booted_host

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = "tests/fixtures/inventories/gateway_fleet.py"
FULL = "deploys/danarch4090.py"
FLEET_KEY = "GPUBOX_GATEWAY_FLEET"
GROUP = "smol"
UNIT = "llama.service"
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
GPUBOX = str(Path(sys.executable).with_name("gpubox"))
LLAMA_REPO_MOUNT = "/srv/llama.cpp.git"
CCACHE_MOUNT = "/var/cache/ccache-shared"


APT_ARCHIVES = "/var/cache/apt/archives"


@contextmanager
def fleet_hosts(repo: Path, ccache: Path) -> Iterator[tuple[TestHost, TestHost, TestHost]]:
    """Three booted hosts (gateway, node1, node2): the nodes with the llama.cpp repo and the shared ccache, the
    gateway with the apt archive cache (HAProxy's packages download once)."""
    archives = cache_dir() / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    nodes = {"binds_ro": [(repo, LLAMA_REPO_MOUNT)], "binds": [(ccache, CCACHE_MOUNT)]}
    with (
        booted_host(binds=[(archives, APT_ARCHIVES)]) as gateway,
        booted_host(**nodes) as node1,  # type: ignore[arg-type]
        booted_host(**nodes) as node2,  # type: ignore[arg-type]
    ):
        yield gateway, node1, node2


def fleet_settings(gateway: TestHost, nodes: Sequence[TestHost], commit: str, smollm2: Path) -> dict[str, object]:
    """``GPUBOX_GATEWAY_FLEET``'s JSON for booted hosts (the llama.cpp repo and ccache bound at the mounts)."""
    return {
        "gateway": {"name": gateway.pyinfra_host_name(), "data": gateway.pyinfra_host_data()},
        "nodes": [{"name": node.pyinfra_host_name(), "data": node.pyinfra_host_data()} for node in nodes],
        "repo": LLAMA_REPO_MOUNT,
        "commit": commit,
        "ccache_dir": CCACHE_MOUNT,
        "model_source": str(smollm2),
        "model_sha256": hashlib.sha256(smollm2.read_bytes()).hexdigest(),
        "llama_ports": [free_port() for _ in nodes],
        "port": free_port(),
        "stats_port": free_port(),
        # the smoke test's floor: this shared 2-core machine under the clients' load measured 1.0 tok/s
        "min_tokens_per_second": [0.1 for _ in nodes],
    }


def environment(settings: dict[str, object], store: Path, base: dict[str, str]) -> dict[str, str]:
    return {**base, FLEET_KEY: json.dumps(settings), STORE_ENV: str(store), "COLUMNS": "200"}


def changed(env: dict[str, str], **changes: object) -> dict[str, str]:
    """The environment with some of the fleet's settings changed (e.g. ``ctx_sizes=[4096, 4096]``)."""
    return {**env, FLEET_KEY: json.dumps({**json.loads(env[FLEET_KEY]), **changes})}


def setting(env: dict[str, str], key: str) -> object:
    return json.loads(env[FLEET_KEY])[key]


def gateway_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{setting(env, 'port')}"


def client_key(gateway: TestHost) -> str:
    return gateway.run("head -n1 /etc/gpubox/gateway/client.key", check=True).stdout.strip()


def node_key(node: TestHost) -> str:
    """The node's own key (the first line of its key file; the gateway's group key is another line)."""
    return node.run("head -n1 /etc/gpubox/keys/llama.key", check=True).stdout.strip()


def run(env: dict[str, str], *argv: str, echo: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
    """A command from the repo root with the fleet's environment; its result and seconds."""
    started = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.monotonic() - started
    if echo:
        print(result.stdout[-8000:], result.stderr[-4000:], sep="\n")
    return result, elapsed


def unit_text(node: TestHost) -> str:
    return node.run(f"systemctl cat {UNIT}", check=True).stdout


@dataclass(frozen=True)
class Request:
    started: float
    seconds: float
    stream: bool
    ok: bool
    why: str = ""


def one_request(url: str, key: str, stream: bool, max_tokens: int = 8, timeout_s: float = 300) -> tuple[bool, str]:
    """A chat completion at ``url`` (``.../v1/chat/completions``): (ok, why not)."""
    body = {"model": GROUP, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": max_tokens,
            "stream": stream}  # fmt: skip
    try:
        with requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s,
                           stream=stream) as answer:  # fmt: skip
            if answer.status_code != 200:
                return False, f"{answer.status_code}: {answer.text[:200]}"
            if not stream:
                return ("choices" in answer.json()), ""
            events = [line[6:] for line in answer.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    except (requests.RequestException, ValueError) as error:
        return False, f"{type(error).__name__}: {error}"[:300]
    if not events or events[-1] != "[DONE]":
        return False, f"the stream did not end with [DONE]: {events[-2:]}"
    errors = [event for event in events[:-1] if '"error"' in event]
    return (not errors), "; ".join(errors)[:300]


@dataclass
class Load:
    """``clients`` threads sending completions through the gateway until ``stop``."""

    url: str
    key: str
    clients: int = 3
    max_tokens: int = 8
    requests: list[Request] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, index: int) -> None:
        stream = bool(index % 2)
        while not self._stop.is_set():
            started = time.monotonic()
            ok, why = one_request(f"{self.url}/v1/chat/completions", self.key, stream, self.max_tokens)
            with self._lock:
                self.requests.append(Request(started, time.monotonic() - started, stream, ok, why))
            stream = not stream

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> list[Request]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=600)
        return self.requests

    def between(self, start: float, end: float) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if start <= r.started < end]


def failed(requests_: Sequence[Request]) -> list[Request]:
    return [request for request in requests_ if not request.ok]


def failing_seconds(requests_: Sequence[Request]) -> float:
    """From the first failed request's start to the last one's end (0 when none failed)."""
    misses = failed(requests_)
    if not misses:
        return 0.0
    return max(r.started + r.seconds for r in misses) - min(r.started for r in misses)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` 0.5 for p50); nan of nothing."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


@dataclass(frozen=True)
class Sample:
    at: float
    pids: tuple[str, ...]  # each node's MainPID ("" when it could not be read)


@dataclass(frozen=True)
class StatSample:
    at: float
    statuses: dict[str, str] | None  # HAProxy's status by server name; None when show stat could not be read


def server_name(node: TestHost) -> str:
    return f"{node.pyinfra_host_name()}:llama"


def read_stats(gateway: TestHost) -> dict[str, str] | None:
    shown = gateway.nsenter(f"printf '%s\\n' '{SHOW_STAT}' | socat -t 5 stdio UNIX-CONNECT:{ADMIN_SOCKET}", timeout=30)
    try:
        stats = parse_show_stat(shown.stdout)
    except ValueError:
        return None
    return {server: stat.status for (backend, server), stat in stats.items() if backend == f"group_{GROUP}"}


@dataclass
class Watch:
    """Samples each node's MainPID every ``interval_s`` and, in another thread, the gateway's servers' statuses
    every ``stat_interval_s``, until ``stop``."""

    gateway: TestHost
    nodes: Sequence[TestHost]
    interval_s: float = 0.5
    stat_interval_s: float = 0.2
    samples: list[Sample] = field(default_factory=list)
    stats: list[StatSample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _pid_loop(self) -> None:
        while not self._stop.is_set():
            at = time.monotonic()
            pids = tuple(
                node.nsenter(f"systemctl show -p MainPID --value {UNIT}", timeout=30).stdout.strip()
                for node in self.nodes
            )
            self.samples.append(Sample(at, pids))
            self._stop.wait(self.interval_s)

    def _stat_loop(self) -> None:
        while not self._stop.is_set():
            self.stats.append(StatSample(time.monotonic(), read_stats(self.gateway)))
            self._stop.wait(self.stat_interval_s)

    def start(self) -> Watch:
        self._threads = [threading.Thread(target=loop, daemon=True) for loop in (self._pid_loop, self._stat_loop)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Watch:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self

    def pids(self, index: int) -> list[str]:
        """A node's MainPIDs in the order seen, each once per run of samples (0 and unread left out)."""
        seen: list[str] = []
        for sample in self.samples:
            pid = sample.pids[index]
            if pid not in ("", "0") and (not seen or seen[-1] != pid):
                seen.append(pid)
        return seen

    def restarts(self, index: int) -> int:
        return max(0, len(self.pids(index)) - 1)

    def statuses(self, node: TestHost) -> list[str]:
        return [s.statuses.get(server_name(node), "missing") for s in self.stats if s.statuses is not None]

    def fewest_up(self) -> int:
        """The fewest servers taking requests (status UP, or UP going down) in any sample of show stat."""
        counts = [sum(status.startswith("UP") for status in s.statuses.values())
                  for s in self.stats if s.statuses is not None]  # fmt: skip
        return min(counts) if counts else -1

    def unread(self) -> int:
        return sum(sample.statuses is None for sample in self.stats)
