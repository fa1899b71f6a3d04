"""Test bed for gpubox end-to-end tests: real assets and a booted systemd host over SSH."""

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

__all__ = [
    "TestHost",
    "booted_host",
    "build_rootfs",
    "cache_dir",
    "ccache_dir",
    "create_host",
    "free_port",
    "llama_cpp_repo",
    "local_llama_server",
    "reap",
    "same_tree_commit",
    "sha256_file",
    "smollm2_gguf",
    "inventory_config",
]
