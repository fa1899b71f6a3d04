"""Watching a gateway (issue 25): HAProxy's exporter scraped by its host's Prometheus, an alert when a model
group has fewer healthy backends than its ``min_healthy``, a gateway row on the dashboard and in `gpubox top`,
and `gpubox check` showing (or refusing by field) the gateway.

The inventory is tests/fixtures/inventories/gateway_monitoring.py: ``gw`` runs only a gateway (no box) in front
of ``llama1``'s and ``llama2``'s ``chat`` (group ``gemma``, ``min_healthy=1``). The exporter's output is real:
tests/fixtures/haproxy/exporter-metrics.txt, recorded from Debian's HAProxy 2.6 running the rendered config
(tests/haproxy_harness.py: llama1 serving one request with two queued, llama2 down after three 5xx); the rule,
the panels and top's queries are evaluated on it by promtool, and a live HAProxy is checked to still serve
every metric gpubox reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from gpubox.cli import main
from gpubox.monitoring import metrics, prometheus
from gpubox.monitoring.dashboards import GATEWAY_ROW, fleet_dashboard, panel_queries
from gpubox.monitoring.files import host_files, monitoring_files
from gpubox.monitoring.fleet import KIND_GATEWAY, Fleet, FleetError, build_fleet, fleet_from_inventory, scrape_targets
from gpubox.monitoring.query import (
    GATEWAY_HEALTHY_QUERY,
    GATEWAY_QUEUE_QUERY,
    GATEWAY_SESSIONS_QUERY,
    UP_QUERY,
    Alert,
    PrometheusClient,
    Sample,
    fleet_rows,
    gateway_rows,
    gateway_table,
)
from gpubox.monitoring.rules import alert_rules, rules_yaml, selector
from tests.haproxy_harness import FIXTURE, INVENTORY, busy_and_degraded, running_gateway
from tests.test_monitoring_rules import case, check_rules, expand, promtool, run_rule_tests, series

FLEET = fleet_from_inventory(INVENTORY)
TEXT = INVENTORY.read_text()
GATEWAY_LABELS = {"host": "gw", "kind": KIND_GATEWAY, "job": "gateway@gw", "instance": "127.0.0.1:8404"}
READ = {value for name, value in vars(metrics).items() if name.startswith("HAPROXY_") and value.startswith("haproxy_")}


def as_data(text: str) -> str:
    """The inventory with its gateway as plain data (dicts), validated when gpubox reads it rather than when the
    file imports: refused at its fields under ``gateway.``."""
    for spec in ("Gateway(", "ModelGroup(", "BackendRef(", "HostMonitoring("):
        text = text.replace(spec, "dict(")
    return text


def data_of(fleet_text: str, tmp_path: Path) -> Fleet:
    path = tmp_path / "inventory.py"
    path.write_text(fleet_text)
    return fleet_from_inventory(path)


def with_min_healthy(value: int) -> Fleet:
    """The fixture's fleet with group gemma's min_healthy changed (a copy of the gateway, revalidated)."""
    gw = FLEET.host("gw").gateway
    assert gw is not None
    group = gw.groups[0].model_copy(update={"min_healthy": value})
    gateway = type(gw).model_validate({**gw.model_dump(), "groups": [group.model_dump()]})
    entries = [("gw", {"gateway": gateway, "monitoring": FLEET.monitoring})]
    entries += [(h.name, {"box": h.box, "monitoring": FLEET.monitoring, "ssh_hostname": h.address})
                for h in FLEET.hosts if h.box is not None]  # fmt: skip
    return build_fleet(entries)


# --- gpubox check ---------------------------------------------------------------------------------------------


def test_check_shows_the_gateway_its_groups_and_its_plain_http_warning(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(INVENTORY)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "gpubox gateways" in out
    for cell in ("0.0.0.0:8000", "allow_from 10.0.0.0/24", "gemma", "llama1:chat 10.0.0.11:8080",
                 "llama2:chat 10.0.0.12:8080", "1 of 2"):  # fmt: skip
        assert cell in out, cell
    assert "│ gw │ gateway │ gateway.tls_cert │" in out and "plain HTTP" in out  # the warning, exit 0
    assert "3 host(s), 6 scrape jobs" in out  # the gateway-only host is in the fleet: gateway@gw, node@gw


@pytest.mark.parametrize(
    ("old", "new", "field", "advice"),
    [
        ('allow_from=(f"{GATEWAY_ADDRESS}/32",)', 'allow_from=("10.9.9.9/32",)', "gateway.groups.0.backends.0",
         "does not admit the gateway's address"),
        ('BackendRef(host="llama2", service="chat")', 'BackendRef(host="llama2", service="nope")',
         "gateway.groups.0.backends.1.service", "is no service of the inventory"),
        ("min_healthy=1", "min_healthy=3", "gateway.groups.0.min_healthy", "more than the group's 2"),
        ("monitoring=HostMonitoring(agent_port=9096)", "monitoring=HostMonitoring(agent_port=9096), stats_port=9100",
         "gateway.stats_port", "monitoring.node_exporter_port"),
    ],
)  # fmt: skip
def test_check_refuses_a_gateway_by_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, field: str, advice: str
) -> None:
    assert old in TEXT
    path = tmp_path / "inventory.py"
    path.write_text(as_data(TEXT.replace(old, new)))
    assert main(["check", str(path)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert field in out and advice in out, out


def test_a_gateway_beside_a_box_takes_the_box_s_monitoring(tmp_path: Path) -> None:
    beside = '("llama1", {"gateway": gateway.model_copy(update={"address": None}), "box": llama_box("10.0.0.11"),'
    text = TEXT.replace('("llama1", {"box": llama_box("10.0.0.11"),', beside)
    with pytest.raises(FleetError) as caught:  # llama1's box.monitoring runs there: a different one is refused
        data_of(text, tmp_path)
    assert "llama1.gateway.monitoring" in {problem.field for problem in caught.value.problems}


# --- the fleet: the gateway-only host is watched, HAProxy's exporter scraped ----------------------------------


def test_the_gateway_only_host_scrapes_haproxy_s_exporter_and_runs_its_agent_on_the_gateway_s_ports(
    tmp_path: Path,
) -> None:
    gw = FLEET.host("gw")
    assert gw.box is None and gw.services == () and gw.monitoring.agent_port == 9096
    assert [backend.server_name for backend in gw.backends["gemma"]] == ["llama1:chat", "llama2:chat"]
    gateway, node = scrape_targets(gw)
    assert (gateway.job, gateway.port, gateway.path, gateway.labels) == (
        "gateway@gw", 8404, "/metrics", {"host": "gw", "kind": KIND_GATEWAY})
    assert node.job == "node@gw"
    config = prometheus.prometheus_config(FLEET, gw)
    assert config["scrape_configs"][0] == {
        "job_name": "gateway@gw", "static_configs": [{"targets": ["127.0.0.1:8404"], "labels": gateway.labels}]}
    assert "--web.listen-address=127.0.0.1:9096" in prometheus.arguments(prometheus.PROMETHEUS, FLEET, gw)
    path = tmp_path / "gpubox.yml"
    path.write_text(prometheus.to_yaml(config))
    checked = promtool("check", "config", "--agent", "--syntax-only", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    files = {f.path: f.text for f in host_files(FLEET, gw, "apt", {})}
    script = files["/usr/local/lib/gpubox/gpu-metrics.sh"]
    assert "gpubox_nvidia_smi_up" in script and "service=" not in script  # no box: no unit of a service
    assert "gw/etc/prometheus/gpubox.yml" in monitoring_files(FLEET, {})
    # the gateway's series are no service's: UP_QUERY's rows are the services'
    assert {row.host for row in fleet_rows(FLEET, Answers({}))} == {"llama1", "llama2"}


def test_the_monitor_s_prometheus_port_is_refused_on_the_gateway_s_ports() -> None:
    entries = [(h.name, {"box": h.box, "gateway": h.gateway, "monitoring": FLEET.monitoring.model_copy(
        update={"monitor": "gw", "port": 8404})}) for h in FLEET.hosts]  # fmt: skip
    with pytest.raises(FleetError) as caught:
        build_fleet((name, {k: v for k, v in data.items() if v is not None}) for name, data in entries)
    assert "HAProxy's exporter" in {p.field: p.message for p in caught.value.problems}["monitoring.port"]


# --- the exporter: real output, and a live HAProxy still serving what gpubox reads ----------------------------


def exporter_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def test_the_recorded_exporter_output_has_every_metric_gpubox_reads() -> None:
    samples = exporter_samples(FIXTURE.read_text())
    names = {name for name, _, _ in samples}
    assert names >= READ, READ - names
    status = {(labels["server"], labels["state"]): value for name, labels, value in samples
              if name == metrics.HAPROXY_SERVER_STATUS}  # fmt: skip
    assert status[("llama1:chat", "UP")] == 1 and status[("llama2:chat", "DOWN")] == 1
    assert status[("llama2:chat", "UP")] == 0


def test_a_live_haproxy_with_the_rendered_config_serves_every_metric_gpubox_reads(tmp_path: Path) -> None:
    with running_gateway(tmp_path) as gateway:
        text = busy_and_degraded(gateway)
    samples = exporter_samples(text)
    assert {name for name, _, _ in samples} >= READ
    found = {(name, labels.get("server")): value for name, labels, value in samples
             if labels.get("proxy") == "group_gemma" and labels.get("state", "UP") == "UP"}  # fmt: skip
    assert found[(metrics.HAPROXY_SERVER_STATUS, "llama1:chat")] == 1
    assert found[(metrics.HAPROXY_SERVER_STATUS, "llama2:chat")] == 0
    assert found[(metrics.HAPROXY_SERVER_SESSIONS, "llama1:chat")] == 1
    assert found[(metrics.HAPROXY_BACKEND_QUEUE, None)] == 2


def fixture_series(overrides: Mapping[tuple[str, str], str] | None = None, repeat: int = 20) -> list[dict[str, str]]:
    """The recorded exporter output as promtool input series, with the labels gw's scrape adds; each value
    constant (``overrides``: by (metric, server), promtool's own values)."""
    entries = []
    for name, labels, value in exporter_samples(FIXTURE.read_text()):
        if name not in READ and name != "haproxy_backend_active_servers":
            continue
        key = (name, labels.get("server", ""))
        values = (overrides or {}).get(key, f"{value:g}x{repeat}")
        entries.append(series(name, {**GATEWAY_LABELS, **labels}, values))
    return entries


# --- the alert ------------------------------------------------------------------------------------------------


def degraded_rule(fleet: Fleet) -> dict[str, Any]:
    (rule,) = [r for g in alert_rules(fleet, {})["groups"] for r in g["rules"]
               if r["alert"] == "GpuboxGatewayGroupDegraded"]  # fmt: skip
    return rule


def fired(fleet: Fleet, value: str) -> dict[str, Any]:
    rule = degraded_rule(fleet)
    return {"exp_labels": {"severity": "critical", "host": "gw", "group": "gemma"},
            "exp_annotations": {name: expand(text, value) for name, text in rule["annotations"].items()}}  # fmt: skip


def test_the_rule_counts_up_backends_of_the_group_against_its_min_healthy(tmp_path: Path) -> None:
    rule = degraded_rule(FLEET)
    assert rule["expr"] == ('(count(haproxy_server_status{host="gw",kind="gateway",proxy="group_gemma",state="UP"} '
                            "== 1) or vector(0)) < 1")  # fmt: skip
    assert rule["for"] == "2m" and rule["labels"] == {"severity": "critical", "host": "gw", "group": "gemma"}
    assert "fewer than 1" in rule["annotations"]["summary"]
    assert "ModelGroup.min_healthy = 1" in rule["annotations"]["description"]
    assert "(chat@llama1, chat@llama2)" in rule["annotations"]["description"]
    assert degraded_rule(with_min_healthy(2))["expr"].endswith("< 2")
    down = [r for g in alert_rules(FLEET, {})["groups"] for r in g["rules"] if r["alert"] == "GpuboxGatewayDown"]
    assert [r["expr"] for r in down] == ['up{job="gateway@gw"} == 0']
    check_rules(rules_yaml(FLEET, {}), tmp_path)


def test_the_alert_fires_below_min_healthy_not_at_it_and_resolves(tmp_path: Path) -> None:
    alert = "GpuboxGatewayGroupDegraded"
    two = with_min_healthy(2)
    up1 = ("haproxy_server_status", "llama1:chat")
    # the recorded state (llama1 UP, llama2 DOWN): at min_healthy=1 quiet, below min_healthy=2 firing with 1
    run_rule_tests(rules_yaml(FLEET, {}), [case(fixture_series(), [("5m", alert, [])])], tmp_path)
    run_rule_tests(rules_yaml(two, {}), [case(fixture_series(), [("1m", alert, []), ("5m", alert, [fired(two, "1")])])],
                   tmp_path)  # fmt: skip
    # llama1 fails for 10 minutes, then is back: fires after down_for_s (2m) with 0, resolves
    flapping = fixture_series({up1: "1x2 0x10 1x10"})
    checks = [("3m", alert, []), ("6m", alert, [fired(FLEET, "0")]), ("16m", alert, [])]
    run_rule_tests(rules_yaml(FLEET, {}), [case(flapping, checks)], tmp_path)
    # HAProxy's series gone (a failed scrape marks them stale): nothing healthy is known, the group alert fires
    gone = [{**entry, "values": "1x2 stale"} for entry in fixture_series()]
    run_rule_tests(rules_yaml(FLEET, {}), [case(gone, [("1m", alert, []), ("6m", alert, [fired(FLEET, "0")])])],
                   tmp_path)  # fmt: skip


# --- the dashboard's gateway row and top's queries, computed on the recorded output ---------------------------

DASHBOARD = fleet_dashboard(FLEET)
QUERIES = [(title, expr) for title, expr in panel_queries(DASHBOARD) if title.startswith("Gateway")]


def test_the_dashboard_has_a_gateway_row_only_with_a_gateway() -> None:
    titles = [(panel["type"], panel["title"]) for panel in DASHBOARD["panels"]]
    row = titles.index(("row", GATEWAY_ROW))
    assert [title for _, title in titles[row + 1:]] == [
        "Gateway backends up", "Gateway healthy backends", "Gateway sessions", "Gateway queue", "Gateway errors",
        "Gateway response time"]  # fmt: skip
    assert "gemma@gw 1 of 2" in next(p["description"] for p in DASHBOARD["panels"]
                                     if p["title"] == "Gateway healthy backends")  # fmt: skip
    no_gateway = build_fleet((h.name, {"box": h.box, "monitoring": FLEET.monitoring}) for h in FLEET.hosts if h.box)
    assert not [t for t, _ in panel_queries(fleet_dashboard(no_gateway)) if t.startswith("Gateway")]


def test_the_gateway_panels_and_top_s_queries_compute_what_they_say(tmp_path: Path) -> None:
    variables = {"$__rate_interval": "1m", "$host": "gw|llama1"}
    exprs = [(f"gpubox_panel_{i}", expr) for i, (_, expr) in enumerate(QUERIES)]
    exprs += [("gpubox_top_healthy", GATEWAY_HEALTHY_QUERY), ("gpubox_top_sessions", GATEWAY_SESSIONS_QUERY),
              ("gpubox_top_queued", GATEWAY_QUEUE_QUERY)]  # fmt: skip
    rules = []
    for record, expr in exprs:
        for name, value in variables.items():
            expr = expr.replace(name, value)
        rules.append({"record": record, "expr": expr})
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"groups": [{"name": "p", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", "panels.yaml", cwd=tmp_path).stdout
    # llama2's three 5xx were at the start; one more each minute now: 1/60 per second
    five = ("haproxy_server_http_responses_total", "llama2:chat")
    input_series = fixture_series({five: "3+1x20"})

    def at(title: str, needle: str, expected: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
        (index,) = [i for i, (t, e) in enumerate(QUERIES) if t == title and needle in e]
        return expect(f"gpubox_panel_{index}", expected)

    def expect(record: str, expected: list[tuple[dict[str, str], float]]) -> dict[str, Any]:
        return {"expr": record, "eval_time": "10m",
                "exp_samples": [{"labels": selector(record, labels), "value": value} for labels, value in expected]}

    def server(name: str, **extra: str) -> dict[str, str]:
        return {**GATEWAY_LABELS, "proxy": "group_gemma", "server": name, **extra}

    group = {"host": "gw", "proxy": "group_gemma"}
    checks = [
        at("Gateway backends up", "", [(server("llama1:chat") | {}, 1), (server("llama2:chat"), 0)]),
        at("Gateway healthy backends", "", [(group, 1)]),
        at("Gateway sessions", "", [(server("llama1:chat"), 1), (server("llama2:chat"), 0)]),
        at("Gateway queue", "backend", [({**GATEWAY_LABELS, "proxy": "group_gemma"}, 2)]),
        at("Gateway errors", "5xx", [(server("llama1:chat", code="5xx"), 0),
                                     (server("llama2:chat", code="5xx"), 1 / 60)]),
        at("Gateway response time", "", [(server("llama1:chat"), 0.001), (server("llama2:chat"), 0.001)]),
        expect("gpubox_top_healthy", [(group, 1)]),
        expect("gpubox_top_sessions", [(group, 1)]),
        expect("gpubox_top_queued", [(group, 2)]),
    ]  # fmt: skip
    for check in checks[:1]:  # the stat panel keeps host, proxy and server only
        check["exp_samples"] = [{"labels": selector(check["expr"], {k: v for k, v in labels.items()
                                                                    if k in ("host", "proxy", "server")}),
                                 "value": value} for labels, value in
                                [(server("llama1:chat"), 1), (server("llama2:chat"), 0)]]  # fmt: skip
    unit = {"rule_files": ["panels.yaml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": input_series, "promql_expr_test": checks}]}  # fmt: skip
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- gpubox top -------------------------------------------------------------------------------------------------


class Answers(PrometheusClient):
    """Prometheus's answers to top's queries, by query (what the test above evaluates with promtool)."""

    def __init__(self, answers: Mapping[str, list[Sample]], alerts: list[Alert] | None = None) -> None:
        super().__init__("http://prometheus.invalid:9090")
        self.answers = answers
        self.firing = alerts or []
        self.asked: list[str] = []

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        self.asked.append(promql)
        return self.answers.get(promql, [])

    def alerts(self) -> list[Alert]:
        return self.firing


GROUP = {"host": "gw", "proxy": "group_gemma"}


@pytest.mark.parametrize(
    ("healthy", "sessions", "shown", "degraded"),
    [(1.0, 1.0, "1/2", False), (None, 0.0, "0/2", True), (None, None, "?/2", True)],
)
def test_top_shows_a_row_per_group_healthy_of_total_sessions_and_queue(
    healthy: float | None, sessions: float | None, shown: str, degraded: bool
) -> None:
    answers = {GATEWAY_QUEUE_QUERY: [Sample(labels=GROUP, value=2)]}
    if healthy is not None:
        answers[GATEWAY_HEALTHY_QUERY] = [Sample(labels=GROUP, value=healthy)]
    if sessions is not None:
        answers[GATEWAY_SESSIONS_QUERY] = [Sample(labels=GROUP, value=sessions)]
    alert = Alert(name="GpuboxGatewayGroupDegraded", state="firing", labels={"host": "gw", "group": "gemma"})
    (row,) = gateway_rows(FLEET, Answers(answers, [alert] if degraded else []))
    assert (row.host, row.group, row.total, row.min_healthy, row.queued) == ("gw", "gemma", 2, 1, 2)
    assert row.degraded is degraded and row.alerts == (("GpuboxGatewayGroupDegraded",) if degraded else ())
    console = Console(width=200, record=True)
    console.print(gateway_table([row]))
    text = console.export_text()
    cells = [cell.strip() for cell in next(line for line in text.splitlines() if "gemma" in line).split("│")]
    assert cells[1:7] == ["gw", "gemma", shown, "1", "-" if sessions is None else f"{sessions:.0f}", "2"]
    assert "healthy/total" in text and ("GpuboxGatewayGroupDegraded" in text) is degraded


def test_top_without_a_gateway_asks_nothing_more() -> None:
    plain = build_fleet((h.name, {"box": h.box, "monitoring": FLEET.monitoring}) for h in FLEET.hosts if h.box)
    client = Answers({})
    assert gateway_rows(plain, client) == [] and client.asked == []
    assert UP_QUERY not in client.asked
