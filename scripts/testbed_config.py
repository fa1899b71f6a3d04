"""Write the config inventory/testbed.py reads, for the test host `python -m gpubox.testbed up` started."""

from __future__ import annotations

import json
import runpy
import sys

from gpubox.testbed import inventory_config
from gpubox.testbed.__main__ import state_file


def main() -> int:
    state = json.loads(state_file().read_text())
    ((host_name, host_data),) = runpy.run_path(state["inventory"])["testbed"]
    json.dump(inventory_config(host_name, host_data), sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
