"""Benchmark llama-server configurations: slots, drafter on/off, draft n-max, context fill.

Two ways to run:

- against a running server (`gpubox bench --url`): its configuration is fixed, so the sweep is the
  number of requests in flight and the prompt length;
- by starting temporary local llama-server instances of variants of a service
  (`bench_variant`: the service with the configuration's slots, drafter and a loopback port),
  each rendered by the service's own flag table.

Per configuration: single-stream tok/s (llama-server's own `timings.predicted_per_second`, median
of sequential requests), aggregate tok/s (generated tokens / wall seconds with `parallel` requests
in flight, prompt processing included), draft acceptance, and p50/p95 request latency. A
bandwidth roofline (peak memory bandwidth / bytes read per token) says how close decode gets to
the memory bound; drafting can beat it, since a verified draft yields several tokens per read.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from rich.table import Table

from gpubox.smoke import (
    CompletionTimings,
    Transport,
    acceptance_of,
    complete,
    requests_transport,
    wait_until_healthy,
)
from gpubox.spec import problems_from
from gpubox.unit import server_environment

if TYPE_CHECKING:
    from gpubox.servers.llama import LlamaServer

ContextFill = Literal["short", "long"]
Objective = Literal["single", "aggregate"]

DEFAULT_PARALLELS = (1, 2, 4)
DEFAULT_DRAFT_N_MAX = (1, 2, 3, 4)
DEFAULT_LONG_PROMPT_TOKENS = 384
SHORT_PROMPT = "Write a short story about a lighthouse keeper who finds a map."
# Varied prose for the long prompt: repeating one sentence would make drafting look better than it is.
_FILLER = (
    "The harbour town woke before dawn. Fishermen checked their nets, bakers lit the ovens, and the "
    "ferry captain counted the crates of apples bound for the islands. A storm had passed in the night, "
    "leaving seaweed on the quay and a broken mast against the lighthouse steps. Children ran along the "
    "sea wall looking for shells, while the harbour master wrote the tide times on a slate by the office "
    "door. Nobody noticed the small boat drifting past the breakwater, its sail torn and its deck empty, "
    "until the keeper rang the bell three times. "
)
SERVER_START_TIMEOUT_S = 300.0


class BenchConfig(BaseModel):
    """One point of the sweep. `draft` None: a running server drafts (or not) as configured."""

    model_config = ConfigDict(frozen=True)

    parallel: int
    draft: bool | None
    draft_n_max: int | None = None
    context: ContextFill

    @property
    def label(self) -> str:
        if self.draft is None:
            return f"{self.parallel} in flight, {self.context}"
        elif self.draft:
            drafting = f"draft n-max {self.draft_n_max}"
        else:
            drafting = "no draft"
        return f"np={self.parallel} {drafting} {self.context}"

    @property
    def server_key(self) -> tuple[int, bool | None, int | None]:
        """Configurations sharing a key run on one server start (only the prompt differs)."""
        return (self.parallel, self.draft, self.draft_n_max)


class BenchMeasurement(BaseModel):
    config: BenchConfig
    prompt_tokens: int
    single_tokens_per_second: float
    aggregate_tokens_per_second: float
    draft_tokens: int
    accepted_tokens: int
    acceptance: float | None
    latency_p50_s: float
    latency_p95_s: float
    requests: int
    roofline_tokens_per_second: float | None = None

    @property
    def single_roofline_fraction(self) -> float | None:
        if self.roofline_tokens_per_second is None:
            return None
        return self.single_tokens_per_second / self.roofline_tokens_per_second

    def score(self, objective: Objective) -> float:
        return self.single_tokens_per_second if objective == "single" else self.aggregate_tokens_per_second


class BenchReport(BaseModel):
    target: str
    objective: Objective
    n_predict: int
    bandwidth_bytes_per_s: float | None
    bytes_per_token: int | None
    results: list[BenchMeasurement]

    @property
    def best(self) -> BenchMeasurement:
        return max(self.results, key=lambda result: result.score(self.objective))


def sweep(
    parallels: Sequence[int],
    drafter: bool,
    draft_n_max_values: Sequence[int],
    contexts: Sequence[ContextFill],
) -> list[BenchConfig]:
    """Every configuration: each parallel, drafter off (and on with each n-max when there is one), each context."""
    configs: list[BenchConfig] = []
    for parallel in parallels:
        drafting: list[tuple[bool, int | None]] = [(False, None)]
        if drafter:
            drafting += [(True, n_max) for n_max in draft_n_max_values]
        for draft, n_max in drafting:
            configs += [
                BenchConfig(parallel=parallel, draft=draft, draft_n_max=n_max, context=context) for context in contexts
            ]
    return configs


def quick_sweep(service: LlamaServer | None) -> list[BenchConfig]:
    """Few configurations for slow (CPU) runs: one slot, short prompt, drafter off and at its n-max."""
    if service is None:
        return [BenchConfig(parallel=1, draft=None, context="short")]
    configs = [BenchConfig(parallel=1, draft=False, context="short")]
    if service.drafts:
        configs.append(BenchConfig(parallel=1, draft=True, draft_n_max=service.setting("spec_draft_n_max"),
                                   context="short"))
    return configs


def long_prompt_tokens(ctx_size: int, max_parallel: int, n_predict: int, cap: int = DEFAULT_LONG_PROMPT_TOKENS) -> int:
    """Tokens for the long prompt: at most `cap`, and at most half a slot's context less the generation.

    Each slot gets ctx_size / parallel; one prompt is used for every configuration so they compare.
    """
    per_slot = ctx_size // max_parallel
    return max(16, min(cap, per_slot // 2 - n_predict))


def bench_prompt(context: ContextFill, target_tokens: int) -> str:
    """The prompt for a context fill; the long one is about `target_tokens` tokens (~0.75 words each)."""
    if context == "short":
        return SHORT_PROMPT
    filler_words = _FILLER.split()
    words_needed = max(1, int(target_tokens * 0.75))
    repeated = (filler_words * (words_needed // len(filler_words) + 1))[:words_needed]
    return " ".join(repeated) + "\n\nWhat happened in the harbour town? Continue the story."


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: with few requests it names a request that happened)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def roofline_tokens_per_second(bandwidth_bytes_per_s: float, bytes_per_token: int) -> float:
    """Decode's memory bound: every generated token reads the weights once (dense model, batch 1)."""
    return bandwidth_bytes_per_s / bytes_per_token


