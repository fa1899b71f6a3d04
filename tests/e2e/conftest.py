"""Fixtures for end-to-end tests on a real systemd-nspawn host reachable over SSH."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed import TestHost, booted_host, ccache_dir, llama_cpp_repo, smollm2_gguf

LLAMA_REPO_MOUNT = "/srv/llama.cpp.git"
CCACHE_MOUNT = "/var/cache/ccache-shared"

_TOOLS = ("systemd-nspawn", "debootstrap", "zstd", "ssh", "ssh-keygen", "nsenter")


def _skip_reason() -> str | None:
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools {missing}: apt-get install $(cat .ci/apt-packages.txt)"
    if os.geteuid() != 0:
        return "e2e test hosts need root (systemd-nspawn)"
    return None


@pytest.fixture(scope="session")
def can_boot_hosts() -> None:
    """Fails (never skips) where test hosts can't boot: the e2e tests must run (CI runs them as root)."""
    reason = _skip_reason()
    if reason:
        pytest.fail(f"the e2e tests must run (CI runs them as root): {reason}")


@pytest.fixture(scope="session")
def llama_repo() -> tuple[Path, str]:
    """(path, full commit sha) of the deterministic llama.cpp git repo."""
    return llama_cpp_repo()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf."""
    return smollm2_gguf()


@pytest.fixture(scope="session")
def shared_ccache() -> Path:
    """Host-side ccache dir, bound read-write into test hosts at CCACHE_MOUNT."""
    return ccache_dir()


@pytest.fixture(scope="module")
def test_host(can_boot_hosts: None, llama_repo: tuple[Path, str], shared_ccache: Path) -> Iterator[TestHost]:
    """A booted Debian bookworm host (one per test module), stopped and deleted afterwards.

    The llama.cpp repo is bound read-only at /srv/llama.cpp.git and the shared ccache
    read-write at /var/cache/ccache-shared.
    """
    repo, _ = llama_repo
    with booted_host(
        binds_ro=[(repo, LLAMA_REPO_MOUNT)],
        binds=[(shared_ccache, CCACHE_MOUNT)],
    ) as host:
        yield host


@pytest.fixture(scope="module")
def gateway_fleet(
    can_boot_hosts: None, llama_repo: tuple[Path, str], shared_ccache: Path
) -> Iterator[tuple[TestHost, TestHost, TestHost]]:
    """The three-host gateway fleet (gateway, node1, node2) of tests/e2e/test_gateway.py and test_rollout.py, one
    per module (``tests.testbed.rollout_load.fleet_hosts``)."""
    from tests.testbed.rollout_load import fleet_hosts

    with fleet_hosts(llama_repo[0], shared_ccache) as booted:
        yield booted


@pytest.fixture(scope="module")
def gateway_fleet_env(
    gateway_fleet: tuple[TestHost, TestHost, TestHost], llama_repo: tuple[Path, str], smollm2: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:  # fmt: skip
    """The environment that points tests/fixtures/inventories/gateway_fleet.py at ``gateway_fleet`` (its own key
    store: the gateway's group keys)."""
    from tests.testbed.rollout_load import environment, fleet_settings

    gateway, *nodes = gateway_fleet
    settings = fleet_settings(gateway, nodes, llama_repo[1], smollm2)
    return environment(settings, tmp_path_factory.mktemp("key-store"), dict(os.environ))
