"""Each model file is hashed at most once per run, and a model shared by two services is placed once.

The operations run as the fixture runner runs them (tests/operations/test_operations.py: a FakeState,
a fake host answering facts from a dict), with a host that counts the facts asked for.
"""

from __future__ import annotations

import runpy
import shlex
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState, parse_value

import operations.box_state
import operations.deploy_lock
import operations.host_facts
import operations.service
import operations.smoke
import operations.source_build
import operations.vram
from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile
from gpubox.verified import stamp_path, stamped_sha256
from operations import models
from operations.speculation import drafter_architecture
from tests.operations.test_operations import REPO_ROOT, GpuboxFakeHost

SOURCE = "tests/fixtures/gguf/ggml-vocab-llama-spm.gguf"
SOURCE_SHA256 = "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
OLD_SHA256 = "9f2c5d0b7e61a4c38d12f0e5a7b96c4d3e8f1a2b5c6d7e8f9a0b1c2d3e4f5a6b"
PATH = "/srv/models/llama-spm.gguf"
INFO = {
    "user": "root", "group": "root", "mode": 644, "atime": "datetime:2026-11-29T00:40:01",
    "mtime": "datetime:2026-11-29T00:40:00", "ctime": "datetime:2026-11-29T00:40:02", "size": 98000000,
}  # fmt: skip
MODEL = ModelFile(path=PATH, sha256=SOURCE_SHA256, source=SOURCE, architecture="llama")


