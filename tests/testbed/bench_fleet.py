"""Fleet scaling: a no-op converge of the full deploy and of the observability deploy at 1, 2, 4, 8, 16 hosts.

A benchmark, not a timed test: boots as many test hosts as the largest count (tests.testbed), converges
them all once (box, then monitoring; the first host is the monitor, the others run agents), then times
no-op runs of each deploy over the first 1, 2, 4, 8 and 16 hosts, and pyinfra's floor over the same
hosts (the CLI, SSH and an empty deploy, as ``tests.testbed.bench_noop`` times it for one host),
``--rounds`` times in turn (each round runs every count once, so what else the machine does falls on
all counts alike), and prints a table of the medians with the ratio to 1 host. pyinfra runs the hosts
of a run in parallel; the goal is <= 1.5x the 1-host time at 16 hosts. Here the test hosts share the
controller's cores, so the floor's own ratio says how much of it the machine allows.

    scripts/bench-fleet [--hosts 1,2,4,8,16] [--rounds 5] [--config PATH] [--json .cache/bench-fleet.json]
    (runs this module; ``--config`` times a fleet that is up and converged already)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from gpubox.bench import free_port
from tests.testbed import booted_host, cache_dir, ccache_dir, inventory_config, llama_cpp_repo
from tests.testbed.config import FleetHost, TestbedConfig

ROOT = Path(__file__).resolve().parents[2]

PYINFRA = str(ROOT / ".venv" / "bin" / "pyinfra")
DEPLOYS = {"full deploy (danarch4090.py)": "deploys/danarch4090.py", "observability.py": "deploys/observability.py"}
FLOOR = "pyinfra's floor (empty deploy)"
EMPTY = ROOT / "tests" / "testbed" / "empty_deploy.py"


def floor_inventory(config: TestbedConfig, path: Path) -> Path:
    """A plain pyinfra inventory of the config's hosts (the first, and its fleet): their connections, nothing else."""
    hosts = [(config.host_name, config.host_data), *((more.host_name, more.host_data) for more in config.fleet)]
    path.write_text(f"testbed = {hosts!r}\n")
    return path


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


@contextlib.contextmanager
def converged_fleet(count: int, scratch: Path) -> Iterator[TestbedConfig]:
    """``count`` booted test hosts, each a converged box with its monitoring (the first the monitor)."""
    repo, _ = llama_cpp_repo()
    archives = cache_dir() / "apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        booted = [
            stack.enter_context(
                booted_host(
                    binds_ro=[(repo, "/srv/llama.cpp.git")],
                    binds=[(ccache_dir(), "/var/cache/ccache-shared"), (archives, "/var/cache/apt/archives")],
                )
            )
            for _ in range(count)
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
        for deploy in DEPLOYS.values():
            print(f"converging {len(booted)} hosts: {deploy} ...", flush=True)
            # one host at a time: sixteen builds and smoke tests at once on 2 cores starve each other
            print(f"  {run(deploy, everything, scratch / 'converge.json', '--parallel', '1'):.1f} s", flush=True)
        yield everything


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", type=Path, help="a converged fleet's config, its hosts up (default: boot them)")
    parser.add_argument("--json", default=str(ROOT / ".cache" / "bench-fleet.json"))
    args = parser.parse_args()
    counts = [int(count) for count in args.hosts.split(",")]
    names = [*DEPLOYS, FLOOR]
    runs: dict[str, dict[int, list[float]]] = {name: {count: [] for count in counts} for name in names}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        scratch_dir = Path(scratch)
        if args.config:
            everything = TestbedConfig.read(args.config)
        else:
            everything = stack.enter_context(converged_fleet(max(counts), scratch_dir))
        config_path = scratch_dir / "config.json"
        floor_dir = scratch_dir / "floor"  # no config.py there: the floor is pyinfra's alone
        floor_dir.mkdir()
        for round_number in range(args.rounds):
            for count in counts:
                config = fleet_config(everything, count)
                for name in names:
                    if name == FLOOR:
                        config.write(config_path)
                        inventory = floor_inventory(config, floor_dir / "inventory.py")
                        seconds = timed_pyinfra(str(inventory), str(EMPTY), config_path, cwd=floor_dir)
                    else:
                        seconds = run(DEPLOYS[name], config, config_path)
                    runs[name][count].append(seconds)
                    print(f"round {round_number + 1}: {name} at {count} host(s): {seconds:.2f} s", flush=True)
    times = {name: {count: statistics.median(all_runs) for count, all_runs in by.items()} for name, by in runs.items()}
    print(f"\nmedians of {args.rounds} rounds")
    print("| hosts | " + " | ".join(f"{name} | ratio to 1 host" for name in times) + " |")
    print("| --- | " + " | ".join("--- | ---" for _ in times) + " |")
    for count in counts:
        cells = [f"{times[name][count]:.2f} s | {times[name][count] / times[name][counts[0]]:.2f}x" for name in times]
        print(f"| {count} | " + " | ".join(cells) + " |")
    Path(args.json).write_text(json.dumps({name: {str(k): v for k, v in t.items()} for name, t in runs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
