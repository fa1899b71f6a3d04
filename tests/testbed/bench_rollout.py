"""Rollouts through the gateway under load: a benchmark that stops by itself (not a timed test).

Boots the three hosts of tests/e2e/test_rollout.py (a gateway-only host, two llama-servers with SmolLM2 on
the CPU), converges them, then with ``--clients`` threads sending chat completions through the gateway
(streamed and not, ``tests/testbed/rollout_load.py``):

1. ``--baseline`` seconds of load alone: p50/p99 latency before;
2. ``gpubox rollout`` of a new ctx_size (restarts both llama-servers): its duration, p50/p99 during it, failed
   requests (goal 0), each node's restarts (goal 1) and the fewest servers UP in any ``show stat`` (goal >= 1);
3. the same with a new state whose smoke test cannot pass: the canary rolled back, the rollout stopped;
4. for comparison, a plain ``pyinfra INVENTORY deploys/danarch4090.py -y`` of another ctx_size (both nodes at
   once): its failed requests;
5. the gateway's added latency: ``--pairs`` sequential non-streamed completions, alternately straight to a
   node (its own key) and through the gateway (the client key).

    scripts/bench-rollout [--clients 3] [--baseline 20] [--pairs 30] [--json .cache/bench-rollout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.testbed import ccache_dir, llama_cpp_repo, smollm2_gguf
from tests.testbed.host import TestHost
from tests.testbed.rollout_load import (
    FULL,
    GPUBOX,
    INVENTORY,
    PYINFRA,
    ROOT,
    Load,
    Request,
    Watch,
    changed,
    client_key,
    environment,
    failed,
    failing_seconds,
    fleet_hosts,
    fleet_settings,
    gateway_url,
    node_key,
    one_request,
    percentile,
    run,
    setting,
)


def latencies(requests_: list[Request]) -> str:
    seconds = [request.seconds for request in requests_]
    return f"{percentile(seconds, 0.5):.2f} / {percentile(seconds, 0.99):.2f}"


def under_load(
    env: dict[str, str], gateway: TestHost, nodes: tuple[TestHost, TestHost], clients: int, *argv: str
) -> dict[str, object]:
    """``argv`` run with the load going and the watch sampling: what it did to the requests and the nodes."""
    watch = Watch(gateway, nodes).start()
    load = Load(gateway_url(env), client_key(gateway), clients=clients).start()
    time.sleep(3)  # the load running before the change starts
    started = time.monotonic()
    try:
        result, seconds = run(env, *argv, echo=False)
    finally:
        ended = time.monotonic()
        everything = load.stop()
        watch.stop()
    during = [request for request in everything if started <= request.started < ended]
    misses = failed(everything)
    for request in misses[:5]:
        print(f"  failed: {request}", flush=True)
    if result.returncode not in (0, 1):
        print((result.stdout + result.stderr)[-4000:])
    return {
        "exit": result.returncode,
        "seconds": seconds,
        "requests": len(everything),
        "during": len(during),
        "p50_during": percentile([r.seconds for r in during], 0.5),
        "p99_during": percentile([r.seconds for r in during], 0.99),
        "failed": len(misses),
        "failing_s": failing_seconds(everything),
        "restarts": [watch.restarts(0), watch.restarts(1)],
        "fewest_up": watch.fewest_up(),
        "samples": len(watch.stats),
        "output_tail": result.stdout[-1500:],
    }


def gateway_overhead(env: dict[str, str], gateway: TestHost, node: TestHost, pairs: int) -> dict[str, float]:
    """Median seconds of a 4-token completion straight to a node and through the gateway, interleaved."""
    direct_url = f"http://127.0.0.1:{setting(env, 'llama_ports')[0]}/v1/chat/completions"  # type: ignore[index]
    via_url = f"{gateway_url(env)}/v1/chat/completions"
    keys = {"direct": (direct_url, node_key(node)), "gateway": (via_url, client_key(gateway))}
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(pairs):
        for name, (url, key) in keys.items():
            started = time.monotonic()
            ok, why = one_request(url, key, stream=False, max_tokens=4)
            if not ok:
                raise SystemExit(f"{name} request failed: {why}")
            times[name].append(time.monotonic() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds of load before any change (after "
                        "10 s of warm-up)")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--json", default=str(ROOT / ".cache" / "bench-rollout.json"))
    args = parser.parse_args()
    repo, commit = llama_cpp_repo()
    with (
        tempfile.TemporaryDirectory() as store,
        fleet_hosts(repo, ccache_dir()) as (gateway, node1, node2),
    ):
        nodes = (node1, node2)
        env = environment(fleet_settings(gateway, nodes, commit, smollm2_gguf()), Path(store), dict(os.environ))
        print("converging the gateway and both nodes ...", flush=True)
        result, seconds = run(env, PYINFRA, "-y", INVENTORY, FULL, echo=False)
        if result.returncode != 0:
            raise SystemExit((result.stdout + result.stderr)[-4000:])
        print(f"  {seconds:.0f} s", flush=True)
        print(f"load alone for {args.baseline:.0f} s (after 10 s of warm-up) ...", flush=True)
        load = Load(gateway_url(env), client_key(gateway), clients=args.clients).start()
        time.sleep(10)  # the first requests page the model in
        started = time.monotonic()
        time.sleep(args.baseline)
        load.stop()
        baseline = load.between(started, started + args.baseline)
        rows: dict[str, dict[str, object]] = {}
        print("gpubox rollout (ctx_size 2048 -> 4096) under load ...", flush=True)
        new = changed(env, ctx_sizes=[4096, 4096])
        rows["gpubox rollout"] = under_load(new, gateway, nodes, args.clients, GPUBOX, "rollout", INVENTORY, FULL)
        print("gpubox rollout of a state whose smoke test fails, under load ...", flush=True)
        bad = changed(new, ctx_sizes=[3072, 3072], min_tokens_per_second=[1_000_000, 1_000_000])
        rows["gpubox rollout, canary misses its smoke test"] = under_load(
            bad, gateway, nodes, args.clients, GPUBOX, "rollout", INVENTORY, FULL
        )
        print("plain pyinfra (ctx_size 4096 -> 2048, both nodes at once) under load ...", flush=True)
        rows["plain pyinfra -y"] = under_load(env, gateway, nodes, args.clients, PYINFRA, "-y", INVENTORY, FULL)
        print(f"gateway overhead: {args.pairs} pairs of sequential completions ...", flush=True)
        overhead = gateway_overhead(env, gateway, node1, args.pairs)
    before = [request.seconds for request in baseline]
    print()
    print(f"load: {args.clients} clients, chat completions of 8 tokens through the gateway, streamed and not")
    print(f"before any change: {len(baseline)} requests, {len(failed(baseline))} failed, p50 / p99 "
          f"{percentile(before, 0.5):.2f} / {percentile(before, 0.99):.2f} s")  # fmt: skip
    print()
    print("| change under load | exit | duration | requests during | p50 / p99 during | failed requests "
          "| failing for | restarts n1, n2 | fewest UP in show stat (samples) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        restarts = row["restarts"]
        assert isinstance(restarts, list)
        print(f"| {name} | {row['exit']} | {row['seconds']:.0f} s | {row['during']} | {row['p50_during']:.2f} / "
              f"{row['p99_during']:.2f} s | {row['failed']} of {row['requests']} | {row['failing_s']:.1f} s "
              f"| {restarts[0]}, {restarts[1]} | {row['fewest_up']} ({row['samples']}) |")  # fmt: skip
    print()
    added = overhead["gateway"] - overhead["direct"]
    print(f"gateway's added latency (median of {args.pairs}, 4-token completion, one at a time): direct "
          f"{overhead['direct'] * 1000:.1f} ms, through the gateway {overhead['gateway'] * 1000:.1f} ms, "
          f"added {added * 1000:.1f} ms")  # fmt: skip
    report = {
        "baseline": {"requests": len(baseline), "failed": len(failed(baseline)),
                     "p50": percentile(before, 0.5), "p99": percentile(before, 0.99)},
        "changes": {name: {k: v for k, v in row.items() if k != "output_tail"} for name, row in rows.items()},
        "overhead": overhead,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
