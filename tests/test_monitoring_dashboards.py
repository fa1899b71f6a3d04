"""The fleet's Grafana dashboard and provisioning: every panel query is PromQL Prometheus accepts and
computes what its title says, on synthetic series of a two-host fleet (promtool, one recording rule
per query), and names only metrics gpubox's monitoring knows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpubox import Box, ExpectedGpu, LlamaCppBuild, WhisperCppBuild
from gpubox.monitoring import metrics
from gpubox.monitoring.dashboards import (
    DASHBOARD_FILE,
    DASHBOARD_UID,
    DASHBOARDS_DIR,
    DATASOURCE_FILE,
    DATASOURCE_UID,
    PROVIDER_FILE,
    fleet_dashboard,
    panel_queries,
    provisioning_files,
)
from gpubox.monitoring.fleet import Fleet, build_fleet
from gpubox.monitoring.rules import selector
from gpubox.monitoring.spec import Monitoring
from tests.test_monitoring_rules import (
    COMMIT,
    GIB,
    MONITORING,
    WHISPER,
    chat,
    check_rules,
    drafter,
    llama,
    node,
    promtool,
    series,
)


def two_hosts(monitoring: Monitoring = MONITORING) -> Fleet:
    """alpha: ``chat`` (API key) on GPU 0; beta: ``draft`` (draft-simple) on GPU 0 and ``whisper`` on GPU 1."""
    alpha = Box(
        llama_cpp=LlamaCppBuild(commit=COMMIT),
        services=(chat(),),
        expected_gpus=(ExpectedGpu(index=0, name="NVIDIA H200", memory_total_mib=143771),),
    )
    beta = Box(
        llama_cpp=LlamaCppBuild(commit=COMMIT),
        whisper_cpp=WhisperCppBuild(commit=COMMIT),
        services=(drafter(), WHISPER),
    )
    return build_fleet(
        (name, {"box": box, "monitoring": monitoring, "ssh_hostname": "127.0.0.1"})
        for name, box in (("alpha", alpha), ("beta", beta))
    )


FLEET = two_hosts()
DASHBOARD = fleet_dashboard(FLEET)
QUERIES = panel_queries(DASHBOARD)
# What Grafana substitutes for its variables (a multi-value variable is a regex of its values).
VARIABLES = {"$__rate_interval": "1m", "$host": "alpha|beta", "$service": ".*"}


def substitute(expr: str, variables: dict[str, str] = VARIABLES) -> str:
    # longest first, so that no variable's name is cut short by another's
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    assert "$" not in expr, expr
    return expr


def record_name(position: int) -> str:
    return f"gpubox_panel_{position}"


def recording_rules(variables: dict[str, str] = VARIABLES) -> str:
    """A rule file of one recording rule per panel query, Grafana's variables substituted."""
    rules = [{"record": record_name(i), "expr": substitute(expr, variables)} for i, (_, expr) in enumerate(QUERIES)]
    return yaml.safe_dump({"groups": [{"name": "gpubox-panels", "rules": rules}]}, sort_keys=False)


def query_position(title: str, needle: str = "") -> int:
    matches = [i for i, (panel, expr) in enumerate(QUERIES) if panel == title and needle in expr]
    assert len(matches) == 1, (title, needle, QUERIES)
    return matches[0]


def sample(title: str, labels: dict[str, str], value: float, needle: str = "") -> dict[str, Any]:
    """An ``exp_samples`` entry: the recorded series of a panel's query, with ``labels``."""
    return {"labels": selector(record_name(query_position(title, needle)), labels), "value": value}


# --- the dashboard's JSON ------------------------------------------------------------------------------


def test_dashboard_has_host_and_service_variables_from_label_values() -> None:
    variables = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
    assert set(variables) == {"host", "service"}
    assert variables["host"]["query"] == "label_values(up, host)"
    assert variables["service"]["query"] == 'label_values(gpubox_unit_active{host=~"$host"}, service)'
    for variable in variables.values():
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"


def test_every_panel_and_query_names_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(provisioning_files(FLEET)[DATASOURCE_FILE])["datasources"]
    assert [source["uid"] for source in provisioned] == [DATASOURCE_UID]
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}


