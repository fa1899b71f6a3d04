"""Fleet scaling: a no-op converge of the full deploy and of the observability deploy at 1, 2, 4, 8, 16 hosts.

A benchmark, not a timed test: boots as many test hosts as the largest count (tests.testbed), converges
them all once (box, then monitoring; the first host is the monitor, the others run agents), then times
one no-op run of each deploy over the first 1, 2, 4, 8 and 16 hosts and prints a table with the ratio
to 1 host. pyinfra runs the hosts of a run in parallel; the goal is <= 1.5x the 1-host time at 16 hosts.

    scripts/bench-fleet [--hosts 1,2,4,8,16] [--json .cache/bench-fleet.json]   (runs this module)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpubox.bench import free_port
from tests.testbed import booted_host, cache_dir, ccache_dir, inventory_config, llama_cpp_repo
from tests.testbed.config import FleetHost, TestbedConfig

ROOT = Path(__file__).resolve().parents[2]

PYINFRA = str(ROOT / ".venv" / "bin" / "pyinfra")
DEPLOYS = {"full deploy (danarch4090.py)": "deploys/danarch4090.py", "observability.py": "deploys/observability.py"}


def fleet_config(base: TestbedConfig, count: int) -> TestbedConfig:
    """inventory/testbed.py's config for the first ``count`` hosts; ports fixed per host across runs."""
    return base.changed(fleet=base.fleet[: count - 1])


def timed_pyinfra(inventory: str, deploy: str, config_path: Path, *flags: str, cwd: Path = ROOT) -> float:
    """Seconds of one ``pyinfra -y`` run of ``deploy`` (from ``cwd``, the repo root unless told) with the
    test host config at ``config_path``; a failed run stops the benchmark with its output."""
    started = time.monotonic()
    result = subprocess.run(
        [PYINFRA, "-y", *flags, inventory, deploy],
        cwd=cwd,
        env={**os.environ, "GPUBOX_TESTBED_CONFIG": str(config_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{deploy} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return elapsed


def run(deploy: str, config: TestbedConfig, config_path: Path, *flags: str) -> float:
    config.write(config_path)
    return timed_pyinfra("inventory/testbed.py", deploy, config_path, *flags)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="1,2,4,8,16")
    parser.add_argument("--json", default=str(ROOT / ".cache" / "bench-fleet.json"))
    args = parser.parse_args()
    counts = [int(count) for count in args.hosts.split(",")]
    repo, _ = llama_cpp_repo()
    archives = cache_dir() / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        booted = [
            stack.enter_context(
                booted_host(
                    binds_ro=[(repo, "/srv/llama.cpp.git")],
                    binds=[(ccache_dir(), "/var/cache/ccache-shared"), (archives, "/var/cache/apt/archives")],
                )
            )
            for _ in range(max(counts))
        ]
        monitor = booted[0]
        everything = inventory_config(monitor.pyinfra_host_name(), monitor.pyinfra_host_data()).changed(
            jobs=os.cpu_count() or 2,
            node_exporter_port=free_port(),
            agent_port=free_port(),
            monitoring={"monitor": monitor.pyinfra_host_name(), "port": free_port()},
            fleet=[
                FleetHost(
                    host_name=host.pyinfra_host_name(),
                    host_data=host.pyinfra_host_data(),
                    port=free_port(),
                    node_exporter_port=free_port(),
                    agent_port=free_port(),
                )
                for host in booted[1:]
            ],
        )
        config_path = Path(scratch) / "config.json"
        for deploy in DEPLOYS.values():
            print(f"converging {len(booted)} hosts: {deploy} ...", flush=True)
            # one host at a time: sixteen builds and smoke tests at once on 2 cores starve each other
            print(f"  {run(deploy, everything, config_path, '--parallel', '1'):.1f} s", flush=True)
        times: dict[str, dict[int, float]] = {name: {} for name in DEPLOYS}
        for count in counts:
            for name, deploy in DEPLOYS.items():
                times[name][count] = run(deploy, fleet_config(everything, count), config_path)
                print(f"no-op {name} at {count} host(s): {times[name][count]:.2f} s", flush=True)
    print()
    print("| hosts | " + " | ".join(f"{name} no-op | ratio to 1 host" for name in DEPLOYS) + " |")
    print("| --- | " + " | ".join("--- | ---" for _ in DEPLOYS) + " |")
    for count in counts:
        cells = [f"{times[name][count]:.2f} s | {times[name][count] / times[name][counts[0]]:.2f}x" for name in DEPLOYS]
        print(f"| {count} | " + " | ".join(cells) + " |")
    Path(args.json).write_text(json.dumps({name: {str(k): v for k, v in t.items()} for name, t in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
