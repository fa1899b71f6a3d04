"""The rollout's runtime API code against a real HAProxy 2.6 on this machine.

HAProxy runs the config ``gpubox.haproxy.haproxy_config`` renders (its admin socket and state file moved to a
temporary directory, no user switch, no syslog) in front of two stub llama-servers (``/health`` and
``/v1/chat/completions``, each counting what it served). ``HaproxyRuntime`` reaches the admin socket through
``LocalShell`` and ``socat``, as it does on the gateway host over SSH: a drained server gets no new request,
its in-flight count is what ``show stat`` says, and it comes back UP once ready. Then a whole ``Rollout`` with
a fake deploy that sends requests while its host is drained: none reaches it. And the fleet lock
(``FleetLock``) taken through the same local shell: a second rollout refused, a dead one's lock taken over.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpubox.deploy_lock import Holder
from gpubox.gateway import Backend, BackendRef, Gateway, GatewayTimeouts, ModelGroup
from gpubox.haproxy import ADMIN_SOCKET, STATE_FILE, haproxy_config
from gpubox.rollout import ROLLED_BACK, Group, Member, RolloutError, Step, Unit
from gpubox.rollout import Plan as RolloutPlan
from gpubox.rollout_io import FleetLock, LocalShell
from gpubox.rollout_run import Deployer as RolloutDeployer
from gpubox.rollout_run import HaproxyRuntime, Rollout, RolloutResult, Timing

# Debian's haproxy and socat are in .ci/apt-packages.txt: without them these tests fail (never skip).
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture(autouse=True)
def _installed() -> None:
    missing = [name for name, path in (("haproxy", HAPROXY), ("socat", shutil.which("socat"))) if not path or
               not Path(path).exists()]  # fmt: skip
    assert not missing, f"{missing} not installed: scripts/setup installs .ci/apt-packages.txt"
SHA = "c" * 64


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Stub:
    """A llama-server stand-in: ``/health`` answers 200 (unless ``healthy`` is off), a completion is counted and
    answered after ``{"sleep": s}`` seconds; while ``loading`` (a restarted llama-server) everything is 503."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.served = 0
        self.healthy = True
        self.loading = False
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health" and stub.healthy and not stub.loading:
                    self._answer(200, {"status": "ok"})
                else:
                    self._answer(503, {"status": "unavailable"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if stub.loading:
                    self._answer(503, {"error": {"message": "Loading model"}})
                    return
                time.sleep(float(body.get("sleep", 0)))
                stub.served += 1
                self._answer(200, {"served_by": stub.name})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Gw:
    """HAProxy with gpubox's config for one group ``chat`` of the stubs, and its runtime API."""

    def __init__(self, tmp: Path, stubs: Sequence[Stub]) -> None:
        self.port = _free_port()
        gateway = Gateway(
            port=self.port,
            stats_port=_free_port(),
            timeouts=GatewayTimeouts(check_interval_s=0.2, connect_s=1),
            groups=(ModelGroup(name="chat", backends=tuple(BackendRef(host=s.name, service="chat") for s in stubs)),),
        )
        backends = tuple(
            Backend(ref=BackendRef(host=s.name, service="chat"), address="127.0.0.1", port=s.port, parallel=4,
                    model_sha256=SHA, key_file=None)
            for s in stubs
        )  # fmt: skip
        self.socket = str(tmp / "admin.sock")
        config = haproxy_config(gateway, {"chat": backends}, keyed_groups=set())
        config = config.replace(ADMIN_SOCKET, self.socket).replace(STATE_FILE, str(tmp / "state"))
        kept = [line for line in config.splitlines() if line.strip() not in ("user haproxy", "group haproxy")]
        kept = [line for line in kept if "log /dev/log" not in line]
        path = tmp / "haproxy.cfg"
        path.write_text("\n".join(kept) + "\n")
        checked = subprocess.run([str(HAPROXY), "-c", "-f", str(path)], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.process = subprocess.Popen([str(HAPROXY), "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.api = HaproxyRuntime(LocalShell(), "localhost", socket=self.socket)
        deadline = time.monotonic() + 10
        while not Path(self.socket).exists():
            assert self.process.poll() is None, self.process.stderr.read() if self.process.stderr else ""
            assert time.monotonic() < deadline, "haproxy did not open its admin socket"
            time.sleep(0.05)

    def member(self, stub: Stub) -> Member:
        return Member(gateway="gw", group="chat", server=f"{stub.name}:chat", host=stub.name)

    def status(self, stub: Stub) -> str:
        return self.api.stats()[("group_chat", f"{stub.name}:chat")].status

    def wait_status(self, stub: Stub, want: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (status := self.status(stub)) != want:
            assert time.monotonic() < deadline, f"{stub.name} is {status}, not {want}"
            time.sleep(0.1)

    def ask(self, sleep: float = 0) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/chat/v1/chat/completions",
            data=json.dumps({"messages": [], "sleep": sleep}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            served: str = json.loads(answer.read())["served_by"]
            return served

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Gw, Stub, Stub]]:
    alpha, bravo = Stub("alpha"), Stub("bravo")
    gw = Gw(tmp_path, [alpha, bravo])
    try:
        gw.wait_status(alpha, "UP")
        gw.wait_status(bravo, "UP")
        yield gw, alpha, bravo
    finally:
        gw.close()
        alpha.close()
        bravo.close()


def test_a_drained_server_gets_no_new_request_and_comes_back_up(fleet: tuple[Gw, Stub, Stub]) -> None:
    gw, alpha, bravo = fleet
    assert {gw.ask() for _ in range(8)} == {"alpha", "bravo"}  # both serve
    gw.api.set_state(gw.member(alpha), "drain")
    assert gw.status(alpha) == "DRAIN"  # drained, and its checks pass
    before = alpha.served
    assert {gw.ask() for _ in range(10)} == {"bravo"}
    assert alpha.served == before
    gw.api.set_state(gw.member(alpha), "ready")
    gw.wait_status(alpha, "UP")
    assert "alpha" in {gw.ask() for _ in range(8)}


def test_show_stat_counts_the_requests_in_flight_on_a_drained_server(fleet: tuple[Gw, Stub, Stub]) -> None:
    gw, alpha, bravo = fleet
    gw.api.set_state(gw.member(bravo), "drain")  # the slow request must land on alpha
    slow = threading.Thread(target=gw.ask, kwargs={"sleep": 1.5})
    slow.start()
    deadline = time.monotonic() + 5
    while gw.api.stats()[("group_chat", "alpha:chat")].in_flight != 1:
        assert time.monotonic() < deadline, "the slow request never showed in scur"
        time.sleep(0.05)
    gw.api.set_state(gw.member(bravo), "ready")
    gw.api.set_state(gw.member(alpha), "drain")
    assert gw.api.stats()[("group_chat", "alpha:chat")].in_flight == 1  # drained, still serving its request
    slow.join()
    assert gw.api.stats()[("group_chat", "alpha:chat")].in_flight == 0


def test_the_runtime_api_refuses_an_unknown_server_by_name(fleet: tuple[Gw, Stub, Stub]) -> None:
    gw, _, _ = fleet
    with pytest.raises(RolloutError, match="HAProxy refused 'set server group_chat/nosuch:chat state drain'"):
        gw.api.set_state(Member(gateway="gw", group="chat", server="nosuch:chat", host="nosuch"), "drain")



class Quiet:
    """A rollout reporter that says nothing: the tests read the rollout's result."""

    def event(self, unit: str, step: str, detail: str = "") -> None:
        pass

    def output(self, unit: str, line: str) -> None:
        pass


CHAT = Group(gateway="gw", name="chat", min_healthy=1, servers=("alpha:chat", "bravo:chat"), hosts=("alpha", "bravo"))


def _roll(gw: Gw, plan: RolloutPlan, deployer: RolloutDeployer, poll_s: float) -> RolloutResult:
    timing = Timing(drain_timeout_s=5, ready_timeout_s=15, health_wait_s=15, poll_s=poll_s)
    return Rollout(plan, {"gw": gw.api}, deployer, Quiet(), timing).run()


def test_a_whole_rollout_keeps_requests_off_the_host_it_deploys(fleet: tuple[Gw, Stub, Stub]) -> None:
    gw, alpha, bravo = fleet
    stubs = {"alpha": alpha, "bravo": bravo}
    during: dict[str, set[str]] = {}
    statuses: dict[str, str] = {}

    class Deployer:
        def deploy(self, hosts: Sequence[str], say: Callable[[str], None]) -> int:
            (host,) = hosts
            statuses[host] = gw.status(stubs[host])
            stubs[host].healthy = False  # the restart: its checks fail for a while
            during[host] = {gw.ask() for _ in range(6)}
            stubs[host].healthy = True
            say(f"deployed {host}")
            return 0

    group = CHAT
    units = [Unit(hosts=(name,), members=(gw.member(stub),)) for name, stub in stubs.items()]
    plan = RolloutPlan(steps=(Step("canary", group, (units[0],)), Step("batch", group, (units[1],))),
                       groups=(group,), lock_host="gw", gateways=("gw",))  # fmt: skip
    result = _roll(gw, plan, Deployer(), poll_s=0.1)
    assert result.ok, result.stopped
    assert statuses == {"alpha": "DRAIN", "bravo": "DRAIN"}
    assert during == {"alpha": {"bravo"}, "bravo": {"alpha"}}
    assert result.hosts("new") == ["alpha", "bravo"]
    assert gw.status(alpha) == "UP" and gw.status(bravo) == "UP"


def test_a_rolled_back_host_still_loading_is_not_put_back_before_its_checks_pass(
    fleet: tuple[Gw, Stub, Stub],
) -> None:
    """The deploy's rollback restarted the previous unit and exited: the gateway has not checked the new process
    yet and ``show stat`` still says DRAIN. The rollout marks it down (``health down``) and puts it back only
    once its checks pass: no request meets the loading server."""
    gw, alpha, bravo = fleet

    class Deployer:
        def deploy(self, hosts: Sequence[str], say: Callable[[str], None]) -> int:
            alpha.loading = True  # restarted on the previous unit; loads for a second
            threading.Timer(1.0, lambda: setattr(alpha, "loading", False)).start()
            say(f"The previous unit (/etc/systemd/system/alpha.service.prev) {ROLLED_BACK}, and it restarted on it.")
            return 1

    group = CHAT
    unit = Unit(hosts=("alpha",), members=(gw.member(alpha),))
    plan = RolloutPlan(steps=(Step("canary", group, (unit,)),), groups=(group,), lock_host="gw", gateways=("gw",))
    result = _roll(gw, plan, Deployer(), poll_s=0.05)
    assert not result.ok and result.results[0].outcome == "rolled back" and result.results[0].serving
    assert not alpha.loading  # put back only once it serves
    assert gw.status(alpha) == "UP"
    assert {gw.ask() for _ in range(8)} == {"alpha", "bravo"}


def _holder(pid: int) -> Holder:
    return Holder(controller="laptop", pid=pid, user="dan", started="2026-05-01T10:00:00Z")


def test_one_rollout_at_a_time_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    first = FleetLock(LocalShell(), "gw", _holder(1), lock_dir=str(tmp_path))
    assert "holds the 'rollout' lock on gw" in first.acquire()
    second = FleetLock(LocalShell(), "gw", _holder(2), lock_dir=str(tmp_path))
    with pytest.raises(RolloutError, match=r"another rollout .* 'rollout' lock on gw: dan@laptop pid 1, started 20"):
        second.acquire()
    # the first controller dies: its holder's stdin ends, the kernel frees the lock, its record stays
    assert first._process is not None
    first._process.close()
    first._process = None
    said = second.acquire()
    assert "took over the 'rollout' lock on gw" in said and "dan@laptop pid 1" in said
    second.release()  # a release removes the record: the next one takes the lock plainly
    third = FleetLock(LocalShell(), "gw", _holder(3), lock_dir=str(tmp_path))
    assert "holds the 'rollout' lock" in third.acquire()
    third.release()
