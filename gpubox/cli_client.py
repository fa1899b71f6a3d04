"""`gpubox smoke` and `gpubox bench`: the HTTP client side of the CLI (registered by gpubox.cli)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from rich.console import Console

from gpubox.bench import (
    DEFAULT_DRAFT_N_MAX,
    DEFAULT_LONG_PROMPT_TOKENS,
    DEFAULT_PARALLELS,
    BenchConfig,
    BenchMeasurement,
    BenchReport,
    ContextFill,
    Objective,
    ServerStartError,
    bench_local,
    bench_table,
    bench_url,
    check_suggestion,
    inventory_diff,
    long_prompt_tokens,
    parallel_speculation_advice,
    quick_sweep,
    roofline_tokens_per_second,
    suggested_changes,
    sweep,
    write_plot,
)
from gpubox.box import Box
from gpubox.inventory import InventoryError, inventory_boxes
from gpubox.keys import KeyFileError, first_line_key
from gpubox.smoke import requests_transport, run_smoke, smoke_table
from gpubox.spec import SmokeThresholds

if TYPE_CHECKING:
    from gpubox.servers.llama import LlamaServer

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
GB = 1e9


class ApiKeyFileError(Exception):
    """``--api-key-file`` names no readable file, or one without a key."""


def _read_api_key(path: str | None) -> str | None:
    """The first key of an API key file (llama-server's --api-key-file format: one key per line)."""
    if path is None:
        return None
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ApiKeyFileError(
            f"--api-key-file {path}: {error.strerror or error}: give a file whose first line is the service's key "
            f"(on the box: /etc/gpubox/keys/<service>.key, readable by root and the service's user)"
        ) from None
    try:
        return first_line_key(text, f"--api-key-file {path}")
    except KeyFileError as error:
        raise ApiKeyFileError(str(error)) from None


def cmd_smoke(args: argparse.Namespace, console: Console) -> int:
    """Smoke test a running llama-server against thresholds; exit 1 when it fails them."""
    prompts = tuple(args.prompt) if args.prompt else SmokeThresholds.model_fields["prompts"].default
    thresholds = SmokeThresholds(
        min_tokens_per_second=args.min_tok_s,
        min_acceptance=args.min_acceptance,
        prompts=prompts,
        n_predict=args.n_predict,
        runs=args.runs,
        timeout_s=args.timeout,
    )
    try:
        api_key = _read_api_key(args.api_key_file)
    except ApiKeyFileError as error:
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        return EXIT_USAGE
    result = run_smoke(requests_transport(args.url, api_key), thresholds)
    console.print(smoke_table(result))
    for failure in result.failures:
        console.print(f"[bold red]failed[/]: {failure}", highlight=False)
    for note in result.notes:
        console.print(f"[dim]note[/]: {note}", highlight=False)
    if args.json:
        Path(args.json).write_text(result.model_dump_json(indent=2))
    return EXIT_OK if result.passed else EXIT_FAILED


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item.strip())


def _context_list(text: str) -> tuple[ContextFill, ...]:
    contexts = tuple(item.strip() for item in text.split(",") if item.strip())
    for context in contexts:
        if context not in ("short", "long"):
            raise argparse.ArgumentTypeError(f"contexts are 'short' and 'long', got {context!r}")
    return cast(tuple[ContextFill, ...], contexts)


def _find_service(inventory: str, host: str | None, service_name: str | None) -> tuple[Box, LlamaServer]:
    boxes = inventory_boxes(inventory)
    hosts = [host_box for host_box in boxes if host is None or host_box.host == host]
    if not hosts:
        raise InventoryError(f"{inventory}: no gpubox host {host!r}; hosts: {[b.host for b in boxes]}")
    if len(hosts) > 1:
        raise InventoryError(f"{inventory}: several hosts, pick one with --host: {[b.host for b in hosts]}")
    host_box = hosts[0]
    if host_box.box is None:
        problems = "; ".join(f"{problem.field}: {problem.message}" for problem in host_box.problems)
        raise InventoryError(f"{inventory}: host {host_box.host} is refused: {problems}")
    services = host_box.box.chat_servers()
    if service_name is None:
        if len(services) != 1:
            raise InventoryError(f"pick a llama-server with --service: {[s.name for s in services]}")
        return host_box.box, services[0]
    try:
        return host_box.box, host_box.box.llama_server(service_name)
    except KeyError as error:
        raise InventoryError(str(error.args[0])) from error