def _concurrent_round(
    transport: Transport, prompt: str, n_predict: int, in_flight: int, timeout_s: float
) -> tuple[list[tuple[CompletionTimings, float]], float]:
    """`in_flight` requests at once; their results and the round's wall-clock seconds."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        futures = [
            pool.submit(complete, transport, prompt, n_predict, timeout_s, ignore_eos=True) for _ in range(in_flight)
        ]
        results = [future.result() for future in futures]
    return results, time.monotonic() - started


def measure(
    transport: Transport,
    config: BenchConfig,
    prompt: str,
    n_predict: int,
    *,
    single_runs: int = 3,
    aggregate_rounds: int = 2,
    timeout_s: float = 600.0,
) -> BenchMeasurement:
    """Measure one configuration on a server already running it (one warm-up request first)."""
    complete(transport, prompt, min(8, n_predict), timeout_s, ignore_eos=True)
    singles = [complete(transport, prompt, n_predict, timeout_s, ignore_eos=True) for _ in range(single_runs)]
    if config.parallel > 1:
        rounds = [
            _concurrent_round(transport, prompt, n_predict, config.parallel, timeout_s) for _ in range(aggregate_rounds)
        ]
        concurrent = [item for results, _ in rounds for item in results]
        generated = sum(timings.predicted_n for timings, _ in concurrent)
        aggregate = generated / sum(wall for _, wall in rounds)
    else:
        concurrent = []
        aggregate = sum(timings.predicted_n for timings, _ in singles) / sum(elapsed for _, elapsed in singles)
    every = singles + concurrent
    drafted, accepted, acceptance = acceptance_of(timings for timings, _ in every)
    latencies = [elapsed for _, elapsed in every]
    return BenchMeasurement(
        config=config,
        prompt_tokens=int(statistics.median(timings.prompt_n for timings, _ in singles)),
        single_tokens_per_second=statistics.median(timings.predicted_per_second for timings, _ in singles),
        aggregate_tokens_per_second=aggregate,
        draft_tokens=drafted,
        accepted_tokens=accepted,
        acceptance=acceptance,
        latency_p50_s=percentile(latencies, 0.5),
        latency_p95_s=percentile(latencies, 0.95),
        requests=len(every),
    )


def bench_variant(service: LlamaServer, config: BenchConfig, port: int) -> LlamaServer:
    """The service as one bench configuration runs it: its slots, its drafter (or none), 127.0.0.1:`port`.

    A copy, not a validated spec: the sweep deliberately runs what the rules refuse (drafting at
    parallel > 1) to measure it. The API key file is dropped: the server listens on loopback only.
    """
    update: dict[str, object] = {"parallel": config.parallel, "host": "127.0.0.1", "port": port, "api_key_file": None}
    if config.draft:
        update["spec_type"] = service.spec_type if service.drafts else "draft-simple"
        update["spec_draft_n_max"] = config.draft_n_max
    elif config.draft is not None:
        update |= service.DRAFTING_OFF
    return service.model_copy(update=update)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerStartError(RuntimeError):
    """A temporary llama-server exited or never became healthy; the message ends with its log."""


def _log_tail(log: IO[bytes], limit: int = 2000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


@contextmanager
def local_server(argv: list[str], env: dict[str, str], port: int, log: IO[bytes]) -> Iterator[Transport]:
    """Start llama-server, wait for /health, yield a transport to it, and stop it afterwards."""
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def sleep_unless_exited(seconds: float) -> None:
        if process.poll() is not None:
            raise ServerStartError(f"llama-server exited with {process.returncode}:\n{_log_tail(log)}")
        time.sleep(seconds)

    try:
        transport = requests_transport(f"http://127.0.0.1:{port}")
        wait = wait_until_healthy(transport, SERVER_START_TIMEOUT_S, sleep=sleep_unless_exited, poll_interval_s=0.25)
        if not wait.healthy:
            raise ServerStartError(f"llama-server not healthy: {wait.last_answer}\n{_log_tail(log)}")
        yield transport
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _with_roofline(result: BenchMeasurement, roofline: float | None) -> BenchMeasurement:
    return result.model_copy(update={"roofline_tokens_per_second": roofline})


Progress = Callable[[BenchMeasurement], None]


def bench_url(
    transport: Transport,
    configs: Sequence[BenchConfig],
    *,
    n_predict: int,
    long_tokens: int,
    single_runs: int = 3,
    aggregate_rounds: int = 2,
    roofline: float | None = None,
    progress: Progress | None = None,
) -> list[BenchMeasurement]:
    """Measure each configuration's request pattern against one running server."""
    wait = wait_until_healthy(transport, 30.0)
    if not wait.healthy:
        raise ServerStartError(f"the server is not healthy: {wait.last_answer}")
    return _measure_each(transport, configs, n_predict, long_tokens, single_runs, aggregate_rounds, roofline, progress)


