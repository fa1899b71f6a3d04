"""Test bed for gpubox end-to-end tests: real assets and a booted systemd host over SSH.

The names below load on first use (PEP 562): inventory/testbed.py imports only tests.testbed.config,
and a deploy on the test host should not pay for the host, asset and benchmark modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpubox.bench import free_port
    from tests.testbed.assets import (
        cache_dir,
        ccache_dir,
        inventory_config,
        llama_cpp_repo,
        local_llama_server,
        same_tree_commit,
        sha256_file,
        smollm2_gguf,
    )
    from tests.testbed.host import TestHost, booted_host, build_rootfs, create_host
    from tests.testbed.registry import reap

_HOMES = {
    "free_port": "gpubox.bench",
    **dict.fromkeys(
        ("cache_dir", "ccache_dir", "inventory_config", "llama_cpp_repo", "local_llama_server", "same_tree_commit",
         "sha256_file", "smollm2_gguf"),
        "tests.testbed.assets",
    ),  # fmt: skip
    **dict.fromkeys(("TestHost", "booted_host", "build_rootfs", "create_host"), "tests.testbed.host"),
    "reap": "tests.testbed.registry",
}

__all__ = [
    "TestHost", "booted_host", "build_rootfs", "cache_dir", "ccache_dir", "create_host", "free_port",
    "inventory_config", "llama_cpp_repo", "local_llama_server", "reap", "same_tree_commit", "sha256_file",
    "smollm2_gguf",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
