"""Write the config inventory/testbed.py reads, for the test host `python -m tests.testbed up` started."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests.testbed

from tests.testbed import free_port, inventory_config  # noqa: E402
from tests.testbed.__main__ import state_file  # noqa: E402
from tests.testbed.speech import speech_config  # noqa: E402


def main(argv: list[str]) -> int:
    """Print the config; each `KEY=VALUE` argument (VALUE as JSON, e.g. spec_draft_n_max=2) overrides a key."""
    state = json.loads(state_file().read_text())
    ((host_name, host_data),) = runpy.run_path(state["inventory"])["testbed"]
    config = inventory_config(host_name, host_data)
    if state.get("speech"):  # `up --bind-whisper`: the box speaks and listens too
        config |= speech_config()
    # The box watches itself (deploys/observability.py): its listeners on free ports of this machine,
    # whose network the test host shares.
    config |= {
        "node_exporter_port": free_port(),
        "agent_port": free_port(),
        "monitoring": {"monitor": host_name, "port": free_port(), "scrape_interval_s": 5, "evaluation_interval_s": 5},
    }
    for assignment in argv:
        key, _, value = assignment.partition("=")
        config[key] = json.loads(value)
    json.dump(config, sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