def _measure_each(
    transport: Transport,
    configs: Sequence[BenchConfig],
    n_predict: int,
    long_tokens: int,
    single_runs: int,
    aggregate_rounds: int,
    roofline: float | None,
    progress: Progress | None,
) -> list[BenchMeasurement]:
    """Measure configurations one after another on one server, reporting each as it is done."""
    results: list[BenchMeasurement] = []
    for config in configs:
        prompt = bench_prompt(config.context, long_tokens)
        result = measure(
            transport, config, prompt, n_predict, single_runs=single_runs, aggregate_rounds=aggregate_rounds
        )
        results.append(_with_roofline(result, roofline))
        if progress is not None:
            progress(results[-1])
    return results


def bench_local(
    service: LlamaServer,
    binary: str,
    configs: Sequence[BenchConfig],
    *,
    n_predict: int,
    long_tokens: int,
    single_runs: int = 3,
    aggregate_rounds: int = 2,
    roofline: float | None = None,
    environment: dict[str, str] | None = None,
    progress: Progress | None = None,
    log_dir: Path | None = None,
) -> list[BenchMeasurement]:
    """Start one temporary server per (parallel, drafter, n-max) and measure each context fill on it.

    The environment is the caller's (`environment`, default os.environ) overlaid with the service's
    own (`server_environment`: CUDA_VISIBLE_DEVICES), as systemd would give it.
    """
    env = {**(environment if environment is not None else os.environ), **server_environment(service)}
    results: list[BenchMeasurement] = []
    by_server: dict[tuple[int, bool | None, int | None], list[BenchConfig]] = {}
    for config in configs:
        by_server.setdefault(config.server_key, []).append(config)
    for server_configs in by_server.values():
        port = free_port()
        argv = bench_variant(service, server_configs[0], port).argv(binary)
        log_path = (log_dir or Path("/tmp")) / f"gpubox-bench-{service.name}-{port}.log"
        with open(log_path, "w+b") as log, local_server(argv, env, port, log) as transport:
            results += _measure_each(
                transport, server_configs, n_predict, long_tokens, single_runs, aggregate_rounds, roofline, progress
            )
    return results


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def result_notes(result: BenchMeasurement, report: BenchReport) -> str:
    notes = [f"prompt {result.prompt_tokens} tok"]
    if result.acceptance is not None:
        notes.append(f"accept {result.acceptance:.0%} ({result.accepted_tokens}/{result.draft_tokens})")
    if result is report.best:
        notes.append(f"best for {report.objective}")
    return ", ".join(notes)