def test_a_panel_per_concept() -> None:
    titles = [panel["title"] for panel in DASHBOARD["panels"]]
    for title in (
        "Decode speed",
        "Draft acceptance",
        "Requests processing and deferred",
        "VRAM used vs planned",
        "GPU utilization",
        "GPU temperature",
        "GPU power",
        "Targets up",
        "Units active",
        "Unit restarts (15m)",
    ):
        assert title in titles
    assert len(set(titles)) == len(titles)
    assert {panel["type"] for panel in DASHBOARD["panels"]} == {"timeseries", "stat"}
    assert DASHBOARD["uid"] == DASHBOARD_UID


def test_rates_use_grafanas_rate_interval_and_counters_only() -> None:
    for title, expr in QUERIES:
        for window in re.findall(r"\b(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "15m"), (title, expr)
    decode = dict(QUERIES)["Decode speed"]
    assert decode.count("[$__rate_interval]") == 2
    assert metrics.LLAMA_TOKENS_PREDICTED in decode and metrics.LLAMA_TOKENS_PREDICTED_SECONDS in decode
    assert not [expr for _, expr in QUERIES if "llamacpp:predicted_tokens_seconds" in expr or "kv_cache" in expr]


def test_descriptions_name_the_thresholds_of_the_specs() -> None:
    descriptions = {panel["title"]: panel["description"] for panel in DASHBOARD["panels"]}
    assert "chat@alpha 100 tok/s, draft@beta 50 tok/s" in descriptions["Decode speed"]
    assert "draft@beta 0.5" in descriptions["Draft acceptance"]
    assert "Monitoring.restarts_max = 2" in descriptions["Unit restarts (15m)"]
    restarts = next(panel for panel in DASHBOARD["panels"] if panel["title"] == "Unit restarts (15m)")
    assert [step["value"] for step in restarts["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 3]


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
PROMQL_FUNCTIONS = {"rate", "increase", "time", "sum", "max", "min", "avg", "absent", "clamp_min", "label_values"}
KNOWN_METRICS = {value for name, value in vars(metrics).items() if name.isupper() and isinstance(value, str)}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers outside strings, matchers and windows, not called."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        rest = bare[match.end():].lstrip()
        if rest.startswith("("):
            assert match.group() in PROMQL_FUNCTIONS, (match.group(), expr)
        elif match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def test_metric_names_extraction() -> None:
    assert metric_names('rate(a:b_total{x="y{z}"}[5m]) / on (x) rate(c[1m]) > bool 0') == {"a:b_total", "c"}


def test_queries_read_only_gpubox_node_exporter_and_up_metrics() -> None:
    read = set()
    for title, expr in QUERIES:
        names = metric_names(expr)
        assert names, (title, expr)
        for name in names:
            assert name in KNOWN_METRICS or name == "up" or name.startswith("node_"), (title, name)
        read |= names
    assert read >= {metrics.GPU_MEMORY_USED, metrics.GPU_PLANNED_MEMORY, metrics.UNIT_RESTARTS, "up"}


def test_panel_queries_reads_rows_panels_too() -> None:
    nested = {
        "panels": [
            {"type": "row", "title": "r", "panels": [{"title": "inner", "targets": [{"expr": "up", "refId": "A"}]}]},
            {"title": "text", "type": "text"},
            {"title": "outer", "targets": [{"expr": "a", "refId": "A"}, {"refId": "B"}]},
        ]
    }
    assert panel_queries(nested) == [("inner", "up"), ("outer", "a")]


# --- provisioning -------------------------------------------------------------------------------------------


def test_provisioning_files() -> None:
    files = provisioning_files(FLEET)
    assert set(files) == {DATASOURCE_FILE, PROVIDER_FILE, DASHBOARD_FILE}
    assert (DATASOURCE_FILE, PROVIDER_FILE, DASHBOARD_FILE) == (
        "datasources/gpubox.yaml",
        "dashboards/gpubox.yaml",
        "gpubox-fleet.json",
    )
    source = yaml.safe_load(files[DATASOURCE_FILE])
    assert source["apiVersion"] == 1
    assert source["datasources"][0] | {"jsonData": None} == {
        "name": "gpubox Prometheus",
        "type": "prometheus",
        "uid": DATASOURCE_UID,
        "access": "proxy",
        "url": FLEET.prometheus_url,
        "isDefault": False,
        "editable": False,
        "jsonData": None,
    }
    assert source["datasources"][0]["jsonData"]["timeInterval"] == "15s"  # Monitoring.scrape_interval_s
    provider = yaml.safe_load(files[PROVIDER_FILE])["providers"]
    assert len(provider) == 1 and provider[0]["type"] == "file"
    assert provider[0]["options"]["path"] == DASHBOARDS_DIR == "/var/lib/grafana/dashboards/gpubox"
    assert json.loads(files[DASHBOARD_FILE]) == DASHBOARD


def test_provisioning_follows_the_fleet_and_its_parameters() -> None:
    fleet = two_hosts(MONITORING.model_copy(update={"port": 9191, "scrape_interval_s": 30}))
    files = provisioning_files(fleet, dashboards_dir="/srv/grafana/gpubox")
    source = yaml.safe_load(files[DATASOURCE_FILE])["datasources"][0]
    assert source["url"] == "http://127.0.0.1:9191"
    assert source["jsonData"]["timeInterval"] == "30s"
    assert yaml.safe_load(files[PROVIDER_FILE])["providers"][0]["options"]["path"] == "/srv/grafana/gpubox"
    local = provisioning_files(fleet, prometheus_url="http://localhost:9191")
    assert yaml.safe_load(local[DATASOURCE_FILE])["datasources"][0]["url"] == "http://localhost:9191"


# --- the queries, as Prometheus reads and computes them -----------------------------------------------------


def test_promtool_accepts_every_query(tmp_path: Path) -> None:
    assert len(QUERIES) >= 12
    output = check_rules(recording_rules(), tmp_path)
    assert f"SUCCESS: {len(QUERIES)} rules found" in output


def synthetic_series() -> list[dict[str, str]]:
    """Both hosts, sampled every 15s for 15 minutes."""
    chat_labels, draft_labels = llama("alpha", "chat"), llama("beta", "draft")
    gpu = {"alpha": [("0", 20, 22)], "beta": [("0", 30, 28), ("1", 3, 4)]}  # (index, used GiB, planned GiB)
    return [
        # chat: 50 tok/s (tokens +750 per 15s, seconds +15); draft: 60 tok/s (tokens +450, seconds +7.5)
        series(metrics.LLAMA_TOKENS_PREDICTED, chat_labels, "0+750x60"),
        series(metrics.LLAMA_TOKENS_PREDICTED_SECONDS, chat_labels, "0+15x60"),
        series(metrics.LLAMA_TOKENS_PREDICTED, draft_labels, "0+450x60"),
        series(metrics.LLAMA_TOKENS_PREDICTED_SECONDS, draft_labels, "0+7.5x60"),
        # draft accepts 45 of every 60 drafted; chat (spec_type none) has counters too, and is left out
        series(metrics.LLAMA_DRAFT_TOKENS, draft_labels, "0+60x60"),
        series(metrics.LLAMA_ACCEPTED_TOKENS, draft_labels, "0+45x60"),
        series(metrics.LLAMA_DRAFT_TOKENS, chat_labels, "0+10x60"),
        series(metrics.LLAMA_ACCEPTED_TOKENS, chat_labels, "0+5x60"),
        series(metrics.LLAMA_REQUESTS_PROCESSING, chat_labels, "1x60"),
        series(metrics.LLAMA_REQUESTS_DEFERRED, chat_labels, "3x60"),
        *[
            entry
            for host, gpus in gpu.items()
            for index, used, planned in gpus
            for entry in (
                series(metrics.GPU_MEMORY_USED, node(host, gpu=index, uuid=f"GPU-{host}{index}", name="H200"),
                       f"{used * GIB}x60"),
                series(metrics.GPU_PLANNED_MEMORY, node(host, gpu=index), f"{planned * GIB}x60"),
            )
        ],
        series(metrics.GPU_UTILIZATION, node("alpha", gpu="0", uuid="GPU-alpha0", name="H200"), "0.85x60"),
        series("up", chat_labels, "1x60"),
        series("up", draft_labels, "0x60"),
        series("up", node("alpha"), "1x60"),
        series("up", node("beta"), "1x60"),
        series(metrics.UNIT_ACTIVE, node("beta", service="whisper", unit="whisper.service"), "1x60"),
        series(metrics.UNIT_ACTIVE, node("beta", service="draft", unit="draft.service"), "0x60"),
        series(metrics.UNIT_ACTIVE, node("alpha", service="chat", unit="chat.service"), "1x60"),
        # whisper restarted 3 times in the last 15 minutes: 0 until 5m, then 1, 2, 3
        series(metrics.UNIT_RESTARTS, node("beta", service="whisper", unit="whisper.service"), "0x20 1x10 2x10 3x20"),
        # the GPU textfile of alpha, last written 30s before each sample
        series(metrics.TEXTFILE_UPDATED, node("alpha"), "-30+15x60"),
    ]


def run_expr_tests(tmp_path: Path, rules_text: str, checks: list[dict[str, Any]]) -> None:
    (tmp_path / "panels.yaml").write_text(rules_text)
    unit = {
        "rule_files": ["panels.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "15s", "input_series": synthetic_series(), "promql_expr_test": checks}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def at(title: str, samples: list[dict[str, Any]], needle: str = "", when: str = "10m") -> dict[str, Any]:
    return {"expr": record_name(query_position(title, needle)), "eval_time": when, "exp_samples": samples}


def test_panels_compute_what_they_say(tmp_path: Path) -> None:
    chat_labels, draft_labels = llama("alpha", "chat"), llama("beta", "draft")
    used = {"uuid": "GPU-alpha0", "name": "H200"}
    checks = [
        at("Decode speed", [sample("Decode speed", chat_labels, 50), sample("Decode speed", draft_labels, 60)]),
        at("Draft acceptance", [sample("Draft acceptance", draft_labels, 0.75)]),
        at("Requests processing and deferred", [
            sample("Requests processing and deferred", chat_labels, 1, "processing")
        ], "processing"),
        at("Requests processing and deferred", [
            sample("Requests processing and deferred", chat_labels, 3, "deferred")
        ], "deferred"),
        at("VRAM used vs planned", [
            sample("VRAM used vs planned", node("alpha", gpu="0", **used), 20 * GIB, "used"),
            sample("VRAM used vs planned", node("beta", gpu="0", uuid="GPU-beta0", name="H200"), 30 * GIB, "used"),
            sample("VRAM used vs planned", node("beta", gpu="1", uuid="GPU-beta1", name="H200"), 3 * GIB, "used"),
        ], "used"),
        at("VRAM used vs planned", [
            sample("VRAM used vs planned", node("alpha", gpu="0"), 22 * GIB, "planned"),
            sample("VRAM used vs planned", node("beta", gpu="0"), 28 * GIB, "planned"),
            sample("VRAM used vs planned", node("beta", gpu="1"), 4 * GIB, "planned"),
        ], "planned"),
        at("GPU utilization", [sample("GPU utilization", node("alpha", gpu="0", **used), 0.85)]),
        at("Targets up", [
            sample("Targets up", chat_labels, 1),
            sample("Targets up", draft_labels, 0),
            sample("Targets up", node("alpha"), 1),
            sample("Targets up", node("beta"), 1),
        ]),
        at("Unit restarts (15m)", [
            sample("Unit restarts (15m)", node("beta", service="whisper", unit="whisper.service"), 3)
        ], when="15m"),
        at("GPU metrics age", [sample("GPU metrics age", node("alpha"), 30)]),
    ]
    run_expr_tests(tmp_path, recording_rules(), checks)


def test_idle_decode_is_a_gap_not_zero(tmp_path: Path) -> None:
    # counters standing still: 0/0, NaN, which Grafana draws as a gap (a zero would read as "slow")
    (tmp_path / "panels.yaml").write_text(recording_rules())
    chat_labels = llama("alpha", "chat")
    decode = record_name(query_position("Decode speed"))
    unit = {
        "rule_files": ["panels.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "15s",
            "input_series": [
                series(metrics.LLAMA_TOKENS_PREDICTED, chat_labels, "100x60"),
                series(metrics.LLAMA_TOKENS_PREDICTED_SECONDS, chat_labels, "2x60"),
            ],
            "promql_expr_test": [
                {"expr": f"count({decode})", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]},
                {"expr": f"{decode} >= 0 or {decode} < 0", "eval_time": "10m", "exp_samples": []},
            ],
        }],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("host", "service", "expected"),
    [
        ("beta", "whisper", [("beta", "whisper")]),
        ("alpha|beta", "chat|whisper", [("alpha", "chat"), ("beta", "whisper")]),
        ("alpha", ".*", [("alpha", "chat")]),
    ],
)
def test_the_variables_select(tmp_path: Path, host: str, service: str, expected: list[tuple[str, str]]) -> None:
    variables = {**VARIABLES, "$host": host, "$service": service}
    value = {"chat": 1, "draft": 0, "whisper": 1}
    checks = [at("Units active", [
        sample("Units active", node(h, service=s, unit=f"{s}.service"), value[s]) for h, s in expected
    ])]
    run_expr_tests(tmp_path, recording_rules(variables), checks)
