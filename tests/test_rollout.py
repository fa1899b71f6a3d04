"""`gpubox rollout`: the plan (units, canaries, batches, min_healthy), the runtime API's words and ``show stat``,
and the orchestration over a fake gateway and a fake deploy (the order of drain, deploy and ready; a smoke miss
stops it; the summary says which hosts run the new state and which the old). The same code against a real
HAProxy is tests/test_rollout_haproxy.py; on test hosts over SSH it is not run yet (docs/rollout.md).
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from rich.console import Console

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, cli_rollout
from gpubox.cli import main
from gpubox.cli_rollout import RolloutIo, fleet
from gpubox.rollout import (
    ROLLED_BACK,
    Group,
    Member,
    Plan,
    RolloutError,
    ServerStat,
    ServerState,
    parse_show_stat,
    plan_rollout,
    recheck_command,
    runtime_shell,
    set_state_command,
)
from gpubox.rollout_run import Rollout, RolloutResult, Timing

ROOT = Path(__file__).resolve().parents[1]
FLEET = str(ROOT / "tests/fixtures/inventories/rollout_fleet.py")
DEPLOY = "deploys/danarch4090.py"
MODEL = ModelFile(path="/srv/models/m.gguf", sha256="a" * 64, architecture="llama")


def _plan(**options: object) -> Plan:
    hosts, boxes, groups = fleet(FLEET)
    return plan_rollout(hosts, boxes, groups, **options)  # type: ignore[arg-type]


def _steps(plan: Plan) -> list[tuple[str, str | None, list[str]]]:
    return [(step.kind, step.group.name if step.group else None, [u.name for u in step.units]) for step in plan.steps]


def _groups(*specs: tuple[str, int, Sequence[str]]) -> tuple[list[str], dict[str, Box], list[Group]]:
    """Groups (name, min_healthy, hosts) on gateway gw, each host one llama-server per group it is in."""
    hosts = list(dict.fromkeys(host for _, _, group_hosts in specs for host in group_hosts))
    boxes = {host: Box(llama_cpp=LlamaCppBuild(commit="0" * 40), services=(LlamaServer(name="s", model=MODEL),))
             for host in hosts}  # fmt: skip
    groups = [Group(gateway="gw", name=name, min_healthy=keep, servers=tuple(f"{h}:{name}" for h in group_hosts),
                    hosts=tuple(group_hosts)) for name, keep, group_hosts in specs]  # fmt: skip
    return hosts, boxes, groups


# --- the plan ------------------------------------------------------------------------------------------


def test_each_group_starts_with_a_canary_an_rpc_pair_is_one_unit_and_the_rest_roll_alone() -> None:
    plan = _plan()
    assert _steps(plan) == [
        ("canary", "chat", ["alpha"]),
        ("batch", "chat", ["bravo"]),
        ("batch", "chat", ["charlie"]),  # charlie serves code too: drained in both, rolled once
        ("canary", "code", ["delta+echo"]),  # delta's llama-server uses echo's RPC server: one --limit
        ("alone", None, ["foxtrot"]),  # in no group
    ]
    assert [str(m) for m in plan.steps[2].members] == ["group_chat/charlie:chat", "group_code/charlie:code"]
    assert plan.lock_host == "gw" and plan.gateways == ("gw",)


def test_the_canary_option_goes_first_and_stands_for_every_group_it_serves() -> None:
    plan = _plan(canary="charlie")
    assert _steps(plan)[:2] == [("canary", "chat", ["charlie"]), ("batch", "chat", ["alpha"])]
    assert ("batch", "code", ["delta+echo"]) in _steps(plan)  # code's canary was charlie
    assert _steps(_plan(canary="echo"))[0] == ("canary", "code", ["delta+echo"])  # a unit's host names the unit


def test_batches_of_n_after_the_canary() -> None:
    hosts, boxes, groups = _groups(("chat", 2, ["a", "b", "c", "d", "e", "f"]))
    plan = plan_rollout(hosts, boxes, groups, batch=2)
    assert _steps(plan) == [("canary", "chat", ["a"]), ("batch", "chat", ["b", "c"]),
                            ("batch", "chat", ["d", "e"]), ("batch", "chat", ["f"])]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch": 0}, "--batch 0: a batch is at least one unit"),
        ({"batch": -3}, "--batch -3"),
        ({"canary": "foxtrot"}, "--canary foxtrot: no model group has a backend on foxtrot"),
        ({"canary": "nosuch"}, "--canary nosuch: no model group"),
        ({"batch": 2}, "--batch 2 would drain 2 of group chat's 3 backends at once (bravo, charlie), and it keeps "
                       "min_healthy=2: at most --batch 1"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_anything(options: dict[str, object], message: str) -> None:
    with pytest.raises(RolloutError) as refused:
        _plan(**options)
    assert message in str(refused.value)


def test_a_batch_is_refused_for_any_group_it_drains_and_the_largest_that_works_is_named() -> None:
    # b and c are in chat (keep 1 of 4) and in code (keep 1 of 2): chat alone would take --batch 3
    hosts, boxes, groups = _groups(("chat", 1, ["a", "b", "c", "d"]), ("code", 1, ["b", "c"]))
    with pytest.raises(RolloutError, match="--batch 3 would drain 2 of group code's 2 backends .* at most --batch 1"):
        plan_rollout(hosts, boxes, groups, batch=3)


def test_a_group_that_cannot_lose_a_backend_is_refused_naming_the_way_out() -> None:
    hosts, boxes, groups = _groups(("solo", 1, ["a"]))
    with pytest.raises(RolloutError, match="a serves 1 of group solo's 1 backend.*min_healthy=1.*plain pyinfra"):
        plan_rollout(hosts, boxes, groups)


def test_without_a_gateway_every_host_rolls_alone_in_inventory_order() -> None:
    hosts, boxes, _ = _groups(("x", 1, ["a", "b", "c"]))
    plan = plan_rollout(hosts, boxes, [])
    assert _steps(plan) == [("alone", None, ["a"]), ("alone", None, ["b"]), ("alone", None, ["c"])]
    assert plan.lock_host == "a"


# --- the runtime API's words ------------------------------------------------------------------------------

SHOW_STAT_OUTPUT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight\n"
    "group_chat,alpha:chat,0,0,2,3,4,10,1,1,,0,,0,0,0,0,UP,1\n"
    "group_chat,bravo:chat,1,1,0,1,4,5,1,1,,0,,0,0,0,0,DRAIN,1\n"
    "group_chat,BACKEND,0,0,2,3,,15,1,1,0,0,,0,0,0,0,UP,2\n"
    "\n"
)


def test_show_stat_is_read_by_its_header() -> None:
    stats = parse_show_stat(SHOW_STAT_OUTPUT)
    assert set(stats) == {("group_chat", "alpha:chat"), ("group_chat", "bravo:chat")}
    alpha, bravo = stats[("group_chat", "alpha:chat")], stats[("group_chat", "bravo:chat")]
    assert (alpha.in_flight, alpha.healthy, alpha.checks_pass) == (2, True, True)
    assert (bravo.in_flight, bravo.healthy, bravo.checks_pass) == (1, False, True)
    with pytest.raises(ValueError, match="not `show stat` output"):
        parse_show_stat("Unknown command.\n")


def test_runtime_commands_are_built_from_checked_words_and_reach_socat_whole() -> None:
    member = Member(gateway="gw", group="chat", server="alpha:chat", host="alpha")
    assert set_state_command(member, "drain") == "set server group_chat/alpha:chat state drain"
    assert recheck_command(member) == "set server group_chat/alpha:chat health down"
    with pytest.raises(ValueError, match="HAProxy"):
        set_state_command(Member(gateway="gw", group="chat", server="a b;c", host="a"), "ready")
    with pytest.raises(ValueError):
        set_state_command(member, "up")  # type: ignore[arg-type]
    line = runtime_shell("set server group_chat/alpha:chat state drain", "/run/x y/admin.sock")
    assert "socat" in line and "'UNIX-CONNECT:/run/x y/admin.sock'" in line
    printed = subprocess.run(line.split(" | ")[0], shell=True, capture_output=True, text=True, check=True).stdout
    assert printed == "set server group_chat/alpha:chat state drain\n"
    with pytest.raises(ValueError, match="one runtime API command"):
        runtime_shell("show stat; shutdown frontend gpubox")


def test_the_rollback_sentence_the_rollout_looks_for_is_the_deploys() -> None:
    from operations.smoke import what_rollback_did

    server = LlamaServer(name="chat", model=MODEL)
    assert ROLLED_BACK in what_rollback_did(server, "unit-restored")
    assert ROLLED_BACK not in what_rollback_did(server, "no-previous-unit")


# --- the orchestration, with fakes ------------------------------------------------------------------------


class FakeGateway:
    """HAProxy's runtime API as a table: each server's admin state, health and in-flight requests."""

    def __init__(self, servers: Sequence[str], log: list[tuple[str, str]]) -> None:
        self.admin = {server: "ready" for server in servers}
        self.up = {server: True for server in servers}
        self.in_flight = {server: 0 for server in servers}
        self.log = log
        self.rechecked: list[str] = []

    def stats(self) -> dict[tuple[str, str], ServerStat]:
        stats = {}
        for key, admin in self.admin.items():
            backend, server = key.split("/")
            status = "DOWN" if not self.up[key] else "DRAIN" if admin == "drain" else "UP"
            stats[(backend, server)] = ServerStat(backend, server, status, scur=self.in_flight[key])
            if admin == "drain" and self.in_flight[key]:
                self.in_flight[key] -= 1  # one ends between two looks
        return stats

    def set_state(self, member: Member, state: ServerState) -> None:
        self.admin[str(member)] = state
        self.log.append((state, str(member)))

    def recheck(self, member: Member) -> None:
        self.rechecked.append(str(member))


class FakeDeployer:
    def __init__(self, log: list[tuple[str, str]], results: dict[str, tuple[int, list[str]]] | None = None,
                 during: Callable[[str], None] = lambda host: None) -> None:  # fmt: skip
        self.log, self.results, self.during = log, results or {}, during

    def deploy(self, hosts: Sequence[str], say: Callable[[str], None]) -> int:
        name = "+".join(hosts)
        self.log.append(("deploy", name))
        self.during(name)
        code, lines = self.results.get(name, (0, [f"[{name}] done"]))
        for line in lines:
            say(line)
        return code


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.lines: list[tuple[str, str]] = []

    def event(self, unit: str, step: str, detail: str = "") -> None:
        self.events.append((unit, step, detail))

    def output(self, unit: str, line: str) -> None:
        self.lines.append((unit, line))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


SERVERS = ("group_chat/alpha:chat", "group_chat/bravo:chat", "group_chat/charlie:chat", "group_code/charlie:code",
           "group_code/delta:code")  # fmt: skip


def _rollout(plan: Plan, deployer: FakeDeployer, gateway: FakeGateway) -> tuple[RolloutResult, Recorder, Clock]:
    recorder, clock = Recorder(), Clock()
    timing = Timing(drain_timeout_s=30, ready_timeout_s=30, health_wait_s=20, poll_s=1)
    result = Rollout(plan, {"gw": gateway}, deployer, recorder, timing, clock=clock, sleep=clock.sleep).run()
    return result, recorder, clock


def test_each_host_is_drained_deployed_alone_and_put_back_in_order() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)
    result, recorder, _ = _rollout(_plan(), FakeDeployer(log), gateway)
    assert result.ok
    assert gateway.rechecked == [server for server in SERVERS]  # each drained one, once, after its deploy
    assert log == [
        ("drain", "group_chat/alpha:chat"), ("deploy", "alpha"), ("ready", "group_chat/alpha:chat"),
        ("drain", "group_chat/bravo:chat"), ("deploy", "bravo"), ("ready", "group_chat/bravo:chat"),
        ("drain", "group_chat/charlie:chat"), ("drain", "group_code/charlie:code"), ("deploy", "charlie"),
        ("ready", "group_chat/charlie:chat"), ("ready", "group_code/charlie:code"),
        ("drain", "group_code/delta:code"), ("deploy", "delta+echo"), ("ready", "group_code/delta:code"),
        ("deploy", "foxtrot"),
    ]  # fmt: skip
    assert result.hosts("new") == ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    assert ("alpha", "[alpha] done") in recorder.lines


def test_the_deploy_waits_for_the_requests_in_flight() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)
    gateway.in_flight["group_chat/alpha:chat"] = 3
    seen: dict[str, int] = {}
    deployer = FakeDeployer(log, during=lambda host: seen.setdefault(host, gateway.in_flight["group_chat/alpha:chat"]))
    result, recorder, _ = _rollout(_plan(), deployer, gateway)
    assert result.ok and seen["alpha"] == 0
    assert [detail for unit, step, detail in recorder.events if unit == "alpha" and step == "in flight"] == [
        "3", "2", "1", "0"
    ]  # fmt: skip


def test_the_drain_timeout_deploys_anyway_and_says_so() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)
    gateway.in_flight["group_chat/alpha:chat"] = 1000
    result, recorder, _ = _rollout(_plan(), FakeDeployer(log), gateway)
    assert result.ok
    assert any(step == "drain timeout" and "still in flight after 30 s" in detail
               for unit, step, detail in recorder.events)  # fmt: skip


def test_a_smoke_miss_that_rolled_back_stops_the_rollout_and_puts_the_host_back() -> None:
    log: list[tuple[str, str]] = []
    said = f"[bravo] smoke test missed: ... The previous unit ({'/etc/x'}) {ROLLED_BACK}, and chat restarted on it."
    deployer = FakeDeployer(log, {"bravo": (1, [said])})
    result, _, _ = _rollout(_plan(), deployer, FakeGateway(SERVERS, log))
    assert not result.ok and "the deploy of bravo (exit 1) failed" in (result.stopped or "")
    assert ("deploy", "charlie") not in log  # stopped
    assert log[-1] == ("ready", "group_chat/bravo:chat")  # rolled back and its checks pass: serving
    outcomes = {r.unit.name: (r.outcome, r.state, r.serving) for r in result.results}
    assert outcomes["alpha"] == ("new", "new", True)
    assert outcomes["bravo"] == ("rolled back", "old", True)
    assert outcomes["charlie"] == ("old", "old", True)
    assert result.hosts("new") == ["alpha"] and result.hosts("old") == ["bravo", "charlie", "delta", "echo", "foxtrot"]


def test_a_miss_without_a_rollback_leaves_the_host_drained_and_says_so() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)
    deployer = FakeDeployer(log, {"bravo": (1, ["[bravo] error: connection lost"])})
    result, _, _ = _rollout(_plan(), deployer, gateway)
    assert not result.ok
    assert gateway.admin["group_chat/bravo:chat"] == "drain"
    assert gateway.admin["group_chat/alpha:chat"] == "ready"  # every other host serves
    bravo = next(r for r in result.results if r.unit.name == "bravo")
    assert (bravo.outcome, bravo.state, bravo.serving) == ("failed", "unknown", False)
    assert "left drained: its deploy did not roll it back" in bravo.note
    assert [str(m) for m in result.drained] == ["group_chat/bravo:chat"]


def test_a_rollback_whose_checks_fail_stays_drained() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)

    def crash(host: str) -> None:
        if host == "bravo":
            gateway.up["group_chat/bravo:chat"] = False

    deployer = FakeDeployer(log, {"bravo": (1, [f"... {ROLLED_BACK} ..."])}, during=crash)
    result, _, clock = _rollout(_plan(), deployer, gateway)
    assert gateway.admin["group_chat/bravo:chat"] == "drain"
    assert "the gateway's checks fail" in next(r.note for r in result.results if r.unit.name == "bravo")
    assert clock.now >= 30  # it waited the ready timeout for the checks


def test_a_backend_already_down_is_waited_for_then_the_rollout_stops_naming_it() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)
    gateway.up["group_chat/charlie:chat"] = False  # chat keeps 2 of 3: draining alpha would leave 1
    result, recorder, clock = _rollout(_plan(), FakeDeployer(log), gateway)
    assert log == []  # nothing drained, nothing deployed
    assert result.stopped is not None and "not draining alpha" in result.stopped
    assert "group 'chat' would keep 1 healthy backend(s) of 3, below its min_healthy=2" in result.stopped
    assert "charlie:chat (DOWN)" in result.stopped
    assert clock.now >= 20
    assert any(step == "wait" for _, step, _ in recorder.events)


def test_a_backend_that_comes_back_while_waited_for_lets_the_rollout_go_on() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)
    gateway.up["group_chat/charlie:chat"] = False
    original = gateway.stats
    looks = 0

    def stats() -> dict[tuple[str, str], ServerStat]:
        nonlocal looks
        looks += 1
        if looks == 4:
            gateway.up["group_chat/charlie:chat"] = True
        return original()

    gateway.stats = stats  # type: ignore[method-assign]
    result, _, _ = _rollout(_plan(), FakeDeployer(log), gateway)
    assert result.ok


def test_the_units_of_a_batch_are_drained_together_then_deployed() -> None:
    hosts, boxes, groups = _groups(("chat", 1, ["a", "b", "c"]))
    plan = plan_rollout(hosts, boxes, groups, batch=2)
    log: list[tuple[str, str]] = []
    servers = [f"group_chat/{h}:chat" for h in hosts]
    result, _, _ = _rollout(plan, FakeDeployer(log), FakeGateway(servers, log))
    assert result.ok
    assert log[3:5] == [("drain", "group_chat/b:chat"), ("drain", "group_chat/c:chat")]
    assert sorted(log[5:7]) == [("deploy", "b"), ("deploy", "c")]
    assert sorted(log[7:]) == [("ready", "group_chat/b:chat"), ("ready", "group_chat/c:chat")]


def test_a_host_that_does_not_come_back_up_stops_the_rollout() -> None:
    log: list[tuple[str, str]] = []
    gateway = FakeGateway(SERVERS, log)

    def broken(host: str) -> None:
        if host == "alpha":
            gateway.up["group_chat/alpha:chat"] = False

    result, _, _ = _rollout(_plan(), FakeDeployer(log, during=broken), gateway)
    assert result.stopped is not None and "group_chat/alpha:chat did not come back UP" in result.stopped
    assert ("deploy", "bravo") not in log


# --- the command ------------------------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["rollout", *argv])
    return code, " ".join(capsys.readouterr().out.split())


def test_rollout_help_exists(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["rollout", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--canary HOST", "--batch N", "--drain-timeout S", "--dry"):
        assert option in text


def test_dry_shows_the_order_and_touches_nothing(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def no_io(args: argparse.Namespace, plan: Plan) -> RolloutIo:
        raise AssertionError("--dry touched the fleet")

    monkeypatch.setattr(cli_rollout, "IO_FACTORY", no_io)
    code, out = _run([FLEET, DEPLOY, "--dry"], capsys)
    assert code == 0
    assert "rollout plan: 5 step(s), --batch 1, lock on gw" in out
    assert "delta+echo" in out and "--dry: nothing was touched" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch 0: a batch is at least one unit"),
        (["--canary", "foxtrot"], "--canary foxtrot: no model group has a backend on foxtrot"),
        (["--batch", "2"], "at most --batch 1"),
    ],
)
def test_bad_input_exits_2_before_the_fleet_is_touched(argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(cli_rollout, "IO_FACTORY", lambda args, plan: pytest.fail("touched"))
    code, out = _run([FLEET, DEPLOY, *argv], capsys)
    assert code == 2 and message in out


def _fake_io(
    log: list[tuple[str, str]], deployer: FakeDeployer, acquire: Callable[[], str]
) -> Callable[..., RolloutIo]:
    gateway = FakeGateway(SERVERS, log)

    def factory(args: argparse.Namespace, plan: Plan) -> RolloutIo:
        assert (args.inventory, args.deploy) == (FLEET, DEPLOY)
        return RolloutIo({"gw": gateway}, deployer, acquire, lambda: log.append(("close", "")))

    return factory


def test_a_second_rollout_is_refused_naming_the_first(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    log: list[tuple[str, str]] = []

    def held() -> str:
        raise RolloutError("another rollout of this fleet holds the 'rollout' lock on gw: dan@laptop pid 42, "
                           "started 2026-05-01T10:00:00Z (35 s ago)")  # fmt: skip

    monkeypatch.setattr(cli_rollout, "IO_FACTORY", _fake_io(log, FakeDeployer(log), held))
    code, out = _run([FLEET, DEPLOY], capsys)
    assert code == 2 and "dan@laptop pid 42, started 2026-05-01T10:00:00Z (35 s ago)" in out
    assert log == [("close", "")]  # nothing drained or deployed


def test_the_summary_says_which_hosts_run_the_new_state_and_which_the_old(capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[tuple[str, str]] = []
    deployer = FakeDeployer(log, {"charlie": (1, ["[charlie] error"])})
    monkeypatch.setattr(cli_rollout, "IO_FACTORY", _fake_io(log, deployer, lambda: "holds the 'rollout' lock on gw"))
    monkeypatch.setattr(cli_rollout, "Timing", lambda **kw: Timing(**{**kw, "poll_s": 0.0}))
    code, out = _run([FLEET, DEPLOY, "--ready-timeout", "0", "--health-wait", "0"], capsys)
    assert code == 1
    assert "new state: alpha, bravo" in out
    assert "old state: delta, echo, foxtrot" in out
    assert "unknown state (deploy failed): charlie" in out
    assert "left drained: group_chat/charlie:chat, group_code/charlie:code" in out
    assert "stopped: the deploy of charlie (exit 1) failed" in out
    assert "rollout summary" in out and log[-1] == ("close", "")


def test_console_progress_names_the_host_the_step_and_the_in_flight_count() -> None:
    console = Console(record=True, width=120)
    reporter = cli_rollout.ConsoleReporter(console)
    reporter.event("alpha", "in flight", "3")
    reporter.output("alpha", "[alpha] Connected [x]")
    text = console.export_text()
    assert "alpha  in flight  3" in text and "alpha | [alpha] Connected [x]" in text


def test_pyinfra_connections_run_commands_and_hold_the_lock_as_a_deploy_would(tmp_path: Path) -> None:
    """pyinfra's API in this process, on an @local host: the shell the runtime API and the fleet lock use."""
    from gpubox.deploy_lock import Holder
    from gpubox.rollout_io import FleetLock, PyinfraConnections

    inventory = tmp_path / "local.py"
    inventory.write_text('hosts = ["@local"]\n')
    connections = PyinfraConnections(str(inventory))
    try:
        shell = connections.shell("@local")
        assert shell.run("echo 'a b'; echo err >&2; exit 3") == (3, "a b\n", "err\n")
        holder = Holder(controller="laptop", pid=7, user="dan", started="2026-05-01T10:00:00Z")
        lock = FleetLock(shell, "@local", holder, lock_dir=str(tmp_path / "locks"))
        assert lock.acquire() == "holds the 'rollout' lock on @local (dan@laptop pid 7)"
        assert "controller=laptop" in (tmp_path / "locks" / "rollout.holder").read_text()
        lock.release()
        assert not (tmp_path / "locks" / "rollout.holder").exists()
    finally:
        connections.close()


def test_the_deploy_runs_pyinfra_limited_to_the_units_hosts_and_streams_its_output(tmp_path: Path) -> None:
    from gpubox.rollout_io import PyinfraDeployer

    fake = tmp_path / "pyinfra"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "to stderr" >&2\nexit 4\n')
    fake.chmod(0o755)
    deployer = PyinfraDeployer("inventory/x.py", "deploys/y.py", pyinfra=str(fake))
    lines: list[str] = []
    assert deployer.deploy(("delta", "echo"), lines.append) == 4
    assert lines == ["argv: inventory/x.py deploys/y.py --limit delta --limit echo -y", "to stderr"]