def bench_table(report: BenchReport) -> Table:
    """The seed-style table: configuration, tok/s, notes; the best row for the objective starred."""
    table = Table(title=f"gpubox bench: {report.target} (n_predict {report.n_predict}, objective {report.objective})")
    columns = ("configuration", "tok/s single", "tok/s aggregate", "p50 s", "p95 s", "roofline", "notes")
    for column in columns:
        table.add_column(column, justify="left" if column in ("configuration", "notes") else "right")
    best = report.best
    for result in report.results:
        roofline = (
            "-"
            if result.roofline_tokens_per_second is None
            else f"{_fraction(result.single_roofline_fraction)} of {result.roofline_tokens_per_second:.0f}"
        )
        star = "★ " if result is best else ""
        table.add_row(
            star + result.config.label,
            f"{result.single_tokens_per_second:.1f}",
            f"{result.aggregate_tokens_per_second:.1f}",
            f"{result.latency_p50_s:.2f}",
            f"{result.latency_p95_s:.2f}",
            roofline,
            result_notes(result, report),
            style="bold green" if result is best else None,
        )
    return table


def write_plot(report: BenchReport, path: Path) -> None:
    """Horizontal bars of single and aggregate tok/s per configuration; best starred, roofline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [("★ " if result is report.best else "") + result.config.label for result in report.results]
    positions = list(range(len(report.results)))
    height = 0.38
    figure, axes = plt.subplots(figsize=(9, 1.4 + 0.45 * len(labels)))
    singles = [result.single_tokens_per_second for result in report.results]
    aggregates = [result.aggregate_tokens_per_second for result in report.results]
    single_bars = axes.barh(
        [p - height / 2 for p in positions], singles, height, label="single stream", color="#4c72b0"
    )
    aggregate_bars = axes.barh(
        [p + height / 2 for p in positions], aggregates, height, label="aggregate", color="#dd8452"
    )
    for bars in (single_bars, aggregate_bars):
        axes.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
    best_index = report.results.index(report.best)
    best_bar = (single_bars if report.objective == "single" else aggregate_bars)[best_index]
    best_bar.set_edgecolor("black")
    best_bar.set_linewidth(1.5)
    tallest = max(singles + aggregates)
    rooflines = sorted(
        {result.roofline_tokens_per_second for result in report.results if result.roofline_tokens_per_second}
    )
    drawn = [roofline for roofline in rooflines if roofline <= 3 * tallest]
    for roofline in rooflines:
        # A roofline far beyond the bars would squash them to slivers: name it instead of drawing it.
        if roofline in drawn:
            axes.axvline(roofline, color="grey", linestyle="--", label=f"bandwidth roofline {roofline:.0f} tok/s")
        else:
            axes.plot([], [], " ", label=f"bandwidth roofline {roofline:.0f} tok/s (off scale)")
    axes.set_xlim(0, max([tallest * 1.15, *drawn]) * 1.05)
    axes.set_yticks(positions, labels)
    axes.invert_yaxis()
    axes.set_xlabel("tokens/s")
    axes.set_title(f"{report.target}: tok/s per configuration (best for {report.objective} starred)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def suggested_changes(service: LlamaServer, best: BenchConfig) -> dict[str, object]:
    """Field changes (dotted for nested fields) that make the service run the winner; only those that differ.

    A value of None means: remove the field (back to its default).
    """
    target: dict[str, object] = {"parallel": best.parallel}
    if best.draft is False and service.drafts:
        target |= service.DRAFTING_OFF
        if service.smoke is not None and service.smoke.min_acceptance is not None:
            target["smoke.min_acceptance"] = None
    if best.draft:
        target["spec_draft_n_max"] = best.draft_n_max
        if not service.drafts:
            target["spec_type"] = "draft-simple"
        target["allow_parallel_speculation"] = best.parallel > 1 or service.allow_parallel_speculation
    if service.ctx_size % best.parallel:
        target["ctx_size"] = service.ctx_size - service.ctx_size % best.parallel
    current = service.model_dump()
    return {field: value for field, value in target.items() if _dotted_get(current, field) != value}


def _dotted_get(data: dict[str, object], dotted: str) -> object:
    value: object = data
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def apply_changes(service: LlamaServer, changes: dict[str, object]) -> dict[str, object]:
    """The service's data with the (dotted) changes applied, ready for validation."""
    data: dict[str, object] = service.model_dump()
    for dotted, value in changes.items():
        *parents, field = dotted.split(".")
        node = data
        for part in parents:
            child = node[part]
            if not isinstance(child, dict):
                raise KeyError(f"{dotted}: {part} is not set on service {service.name!r}")
            node = child
        node[field] = value
    return data


