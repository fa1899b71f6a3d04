"""Smoke client: replayed real llama-server answers, the curl transport, the GPU residency check."""

from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rich.console import Console

from gpubox.gpu import ComputeApp
from gpubox.smoke import (
    METRIC_ACCEPTED_TOKENS,
    METRIC_DRAFT_TOKENS,
    GpuProcesses,
    HttpResponse,
    TransportError,
    check_gpu_residency,
    command_transport,
    curl_command,
    parse_curl_output,
    read_spec_counters,
    requests_transport,
    run_smoke,
    smoke_table,
    unlabelled_samples,
    wait_until_healthy,
)
from gpubox.spec import SmokeThresholds

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llama-server"
GPU_A = "GPU-aaaaaaaa-0000-0000-0000-000000000000"
GPU_B = "GPU-bbbbbbbb-0000-0000-0000-000000000000"


def session(name: str) -> list[dict[str, object]]:
    exchanges: list[dict[str, object]] = json.loads((FIXTURES / f"smoke-{name}.json").read_text())["exchanges"]
    return exchanges


def loading_answer() -> HttpResponse:
    recorded = json.loads((FIXTURES / "health-loading.json").read_text())
    return HttpResponse(status=recorded["status"], body=recorded["body"])


class Replay:
    """A transport answering each (method, path) with its recorded answers in order."""

    def __init__(self, exchanges: list[dict[str, object]]) -> None:
        self.queues: dict[tuple[str, str], list[HttpResponse | TransportError]] = {}
        for exchange in exchanges:
            key = (str(exchange["method"]), str(exchange["path"]))
            self.queues.setdefault(key, []).append(
                HttpResponse(status=int(str(exchange["status"])), body=str(exchange["body"]))
            )
        self.requests: list[tuple[str, str, dict[str, object] | None]] = []

    def prepend(self, method: str, path: str, *answers: HttpResponse | TransportError) -> None:
        self.queues[(method, path)] = [*answers, *self.queues.get((method, path), [])]

    def __call__(self, method: str, path: str, body: dict[str, object] | None, timeout: float) -> HttpResponse:
        self.requests.append((method, path, body))
        queue = self.queues.get((method, path))
        if not queue:
            raise TransportError(f"no recorded answer left for {method} {path}")
        answer = queue.pop(0)
        if isinstance(answer, TransportError):
            raise answer
        return answer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def recorded_timings(name: str) -> list[dict[str, float]]:
    """Timings of the measured runs (the warm-up, with its smaller n_predict, left out)."""
    thresholds_n_predict = 48
    return [
        json.loads(str(exchange["body"]))["timings"]
        for exchange in session(name)
        if exchange["path"] == "/completion"
        and isinstance(exchange["request"], dict)
        and exchange["request"]["n_predict"] == thresholds_n_predict
    ]


def thresholds(**overrides: object) -> SmokeThresholds:
    values: dict[str, object] = {"min_tokens_per_second": 1, "n_predict": 48, "runs": 3}
    return SmokeThresholds.model_validate(values | overrides)


# -- recorded answers ------------------------------------------------------------------------------


def test_recorded_answers_have_the_fields_the_client_reads() -> None:
    """The fixtures are real llama-server answers: drafted runs carry draft fields, plain runs don't."""
    assert json.loads(loading_answer().body)["error"] == {
        "code": 503,
        "message": "Loading model",
        "type": "unavailable_error",
    }
    assert all("draft_n" in timings and "draft_n_accepted" in timings for timings in recorded_timings("draft"))
    assert all("draft_n" not in timings for timings in recorded_timings("plain"))
    metrics = [exchange for exchange in session("draft") if exchange["path"] == "/metrics"]
    samples = unlabelled_samples(str(metrics[-1]["body"]))
    assert samples is not None
    assert samples[METRIC_DRAFT_TOKENS] > 0
    assert 0 < samples[METRIC_ACCEPTED_TOKENS] <= samples[METRIC_DRAFT_TOKENS]


def test_prometheus_labels_and_comments() -> None:
    text = (
        "# HELP llamacpp:a_total y\n# TYPE llamacpp:a_total counter\nllamacpp:a_total 3\n"
        'per_pos{position="0"} 1.5e+02\n\ny_total 7 1700000000\n'
    )
    assert unlabelled_samples(text) == {"llamacpp:a_total": 3.0, "y_total": 7.0}


def counters_of(status: int, body: str) -> tuple[float, float] | None:
    def transport(method: str, path: str, body_json: dict[str, object] | None, timeout_s: float) -> HttpResponse:
        assert (method, path) == ("GET", "/metrics")
        return HttpResponse(status, body)

    counters = read_spec_counters(transport)
    return None if counters is None else (counters.draft_tokens, counters.accepted_tokens)


