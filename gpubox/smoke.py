"""Smoke test a running llama-server: healthy, fast enough, drafting well enough, on its GPUs.

The deploy runs on a controller while llama-server listens on the target host's loopback, so every
request goes through a `Transport`: `requests_transport` talks HTTP from this machine, and
`command_transport` runs `curl_command` wherever a shell runs (over SSH for the deploy) and reads
the answer back with `parse_curl_output`.

Field names are the pinned llama-server's (tools/server): `/completion` takes `prompt`,
`n_predict`, `temperature`, `cache_prompt`; its `timings` carry `predicted_per_second`, and
`draft_n`/`draft_n_accepted` only when tokens were drafted; `/metrics` (with `--metrics`) counts
`llamacpp:spec_decode_num_draft_tokens_total` and `llamacpp:spec_decode_num_accepted_tokens_total`.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from gpubox.gpu import ComputeApp
from gpubox.keys import authorization_header_command
from gpubox.quoting import shell_join, shell_word
from gpubox.spec import SmokeThresholds

if TYPE_CHECKING:  # rich is imported where a table is drawn: a no-op deploy draws none
    from rich.table import Table

METRIC_DRAFT_TOKENS = "llamacpp:spec_decode_num_draft_tokens_total"
METRIC_ACCEPTED_TOKENS = "llamacpp:spec_decode_num_accepted_tokens_total"
HEALTH_REQUEST_TIMEOUT_S = 5.0
HEALTH_POLL_INTERVAL_S = 1.0
WARM_UP_N_PREDICT = 8
CURL_EXIT_CONNECTION_REFUSED = 7
CURL_EXIT_TIMEOUT = 28
_BODY_EXCERPT = 200


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: str

    def json_object(self) -> dict[str, object]:
        """The body as a JSON object; ValueError when it is not one."""
        value = json.loads(self.body)
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {self.body[:_BODY_EXCERPT]!r}")
        return value


class TransportError(Exception):
    """The request got no HTTP answer: connection refused, timeout, or the transport itself failed."""


Transport = Callable[[str, str, dict[str, object] | None, float], HttpResponse]
"""(method, path such as "/health", JSON body or None, timeout in seconds) -> the HTTP answer."""

CommandRunner = Callable[[str], tuple[str, int]]
"""Runs a shell command somewhere (locally, over SSH) and returns (stdout, exit code)."""


def requests_transport(base_url: str, api_key: str | None = None) -> Transport:
    """HTTP from this machine; one `requests.Session` per thread, so the bench may call it concurrently."""
    import requests  # here, not at the top: a deploy smokes over the host's curl and need not load it

    root = base_url.rstrip("/")
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    local = threading.local()

    def session() -> requests.Session:
        current: requests.Session | None = getattr(local, "session", None)
        if current is None:
            current = requests.Session()
            local.session = current
        return current

    def send(method: str, path: str, body: dict[str, object] | None, timeout: float) -> HttpResponse:
        try:
            answer = session().request(method, root + path, json=body, headers=headers, timeout=timeout)
        except requests.RequestException as error:
            raise TransportError(f"{method} {root}{path}: {type(error).__name__}: {error}") from error
        return HttpResponse(status=answer.status_code, body=answer.text)

    return send


def curl_command(
    base_url: str,
    method: str,
    path: str,
    body: dict[str, object] | None,
    timeout: float,
    *,
    api_key_file: str | None = None,
) -> str:
    """A shell command doing the request with curl; it prints the body, then a line with the status.

    With `api_key_file` (a file of keys on the target host, one per line), the first key is sent
    as a bearer token through curl's stdin (`-H @-`), so it never appears in a process's argv.
    """
    words = [
        "curl", "-sS", "--max-time", f"{timeout:g}", "-X", method, "-w", "\n%{http_code}",
    ]  # fmt: skip
    if api_key_file is not None:
        words += ["-H", "@-"]
    if body is not None:
        words += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    words.append(base_url.rstrip("/") + path)
    command = shell_join(words)
    if api_key_file is None:
        return command
    header = authorization_header_command(api_key_file)
    return f"{header} | {command}"


def parse_curl_output(stdout: str, exit_code: int) -> HttpResponse:
    """The answer printed by `curl_command`; TransportError when curl got no HTTP answer."""
    if exit_code == CURL_EXIT_CONNECTION_REFUSED:
        raise TransportError(f"curl: connection refused (exit 7): {stdout.strip()[-_BODY_EXCERPT:]}")
    if exit_code == CURL_EXIT_TIMEOUT:
        raise TransportError("curl: timed out (exit 28)")
    if exit_code != 0:
        raise TransportError(f"curl failed with exit code {exit_code}: {stdout.strip()[-_BODY_EXCERPT:]}")
    body, newline, status_text = stdout.rstrip("\r\n").rpartition("\n")
    if not newline:
        body, status_text = "", stdout.strip()
    if not status_text.isdigit() or int(status_text) == 0:
        raise TransportError(f"curl printed no HTTP status (got {status_text!r})")
    return HttpResponse(status=int(status_text), body=body)


def command_transport(run_command: CommandRunner, base_url: str, *, api_key_file: str | None = None) -> Transport:
    """A transport running `curl_command` through `run_command` (e.g. on the target host over SSH)."""

    def send(method: str, path: str, body: dict[str, object] | None, timeout: float) -> HttpResponse:
        command = curl_command(base_url, method, path, body, timeout, api_key_file=api_key_file)
        stdout, exit_code = run_command(command)
        return parse_curl_output(stdout, exit_code)

    return send


class CompletionTimings(BaseModel):
    """One `/completion` answer's `timings`; draft fields are 0 when llama-server omitted them."""

    model_config = ConfigDict(frozen=True)

    prompt_n: int
    predicted_n: int
    predicted_per_second: float
    predicted_ms: float
    draft_n: int = 0
    draft_n_accepted: int = 0


class CompletionRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_index: int
    timings: CompletionTimings
    elapsed_s: float
    """Wall-clock seconds seen by the client, prompt processing and transport included."""


class CompletionError(Exception):
    """`/completion` answered with an error status or a body without timings."""


def completion_request(prompt: str, n_predict: int, *, ignore_eos: bool = True) -> dict[str, object]:
    """A deterministic request: greedy, and no prompt cache so every run processes its prompt.

    `ignore_eos` makes every request generate exactly `n_predict` tokens, so tok/s is measured
    over the same length whatever the model answers (an instruct model may stop at once on a
    raw prompt).
    """
    request: dict[str, object] = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "cache_prompt": False}
    if ignore_eos:
        request["ignore_eos"] = True
    return request


def parse_completion(response: HttpResponse) -> CompletionTimings:
    """The timings of a `/completion` answer; CompletionError for anything else."""
    if response.status != 200:
        raise CompletionError(f"/completion answered HTTP {response.status}: {response.body[:_BODY_EXCERPT]}")
    try:
        timings = response.json_object()["timings"]
        return CompletionTimings.model_validate(timings)
    except (ValueError, KeyError) as error:
        raise CompletionError(f"/completion answer has no usable timings: {error}") from error


def complete(
    transport: Transport,
    prompt: str,
    n_predict: int,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    *,
    ignore_eos: bool = True,
) -> tuple[CompletionTimings, float]:
    """One completion: its timings and the wall-clock seconds it took."""
    started = clock()
    request = completion_request(prompt, n_predict, ignore_eos=ignore_eos)
    response = transport("POST", "/completion", request, timeout_s)
    return parse_completion(response), clock() - started


class HealthWait(BaseModel):
    model_config = ConfigDict(frozen=True)

    healthy: bool
    waited_s: float
    polls: int
    last_answer: str
    """The last status and body (or transport error) seen, to say why it never became healthy."""


def _is_ready(response: HttpResponse) -> bool:
    if response.status != 200:
        return False
    try:
        return response.json_object().get("status") == "ok"
    except ValueError:
        return False