class CountingHost(GpuboxFakeHost):
    """Counts each fact asked for, by class and arguments."""

    def __init__(self, state: FakeState, facts: dict[str, Any]) -> None:
        super().__init__(state, facts)
        self.asked: Counter[str] = Counter()

    def get_fact(self, fact_cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.asked[f"{fact_cls.__name__} {kwargs.get('path', '')}".strip()] += 1
        return super().get_fact(fact_cls, *args, **kwargs)


def changed_model_host(state: FakeState, stamp_matches: bool = False) -> CountingHost:
    """The host file is the old model (another sha256), stamped when it was placed; unless
    ``stamp_matches``, the file's ctime moved since (it was touched), so its stamp is no proof."""
    stamp_ctime = "2026-11-29T00:40:02" if stamp_matches else "2026-11-28T09:00:00"
    old_stamp = [PATH, OLD_SHA256, "98000000", "2026-11-29T00:40:00", stamp_ctime]
    facts = {
        "files.File": {f"path={PATH}": INFO, f"path={PATH}.part": None},
        "files.FileContents": {f"path={stamp_path(PATH)}": old_stamp},
        "files.Sha256File": {f"path={PATH}": OLD_SHA256},
    }
    return CountingHost(state, parse_value(facts))


def new_state(**attributes: Any) -> FakeState:
    state = FakeState()
    state.cwd = str(REPO_ROOT)
    for key, value in attributes.items():
        setattr(state, key, value)
    return state


def run(op: Any, state: FakeState, host: CountingHost, **kwargs: Any) -> list[Any]:
    with ctx_state.use(state), ctx_host.use(host):
        return list(op._inner(**kwargs))


def test_a_dry_run_with_a_changed_model_hashes_the_host_file_once() -> None:
    """`place` hashes the old (unstamped) file to say what changes; `stamp` reuses that hash."""
    state = new_state()
    host = changed_model_host(state)
    assert run(models.place, state, host, model=MODEL), "the changed model is placed"
    assert run(models.stamp, state, host, model=MODEL) == []
    assert host.noop_description == f"{PATH}: stamped once it is placed"
    assert host.asked[f"Sha256File {PATH}"] == 1


def test_a_run_that_asks_to_confirm_hashes_the_host_file_once() -> None:
    """Without -y pyinfra runs each operation's checks to plan, then again to execute: one hash."""
    state = new_state()
    host = changed_model_host(state)
    run(models.place, state, host, model=MODEL)
    run(models.stamp, state, host, model=MODEL)
    state.is_executing = True
    run(models.place, state, host, model=MODEL)
    assert host.asked[f"Sha256File {PATH}"] == 1


def test_the_hashes_are_one_runs_only() -> None:
    """A new run (another State) hashes again: the file may have changed between runs."""
    for _ in range(2):
        state = new_state()
        host = changed_model_host(state)
        run(models.place, state, host, model=MODEL)
        assert host.asked[f"Sha256File {PATH}"] == 1


def _hashed_paths(commands: list[Any]) -> list[str]:
    """The files the commands run sha256sum on (`sha256sum < FILE`, `sha256sum FILE`)."""
    lines = [line for command in commands if isinstance(command, str) for line in command.splitlines()]
    return [
        shlex.split(line.split("sha256sum", 1)[1].split("|", 1)[0].replace("<", " "))[0]
        for line in lines
        if "sha256sum" in line
    ]


def test_a_changed_spec_replaces_the_stamped_old_file_without_hashing_it() -> None:
    """The stamp still matches the file (size, mtime, ctime) and records the old sha256: the file is
    known to be the old content, so neither the dry run nor the run hashes it; the new one is verified."""
    state = new_state()
    host = changed_model_host(state, stamp_matches=True)
    dry_run = run(models.place, state, host, model=MODEL)
    assert run(models.stamp, state, host, model=MODEL) == []
    assert host.noop_description == f"{PATH}: stamped once it is placed"
    assert any(OLD_SHA256 in line and SOURCE_SHA256 in line for line in host.logs), host.logs  # old -> new
    state.is_executing = True
    executed = run(models.place, state, host, model=MODEL)
    assert host.asked[f"Sha256File {PATH}"] == 0
    for commands in (dry_run, executed):
        assert _hashed_paths(commands) == [f"{PATH}.part"]  # only what is uploaded, never the old file
        assert commands[-1] == f"chmod 0644 {PATH}.part && mv -f {PATH}.part {PATH}"


def test_a_stamp_is_trusted_only_for_its_own_unchanged_file() -> None:
    lines = [PATH, OLD_SHA256, "98000000", "2026-11-29T00:40:00", "2026-11-29T00:40:02"]
    mtime, ctime = datetime(2026, 11, 29, 0, 40, 0), datetime(2026, 11, 29, 0, 40, 2)
    assert stamped_sha256(lines, PATH, 98000000, mtime, ctime) == OLD_SHA256
    assert stamped_sha256([f"{line}\n" for line in lines], PATH, 98000000, mtime, ctime) == OLD_SHA256
    assert stamped_sha256(lines, "/srv/models/other.gguf", 98000000, mtime, ctime) is None
    assert stamped_sha256(lines, PATH, 98000001, mtime, ctime) is None
    assert stamped_sha256(lines, PATH, 98000000, mtime, datetime(2026, 11, 29, 9, 0, 0)) is None
    assert stamped_sha256([PATH, "not-a-hash", *lines[2:]], PATH, 98000000, mtime, ctime) is None
    assert stamped_sha256(lines[:4], PATH, 98000000, mtime, ctime) is None
    assert stamped_sha256(None, PATH, 98000000, mtime, ctime) is None


def test_a_stamped_file_is_not_hashed_in_a_surgical_dry_run() -> None:
    """The drafter check of the surgical deploy trusts the stamp, as `place` and `stamp` do."""
    stamp = [PATH, SOURCE_SHA256, "98000000", "2026-11-29T00:40:00", "2026-11-29T00:40:02"]
    header = {
        "version": 3, "file_size": 98000000, "architecture": "llama", "name": None, "alignment": 32,
        "data_offset": 4096, "metadata": {"general.architecture": "llama"}, "tensors": [],
    }  # fmt: skip
    facts = {
        "files.File": {f"path={PATH}": INFO},
        "files.FileContents": {f"path={stamp_path(PATH)}": stamp},
        "gguf.GgufHeader": {f"head_bytes=4194304, path={PATH}": header},
    }
    state = new_state()
    host = CountingHost(state, parse_value(facts))
    for op in (models.place, models.stamp, drafter_architecture):
        run(op, state, host, model=MODEL)
    assert host.asked[f"Sha256File {PATH}"] == 0


def test_the_controller_file_is_hashed_once_for_every_model_it_sources() -> None:
    """A source shared by two host paths (the test bed's model and drafter), over two runs: one read."""
    models._local_sha256.cache_clear()
    for path in ("/srv/models/a.gguf", "/srv/models/b.gguf", "/srv/models/a.gguf"):
        model = MODEL.model_copy(update={"path": path})
        state = new_state()
        host = CountingHost(state, parse_value({"files.File": {f"path={path}": None, f"path={path}.part": None}}))
        assert run(models.place, state, host, model=model)
    info = models._local_sha256.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def shared_model_box() -> Box:
    shared = ModelFile(path="/srv/models/shared.gguf", sha256=SOURCE_SHA256, source=SOURCE, architecture="llama")
    drafter = ModelFile(path="/srv/models/drafter.gguf", sha256=OLD_SHA256, architecture="llama")
    return Box(
        llama_cpp=LlamaCppBuild(repo="https://github.com/ggml-org/llama.cpp", commit="a" * 40, cuda="off"),
        services=(
            LlamaServer(name="chat", model=shared, port=8080),
            LlamaServer(name="draft", model=shared, model_draft=drafter, spec_type="draft-simple", port=8081),
        ),
    )


def test_a_model_shared_by_two_services_is_placed_and_stamped_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The full deploy's operations for a box whose two services load one file: one `place`, one
    `stamp`, and both services restart on that one placement."""
    calls: list[tuple[str, str]] = []
    restarts_on: dict[str, list[Any]] = {}

    def place(name: str, model: ModelFile, hub: Any = None) -> Any:
        calls.append(("place", model.path))
        return SimpleNamespace(placed=model.path)

    def stamp(name: str, model: ModelFile, placed: Any) -> None:
        assert placed.placed == model.path
        calls.append(("stamp", model.path))

    def llama_server(server: LlamaServer, prefix: str, changed: list[Any], **kwargs: Any) -> None:
        restarts_on[server.name] = [meta.placed for meta in changed]

    monkeypatch.setattr(operations.models, "place", place)
    monkeypatch.setattr(operations.models, "stamp", stamp)
    monkeypatch.setattr(operations.models, "unused", lambda **kwargs: calls.append(("unused", "")))
    monkeypatch.setattr(operations.source_build, "build", lambda spec: [])
    monkeypatch.setattr(operations.vram, "fits", lambda **kwargs: None)
    monkeypatch.setattr(operations.host_facts, "prefetch", lambda reads: None)
    monkeypatch.setattr(operations.models, "check_sources", lambda box: None)
    monkeypatch.setattr(operations.service, "server", llama_server)
    monkeypatch.setattr(operations.smoke, "smoke_test", lambda *args, **kwargs: None)
    monkeypatch.setattr(operations.deploy_lock, "acquire", lambda name="deploy": None)
    host = SimpleNamespace(name="box", data={"box": shared_model_box()})
    with ctx_host.use(host):
        runpy.run_path(str(Path(REPO_ROOT) / "deploys" / "danarch4090.py"))
    assert calls == [
        ("place", "/srv/models/shared.gguf"),
        ("stamp", "/srv/models/shared.gguf"),
        ("place", "/srv/models/drafter.gguf"),
        ("stamp", "/srv/models/drafter.gguf"),
        ("unused", ""),
    ]
    assert restarts_on == {
        "chat": ["/srv/models/shared.gguf"],
        "draft": ["/srv/models/shared.gguf", "/srv/models/drafter.gguf"],
    }
