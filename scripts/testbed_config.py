"""Write the config inventory/testbed.py reads, for the test host `python -m gpubox.testbed up` started."""

from __future__ import annotations

import json
import runpy
import sys

from gpubox.testbed import free_port, llama_cpp_repo, sha256_file, smollm2_gguf
from gpubox.testbed.__main__ import state_file


def main() -> int:
    state = json.loads(state_file().read_text())
    ((host_name, host_data),) = runpy.run_path(state["inventory"])["testbed"]
    _, commit = llama_cpp_repo()
    model = smollm2_gguf()
    config = {
        "host_name": host_name,
        "host_data": host_data,
        "repo": "file:///srv/llama.cpp.git",
        "commit": commit,
        "model_sha256": sha256_file(model),
        "model_source": str(model),
        "port": free_port(),
        "ccache_dir": "/var/cache/ccache-shared",
    }
    json.dump(config, sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
