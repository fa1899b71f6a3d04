"""The demo's test-host config and the lines `scripts/demo` prints when it has converged the box.

`scripts/demo` writes a fresh config for the host `python -m tests.testbed up` booted
(`scripts/testbed_config.py --fresh`), converges it, and prints follow-up lines for the user to
run. Each line is a `FollowUp` here, with what it promises; the e2e test
(tests/e2e/test_speech.py) runs them in order on a converged host and checks each promise.
"""

from __future__ import annotations

import json
import runpy
from dataclasses import dataclass
from pathlib import Path

from gpubox.bench import free_port
from tests.testbed.__main__ import state_file
from tests.testbed.assets import inventory_config
from tests.testbed.config import DEFAULT_PATH, TestbedConfig
from tests.testbed.speech import speech_config

VENV_BIN = ".venv/bin"


@dataclass(frozen=True)
class FollowUp:
    """A line the demo prints: what it promises, and the shell command (run from the repo root)."""

    promise: str
    command: str


def fresh_config() -> TestbedConfig:
    """A new config for the host `up` booted: its connection, SmolLM2, the speech services when it was
    booted with `--bind-whisper`, and its monitoring; every listener on a new free port."""
    state = json.loads(state_file().read_text())
    ((host_name, host_data),) = runpy.run_path(state["inventory"])["testbed"]
    speech = speech_config() if state.get("speech") else {}
    # The box watches itself (deploys/observability.py): its listeners on free ports of this machine,
    # whose network the test host shares.
    return inventory_config(host_name, host_data).changed(
        **speech,
        node_exporter_port=free_port(),
        agent_port=free_port(),
        monitoring={"monitor": host_name, "port": free_port(), "scrape_interval_s": 5, "evaluation_interval_s": 5},
    )


def _with_config(config_path: Path, command: str) -> str:
    """``command`` reading ``config_path`` (the environment variable only where it is not the default)."""
    if config_path == DEFAULT_PATH:
        return command
    return f"GPUBOX_TESTBED_CONFIG={config_path} {command}"


def deploy_command(config_path: Path, deploy: str) -> str:
    """`pyinfra -y` of ``deploys/{deploy}.py`` on the test host."""
    return _with_config(config_path, f"{VENV_BIN}/pyinfra -y inventory/testbed.py deploys/{deploy}.py")


def follow_ups(config_path: Path = DEFAULT_PATH) -> list[FollowUp]:
    """The lines printed after the demo converged, in the order they are meant to run."""
    return [
        FollowUp("A second run changes nothing", deploy_command(config_path, "danarch4090")),
        FollowUp(
            "Change the drafter's n-max 3 -> 2 in the test host's config (its ports and earlier changes kept)",
            _with_config(config_path, f"{VENV_BIN}/python scripts/testbed_config.py spec_draft_n_max=2"),
        ),
        FollowUp(
            "The surgical redeploy: only gemma4 restarts, on its unit with --spec-draft-n-max 2",
            deploy_command(config_path, "gemma4_mtp"),
        ),
        FollowUp("Its monitoring, rerun: no changes", deploy_command(config_path, "observability")),
        FollowUp("Watch it", _with_config(config_path, f"{VENV_BIN}/gpubox top inventory/testbed.py")),
    ]


STOP = FollowUp("Stop the test host", f"{VENV_BIN}/python -m tests.testbed down")


def print_follow_ups(config_path: Path = DEFAULT_PATH) -> None:
    for follow_up in [*follow_ups(config_path), STOP]:
        print(f"{follow_up.promise}:\n  {follow_up.command}")


if __name__ == "__main__":  # scripts/demo: python -m tests.testbed.demo
    print_follow_ups()
