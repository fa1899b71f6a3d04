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