def test_spec_counters_from_llama_server_text() -> None:
    body = (
        f"# HELP {METRIC_DRAFT_TOKENS} Speculative: Total draft tokens generated\n"
        f"# TYPE {METRIC_DRAFT_TOKENS} counter\n{METRIC_DRAFT_TOKENS} 1.2e+06\n"
        f"# TYPE {METRIC_ACCEPTED_TOKENS} counter\n{METRIC_ACCEPTED_TOKENS} 5\n"
    )
    assert counters_of(200, body) == (1.2e6, 5.0)


@pytest.mark.parametrize(
    "body",
    [
        f"{METRIC_DRAFT_TOKENS} 5\n{METRIC_ACCEPTED_TOKENS} five\n",  # a value that is no number
        f"{METRIC_DRAFT_TOKENS} 5\n{METRIC_ACCEPTED_TOKENS}{{a=\"1\" 3\n",  # unterminated labels
        f"{METRIC_DRAFT_TOKENS} 5\n{METRIC_ACCEPTED_TOKENS}\n",  # no value
        '{"error":{"message":"metrics disabled"}}',
        f"{METRIC_DRAFT_TOKENS} 5\n",  # a counter missing
    ],
)
def test_malformed_or_incomplete_metrics_give_no_counters(body: str) -> None:
    assert counters_of(200, body) is None
    assert counters_of(200, f"{METRIC_DRAFT_TOKENS} 5\n{METRIC_ACCEPTED_TOKENS} 4\n") == (5.0, 4.0)


# -- run_smoke on replayed sessions ----------------------------------------------------------------


def test_draft_session_passes_and_measures_from_the_answers() -> None:
    replay = Replay(session("draft"))
    clock = FakeClock()
    replay.prepend("GET", "/health", TransportError("connection refused"), loading_answer())
    result = run_smoke(replay, thresholds(min_acceptance=0.3), sleep=clock.sleep, clock=clock)

    timings = recorded_timings("draft")
    drafted = sum(int(item["draft_n"]) for item in timings)
    accepted = sum(int(item["draft_n_accepted"]) for item in timings)
    assert result.passed, result.failures
    recorded_polls = sum(1 for exchange in session("draft") if exchange["path"] == "/health")
    assert result.health_polls == 2 + recorded_polls  # refused, loading, then as recorded (503s, then ok)
    assert result.health_wait_s == pytest.approx(result.health_polls - 1.0)  # one 1 s sleep between polls
    assert len(result.runs) == 3
    assert result.tokens_per_second == pytest.approx(
        statistics.median(item["predicted_per_second"] for item in timings)
    )
    assert (result.draft_tokens, result.accepted_tokens) == (drafted, accepted)
    assert result.acceptance == pytest.approx(accepted / drafted)
    # the real /metrics counters moved by exactly what the responses reported
    assert (result.metrics_draft_tokens, result.metrics_accepted_tokens) == (drafted, accepted)
    completions = [body for method, path, body in replay.requests if path == "/completion"]
    assert completions[1] == {
        "prompt": thresholds().prompts[0],
        "n_predict": 48,
        "temperature": 0,
        "cache_prompt": False,
        "ignore_eos": True,
    }


def test_too_slow_fails_saying_measured_and_threshold() -> None:
    result = run_smoke(Replay(session("plain")), thresholds(min_tokens_per_second=100000), sleep=lambda _: None)
    assert not result.passed
    assert result.tokens_per_second is not None
    [failure] = result.failures
    assert f"{result.tokens_per_second:.1f} tok/s" in failure
    assert "minimum of 100000 tok/s" in failure


def test_low_acceptance_fails() -> None:
    exchanges = session("draft")
    for exchange in exchanges:
        if exchange["path"] == "/completion":
            answer = json.loads(str(exchange["body"]))
            answer["timings"]["draft_n_accepted"] = answer["timings"]["draft_n"] // 4
            exchange["body"] = json.dumps(answer)
    result = run_smoke(Replay(exchanges), thresholds(min_acceptance=0.5), sleep=lambda _: None)
    assert not result.passed
    assert result.acceptance is not None and result.acceptance < 0.5
    assert any("draft acceptance was" in failure and "minimum of 50%" in failure for failure in result.failures)


def test_plain_server_with_an_acceptance_threshold_fails_no_drafts() -> None:
    result = run_smoke(Replay(session("plain")), thresholds(min_acceptance=0.5), sleep=lambda _: None)
    assert result.acceptance is None and result.draft_tokens == 0
    assert any("no tokens were drafted" in failure for failure in result.failures)


