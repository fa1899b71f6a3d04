"""The alert rules derived from the inventory, checked by Prometheus's own promtool.

`promtool check rules` reads every generated file; `promtool test rules` evaluates each alert on
synthetic series: it fires when a threshold is broken, not while healthy (nor while idle), with
the labels and the annotations (templates expanded by Prometheus) expected. A host whose inventory
name holds a quote, a backslash and ``{{`` runs through all of it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpubox import (
    Box,
    ExpectedGpu,
    LlamaCppBuild,
    LlamaServer,
    ModelFile,
    PiperInstall,
    PiperServer,
    SmokeThresholds,
    WhisperCppBuild,
    WhisperServer,
)
from gpubox.monitoring import metrics
from gpubox.monitoring.fleet import Fleet, build_fleet, service_labels
from gpubox.monitoring.rules import (
    alert_rules,
    duration,
    label_matcher,
    number,
    promql_string,
    rules_yaml,
    selector,
    template_text,
)
from gpubox.monitoring.spec import Monitoring

COMMIT = "0" * 40
GIB = 1024**3
# The third host's inventory name: every quoting path (PromQL strings, Go templates, YAML) meets it.
ODD = 'lab"3\\{{x}}'
MONITORING = Monitoring(
    monitor="alpha", down_for_s=120, slow_for_s=300, rate_window_s=120, restarts_max=2, vram_margin_mib=512
)
PLANNED: dict[str, dict[int, int]] = {"alpha": {0: 10 * GIB}, "beta": {0: 20 * GIB, 1: 4 * GIB}}


def gguf(name: str, digit: str) -> ModelFile:
    return ModelFile(path=f"/srv/models/{name}.gguf", sha256=digit * 64, architecture="llama")


def chat(min_tokens_per_second: float = 100) -> LlamaServer:
    """alpha's llama-server: an API key, no drafter."""
    return LlamaServer(
        name="chat",
        user="llama",
        gpus=(0,),
        model=gguf("chat-q4", "a"),
        api_key_file="generate",
        smoke=SmokeThresholds(min_tokens_per_second=min_tokens_per_second),
    )


def drafter(min_acceptance: float = 0.5) -> LlamaServer:
    """beta's llama-server: draft-simple, with a minimum acceptance."""
    return LlamaServer(
        name="draft",
        user="llama",
        gpus=(0,),
        port=8081,
        model=gguf("big", "b"),
        model_draft=gguf("small", "c"),
        spec_type="draft-simple",
        smoke=SmokeThresholds(min_tokens_per_second=50, min_acceptance=min_acceptance),
    )


WHISPER = WhisperServer(
    name="whisper",
    gpus=(1,),
    port=8090,
    model=ModelFile(
        path="/srv/models/ggml-tiny.en.bin", sha256="d" * 64, format="ggml-whisper", architecture="tiny.en"
    ),
)
PIPER = PiperServer(
    name="piper",
    voice=ModelFile(path="/srv/voices/joe.onnx", sha256="e" * 64, format="onnx"),
    voice_config=ModelFile(path="/srv/voices/joe.onnx.json", sha256="f" * 64, format="json"),
)


def make_fleet(
    monitoring: Monitoring = MONITORING, chat_server: LlamaServer | None = None, draft_server: LlamaServer | None = None
) -> Fleet:
    """alpha: ``chat`` on GPU 0 (with expected_gpus); beta: ``draft`` on GPU 0 and ``whisper`` on GPU 1;
    ODD: ``piper`` on the CPU (no GPU: no nvidia-smi alert)."""
    alpha = Box(
        llama_cpp=LlamaCppBuild(commit=COMMIT),
        services=(chat_server or chat(),),
        expected_gpus=(ExpectedGpu(index=0, name="NVIDIA H200", memory_total_mib=143771),),
    )
    beta = Box(
        llama_cpp=LlamaCppBuild(commit=COMMIT),
        whisper_cpp=WhisperCppBuild(commit=COMMIT),
        services=(draft_server or drafter(), WHISPER),
    )
    odd = Box(piper=PiperInstall(version="1.8.0"), services=(PIPER,))
    return build_fleet(
        (name, {"box": box, "monitoring": monitoring, "ssh_hostname": "127.0.0.1"})
        for name, box in (("alpha", alpha), ("beta", beta), (ODD, odd))
    )


FLEET = make_fleet()
HOSTS = ("alpha", "beta", ODD)


