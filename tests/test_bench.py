"""Bench: sweep shape, argv overrides, measurement on replayed answers, report, plot, suggested diff."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from gpubox.bench import (
    BenchConfig,
    BenchMeasurement,
    BenchReport,
    bench_local,
    bench_prompt,
    bench_table,
    bench_variant,
    check_suggestion,
    edit_inventory_text,
    long_prompt_tokens,
    measure,
    parallel_speculation_advice,
    percentile,
    quick_sweep,
    roofline_tokens_per_second,
    suggested_changes,
    sweep,
    write_plot,
)
from gpubox.cli import main
from gpubox.inventory import inventory_boxes
from gpubox.servers.llama import LlamaServer
from gpubox.smoke import HttpResponse
from gpubox.spec import ModelFile

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llama-server"
HOME = ROOT / "inventory" / "home.py"


def home_service() -> LlamaServer:
    [host_box] = inventory_boxes(HOME)
    assert host_box.box is not None
    return host_box.box.service("gemma4")


def plain_service(**overrides: object) -> LlamaServer:
    model = ModelFile(path="/models/m.gguf", sha256="a" * 64, architecture="llama")
    return LlamaServer.model_validate({"name": "m", "model": model, "ctx_size": 2048} | overrides)


def recorded_completions(name: str) -> list[str]:
    exchanges = json.loads((FIXTURES / f"smoke-{name}.json").read_text())["exchanges"]
    return [str(exchange["body"]) for exchange in exchanges if exchange["path"] == "/completion"]


class CyclingServer:
    """Answers /completion with recorded bodies in turn; counts requests in flight at once."""

    def __init__(self, bodies: list[str], delay_s: float = 0.01) -> None:
        self.bodies = bodies
        self.delay_s = delay_s
        self.served = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, body: dict[str, object] | None, timeout: float) -> HttpResponse:
        with self.lock:
            answer = self.bodies[self.served % len(self.bodies)]
            self.served += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay_s)
        with self.lock:
            self.in_flight -= 1
        return HttpResponse(200, answer)


def measurement(label_parallel: int, draft: bool | None, single: float, aggregate: float) -> BenchMeasurement:
    config = BenchConfig(parallel=label_parallel, draft=draft, draft_n_max=3 if draft else None, context="short")
    return BenchMeasurement(
        config=config,
        prompt_tokens=20,
        single_tokens_per_second=single,
        aggregate_tokens_per_second=aggregate,
        draft_tokens=10 if draft else 0,
        accepted_tokens=6 if draft else 0,
        acceptance=0.6 if draft else None,
        latency_p50_s=1.0,
        latency_p95_s=2.0,
        requests=5,
        roofline_tokens_per_second=200.0,
    )


def report(objective: str = "single") -> BenchReport:
    results = [
        measurement(1, False, 90, 88),
        measurement(1, True, 150, 140),
        measurement(4, False, 60, 200),
        measurement(4, True, 50, 260),
    ]
    return BenchReport.model_validate({
        "target": "t", "objective": objective, "n_predict": 64, "bandwidth_bytes_per_s": 1e12,
        "bytes_per_token": 5_000_000_000, "results": [result.model_dump() for result in results],
    })  # fmt: skip


def test_full_sweep_shape() -> None:
    configs = sweep((1, 2, 4), True, (1, 2, 3, 4), ("short", "long"))
    assert len(configs) == 3 * (1 + 4) * 2
    assert len({config.label for config in configs}) == len(configs)
    assert len(sweep((1, 2, 4), False, (1, 2, 3, 4), ("short", "long"))) == 6


def test_quick_sweep_uses_the_services_n_max() -> None:
    configs = quick_sweep(home_service())
    assert [(c.parallel, c.draft, c.draft_n_max) for c in configs] == [(1, False, None), (1, True, 3)]
    assert len(quick_sweep(plain_service())) == 1


def test_bench_argv_overrides_slots_drafter_and_port() -> None:
    service = home_service()
    drafting = BenchConfig(parallel=4, draft=True, draft_n_max=2, context="short")
    argv = bench_variant(service, drafting, 9123).argv("/tmp/llama-server")
    assert argv[0] == "/tmp/llama-server"
    assert argv.count("--parallel") == 1 and argv[argv.index("--parallel") + 1] == "4"
    assert argv[argv.index("--port") + 1] == "9123" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp"
    assert argv[argv.index("--spec-draft-n-max") + 1] == "2" and argv.count("--spec-draft-n-max") == 1
    assert argv[argv.index("--model-draft") + 1] == service.model_draft.path  # type: ignore[union-attr]
    assert argv[argv.index("--ctx-size") + 1] == "262144" and "--cache-type-v" in argv

    plain = BenchConfig(parallel=1, draft=False, context="long")
    argv = bench_variant(service, plain, 9124).argv("/tmp/llama-server")
    for flag in ("--spec-type", "--model-draft", "--spec-draft-n-max", "--spec-draft-ngl"):
        assert flag not in argv


def test_long_prompt_scales_with_the_slot_context() -> None:
    assert long_prompt_tokens(262144, 4, 128) == 384
    assert long_prompt_tokens(2048, 4, 128) == 2048 // 4 // 2 - 128
    words = len(bench_prompt("long", 300).split())
    assert 200 <= words <= 240
    assert bench_prompt("short", 300) != bench_prompt("long", 300)


def test_percentile_nearest_rank() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.95) == 5.0
    assert percentile([7.0], 0.95) == 7.0


def test_roofline() -> None:
    # an RTX 4090 (1008 GB/s) reading a 7 GB model: at most 144 tok/s at batch 1
    assert roofline_tokens_per_second(1008e9, 7_000_000_000) == pytest.approx(144.0)


def test_measure_on_recorded_answers() -> None:
    bodies = recorded_completions("draft")
    server = CyclingServer(bodies)
    config = BenchConfig(parallel=2, draft=True, draft_n_max=3, context="short")
    result = measure(server, config, "hi", 48, single_runs=3, aggregate_rounds=2)
    assert server.served == 1 + 3 + 2 * 2
    assert server.most_in_flight == 2
    timings = [json.loads(body)["timings"] for body in bodies]
    singles = [timings[index % len(timings)] for index in range(1, 4)]
    assert result.single_tokens_per_second == pytest.approx(
        statistics.median(item["predicted_per_second"] for item in singles)
    )
    every = [timings[index % len(timings)] for index in range(1, 8)]
    assert result.draft_tokens == sum(item["draft_n"] for item in every)
    assert result.requests == 7
    assert result.latency_p50_s <= result.latency_p95_s
    generated = sum(item["predicted_n"] for item in every[3:])
    assert 0 < result.aggregate_tokens_per_second < generated / (2 * 0.01)


def test_best_follows_the_objective() -> None:
    assert report("single").best.config.label == "np=1 draft n-max 3 short"
    assert report("aggregate").best.config.label == "np=4 draft n-max 3 short"


def test_table_stars_the_best_and_shows_roofline() -> None:
    console = Console(width=220, record=True)
    console.print(bench_table(report("single")))
    text = console.export_text()
    assert "★ np=1 draft n-max 3 short" in text
    assert "75% of 200" in text  # 150 tok/s of a 200 tok/s roofline
    assert "best for single" in text


def test_parallel_speculation_advice_only_when_it_wins() -> None:
    assert parallel_speculation_advice(report("single")) is None
    advice = parallel_speculation_advice(report("aggregate"))
    assert advice is not None
    assert "allow_parallel_speculation=True" in advice and "260.0" in advice and "200.0" in advice


def test_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    write_plot(report(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def validated_home(text: str, tmp_path: Path) -> LlamaServer:
    path = tmp_path / "home.py"
    path.write_text(text)
    [host_box] = inventory_boxes(path)
    assert host_box.box is not None, host_box.problems
    return host_box.box.service("gemma4")


def test_suggest_dropping_the_drafter_edits_home_into_a_valid_spec(tmp_path: Path) -> None:
    service = home_service()
    changes = suggested_changes(service, BenchConfig(parallel=1, draft=False, context="short"))
    assert changes == {
        "spec_type": "none",
        "model_draft": None,
        "spec_draft_n_max": None,
        "spec_draft_ngl": None,
        "smoke.min_acceptance": None,
    }
    assert check_suggestion(service, changes) == []
    edited, unplaced = edit_inventory_text(HOME.read_text(), "gemma4", changes)
    assert unplaced == []
    new = validated_home(edited, tmp_path)
    assert new.model_draft is None and new.spec_type == "none" and new.smoke is not None
    assert new.smoke.min_acceptance is None and new.smoke.min_tokens_per_second == 100
    assert new.model == service.model


def test_suggest_parallel_drafting_sets_the_allowance(tmp_path: Path) -> None:
    service = home_service()
    changes = suggested_changes(service, BenchConfig(parallel=2, draft=True, draft_n_max=4, context="short"))
    assert changes == {"parallel": 2, "spec_draft_n_max": 4, "allow_parallel_speculation": True}
    edited, unplaced = edit_inventory_text(HOME.read_text(), "gemma4", changes)
    assert unplaced == []
    new = validated_home(edited, tmp_path)
    assert (new.parallel, new.spec_draft_n_max, new.allow_parallel_speculation) == (2, 4, True)
    # without the allowance the same change is refused: the parallel trap
    assert any("parallel trap" in problem for problem in check_suggestion(service, {"parallel": 2}))


def test_bench_apply_prints_a_diff_and_never_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI path with --apply, the servers replaced by recorded answers."""
    import gpubox.cli_client as cli_client

    def fake_bench_local(*args: object, **kwargs: object) -> list[BenchMeasurement]:
        return [measurement(1, False, 95, 90), measurement(1, True, 80, 75)]

    monkeypatch.setattr(cli_client, "bench_local", fake_bench_local)
    inventory = tmp_path / "home.py"
    inventory.write_text(HOME.read_text())
    code = main([
        "bench", str(inventory), "--host", "danarch4090", "--service", "gemma4", "--llama-server", "/bin/true",
        "--quick", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"), "--apply",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert inventory.read_text() == HOME.read_text()
    assert '-    spec_type="draft-mtp",' in out and '+    spec_type="none",' in out
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["single_tokens_per_second"] == 95
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.e2e
def test_bench_local_against_a_real_llama_server(tmp_path: Path) -> None:
    from tests.test_smoke import llama_server_binary

    binary = llama_server_binary()
    from tests.testbed import smollm2_gguf

    model = ModelFile(path=str(smollm2_gguf()), sha256="a" * 64, architecture="llama")
    service = LlamaServer(
        name="smol", model=model, model_draft=model, spec_type="draft-simple", spec_draft_n_max=2, ctx_size=1024
    )
    configs = [
        BenchConfig(parallel=1, draft=False, context="short"),
        BenchConfig(parallel=2, draft=True, draft_n_max=2, context="short"),
    ]
    results = bench_local(
        service, str(binary), configs, n_predict=16, long_tokens=64, single_runs=1,
        aggregate_rounds=1, log_dir=tmp_path,
    )  # fmt: skip
    assert [result.config for result in results] == configs
    assert results[0].draft_tokens == 0 and results[1].draft_tokens > 0
    assert all(result.single_tokens_per_second > 0 for result in results)


def test_turning_drafting_off_resets_the_draft_cache_types_too() -> None:
    service = home_service().model_copy(update={"spec_draft_type_k": "q8_0", "spec_draft_type_v": "q8_0"})
    variant = bench_variant(service, BenchConfig(parallel=1, draft=False, context="short"), 9125)
    assert not [word for word in variant.argv("/bin/llama-server") if "draft" in word]
    changes = suggested_changes(service, BenchConfig(parallel=1, draft=False, context="short"))
    assert changes["spec_draft_type_k"] is None and changes["spec_draft_type_v"] is None
    assert check_suggestion(service, changes) == []