def test_plain_server_passes_without_acceptance_threshold() -> None:
    result = run_smoke(Replay(session("plain")), thresholds(), sleep=lambda _: None)
    assert result.passed, result.failures
    assert result.metrics_draft_tokens == 0


def test_never_healthy_times_out_without_completions() -> None:
    replay = Replay([])
    replay.prepend("GET", "/health", *[loading_answer()] * 100)
    clock = FakeClock()
    result = run_smoke(replay, thresholds(timeout_s=10), sleep=clock.sleep, clock=clock)
    assert not result.passed and not result.healthy
    assert "not healthy within 10 s" in result.failures[0]
    assert "Loading model" in result.failures[0]
    assert clock.now <= 10
    assert all(path == "/health" for _, path, _ in replay.requests)


def test_completion_timeout_after_health_fails() -> None:
    replay = Replay([exchange for exchange in session("plain") if exchange["path"] == "/health"])
    result = run_smoke(replay, thresholds(), sleep=lambda _: None)
    assert not result.passed and result.healthy
    assert "a completion failed" in result.failures[0]


def test_counters_going_backwards_means_a_restart() -> None:
    exchanges = session("draft")
    metrics = [exchange for exchange in exchanges if exchange["path"] == "/metrics"]
    metrics[0]["body"], metrics[1]["body"] = metrics[1]["body"], metrics[0]["body"]
    result = run_smoke(Replay(exchanges), thresholds(), sleep=lambda _: None)
    assert not result.passed
    assert any("counters were reset" in failure for failure in result.failures)


def test_without_metrics_it_notes_and_passes() -> None:
    exchanges = [exchange for exchange in session("draft") if exchange["path"] != "/metrics"]
    replay = Replay(exchanges)
    replay.prepend("GET", "/metrics", HttpResponse(501, '{"error":{"message":"metrics disabled"}}'))
    result = run_smoke(replay, thresholds(), sleep=lambda _: None)
    assert result.passed
    assert result.metrics_draft_tokens is None
    assert any("/metrics unavailable" in note for note in result.notes)


def test_smoke_table_shows_measured_threshold_and_verdict() -> None:
    result = run_smoke(Replay(session("draft")), thresholds(min_tokens_per_second=100000), sleep=lambda _: None)
    console = Console(width=200, record=True)
    console.print(smoke_table(result))
    text = console.export_text()
    assert "failed" in text and "FAIL" in text and ">= 100000" in text and "/metrics acceptance" in text


# -- GPU residency ---------------------------------------------------------------------------------


def app(pid: int, uuid: str, mib: int | None) -> ComputeApp:
    return ComputeApp(pid=pid, gpu_uuid=uuid, used_memory_mib=mib)


def test_gpu_residency_on_its_gpu_only_passes() -> None:
    assert check_gpu_residency(42, {GPU_A}, [app(42, GPU_A, 9000), app(7, GPU_B, 100)]) == []


def test_gpu_residency_cpu_fallback_fails() -> None:
    [failure] = check_gpu_residency(42, {GPU_A}, [app(7, GPU_A, 100)])
    assert "holds no memory on its GPU" in failure and GPU_A in failure


def test_gpu_residency_on_another_gpu_fails() -> None:
    failures = check_gpu_residency(42, {GPU_A}, [app(42, GPU_A, 9000), app(42, GPU_B, 300)])
    assert len(failures) == 1 and "300 MiB" in failures[0] and GPU_B in failures[0]


def test_gpu_residency_unknown_memory_counts_as_present() -> None:
    assert check_gpu_residency(42, {GPU_A, GPU_B}, [app(42, GPU_A, None), app(42, GPU_B, 1)]) == []


def test_run_smoke_reports_gpu_failures() -> None:
    def probe() -> GpuProcesses:
        return GpuProcesses(pid=42, compute_apps=[])

    result = run_smoke(
        Replay(session("plain")), thresholds(), sleep=lambda _: None, gpu_probe=probe, expected_gpu_uuids={GPU_A}
    )
    assert not result.passed and result.gpu_checked
    assert result.gpu_failures == result.failures


# -- curl ------------------------------------------------------------------------------------------


def test_curl_command_words() -> None:
    body: dict[str, object] = {"prompt": 'it\'s a "test"', "n_predict": 4}
    words = shlex.split(curl_command("http://127.0.0.1:8080/", "POST", "/completion", body, 30))
    assert words[0] == "curl" and "-sS" in words
    assert words[words.index("--max-time") + 1] == "30"
    assert words[words.index("-w") + 1] == "\n%{http_code}"
    assert json.loads(words[words.index("--data-binary") + 1]) == body
    assert words[-1] == "http://127.0.0.1:8080/completion"