def _bandwidth_bytes_per_s(args: argparse.Namespace, service: LlamaServer | None, console: Console) -> float | None:
    """--bandwidth-gbs, else the peak of the service's first GPU (or GPU 0) when NVML sees one here."""
    if args.bandwidth_gbs is not None:
        return float(args.bandwidth_gbs) * GB
    try:
        from gpubox.nvml import local_gpus

        gpus = local_gpus()
    except Exception as error:  # noqa: BLE001 - no NVML here is normal; the roofline is optional
        console.print(f"[dim]no roofline: NVML unavailable ({type(error).__name__})[/]")
        return None
    index = service.gpus[0] if service is not None and service.gpus else 0
    for gpu in gpus:
        if gpu.index == index:
            return gpu.peak_memory_bandwidth_bytes_per_s
    return None


def _bytes_per_token(args: argparse.Namespace, service: LlamaServer | None) -> int | None:
    """The target model file's size (dense model, batch 1: all weights read per token)."""
    path = args.model_file or (service.model.path if service is not None else None)
    if path is None or not Path(path).is_file():
        return None
    return Path(path).stat().st_size


def _configs(args: argparse.Namespace, service: LlamaServer | None) -> list[BenchConfig]:
    if args.quick:
        return quick_sweep(service)
    if service is None:
        return [
            BenchConfig(parallel=parallel, draft=None, context=context)
            for parallel in args.parallel or (1,)
            for context in args.contexts
        ]
    return sweep(args.parallel or DEFAULT_PARALLELS, service.drafts, args.draft_n_max, args.contexts)


def _print_progress(console: Console) -> Callable[[BenchMeasurement], None]:
    def show(result: BenchMeasurement) -> None:
        console.print(
            f"  {result.config.label}: {result.single_tokens_per_second:.1f} tok/s single, "
            f"{result.aggregate_tokens_per_second:.1f} aggregate",
            highlight=False,
        )

    return show