def wait_until_healthy(
    transport: Transport,
    timeout_s: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    poll_interval_s: float = HEALTH_POLL_INTERVAL_S,
    path: str = "/health",
    ready: Callable[[HttpResponse], bool] = _is_ready,
) -> HealthWait:
    """Poll `GET /health` until 200 `{"status": "ok"}`; 503 "Loading model" and refusals are retried.

    `path` and `ready` for a server without `/health`: piper answers `GET /info` once its voice is loaded.
    """
    started = clock()
    polls = 0
    last_answer = "(no answer yet)"
    while True:
        polls += 1
        try:
            response = transport("GET", path, None, min(HEALTH_REQUEST_TIMEOUT_S, timeout_s))
        except TransportError as error:
            last_answer = str(error)
        else:
            if ready(response):
                return HealthWait(healthy=True, waited_s=clock() - started, polls=polls, last_answer=response.body)
            last_answer = f"HTTP {response.status}: {response.body[:_BODY_EXCERPT]}"
        waited = clock() - started
        if waited + poll_interval_s > timeout_s:
            return HealthWait(healthy=False, waited_s=waited, polls=polls, last_answer=last_answer)
        sleep(poll_interval_s)


class SpecCounters(BaseModel):
    """The speculative-decoding counters of `/metrics` at one moment."""

    model_config = ConfigDict(frozen=True)

    draft_tokens: float
    accepted_tokens: float


def unlabelled_samples(text: str) -> dict[str, float] | None:
    """The label-less samples of Prometheus text by sample name (a counter's keeps its ``_total``, and
    llama-server's names their ``llamacpp:``); later duplicates win. None when the text is malformed."""
    # prometheus_client (~35 ms of imports) when a smoke test reads /metrics, not in every deploy that may run one
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }
    except ValueError:
        return None


def read_spec_counters(transport: Transport, timeout_s: float = HEALTH_REQUEST_TIMEOUT_S) -> SpecCounters | None:
    """The counters, or None when `/metrics` is off (no `--metrics`), unreachable or lacks them."""
    try:
        response = transport("GET", "/metrics", None, timeout_s)
    except TransportError:
        return None
    if response.status != 200:
        return None
    samples = unlabelled_samples(response.body)
    if samples is None or METRIC_DRAFT_TOKENS not in samples or METRIC_ACCEPTED_TOKENS not in samples:
        return None
    return SpecCounters(draft_tokens=samples[METRIC_DRAFT_TOKENS], accepted_tokens=samples[METRIC_ACCEPTED_TOKENS])


class GpuProcesses(BaseModel):
    """What the deploy reads on the host for the GPU check: the server's pid and nvidia-smi's compute apps."""

    model_config = ConfigDict(frozen=True)

    pid: int
    compute_apps: list[ComputeApp]


GpuProbe = Callable[[], GpuProcesses]


LLAMA_ON_CPU_HINT = "CUDA build? CUDA_VISIBLE_DEVICES? n_gpu_layers?"


def check_gpu_residency(
    pid: int,
    expected_gpu_uuids: Set[str],
    compute_apps: Iterable[ComputeApp],
    *,
    program: str = "llama-server",
    hint: str = LLAMA_ON_CPU_HINT,
) -> list[str]:
    """Failures when the server process does not hold memory on exactly its GPUs.

    llama-server falls back to the CPU at boot (no CUDA build, a driver mismatch, a wrong
    CUDA_VISIBLE_DEVICES) and /health still says ok; nvidia-smi's compute apps tell. A
    `used_memory` of None (nvidia-smi printed [N/A], as it does under some virtualisation)
    counts as holding memory: the process is listed on that GPU. `program` and `hint` name the server
    and what to look at when it holds nothing (piper's: gpubox.speech.piper_gpu_failures).
    """
    held_mib: dict[str, int | None] = {}
    for app in compute_apps:
        if app.pid != pid:
            continue
        previous = held_mib.get(app.gpu_uuid, 0)
        held_mib[app.gpu_uuid] = (
            None if previous is None or app.used_memory_mib is None else (previous + app.used_memory_mib)
        )
    failures: list[str] = []
    for uuid in sorted(expected_gpu_uuids):
        if uuid not in held_mib or held_mib[uuid] == 0:
            failures.append(
                f"{program} (pid {pid}) holds no memory on its GPU {uuid}: it runs on the CPU or on "
                f"another GPU ({hint})"
            )
    for uuid, mib in sorted(held_mib.items()):
        if uuid not in expected_gpu_uuids:
            amount = "memory" if mib is None else f"{mib} MiB"
            failures.append(
                f"{program} (pid {pid}) holds {amount} on GPU {uuid}, which is not one of its GPUs "
                f"{sorted(expected_gpu_uuids) or '(none)'}: CUDA_VISIBLE_DEVICES is not applied"
            )
    return failures