# --- promtool -----------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool is missing: apt-get install prometheus (Debian's 2.42 has it)"
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def check_rules(text: str, tmp_path: Path) -> str:
    (tmp_path / "rules.yaml").write_text(text)
    result = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_rule_tests(rules_text: str, tests: list[dict[str, Any]], tmp_path: Path) -> None:
    """Run ``promtool test rules`` on ``tests`` (its ``tests:`` list) against ``rules_text``."""
    (tmp_path / "rules.yaml").write_text(rules_text)
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False, allow_unicode=True))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr



def series(metric: str, labels: Mapping[str, str], values: str) -> dict[str, str]:
    """One ``input_series`` entry (``values`` in promtool's expanding notation: ``0+60x20``)."""
    return {"series": selector(metric, labels), "values": values}


def llama(host: str, service: str) -> dict[str, str]:
    """The labels a llama-server's series carry: its target's labels, job and instance."""
    server = FLEET.host(host).box.llama_server(service)
    scrape = server.scrape()
    assert scrape is not None
    return {**service_labels(host, server, scrape), "job": f"{service}@{host}", "instance": f"127.0.0.1:{server.port}"}


def node(host: str, **labels: str) -> dict[str, str]:
    """The labels of a host's node-exporter series (textfile metrics add their own)."""
    return {"host": host, "kind": "node", "job": f"node@{host}", "instance": "127.0.0.1:9100", **labels}


def expand(template: str, value: str) -> str:
    """What Prometheus makes of an annotation, the alert's value humanized as ``value``."""
    for action in ("{{ $value | humanize }}", "{{ $value | humanizePercentage }}", "{{ $value | humanize1024 }}"):
        template = template.replace(action, value)
    return template.replace('{{ "{{" }}', "{{")


