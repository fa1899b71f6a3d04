"""The demo box's no-op against pyinfra's floor, measured as a pair on one host.

A benchmark, not a timed test: boots a test host with the speech services (the box `scripts/demo`
converges: llama-server, whisper-server and piper on the CPU), converges it once, then times ``--runs``
interleaved pairs of

+ the no-op: ``pyinfra -y inventory/testbed.py deploys/danarch4090.py`` (every operation "No changes");
+ pyinfra's floor: ``pyinfra -y FLOOR tests/testbed/empty_deploy.py``, the same CLI, host and SSH
  connection, where FLOOR is a plain inventory of the host's connection and the deploy is empty. It
  runs in a scratch directory: pyinfra runs the ``config.py`` of the directory it starts in, and the
  repo's (gpubox's inventory preflight) is gpubox's cost, not pyinfra's;

and prints each one's median and range and the ratio of the medians (the goal: <= 2x).
``--config PATH`` times a host that is up and converged already (the demo's `.cache/testbed.json`).

    scripts/bench-e2e --noop [--runs 9] [--config PATH]   (runs this module)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.testbed import booted_host, ccache_dir, inventory_config, llama_cpp_repo
from tests.testbed.bench_fleet import EMPTY, ROOT, floor_inventory, timed_pyinfra
from tests.testbed.config import TestbedConfig
from tests.testbed.speech import WHISPER_REPO_MOUNT, speech_config
from tests.testbed.whisper_assets import whisper_cpp_repo

FULL = "deploys/danarch4090.py"


@contextlib.contextmanager
def converged_demo_box(scratch: Path) -> Iterator[Path]:
    """A booted speech host converged with the full deploy; yields its config's path."""
    repo, _ = llama_cpp_repo()
    whisper_repo, _ = whisper_cpp_repo()
    with booted_host(
        binds_ro=[(repo, "/srv/llama.cpp.git"), (whisper_repo, WHISPER_REPO_MOUNT)],
        binds=[(ccache_dir(), "/var/cache/ccache-shared")],
    ) as host:
        config = inventory_config(host.pyinfra_host_name(), host.pyinfra_host_data()).changed(
            jobs=os.cpu_count() or 2, **speech_config()
        )
        path = scratch / "config.json"
        config.write(path)
        print(f"converging the demo box: {FULL} ...", flush=True)
        print(f"  {timed_pyinfra('inventory/testbed.py', FULL, path):.1f} s", flush=True)
        yield path


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):.2f} s (median of {len(times)}; {min(times):.2f}-{max(times):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--config", type=Path, help="a converged test host's config (default: boot one)")
    parser.add_argument("--json", default=str(ROOT / ".cache" / "bench-noop.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        config_path = args.config.resolve() if args.config else stack.enter_context(converged_demo_box(Path(scratch)))
        floor = floor_inventory(TestbedConfig.read(config_path), Path(scratch) / "floor_inventory.py")
        noop: list[float] = []
        empty: list[float] = []
        for run in range(args.runs):  # interleaved: whatever else the machine does falls on both alike
            noop.append(timed_pyinfra("inventory/testbed.py", FULL, config_path))
            empty.append(timed_pyinfra(str(floor), str(EMPTY), config_path, cwd=Path(scratch)))
            print(f"run {run + 1}: no-op {noop[-1]:.2f} s, floor {empty[-1]:.2f} s", flush=True)
    ratio = statistics.median(noop) / statistics.median(empty)
    pair_ratios = [one / other for one, other in zip(noop, empty, strict=True)]
    print()
    print(f"no-op of the demo box ({FULL})   {summary(noop)}")
    print(f"pyinfra's floor (empty deploy, same host)  {summary(empty)}")
    print(f"ratio no-op / floor                        {ratio:.2f}x (of the medians)")
    print(f"ratio of each pair                         {statistics.median(pair_ratios):.2f}x median, "
          f"{min(pair_ratios):.2f}-{max(pair_ratios):.2f}")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    numbers = {"noop_s": noop, "floor_s": empty, "ratio_of_medians": ratio, "pair_ratios": pair_ratios}
    Path(args.json).write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
