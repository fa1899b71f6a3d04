"""Test bed for gpubox end-to-end tests: real assets and a booted systemd host over SSH."""

from gpubox.testbed.assets import (
    cache_dir,
    ccache_dir,
    inventory_config,
    llama_cpp_repo,
    local_llama_server,
    sha256_file,
    smollm2_gguf,
)
from gpubox.testbed.host import TestHost, booted_host, build_rootfs, create_host, free_port

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
    "sha256_file",
    "smollm2_gguf",
    "inventory_config",
]