def _print_apply(args: argparse.Namespace, report: BenchReport, service: LlamaServer, console: Console) -> None:
    """The winner as a suggested inventory diff: printed, never written."""
    changes = suggested_changes(service, report.best.config)
    if not changes:
        console.print(f"[green]the service already runs the best configuration ({report.best.config.label})[/]")
        return
    problems = check_suggestion(service, changes)
    for problem in problems:
        console.print(f"[bold red]the suggestion is refused[/]: {problem}", highlight=False)
    inventory = Path(args.apply if isinstance(args.apply, str) and args.apply else args.inventory)
    diff, unplaced = inventory_diff(inventory, service.name, changes)
    console.print(f"suggested change to {inventory} (not written; review and apply it yourself):")
    console.print(diff or "(no textual edit found)", markup=False, highlight=False, soft_wrap=True)
    for field in unplaced:
        console.print(f"set by hand: {field}={changes[field]!r}", highlight=False)


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Sweep configurations against --url, or on temporary local servers started from a service's spec."""
    service: LlamaServer | None = None
    box: Box | None = None
    if args.inventory is not None:
        try:
            box, service = _find_service(args.inventory, args.host, args.service)
        except InventoryError as error:
            console.print(f"[bold red]refused[/]: {error}", highlight=False)
            return EXIT_USAGE
    if args.url is None and (service is None or args.llama_server is None):
        console.print("[bold red]usage[/]: give --url URL, or INVENTORY --host --service --llama-server PATH")
        return EXIT_USAGE
    if args.apply is not None and (args.url is not None or service is None):
        console.print("[bold red]usage[/]: --apply needs the local sweep (INVENTORY --llama-server), not --url")
        return EXIT_USAGE
    try:
        api_key = _read_api_key(args.api_key_file)
    except ApiKeyFileError as error:
        console.print(f"[bold red]refused[/]: {error}", highlight=False)
        return EXIT_USAGE
    bandwidth = _bandwidth_bytes_per_s(args, service, console)
    bytes_per_token = _bytes_per_token(args, service)
    roofline = (
        None if bandwidth is None or bytes_per_token is None else roofline_tokens_per_second(bandwidth, bytes_per_token)
    )
    configs = _configs(args, service)
    max_parallel = max(config.parallel for config in configs)
    ctx_size = service.ctx_size if service is not None else args.ctx_size
    long_tokens = long_prompt_tokens(ctx_size, max_parallel, args.n_predict, args.long_tokens)
    progress = _print_progress(console)
    console.print(f"benchmarking {len(configs)} configuration(s)...")
    try:
        if args.url is not None:
            target = args.url
            transport = requests_transport(args.url, api_key)
            results = bench_url(
                transport, configs, n_predict=args.n_predict, long_tokens=long_tokens, single_runs=args.runs,
                aggregate_rounds=args.rounds, roofline=roofline, progress=progress,
            )  # fmt: skip
        else:
            assert service is not None and box is not None
            target = f"{args.host or 'host'}/{service.name}"
            results = bench_local(
                service, args.llama_server, configs, n_predict=args.n_predict,
                long_tokens=long_tokens, single_runs=args.runs, aggregate_rounds=args.rounds, roofline=roofline,
                progress=progress,
            )  # fmt: skip
    except ServerStartError as error:
        console.print(f"[bold red]bench failed[/]: {error}", highlight=False)
        return EXIT_FAILED
    objective: Objective = args.objective
    report = BenchReport(
        target=target, objective=objective, n_predict=args.n_predict, bandwidth_bytes_per_s=bandwidth,
        bytes_per_token=bytes_per_token, results=results,
    )  # fmt: skip
    console.print(bench_table(report))
    Path(args.json).write_text(report.model_dump_json(indent=2))
    write_plot(report, Path(args.plot))
    console.print(f"wrote {args.json} and {args.plot}; best for {objective}: {report.best.config.label}")
    advice = parallel_speculation_advice(report)
    if advice is not None:
        console.print(advice, highlight=False)
    if args.apply is not None and service is not None:
        _print_apply(args, report, service, console)
    return EXIT_OK


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `smoke` and `bench` to gpubox's subcommands."""
    smoke = commands.add_parser("smoke", help="smoke test a running llama-server against thresholds")
    smoke.add_argument("url", help="llama-server's base URL, e.g. http://127.0.0.1:8080")
    smoke.add_argument("--min-tok-s", type=float, required=True, help="minimum median generation tok/s")
    smoke.add_argument("--min-acceptance", type=float, default=None, help="minimum draft acceptance, 0..1")
    smoke.add_argument("--n-predict", type=int, default=128)
    smoke.add_argument("--runs", type=int, default=3)
    smoke.add_argument("--timeout", type=float, default=300, help="seconds to wait for /health and per request")
    smoke.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the spec's")
    smoke.add_argument("--api-key-file", help="a file whose first line is the API key")
    smoke.add_argument("--json", help="also write the full result as JSON here")
    smoke.set_defaults(run=cmd_smoke)

    bench = commands.add_parser("bench", help="sweep slots, drafter and n-max; table, JSON and plot")
    bench.add_argument("inventory", nargs="?", help="inventory whose service to start locally (with --llama-server)")
    bench.add_argument("--url", help="bench a running server instead (its configuration is fixed)")
    bench.add_argument("--host", help="inventory host")
    bench.add_argument("--service", help="the host's service")
    bench.add_argument("--llama-server", help="llama-server binary to start temporary servers with")
    bench.add_argument("--quick", action="store_true", help="few configurations (slow CPU runs)")
    bench.add_argument("--parallel", type=_int_list, help=f"slots to sweep (default {DEFAULT_PARALLELS})")
    bench.add_argument(
        "--draft-n-max", type=_int_list, default=DEFAULT_DRAFT_N_MAX, help="draft n-max values (default 1,2,3,4)"
    )
    bench.add_argument("--contexts", type=_context_list, default=("short", "long"), help="short,long")
    bench.add_argument("--n-predict", type=int, default=128)
    bench.add_argument("--runs", type=int, default=3, help="sequential requests for single-stream tok/s")
    bench.add_argument("--rounds", type=int, default=2, help="rounds of `parallel` concurrent requests")
    bench.add_argument("--long-tokens", type=int, default=DEFAULT_LONG_PROMPT_TOKENS, help="long prompt cap")
    bench.add_argument("--ctx-size", type=int, default=4096, help="server's ctx (with --url and no inventory)")
    bench.add_argument("--objective", choices=("single", "aggregate"), default="single")
    bench.add_argument("--bandwidth-gbs", type=float, help="peak memory bandwidth GB/s (default: NVML)")
    bench.add_argument("--model-file", help="model file whose size is the bytes read per token")
    bench.add_argument("--api-key-file", help="with --url: a file whose first line is the API key")
    bench.add_argument("--json", default="gpubox-bench.json")
    bench.add_argument("--plot", default="gpubox-bench.png")
    bench.add_argument(
        "--apply", nargs="?", const="", metavar="INVENTORY",
        help="print the winner as a suggested diff of INVENTORY (default: the bench's); never writes",
    )  # fmt: skip
    bench.set_defaults(run=cmd_bench)