def rule_of(alert: str, host: str, **labels: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [
        rule
        for group in alert_rules(FLEET, PLANNED)["groups"]
        for rule in group["rules"]
        if rule["alert"] == alert
        and expand(rule["labels"]["host"], "") == host
        and all(rule["labels"].get(name) == value for name, value in labels.items())
    ]
    assert len(matches) == 1, (alert, host, labels, matches)
    return matches[0]


def firing(
    alert: str, host: str, series_labels: Mapping[str, str], value: str = "", **rule_labels: str
) -> dict[str, Any]:
    """An ``exp_alerts`` entry: the series' labels and the rule's, its annotations as Prometheus expands them."""
    rule = rule_of(alert, host, **rule_labels)
    labels = {**series_labels, "severity": rule["labels"]["severity"], "host": host, **rule_labels}
    annotations = {name: expand(text, value) for name, text in rule["annotations"].items()}
    return {"exp_labels": labels, "exp_annotations": annotations}


def case(
    input_series: Sequence[dict[str, str]], checks: Sequence[tuple[str, str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    """One promtool test: the series, then (eval_time, alertname, exp_alerts) checks."""
    return {
        "interval": "1m",
        "input_series": list(input_series),
        "alert_rule_test": [
            {"eval_time": at, "alertname": alert, "exp_alerts": expected} for at, alert, expected in checks
        ],
    }


RULES_TEXT = rules_yaml(FLEET, PLANNED)


# --- the file as Prometheus reads it ----------------------------------------------------------------


def test_promtool_accepts_the_rule_file(tmp_path: Path) -> None:
    output = check_rules(RULES_TEXT, tmp_path)
    assert f"SUCCESS: {sum(len(g['rules']) for g in alert_rules(FLEET, PLANNED)['groups'])} rules found" in output


def test_promtool_accepts_the_defaults_and_an_empty_plan(tmp_path: Path) -> None:
    check_rules(rules_yaml(make_fleet(Monitoring(monitor="alpha")), {}), tmp_path)


def test_yaml_is_the_structure() -> None:
    assert yaml.safe_load(RULES_TEXT) == alert_rules(FLEET, PLANNED)
    assert RULES_TEXT.startswith("# Generated by gpubox")
    assert [group["name"] for group in yaml.safe_load(RULES_TEXT)["groups"]] == [
        "gpubox-availability",
        "gpubox-performance",
        "gpubox-gpus-and-units",
    ]


def test_which_rules_each_host_and_service_gets() -> None:
    got = sorted(
        (rule["alert"], expand(rule["labels"]["host"], ""), rule["labels"].get("service", rule["labels"].get("gpu")))
        for group in alert_rules(FLEET, PLANNED)["groups"]
        for rule in group["rules"]
    )
    units = (("alpha", "chat"), ("beta", "draft"), ("beta", "whisper"), (ODD, "piper"))
    assert got == sorted([
        ("GpuboxServiceDown", "alpha", "chat"),
        ("GpuboxServiceDown", "beta", "draft"),
        *[("GpuboxUnitInactive", host, service) for host, service in units],
        *[("GpuboxUnitRestarting", host, service) for host, service in units],
        *[("GpuboxHostSilent", h, None) for h in HOSTS],
        ("GpuboxSlowDecode", "alpha", "chat"),
        ("GpuboxSlowDecode", "beta", "draft"),
        ("GpuboxLowAcceptance", "beta", "draft"),  # chat does not draft
        ("GpuboxGpuMemoryOverPlan", "alpha", "0"),
        ("GpuboxGpuMemoryOverPlan", "beta", "0"),
        ("GpuboxGpuMemoryOverPlan", "beta", "1"),
        # alpha has expected_gpus, beta pins its services; the piper host has no GPU
        ("GpuboxNvidiaSmiFailing", "alpha", None),
        ("GpuboxNvidiaSmiFailing", "beta", None),
    ])


def test_a_host_without_a_plan_gets_no_memory_alert() -> None:
    alerts = [r["alert"] for g in alert_rules(FLEET, {"beta": {0: GIB}})["groups"] for r in g["rules"]]
    assert alerts.count("GpuboxGpuMemoryOverPlan") == 1


def test_speed_is_two_counter_rates_never_the_gauge_nor_kv_cache() -> None:
    rule = rule_of("GpuboxSlowDecode", "alpha", service="chat")
    matchers = 'host="alpha",kind="llama-server",service="chat"'
    assert rule["expr"] == (
        f"rate({metrics.LLAMA_TOKENS_PREDICTED}{{{matchers}}}[2m]) / "
        f"rate({metrics.LLAMA_TOKENS_PREDICTED_SECONDS}{{{matchers}}}[2m]) < 100"
    )
    assert "predicted_tokens_seconds" not in RULES_TEXT
    assert "kv_cache" not in RULES_TEXT


# --- thresholds come from the specs, and say so --------------------------------------------------------


def alert_exprs(
    fleet: Fleet, planned: Mapping[str, Mapping[int, int]] = PLANNED
) -> dict[tuple[str, str], dict[str, Any]]:
    """alpha's and beta's rules by (alert, service or alpha's GPU)."""
    return {
        (rule["alert"], rule["labels"].get("service", rule["labels"].get("gpu", ""))): rule
        for group in alert_rules(fleet, planned)["groups"]
        for rule in group["rules"]
        if rule["labels"]["host"] == "alpha" or (rule["labels"]["host"] == "beta" and "gpu" not in rule["labels"])
    }


def test_changing_a_smoke_threshold_changes_the_expr() -> None:
    before = alert_exprs(FLEET)
    after = alert_exprs(make_fleet(chat_server=chat(min_tokens_per_second=120.5), draft_server=drafter(0.65)))
    assert before[("GpuboxSlowDecode", "chat")]["expr"].endswith(" < 100")
    assert after[("GpuboxSlowDecode", "chat")]["expr"].endswith(" < 120.5")
    assert before[("GpuboxLowAcceptance", "draft")]["expr"].endswith(" < 0.5")
    assert after[("GpuboxLowAcceptance", "draft")]["expr"].endswith(" < 0.65")
    slow, low = after[("GpuboxSlowDecode", "chat")], after[("GpuboxLowAcceptance", "draft")]
    assert "SmokeThresholds.min_tokens_per_second = 120.5" in slow["annotations"]["description"]
    assert "SmokeThresholds.min_acceptance = 0.65" in low["annotations"]["description"]
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {("GpuboxSlowDecode", "chat"), ("GpuboxLowAcceptance", "draft")}


def test_changing_monitoring_changes_windows_durations_and_limits() -> None:
    tuned = MONITORING.model_copy(
        update={"down_for_s": 90, "slow_for_s": 1200, "rate_window_s": 600, "restarts_max": 7, "vram_margin_mib": 2048}
    )
    rules = alert_exprs(make_fleet(tuned))
    assert rules[("GpuboxServiceDown", "chat")]["for"] == "90s"
    assert rules[("GpuboxUnitInactive", "whisper")]["for"] == "90s"
    assert rules[("GpuboxSlowDecode", "chat")]["for"] == "20m"
    assert "[10m]" in rules[("GpuboxSlowDecode", "chat")]["expr"]
    assert "[10m]" in rules[("GpuboxLowAcceptance", "draft")]["expr"]
    assert rules[("GpuboxUnitRestarting", "whisper")]["expr"].endswith("[15m]) > 7")
    assert rules[("GpuboxGpuMemoryOverPlan", "0")]["expr"].endswith(f" > {10 * GIB + 2048 * 1024**2}")
    assert "Monitoring.restarts_max = 7" in rules[("GpuboxUnitRestarting", "whisper")]["annotations"]["description"]
    assert "Monitoring.vram_margin_mib = 2048" in rules[("GpuboxGpuMemoryOverPlan", "0")]["annotations"]["description"]
    assert "Monitoring.down_for_s = 90" in rules[("GpuboxServiceDown", "chat")]["annotations"]["description"]
    assert "Monitoring.rate_window_s = 600" in rules[("GpuboxSlowDecode", "chat")]["annotations"]["description"]


def test_the_plan_sets_the_memory_limit() -> None:
    rules = alert_exprs(FLEET, {"alpha": {0: 10 * GIB}})
    assert rules[("GpuboxGpuMemoryOverPlan", "0")]["expr"] == (
        f'{metrics.GPU_MEMORY_USED}{{host="alpha",kind="node",gpu="0"}} > {10 * GIB + 512 * 1024**2}'
    )
    assert alert_exprs(FLEET, {"alpha": {0: 11 * GIB}})[("GpuboxGpuMemoryOverPlan", "0")]["expr"].endswith(
        f" > {11 * GIB + 512 * 1024**2}"
    )


# --- quoting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("alpha", '"alpha"'),
        ('a"b', r'"a\"b"'),
        ("a\\b", r'"a\\b"'),
        ("a\nb\tc\rd", r'"a\nb\tc\rd"'),
        ("bell\x07", r'"bell\x07"'),
        ("$host {{x}} `é`", '"$host {{x}} `é`"'),
        ("", '""'),
    ],
)
def test_promql_string_escapes(value: str, literal: str) -> None:
    assert promql_string(value) == literal


def test_label_matcher_and_selector() -> None:
    assert label_matcher("host", 'a"b') == r'host="a\"b"'
    assert label_matcher("host", "a|b", "=~") == 'host=~"a|b"'
    assert selector("up", {"host": "h"}, {"service": "a.*"}) == 'up{host="h",service=~"a.*"}'
    assert selector("up", {"kind": "x"}, exclude={"spec_type": "none"}) == 'up{kind="x",spec_type!="none"}'
    assert selector("up") == "up{}"
    for bad in ("1host", "ho-st", ""):
        with pytest.raises(ValueError, match="label name"):
            label_matcher(bad, "x")
    with pytest.raises(ValueError, match="operator"):
        label_matcher("host", "x", "==")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric name"):
        selector('up{host="x"}')


def test_template_text_duration_number() -> None:
    assert template_text("a{{b}}c") == 'a{{ "{{" }}b}}c'
    assert template_text("{{{") == '{{ "{{" }}{'
    assert [duration(s) for s in (0, 15, 90, 120, 300, 3600, 5400, 86400)] == [
        "0s", "15s", "90s", "2m", "5m", "1h", "90m", "1d"
    ]
    assert [number(v) for v in (100, 100.0, 0.5, 120.25)] == ["100", "100", "0.5", "120.25"]


def test_every_label_value_in_an_expr_is_escaped() -> None:
    odd = promql_string(ODD)
    exprs = [r["expr"] for g in alert_rules(FLEET, PLANNED)["groups"] for r in g["rules"] if "lab" in r["expr"]]
    assert exprs, "the odd host has rules"
    assert all(f"host={odd}" in expr for expr in exprs)


# --- each alert fires when broken, not when healthy (promtool test rules) ---------------------------------


def fires_and_not(
    tmp_path: Path,
    alert: str,
    broken: Sequence[dict[str, str]],
    healthy: Sequence[dict[str, str]],
    at: str,
    expected: list[dict[str, Any]],
    pending_at: str | None = None,
) -> None:
    checks = [(at, alert, expected)]
    if pending_at is not None:
        checks.insert(0, (pending_at, alert, []))  # broken, but not yet for the rule's `for`
    run_rule_tests(RULES_TEXT, [case(broken, checks), case(healthy, [(at, alert, [])])], tmp_path)


def test_service_down(tmp_path: Path) -> None:
    chat_up, draft_up = llama("alpha", "chat"), llama("beta", "draft")
    fires_and_not(
        tmp_path,
        "GpuboxServiceDown",
        broken=[series("up", chat_up, "0x10"), series("up", draft_up, "1x10")],
        healthy=[series("up", chat_up, "1x10"), series("up", draft_up, "1x10")],
        at="5m",
        pending_at="1m",  # down_for_s = 120
        expected=[firing("GpuboxServiceDown", "alpha", chat_up, service="chat")],
    )


def test_unit_inactive_watches_every_service_type(tmp_path: Path) -> None:
    units = [("alpha", "chat"), ("beta", "draft"), ("beta", "whisper"), (ODD, "piper")]
    down = {("beta", "whisper"), (ODD, "piper")}
    labels = {unit: node(unit[0], service=unit[1], unit=f"{unit[1]}.service") for unit in units}
    fires_and_not(
        tmp_path,
        "GpuboxUnitInactive",
        broken=[series(metrics.UNIT_ACTIVE, labels[u], "0x10" if u in down else "1x10") for u in units],
        healthy=[series(metrics.UNIT_ACTIVE, labels[u], "1x10") for u in units],
        at="5m",
        pending_at="1m",
        expected=[firing("GpuboxUnitInactive", h, labels[(h, s)], service=s) for h, s in sorted(down)],
    )


def test_host_silent_when_its_exporter_is_absent_or_down(tmp_path: Path) -> None:
    fires_and_not(
        tmp_path,
        "GpuboxHostSilent",
        # beta's agent stopped (no series at all); the odd host's node-exporter is down (up 0)
        broken=[series("up", node("alpha"), "1x10"), series("up", node(ODD), "0x10")],
        healthy=[series("up", node(host), "1x10") for host in ("alpha", "beta", ODD)],
        at="5m",
        pending_at="1m",
        expected=[firing("GpuboxHostSilent", "beta", {}), firing("GpuboxHostSilent", ODD, {})],
    )


def test_host_silent_after_its_series_stop(tmp_path: Path) -> None:
    # alpha reports for 5 minutes, then nothing: absent once the 5m lookback runs out, then for 2m.
    checks = [("9m", "GpuboxHostSilent", []), ("15m", "GpuboxHostSilent", [firing("GpuboxHostSilent", "alpha", {})])]
    others = [series("up", node(host), "1x20") for host in ("beta", ODD)]
    run_rule_tests(RULES_TEXT, [case([series("up", node("alpha"), "1x5"), *others], checks)], tmp_path)


def decode(host: str, service: str, tokens_per_min: int, seconds_per_min: int) -> list[dict[str, str]]:
    labels = llama(host, service)
    return [
        series(metrics.LLAMA_TOKENS_PREDICTED, labels, f"0+{tokens_per_min}x20"),
        series(metrics.LLAMA_TOKENS_PREDICTED_SECONDS, labels, f"0+{seconds_per_min}x20"),
    ]


def test_slow_decode(tmp_path: Path) -> None:
    # chat: 40 tok/s, below its 100; draft: 60 tok/s, above its 50
    fires_and_not(
        tmp_path,
        "GpuboxSlowDecode",
        broken=[*decode("alpha", "chat", 2400, 60), *decode("beta", "draft", 3600, 60)],
        healthy=[*decode("alpha", "chat", 9000, 60), *decode("beta", "draft", 3600, 60)],
        at="10m",
        pending_at="4m",  # slow_for_s = 300
        expected=[firing("GpuboxSlowDecode", "alpha", llama("alpha", "chat"), "40", service="chat")],
    )


def test_idle_servers_do_not_alert(tmp_path: Path) -> None:
    # no tokens, no seconds: 0/0 is NaN, below nothing; a server that was fast then idles stays quiet too
    idle = [*decode("alpha", "chat", 0, 0), *decode("beta", "draft", 0, 0)]
    labels = llama("alpha", "chat")
    fast_then_idle = [
        series(metrics.LLAMA_TOKENS_PREDICTED, labels, "0+9000x5 45000x15"),
        series(metrics.LLAMA_TOKENS_PREDICTED_SECONDS, labels, "0+60x5 300x15"),
    ]
    drafts = llama("beta", "draft")
    idle_drafter = [
        series(metrics.LLAMA_DRAFT_TOKENS, drafts, "100x20"),
        series(metrics.LLAMA_ACCEPTED_TOKENS, drafts, "10x20"),
    ]
    alerts = ("GpuboxSlowDecode", "GpuboxLowAcceptance")
    checks: list[tuple[str, str, list[dict[str, Any]]]] = [
        (at, alert, []) for at in ("5m", "12m", "20m") for alert in alerts
    ]
    run_rule_tests(RULES_TEXT, [case([*idle, *idle_drafter], checks), case(fast_then_idle, checks)], tmp_path)


def test_low_acceptance(tmp_path: Path) -> None:
    drafts = llama("beta", "draft")

    def drafting(accepted_per_min: int) -> list[dict[str, str]]:
        return [
            series(metrics.LLAMA_DRAFT_TOKENS, drafts, "0+600x20"),
            series(metrics.LLAMA_ACCEPTED_TOKENS, drafts, f"0+{accepted_per_min}x20"),
        ]

    fires_and_not(
        tmp_path,
        "GpuboxLowAcceptance",
        broken=drafting(150),  # 25%, below 0.5
        healthy=drafting(480),  # 80%
        at="10m",
        pending_at="4m",
        expected=[firing("GpuboxLowAcceptance", "beta", drafts, "25%", service="draft")],
    )


def test_gpu_memory_over_plan(tmp_path: Path) -> None:
    def used(alpha0: float, beta1: float) -> list[dict[str, str]]:
        return [
            series(metrics.GPU_MEMORY_USED, node("alpha", gpu="0", uuid="GPU-a0", name="H200"), f"{int(alpha0)}x10"),
            series(metrics.GPU_MEMORY_USED, node("beta", gpu="0", uuid="GPU-b0", name="H200"), f"{20 * GIB}x10"),
            series(metrics.GPU_MEMORY_USED, node("beta", gpu="1", uuid="GPU-b1", name="H200"), f"{int(beta1)}x10"),
        ]

    # plan: alpha GPU 0 10 GiB, beta GPU 1 4 GiB; margin 512 MiB
    fires_and_not(
        tmp_path,
        "GpuboxGpuMemoryOverPlan",
        broken=used(12 * GIB, 4.4 * GIB),  # alpha over by 2 GiB; beta's GPU 1 within its margin
        healthy=used(10.4 * GIB, 4 * GIB),
        at="5m",
        pending_at="1m",  # for 2m
        expected=[
            firing(
                "GpuboxGpuMemoryOverPlan",
                "alpha",
                node("alpha", gpu="0", uuid="GPU-a0", name="H200"),
                "12Gi",
                gpu="0",
            )
        ],
    )


def test_unit_restarting(tmp_path: Path) -> None:
    whisper = node("beta", service="whisper", unit="whisper.service")
    piper = node(ODD, service="piper", unit="piper.service")
    fires_and_not(
        tmp_path,
        "GpuboxUnitRestarting",
        # whisper restarts every 5 minutes (3 in 15m, above 2); piper restarted twice, long ago
        broken=[series(metrics.UNIT_RESTARTS, whisper, "0x4 1x4 2x4 3x4 4x4 5x4"),
                series(metrics.UNIT_RESTARTS, piper, "0 1 2x30")],
        healthy=[series(metrics.UNIT_RESTARTS, whisper, "0x14 1x15"),
                 series(metrics.UNIT_RESTARTS, piper, "0 1 2x30")],
        at="25m",
        # the samples of [10m, 25m] span the window: 2 -> 5 is 3 restarts
        expected=[firing("GpuboxUnitRestarting", "beta", whisper, "3", service="whisper")],
    )


def test_nvidia_smi_failing_only_where_gpus_are_expected(tmp_path: Path) -> None:
    fires_and_not(
        tmp_path,
        "GpuboxNvidiaSmiFailing",
        # the odd host has no GPU to watch: its failing nvidia-smi is no alert
        broken=[series(metrics.NVIDIA_SMI_UP, node(h), "1x10" if h == "beta" else "0x10") for h in HOSTS],
        healthy=[series(metrics.NVIDIA_SMI_UP, node(h), "0x10" if h == ODD else "1x10") for h in HOSTS],
        at="8m",
        pending_at="3m",  # for 5m
        expected=[firing("GpuboxNvidiaSmiFailing", "alpha", node("alpha"))],
    )
