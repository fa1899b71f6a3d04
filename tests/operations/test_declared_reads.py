"""Each operation reads on a converged host only what its module declares (`facts_read` & co.): what the
full deploy prefetches in its one round trip (`operations.box_state.box_reads`).

The operations read through `host_facts.read`, with the same one-per-read functions their module's
declared list is built from, so the two cannot drift by hand; these tests run the operations (their
converged fixtures, and the deploys' bodies on a converged host) and record every `fact_once` read:
one the declared list lacks would cost a converged host a round trip more, and fails here.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from pydantic import TypeAdapter
from pyinfra.api.facts import FactBase
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.files import File, FileContents
from pyinfra_testing.util import FakeState, coerce_operation_arguments, parse_value, patch_files

import operations.host_facts
from facts.build import InstalledBuild
from facts.cuda import CudaToolkit
from facts.gpu import NvidiaGpus
from facts.llamacpp import LlamaServerFlags
from facts.systemd import ExistingUsers, UnitStates
from facts.unverified import UnverifiedServices
from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, SmokeThresholds, cuda, gpu
from gpubox.gpu import gpus_from_fact
from gpubox.keys import fact_mode
from gpubox.running import UnitState
from gpubox.unit import render_unit
from operations import box_state, models, monitoring, piper, service, source_build, text_files, vram
from operations.host_facts import FactRead
from tests.operations.test_operations import (
    HERE,
    REPO_ROOT,
    GpuboxFakeHost,
    _build_specs,
    _fact_fixture_value,
    _with_fact_fixtures,
    _with_repo_root,
)

Key = tuple[type[FactBase[Any]], tuple[tuple[str, Any], ...]]


def _key(fact_read: FactRead) -> Key:
    fact, arguments = fact_read
    return fact, tuple(sorted(arguments.items()))


def _name(key: Key) -> str:
    fact, arguments = key
    return f"{fact.__name__}({', '.join(f'{name}={value!r}' for name, value in arguments)})"


@contextmanager
def recorded_reads() -> Iterator[list[Key]]:
    """Every fact `fact_once` (and so `host_facts.read`) is asked for in the block, with its arguments."""
    reads: list[Key] = []
    fact_key = operations.host_facts._fact_key

    def recording(fact: type[FactBase[Any]], arguments: dict[str, Any]) -> Any:
        reads.append((fact, tuple(sorted(arguments.items()))))
        return fact_key(fact, arguments)

    operations.host_facts._fact_key = recording  # type: ignore[assignment]
    try:
        yield reads
    finally:
        operations.host_facts._fact_key = fact_key  # type: ignore[assignment]


def assert_declared(reads: list[Key], declared: list[FactRead], where: str) -> None:
    assert reads, f"{where}: nothing read through fact_once (is the recorder still in the read path?)"
    undeclared = [key for key in dict.fromkeys(reads) if key not in {_key(fact_read) for fact_read in declared}]
    assert not undeclared, (
        f"{where} reads {', '.join(map(_name, undeclared))} on a converged host, which its module's declared "
        f"reads (prefetched in the deploy's one round trip) lack: build the read with the function the "
        f"declared list uses (host_facts.read)"
    )


# What each operation's module declares it reads, from the operation's arguments.
DECLARED: dict[str, Callable[[dict[str, Any]], list[FactRead]]] = {
    "models.place": lambda kw: models.facts_read(kw["model"]),
    "models.stamp": lambda kw: models.facts_read(kw["model"]),
    "models.unused": lambda kw: [models.stamps_read()],
    "monitoring.credentials": lambda kw: list(monitoring.credential_reads(kw["target"])),
    "monitoring.packages": lambda kw: monitoring.package_reads(),
    "service.flags_supported": lambda kw: service.facts_read(kw["server"], kw["prefix"]),
    "service.unit": lambda kw: service.facts_read(kw["server"], kw["prefix"]),
    "source_build.install": lambda kw: source_build.facts_read(kw["build"]),
    "source_build.source": lambda kw: source_build.facts_read(kw["build"]),
    "speculation.drafter_architecture": lambda kw: models.facts_read(kw["model"]),
    "speculation.supported": lambda kw: service.facts_read(kw["server"], kw["prefix"]),
    "text_files.text_file": lambda kw: text_files.facts_read(kw["path"]),
    "vram.fits": lambda kw: box_state.box_reads(kw["box"]),
}


def _converged_fixtures() -> list[Path]:
    """The fixtures where the operation finds the host as it should be: no change, no refusal."""
    found = []
    for path in sorted(HERE.glob("*.*/*.json")):
        data = json.loads(path.read_text())
        if "noop_description" in data and "exception" not in data and not data.get("commands"):
            found.append(path)
    return found


CONVERGED = _converged_fixtures()


def test_every_operation_with_a_converged_fixture_declares_its_reads() -> None:
    assert {path.parent.name for path in CONVERGED} <= set(DECLARED)
    for module in ("models", "monitoring", "service", "source_build", "text_files", "vram"):
        assert any(path.parent.name.startswith(f"{module}.") for path in CONVERGED), module


@pytest.mark.parametrize("fixture", CONVERGED, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_a_converged_operation_reads_only_what_its_module_declares(fixture: Path) -> None:
    module_name, op_name = fixture.parent.name.rsplit(".", 1)
    op = getattr(__import__(f"operations.{module_name}", fromlist=[op_name]), op_name)
    data = _with_repo_root(json.loads(fixture.read_text()))
    state = FakeState()
    state.cwd = str(REPO_ROOT)
    for key, value in data.get("state", {}).items():
        setattr(state, key, value)
    host = GpuboxFakeHost(state, facts=parse_value(_with_fact_fixtures(data.get("facts", {}))))
    args, kwargs = _build_specs(op, parse_value(data.get("args", [])), parse_value(data.get("kwargs", {})))
    args, kwargs = coerce_operation_arguments(op, args, kwargs)
    local_files = patch_files(data["local_files"]) if "local_files" in data else nullcontext()
    with ctx_state.use(state), ctx_host.use(host), local_files, recorded_reads() as reads:
        assert not list(op._inner(*args, **kwargs))
    if not reads and fixture.parent.name in {"source_build.source", "speculation.supported"}:
        return  # reads only with host.get_fact: not planned (source) or not prefetched on a converged host
    assert_declared(reads, DECLARED[fixture.parent.name](kwargs), fixture.parent.name)


# The deploys' bodies on a converged host: each operation they plan runs at once, on the same host.


class ConvergedHost:
    """A host that answers each fact by its class (a callable gets the arguments): an undeclared read
    is answered too, so the test names it rather than failing on a missing fact."""

    name = "box"
    data: dict[str, Any] = {}
    print_prefix = "[box] "

    def __init__(self, facts: dict[type, Any]) -> None:
        self.facts = facts
        self.noops: list[str] = []

    def get_fact(self, fact: type, **arguments: Any) -> Any:
        value = self.facts[fact]
        return value(arguments) if callable(value) else value

    def log(self, message: str, log_func: Any = None) -> None:
        pass

    def noop(self, description: str) -> None:
        self.noops.append(description)


def run_operations_inline(monkeypatch: pytest.MonkeyPatch, module: ModuleType, *names: str) -> None:
    """The module's operations `names`, called from its deploy, run their checks at once: their meta
    says whether they would change anything (nothing, on a converged host)."""
    for name in names:
        op = getattr(module, name)

        def inline(*args: Any, _op: Any = op, name: str = "", _if: Any = None, **kwargs: Any) -> Any:
            commands = list(_op._inner(*args, **kwargs))
            return SimpleNamespace(will_change=bool(commands), commands=commands)

        monkeypatch.setattr(module, name, inline)


GPUS = json.loads((HERE / "service.unit" / "same_unit.json").read_text())["facts"]["gpu.NvidiaGpus"]
FLAGS = _fact_fixture_value({"@fact@": "llamacpp.LlamaServerFlags/help_0c1e57098"})
MODEL = ModelFile(path="/srv/models/m.gguf", sha256="a" * 64, architecture="llama")
SERVER = LlamaServer(
    name="chat",
    model=MODEL,
    port=8080,
    gpus=[0],
    api_key_file="generate",
    smoke=SmokeThresholds(min_tokens_per_second=1),
)
PREFIX = "/opt/llama.cpp"
BUILD = LlamaCppBuild(commit="0" * 40, prefix=PREFIX, cuda="off")


def converged_service_host(server: LlamaServer) -> ConvergedHost:
    unit_text = render_unit(server, server.binary(PREFIX), gpus_from_fact(GPUS))
    key_info = {"user": "root", "group": server.user, "mode": fact_mode(), "size": 65}
    return ConvergedHost({
        ExistingUsers: [server.user],
        LlamaServerFlags: FLAGS,
        NvidiaGpus: GPUS,
        FileContents: unit_text.splitlines(),
        File: key_info,
        UnitStates: {server.unit_name: UnitState(active=True, enabled=True)},
        UnverifiedServices: [],
    })  # fmt: skip


def test_a_converged_service_reads_only_what_service_facts_read_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    run_operations_inline(
        monkeypatch, service, "flags_supported", "api_key", "unit", "running_current", "running_and_enabled"
    )
    monkeypatch.setattr(service, "restart", lambda **kwargs: pytest.fail("a converged service restarted"))
    host = converged_service_host(SERVER)
    with ctx_state.use(FakeState()), ctx_host.use(host), recorded_reads() as reads:
        restarted = service.server.__wrapped__(SERVER, PREFIX)  # type: ignore[attr-defined]
    assert not restarted.planned
    assert_declared(reads, service.facts_read(SERVER, PREFIX), "service.server")
    assert_declared(reads, box_state.box_reads(Box(llama_cpp=BUILD, services=(SERVER,))), "the box deploy")


def test_a_converged_build_reads_only_what_source_build_facts_read_declares(monkeypatch: pytest.MonkeyPatch) -> None:
    run_operations_inline(monkeypatch, source_build, "install")
    converged = json.loads((HERE / "source_build.install" / "converged.json").read_text())
    build = LlamaCppBuild.model_validate(converged["kwargs"]["build"])
    facts = converged["facts"]
    (installed,) = facts["build.InstalledBuild"].values()
    gpus = TypeAdapter(list[gpu.Gpu]).validate_python(facts["gpu.NvidiaGpus"])  # the records the facts return
    toolkit = cuda.Nvcc.model_validate(facts["cuda.CudaToolkit"])
    host = ConvergedHost({NvidiaGpus: gpus, CudaToolkit: toolkit})
    host.facts[InstalledBuild] = lambda arguments: (
        installed if arguments["stamp"].endswith("-cuda/gpubox-build.json") else None
    )
    with ctx_state.use(FakeState()), ctx_host.use(host), recorded_reads() as reads:
        metas = source_build.build.__wrapped__(build)  # type: ignore[attr-defined]
    assert [meta.will_change for meta in metas] == [False], host.noops
    assert_declared(reads, source_build.facts_read(build), "source_build.build")


def _module_calls(module: ModuleType, function: str) -> set[str]:
    tree = ast.parse(Path(module.__file__ or "").read_text())
    return {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function
    }


@pytest.mark.parametrize("module", [models, monitoring, piper, service, source_build, text_files, vram])
def test_operation_modules_read_only_through_declared_reads(module: ModuleType) -> None:
    """No `fact_once(Fact, ...)` in an operation module: a read spelled there would be a second source."""
    assert not _module_calls(module, "fact_once"), f"{module.__name__} calls fact_once: use host_facts.read"
