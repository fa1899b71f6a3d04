"""A service put live is marked unverified until its smoke test passes, and every run smoke-tests (and on
a miss rolls back) a service still marked: the operations' side of `gpubox.unverified`.

The operations run on a fake state and host (facts from a dict); the deploy files run with their
operations replaced by recorders, as tests/operations/test_model_hashes.py runs them.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyinfra.api import OperationError
from pyinfra.context import ctx_host, ctx_inventory, ctx_state
from pyinfra_testing.util import FakeState

import operations.box_state
import operations.deploy_lock
import operations.service
import operations.smoke
from facts.systemd import UnitStates
from facts.unverified import UnverifiedServices
from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, SmokeThresholds
from gpubox.running import UnitState
from gpubox.unverified import Mark, clear_command
from operations import service, smoke
from operations.service import Restarted
from tests.operations.test_operations import REPO_ROOT

MODEL = ModelFile(path="/srv/models/m.gguf", sha256="a" * 64, architecture="llama")
SMOKED = LlamaServer(name="gemma4", model=MODEL, port=8080, smoke=SmokeThresholds(min_tokens_per_second=1))
UNSMOKED = LlamaServer(name="other", model=MODEL, port=8081)
BUILD = LlamaCppBuild(commit="0" * 40, prefix="/opt/llama.cpp")
MARK = Mark(unit="gemma4.service", marked="2026-05-01T10:00:00Z", by="dan@laptop pid 4242", install_switched=True)


class DictHost:
    """A host whose facts come from a dict keyed by (fact, its arguments)."""

    name = "box"
    data: dict[str, Any] = {}
    print_prefix = "[box] "

    def __init__(self, facts: dict[tuple[type, tuple[tuple[str, Any], ...]], Any]) -> None:
        self.facts = facts
        self.logs: list[str] = []
        self.noops: list[str] = []

    def get_fact(self, fact: type, **arguments: Any) -> Any:
        return self.facts[(fact, tuple(sorted(arguments.items())))]

    def log(self, message: str, log_func: Any = None) -> None:
        self.logs.append(message)

    def noop(self, description: str) -> None:
        self.noops.append(description)


def commands(op: Any, host: DictHost, **kwargs: Any) -> list[str]:
    with ctx_state.use(FakeState()), ctx_host.use(host):
        return [str(command) for command in op._inner(**kwargs)]


def status(running: bool, enabled: bool = True) -> DictHost:
    return DictHost({
        (UnitStates, (("units", ("gemma4.service",)),)): {"gemma4.service": UnitState(active=running, enabled=enabled)},
        (UnverifiedServices, ()): [],
    })  # fmt: skip


def test_a_restart_marks_a_smoke_tested_service_first() -> None:
    restart = commands(service.restart, status(True), server=SMOKED)
    assert len(restart) == 2 and restart[1] == "systemctl restart gemma4.service"
    assert "/var/lib/gpubox/unverified/gemma4.service" in restart[0] and "mv -f" in restart[0]
    assert "install=kept" in restart[0]
    assert commands(service.restart, status(True), server=UNSMOKED) == ["systemctl restart other.service"]


def test_a_start_marks_as_a_restart_does() -> None:
    """A service stopped by hand and started by the deploy runs a new process: marked, then smoke-tested."""
    started = commands(service.running_and_enabled, status(False), unit_name="gemma4.service", mark=True)
    assert len(started) == 2 and started[1] == "systemctl start gemma4.service"
    assert "/var/lib/gpubox/unverified/gemma4.service" in started[0]
    assert commands(service.running_and_enabled, status(False), unit_name="gemma4.service") == [
        "systemctl start gemma4.service"
    ]
    # Enabling a running service puts nothing new live: no mark.
    enable = commands(service.running_and_enabled, status(True, enabled=False), unit_name="gemma4.service", mark=True)
    assert enable == ["systemctl enable gemma4.service"]


def test_the_mark_is_read_with_the_runs_other_facts() -> None:
    assert (UnverifiedServices, {}) in service.facts_read(SMOKED, "/opt/llama.cpp")
    box = Box(llama_cpp=BUILD, services=(SMOKED,))
    assert (UnverifiedServices, {}) in operations.box_state.box_reads(box)


def test_a_services_mark_is_found_by_its_unit() -> None:
    host = status(True)
    host.facts[(UnverifiedServices, ())] = [Mark(unit="whisper.service"), MARK]
    with ctx_state.use(FakeState()), ctx_host.use(host):
        assert service.unverified(SMOKED) == MARK
        assert service.unverified(UNSMOKED) is None


class Meta:
    def __init__(self, changed: bool) -> None:
        self.changed = changed

    def did_change(self) -> bool:
        return self.changed


def test_restarted_is_planned_and_happens_for_a_restart_a_start_or_a_mark() -> None:
    assert not Restarted().planned and not Restarted().happened()
    assert Restarted(unverified=MARK).planned and Restarted(unverified=MARK).happened()
    restart = Restarted(restart=Meta(False), start=Meta(True))  # type: ignore[arg-type]
    assert restart.planned and restart.happened()
    assert not Restarted(restart=Meta(False)).happened()  # type: ignore[arg-type]


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    planned: list[dict[str, Any]] = []
    monkeypatch.setattr(operations.smoke, "check", lambda **kwargs: planned.append(kwargs))
    return planned


def test_a_marked_service_is_smoke_tested_with_nothing_else_to_do(checks: list[dict[str, Any]]) -> None:
    smoke.smoke_test(SMOKED, Restarted(), BUILD, [])
    assert checks == []  # converged, verified: nothing planned
    smoke.smoke_test(SMOKED, Restarted(unverified=MARK), BUILD, [])
    (check,) = checks
    assert check["name"] == "Smoke test gemma4.service" and check["_if"]() and check["clear_mark"]
    # The cut run switched the build: a miss now switches it back, as that run's smoke would have.
    assert check["rollback"].build == BUILD and check["rollback"].build_switched()


def test_a_service_without_thresholds_is_never_smoke_tested(checks: list[dict[str, Any]]) -> None:
    smoke.smoke_test(UNSMOKED, Restarted(unverified=Mark(unit="other.service")), BUILD, [])
    assert checks == []


def test_the_round_trips_services_keep_their_marks_for_it(
    checks: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpubox import PiperInstall, PiperServer, SpeechSmoke, TranscriptionSmoke, WhisperCppBuild, WhisperServer

    whisper = WhisperServer(
        name="whisper", model=ModelFile(path="/srv/w.bin", sha256="b" * 64, format="ggml-whisper"), port=8090,
        no_gpu=True, smoke=TranscriptionSmoke(),
    )  # fmt: skip
    piper = PiperServer(
        name="piper", voice=ModelFile(path="/srv/v.onnx", sha256="c" * 64, format="onnx"),
        voice_config=ModelFile(path="/srv/v.onnx.json", sha256="d" * 64, format="json"), port=5000,
        smoke=SpeechSmoke(),
    )  # fmt: skip
    box = Box(
        whisper_cpp=WhisperCppBuild(commit="1" * 40), piper=PiperInstall(version="1.2.0"), services=(whisper, piper)
    )
    smoke.smoke_test(whisper, Restarted(unverified=Mark(unit="whisper.service")), box.whisper_cpp, [], box=box)
    assert checks[0]["clear_mark"] is False
    rounds: list[dict[str, Any]] = []
    monkeypatch.setattr(operations.smoke, "round_trip", lambda **kwargs: rounds.append(kwargs))
    restarts = {"whisper": Restarted(unverified=Mark(unit="whisper.service")), "piper": Restarted()}
    smoke.round_trip_test(box, restarts, {box.whisper_cpp.prefix: [], box.piper.prefix: []})  # type: ignore[union-attr]
    (planned,) = rounds
    assert planned["_if"]()
    assert [happened() for _, _, happened in planned["rollbacks"]] == [False, True]  # piper, whisper


def test_a_pass_clears_the_mark_and_a_miss_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    scripts: list[str] = []
    monkeypatch.setattr(operations.smoke, "run", lambda script, arguments: scripts.append(script) or SimpleNamespace(
        stdout="unit-restored\n"))  # fmt: skip
    rollbacks = [(SMOKED, smoke.Rollback(), lambda: True)]
    smoke._smoke_or_roll_back(lambda outcome: None, rollbacks, {}, "missed", [SMOKED])
    assert scripts == [clear_command("gemma4.service")]

    scripts.clear()
    miss = lambda outcome: outcome.failures.append("too slow")  # noqa: E731
    with pytest.raises(OperationError, match="missed: too slow. The previous unit"):
        smoke._smoke_or_roll_back(miss, rollbacks, {}, "missed", [SMOKED])
    (rollback,) = scripts
    assert rollback.endswith(clear_command("gemma4.service"))  # the previous unit (or nothing) runs now


# The deploy files: the lock before anything touches the host.


class Locked(Exception):
    """Raised by the fake `deploy_lock.acquire`: the deploy got there."""


@pytest.mark.parametrize("deploy", ["danarch4090.py", "gemma4_mtp.py", "observability.py"])
def test_each_deploy_takes_the_lock_before_it_touches_the_host(monkeypatch: pytest.MonkeyPatch, deploy: str) -> None:
    """The host here has no facts at all: a deploy that read one before `acquire` fails on that, not `Locked`."""
    import operations.deploy_inputs

    def acquire(name: str = "deploy") -> None:
        raise Locked(name)

    monkeypatch.setattr(operations.deploy_lock, "acquire", acquire)
    monkeypatch.setattr(operations.deploy_inputs, "build_fleet", lambda hosts: SimpleNamespace())
    drafter = ModelFile(path="/srv/models/d.gguf", sha256="e" * 64, architecture="llama")
    server = LlamaServer.model_validate(
        {**SMOKED.model_dump(), "model_draft": drafter.model_dump(), "spec_type": "draft-simple"}
    )
    host = SimpleNamespace(name="box", data={"box": Box(llama_cpp=BUILD, services=(server,))})
    with ctx_host.use(host), ctx_inventory.use([]), pytest.raises(Locked, match="deploy"):  # type: ignore[arg-type]
        runpy.run_path(str(Path(REPO_ROOT) / "deploys" / deploy))