def check_suggestion(service: LlamaServer, changes: dict[str, object]) -> list[str]:
    """Problems of the service with the changes applied ([] when the rules accept it)."""
    try:
        type(service).model_validate(apply_changes(service, changes))
    except ValidationError as error:
        return [f"{problem.field}: {problem.message}" for problem in problems_from(error)]
    return []


def _value_end(text: str, start: int) -> int:
    """Index of the top-level comma (or closing bracket) ending a Python value starting at `start`."""
    depth = 0
    quote: str | None = None
    index = start
    while index < len(text):
        char = text[index]
        if quote is not None:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char == "#":
            newline = text.find("\n", index)
            index = len(text) if newline < 0 else newline
            continue
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                return index
            depth -= 1
        elif char == "," and depth == 0:
            return index
        index += 1
    return index


def _literal(value: object) -> str:
    """A Python literal for an inventory edit; strings in double quotes, as ruff formats them."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def edit_inventory_text(text: str, service_name: str, changes: dict[str, object]) -> tuple[str, list[str]]:
    """The inventory text with each `field=value,` keyword argument edited; fields it could not place.

    Edits a field only where it appears exactly once as a keyword argument on its own line (as in
    inventory/home.py); a new field goes after the service's `name=...,` line. The rest is left
    to the user, listed by name.
    """
    unplaced: list[str] = []
    for dotted, value in changes.items():
        field = dotted.rsplit(".", 1)[-1]
        matches = list(re.finditer(rf"(?m)^([ \t]*){field}\s*=\s*", text))
        if len(matches) > 1:
            unplaced.append(dotted)
            continue
        if matches:
            match = matches[0]
            end = _value_end(text, match.end())
            line_end = text.find("\n", end)
            line_end = len(text) if line_end < 0 else line_end + 1
            replacement = "" if value is None else f"{match.group(1)}{field}={_literal(value)},\n"
            text = text[: match.start()] + replacement + text[line_end:]
            continue
        if value is None:
            continue
        anchor = re.search(rf"(?m)^([ \t]*)name\s*=\s*[\"']{re.escape(service_name)}[\"'],[^\n]*\n", text)
        if anchor is None or "." in dotted:
            unplaced.append(dotted)
            continue
        insertion = f"{anchor.group(1)}{field}={_literal(value)},\n"
        text = text[: anchor.end()] + insertion + text[anchor.end() :]
    return text, unplaced


def inventory_diff(path: Path, service_name: str, changes: dict[str, object]) -> tuple[str, list[str]]:
    """A unified diff suggesting the changes to the inventory file (never written), and unplaced fields."""
    original = path.read_text()
    edited, unplaced = edit_inventory_text(original, service_name, changes)
    diff = difflib.unified_diff(
        original.splitlines(keepends=True), edited.splitlines(keepends=True), f"{path}", f"{path} (suggested)"
    )
    return "".join(diff), unplaced


def parallel_speculation_advice(report: BenchReport) -> str | None:
    """When drafting with parallel > 1 wins, the evidence and how to allow it; None otherwise."""
    best = report.best
    if not best.config.draft or best.config.parallel <= 1:
        return None
    objective = report.objective
    same_slots_no_draft = [
        result
        for result in report.results
        if result.config.parallel == best.config.parallel and not result.config.draft
    ]
    evidence = [f"{best.config.label}: {best.score(objective):.1f} tok/s ({objective})"]
    if same_slots_no_draft:
        rival = max(same_slots_no_draft, key=lambda result: result.score(objective))
        evidence.append(f"{rival.config.label}: {rival.score(objective):.1f} tok/s")
    return (
        f"drafting with parallel={best.config.parallel} won ({'; vs '.join(evidence)}). The spec rules refuse "
        f"a drafter with parallel > 1 (the parallel trap) unless you set allow_parallel_speculation=True on the "
        f"service: do so, and keep this bench's JSON as the evidence."
    )