def test_curl_command_sends_the_key_through_stdin() -> None:
    command = curl_command("http://127.0.0.1:8080", "GET", "/metrics", None, 5, api_key_file="/etc/llama/keys")
    header, curl = command.split(" | ")
    assert shlex.split(header) == ["sed", "-n", "1s/^/Authorization: Bearer /p", "/etc/llama/keys"]
    assert "-H @-" in curl and "keys" not in curl


def test_parse_curl_output() -> None:
    assert parse_curl_output('{"a":\n1}\n503', 0) == HttpResponse(503, '{"a":\n1}')
    assert parse_curl_output("\n200", 0) == HttpResponse(200, "")
    for exit_code, words in ((7, "refused"), (28, "timed out"), (6, "exit code 6")):
        with pytest.raises(TransportError, match=words):
            parse_curl_output("curl: (x) something", exit_code)


def run_locally(command: str) -> tuple[str, int]:
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    return done.stdout, done.returncode


def test_real_curl_refused_is_a_transport_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = command_transport(run_locally, f"http://127.0.0.1:{port}")
    with pytest.raises(TransportError, match="refused"):
        transport("GET", "/health", None, 5)


# -- a real llama-server ---------------------------------------------------------------------------


def llama_server_binary() -> Path:
    """LLAMA_SERVER_BIN, or the CPU llama-server built here from the pinned llama.cpp (cached)."""
    from tests.testbed import local_llama_server

    configured = os.environ.get("LLAMA_SERVER_BIN")
    return Path(configured) if configured else local_llama_server()


def test_raw_prompt_ending_at_once_fails() -> None:
    """The first recording: SmolLM2-Instruct answered a raw prompt with EOS, 1 token, "0 tok/s"."""
    exchanges = session("plain")
    for exchange in exchanges:
        if exchange["path"] == "/completion":
            answer = json.loads(str(exchange["body"]))
            answer["timings"]["predicted_n"] = 1
            exchange["body"] = json.dumps(answer)
    result = run_smoke(Replay(exchanges), thresholds(), sleep=lambda _: None)
    assert not result.passed
    assert any("stopped after 1 generated token(s)" in failure for failure in result.failures)


@contextmanager
def started_server(extra_args: list[str], log_path: Path) -> Iterator[str]:
    """A real llama-server on SmolLM2; yields its base URL."""
    binary = llama_server_binary()
    from gpubox.bench import free_port
    from tests.testbed import smollm2_gguf

    model = str(smollm2_gguf())
    port = free_port()
    argv = [str(binary), "-m", model, "--port", str(port), "--parallel", "1", "--metrics", "--ctx-size", "2048"]
    argv += [word.replace("MODEL", model) for word in extra_args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    draft = ["--model-draft", "MODEL", "--spec-type", "draft-simple", "--spec-draft-n-max", "3"]
    with started_server(draft, tmp_path_factory.mktemp("llama") / "server.log") as url:
        yield url


@pytest.mark.e2e
@pytest.mark.parametrize("transport_kind", ["requests", "curl"])
def test_real_server_smoke(real_server: str, transport_kind: str) -> None:
    transport = (
        requests_transport(real_server) if transport_kind == "requests" else command_transport(run_locally, real_server)
    )
    chat_prompt = "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"
    smoke = thresholds(prompts=(chat_prompt,), n_predict=24, runs=2, timeout_s=120, min_acceptance=0.3)
    result = run_smoke(transport, smoke)
    assert result.passed, result.failures
    assert result.tokens_per_second is not None and result.tokens_per_second > 1
    assert result.draft_tokens > 0 and result.metrics_draft_tokens == result.draft_tokens


@pytest.mark.e2e
def test_real_server_curl_sends_the_key_from_the_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sekrit-1\nsekrit-2\n")
    with started_server(["--api-key-file", str(keys)], tmp_path / "server.log") as url:
        assert wait_until_healthy(command_transport(run_locally, url), 60).healthy
        with_key = command_transport(run_locally, url, api_key_file=str(keys))
        assert with_key("GET", "/metrics", None, 10).status == 200
        assert command_transport(run_locally, url)("GET", "/metrics", None, 10).status == 401


def test_cli_smoke_exit_code(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import gpubox.cli_client as cli_client
    from gpubox.cli import main

    monkeypatch.setattr(cli_client, "requests_transport", lambda url, key=None: Replay(session("draft")))
    assert main(["smoke", "http://x", "--min-tok-s", "1", "--min-acceptance", "0.5", "--n-predict", "48"]) == 0
    monkeypatch.setattr(cli_client, "requests_transport", lambda url, key=None: Replay(session("draft")))
    assert main(["smoke", "http://x", "--min-tok-s", "100000", "--n-predict", "48"]) == 1
    assert "below the minimum of 100000 tok/s" in " ".join(capsys.readouterr().out.split())