class SmokeResult(BaseModel):
    """Every measurement of one smoke test, the thresholds it was held to, and the verdict in words."""

    thresholds: SmokeThresholds
    healthy: bool
    health_wait_s: float
    health_polls: int
    health_last_answer: str
    runs: list[CompletionRun]
    tokens_per_second: float | None
    """Median of `timings.predicted_per_second` over every measured run."""
    draft_tokens: int
    accepted_tokens: int
    acceptance: float | None
    """sum(draft_n_accepted) / sum(draft_n) over the runs; None when nothing was drafted."""
    metrics_draft_tokens: float | None
    metrics_accepted_tokens: float | None
    """Deltas of the `/metrics` counters over the measured runs; None without `--metrics`."""
    gpu_checked: bool
    gpu_failures: list[str]
    passed: bool
    failures: list[str]
    notes: list[str]

    @property
    def metrics_acceptance(self) -> float | None:
        if not self.metrics_draft_tokens or self.metrics_accepted_tokens is None:
            return None
        return self.metrics_accepted_tokens / self.metrics_draft_tokens


def acceptance_of(timings: Iterable[CompletionTimings]) -> tuple[int, int, float | None]:
    """(drafted, accepted, accepted/drafted or None when nothing was drafted)."""
    listed = list(timings)
    drafted = sum(item.draft_n for item in listed)
    accepted = sum(item.draft_n_accepted for item in listed)
    return drafted, accepted, (accepted / drafted if drafted else None)


