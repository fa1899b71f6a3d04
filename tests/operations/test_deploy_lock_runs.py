"""operations.deploy_lock with pyinfra itself: runs (each its own State) on @local, the lock in a
temporary directory. The SSH path is the same code on a paramiko channel (tests/e2e/test_faults.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.context import ctx_host, ctx_state

import gpubox.deploy_lock
from operations import deploy_lock


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(gpubox.deploy_lock, "LOCK_DIR", str(tmp_path))
    return tmp_path


@contextmanager
def a_run() -> Iterator[State]:
    """A pyinfra run on @local, connected; disconnected (as the CLI does on every exit path) at its end."""
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    try:
        with ctx_state.use(state), ctx_host.use(state.inventory.get_host("@local")):
            yield state
    finally:
        disconnect_all(state)


def record(lock_dir: Path) -> str:
    path = lock_dir / "deploy.holder"
    return path.read_text() if path.exists() else ""


def test_a_second_run_is_refused_naming_the_first_until_the_first_ends(lock_dir: Path) -> None:
    with a_run():
        deploy_lock.acquire()
        deploy_lock.acquire()  # held by this run already: nothing to do
        holder = deploy_lock.holding()
        assert holder is not None and f"pid={holder.pid}" in record(lock_dir)
        with a_run(), pytest.raises(deploy_lock.DeployLockError) as refused:
            deploy_lock.acquire()
        assert f"another deploy holds the 'deploy' lock: {holder.who()}, started {holder.started}" in str(refused.value)
    assert record(lock_dir) == "", "the run's end released the lock, and its record went with it"
    with a_run():
        deploy_lock.acquire()
        deploy_lock.release()
        assert deploy_lock.holding() is None and record(lock_dir) == ""
        with a_run():
            deploy_lock.acquire()  # released mid-run (a rollout's lock): another run may take it


def test_a_run_whose_holder_is_gone_is_taken_over(lock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with a_run() as state:
        deploy_lock.acquire()
        dead = deploy_lock.holding()
        # The connection drops without a release: the holder's stdin ends (what a killed controller does).
        held = deploy_lock._held(state).pop(("@local", "deploy"))
        held.process.close()
    assert dead is not None and f"pid={dead.pid}" in record(lock_dir)
    with caplog.at_level(logging.WARNING, logger="pyinfra"), a_run():
        deploy_lock.acquire()
    assert "took over the 'deploy' lock left by a deploy that ended without releasing it" in caplog.text
    assert dead.who() in caplog.text


def test_locks_are_by_name(lock_dir: Path) -> None:
    with a_run():
        deploy_lock.acquire()
        with a_run():
            deploy_lock.acquire("rollout")
            assert deploy_lock.holding("rollout") is not None and deploy_lock.holding() is None
        with pytest.raises(ValueError, match="lock name"):
            deploy_lock.acquire("../x")