def _threshold_failures(
    thresholds: SmokeThresholds,
    runs: list[CompletionRun],
    tokens_per_second: float,
    drafted: int,
    acceptance: float | None,
) -> list[str]:
    failures: list[str] = []
    generated = statistics.median(run.timings.predicted_n for run in runs)
    if generated < max(2, thresholds.n_predict // 4):
        failures.append(
            f"the runs stopped after {generated:g} generated token(s) (median) of n_predict={thresholds.n_predict}: "
            f"the model ended its answer at once (EOS), so tok/s means nothing; use prompts it continues, e.g. "
            f"in the model's chat template"
        )
    if tokens_per_second < thresholds.min_tokens_per_second:
        failures.append(
            f"generation ran at {tokens_per_second:.1f} tok/s (median of {thresholds.runs} run(s) x "
            f"{len(thresholds.prompts)} prompt(s)), below the minimum of {thresholds.min_tokens_per_second:g} tok/s"
        )
    if thresholds.min_acceptance is not None:
        if acceptance is None:
            failures.append(
                f"no tokens were drafted, so acceptance can't reach the minimum of "
                f"{thresholds.min_acceptance:.0%}: the drafter is not running (spec_type, model_draft?)"
            )
        elif acceptance < thresholds.min_acceptance:
            failures.append(
                f"draft acceptance was {acceptance:.1%} ({drafted} drafted), below the minimum of "
                f"{thresholds.min_acceptance:.0%}"
            )
    return failures


def _metrics_cross_check(
    before: SpecCounters | None, after: SpecCounters | None, drafted: int, accepted: int
) -> tuple[float | None, float | None, list[str], list[str]]:
    """(metrics drafted, metrics accepted, failures, notes) comparing `/metrics` to the timings.

    The counters only grow, and count every request: fewer than the responses claim means they
    were reset, i.e. llama-server restarted during the smoke test; more means other traffic.
    """
    if before is None or after is None:
        return None, None, [], ["/metrics unavailable (llama-server without --metrics?): acceptance not cross-checked"]
    metrics_drafted = after.draft_tokens - before.draft_tokens
    metrics_accepted = after.accepted_tokens - before.accepted_tokens
    failures: list[str] = []
    notes: list[str] = []
    if metrics_drafted < drafted or metrics_accepted < accepted:
        failures.append(
            f"/metrics counted {metrics_drafted:g} drafted / {metrics_accepted:g} accepted tokens over the runs, "
            f"fewer than the responses' {drafted} / {accepted}: the counters were reset (did llama-server restart?)"
        )
    elif metrics_drafted > drafted or metrics_accepted > accepted:
        notes.append(
            f"/metrics counted {metrics_drafted:g} drafted / {metrics_accepted:g} accepted tokens, more than the "
            f"responses' {drafted} / {accepted}: other requests were served meanwhile"
        )
    return metrics_drafted, metrics_accepted, failures, notes


def _early_failure_result(thresholds: SmokeThresholds, wait: HealthWait, failure: str) -> SmokeResult:
    return SmokeResult(
        thresholds=thresholds,
        healthy=wait.healthy,
        health_wait_s=wait.waited_s,
        health_polls=wait.polls,
        health_last_answer=wait.last_answer,
        runs=[],
        tokens_per_second=None,
        draft_tokens=0,
        accepted_tokens=0,
        acceptance=None,
        metrics_draft_tokens=None,
        metrics_accepted_tokens=None,
        gpu_checked=False,
        gpu_failures=[],
        passed=False,
        failures=[failure],
        notes=[],
    )


def _measured_runs(
    transport: Transport, thresholds: SmokeThresholds, clock: Callable[[], float]
) -> list[CompletionRun]:
    runs: list[CompletionRun] = []
    for _ in range(thresholds.runs):
        for index, prompt in enumerate(thresholds.prompts):
            timings, elapsed = complete(transport, prompt, thresholds.n_predict, thresholds.timeout_s, clock)
            runs.append(CompletionRun(prompt_index=index, timings=timings, elapsed_s=elapsed))
    return runs


def run_smoke(
    transport: Transport,
    thresholds: SmokeThresholds,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    gpu_probe: GpuProbe | None = None,
    expected_gpu_uuids: Set[str] = frozenset(),
) -> SmokeResult:
    """Wait for health, warm up once, then time `runs` x each prompt and judge against the thresholds.

    With `gpu_probe` (the server's pid and nvidia-smi's compute apps, read on the host), the
    process must also hold memory on each of `expected_gpu_uuids` and on no other GPU.
    """
    wait = wait_until_healthy(transport, thresholds.timeout_s, sleep=sleep, clock=clock)
    if not wait.healthy:
        return _early_failure_result(
            thresholds,
            wait,
            f"llama-server was not healthy within {thresholds.timeout_s:g} s ({wait.polls} polls); "
            f"last answer: {wait.last_answer}",
        )
    try:
        complete(transport, thresholds.prompts[0], min(WARM_UP_N_PREDICT, thresholds.n_predict), thresholds.timeout_s)
        before = read_spec_counters(transport)
        runs = _measured_runs(transport, thresholds, clock)
        after = read_spec_counters(transport)
    except (TransportError, CompletionError) as error:
        return _early_failure_result(thresholds, wait, f"a completion failed after /health said ok: {error}")
    tokens_per_second = statistics.median(run.timings.predicted_per_second for run in runs)
    drafted, accepted, acceptance = acceptance_of(run.timings for run in runs)
    failures = _threshold_failures(thresholds, runs, tokens_per_second, drafted, acceptance)
    metrics_drafted, metrics_accepted, metric_failures, notes = _metrics_cross_check(before, after, drafted, accepted)
    failures += metric_failures
    gpu_failures: list[str] = []
    if gpu_probe is not None:
        processes = gpu_probe()
        gpu_failures = check_gpu_residency(processes.pid, expected_gpu_uuids, processes.compute_apps)
        failures += gpu_failures
    return SmokeResult(
        thresholds=thresholds,
        healthy=True,
        health_wait_s=wait.waited_s,
        health_polls=wait.polls,
        health_last_answer=wait.last_answer,
        runs=runs,
        tokens_per_second=tokens_per_second,
        draft_tokens=drafted,
        accepted_tokens=accepted,
        acceptance=acceptance,
        metrics_draft_tokens=metrics_drafted,
        metrics_accepted_tokens=metrics_accepted,
        gpu_checked=gpu_probe is not None,
        gpu_failures=gpu_failures,
        passed=not failures,
        failures=failures,
        notes=notes,
    )


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "[dim]-[/]"
    return "[green]pass[/]" if ok else "[bold red]FAIL[/]"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def smoke_table(result: SmokeResult) -> Table:
    """One row per check: what was measured, the threshold, pass or fail."""
    thresholds = result.thresholds
    title = "smoke test: " + ("[green]passed[/]" if result.passed else "[bold red]failed[/]")
    from rich.table import Table
    table = Table(title=title)
    for column in ("check", "measured", "threshold", "result"):
        table.add_column(column)
    table.add_row(
        "health",
        f"ok after {result.health_wait_s:.1f} s" if result.healthy else "never ok",
        f"within {thresholds.timeout_s:g} s",
        _verdict(result.healthy),
    )
    speed = result.tokens_per_second
    table.add_row(
        "generation tok/s",
        "-" if speed is None else f"{speed:.1f} (median of {len(result.runs)})",
        f">= {thresholds.min_tokens_per_second:g}",
        _verdict(None if speed is None else speed >= thresholds.min_tokens_per_second),
    )
    acceptance_ok = None
    if thresholds.min_acceptance is not None and result.runs:
        acceptance_ok = result.acceptance is not None and result.acceptance >= thresholds.min_acceptance
    table.add_row(
        "draft acceptance",
        f"{_percent(result.acceptance)} ({result.accepted_tokens}/{result.draft_tokens})",
        "-" if thresholds.min_acceptance is None else f">= {thresholds.min_acceptance:.0%}",
        _verdict(acceptance_ok),
    )
    if result.metrics_draft_tokens is not None:
        table.add_row(
            "/metrics acceptance",
            f"{_percent(result.metrics_acceptance)} "
            f"({result.metrics_accepted_tokens:g}/{result.metrics_draft_tokens:g})",
            "agrees with responses",
            _verdict(not any("/metrics" in failure for failure in result.failures)),
        )
    if result.gpu_checked:
        table.add_row(
            "GPU residency",
            "on its GPUs only" if not result.gpu_failures else f"{len(result.gpu_failures)} problem(s)",
            "memory on each GPU, no other",
            _verdict(not result.gpu_failures),
        )
    return table


def listening_command(port: int, timeout_s: float) -> str:
    """A shell command that waits until a TCP socket listens on ``port`` (``/proc/net/tcp``, ``tcp6``), up to
    ``timeout_s`` seconds; exit 0 once it does, 1 if it never did.

    It reads the kernel's table rather than connecting: a server that admits only other hosts
    (``IPAddressDeny=any``, an RPC server on a LAN address) would refuse a connection from its own host,
    and an RPC server serves one client at a time.
    """
    pattern = f":{port:04X} [0-9A-F]+:0000 0A "
    return (
        f"for _ in $(seq 1 {max(1, int(timeout_s))}); do "
        f"if grep -qE {shell_word(pattern)} /proc/net/tcp /proc/net/tcp6 2>/dev/null; then exit 0; fi; sleep 1; "
        f"done; exit 1"
    )
