"""Watching RPC servers (issue 24): ``ggml-rpc-server`` has no /metrics, so its unit is watched like every
unit, and the host of each llama-server that uses one probes it with Debian's blackbox exporter (TCP
connect); an alert names the llama-servers that depend on an unreachable device; `gpubox top` and the
dashboard show remote devices.

The inventory is tests/fixtures/inventories/rpc_monitoring.py: ``client`` (the monitor) runs ``chat``, every layer
on ``helper``'s ``rpc0``. The generated files are checked by the real tools (promtool, the blackbox
exporter's ``--config.check``), the probe job by a real Prometheus scraping a real blackbox exporter, the
rule and the panels by ``promtool test rules``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from pydantic import ValidationError
from rich.console import Console

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, RpcRef, RpcServer
from gpubox.bench import free_port
from gpubox.monitoring import metrics, prometheus, textfile
from gpubox.monitoring.dashboards import fleet_dashboard, panel_queries, rpc_reachable_expr
from gpubox.monitoring.files import host_files, monitoring_files
from gpubox.monitoring.fleet import (
    KIND_RPC_PROBE,
    Fleet,
    FleetError,
    build_fleet,
    fleet_from_inventory,
    peer_endpoint,
    probe_targets,
    scrape_targets,
)
from gpubox.monitoring.query import PROBE_QUERY, UP_QUERY, PrometheusClient, Sample, fleet_rows, top_table
from gpubox.monitoring.rules import alert_rules, rules_yaml, selector
from gpubox.servers.rpc import rpc_endpoint
from gpubox.spec import HostMonitoring, problems_from
from tests.test_monitoring_rules import case, check_rules, expand, promtool, run_rule_tests, series

INVENTORY = Path(__file__).parent / "fixtures" / "inventories" / "rpc_monitoring.py"
FLEET = fleet_from_inventory(INVENTORY)
COMMIT = "c" * 40
ENDPOINT = "10.0.0.2:50052"
PROBE_JOB = "rpc-probe:rpc0@helper/chat@client"
BLACKBOX = shutil.which("prometheus-blackbox-exporter")
PROMETHEUS = shutil.which("prometheus")
# Debian's prometheus-blackbox-exporter is in .ci/apt-packages.txt: without it these tests fail (never skip).
assert BLACKBOX is not None, "needs prometheus-blackbox-exporter: scripts/setup installs it"


def model() -> ModelFile:
    return ModelFile(path="/srv/models/big.gguf", sha256="a" * 64, architecture="llama")


def client_box(*refs: RpcRef, port: int = 8080, **fields: Any) -> Box:
    return Box(
        address="10.0.0.1",
        llama_cpp=LlamaCppBuild(commit=COMMIT),
        services=(
            LlamaServer(name="chat", model=model(), port=port, rpc=refs or (RpcRef(host="helper", service="rpc0"),),
                        tensor_split=(1.0,) * max(len(refs), 1), fit="off", n_gpu_layers="all"),
        ),
        **fields,
    )  # fmt: skip


def helper_box(allow_from: tuple[str, ...] = ("10.0.0.1/32",), **fields: Any) -> Box:
    return Box(
        address="10.0.0.2",
        llama_cpp=LlamaCppBuild(commit=COMMIT),
        services=(RpcServer(name="rpc0", host="0.0.0.0", allow_from=allow_from),),
        **fields,
    )


def plain_client() -> Box:
    """The client's llama-server on its own CPU: no RPC server used."""
    return Box(llama_cpp=LlamaCppBuild(commit=COMMIT), services=(LlamaServer(name="chat", model=model()),))


def pair(client: Box | None = None, helper: Box | None = None, **monitoring: Any) -> Fleet:
    spec = FLEET.monitoring.model_copy(update=monitoring)
    boxes = {"client": client or client_box(), "helper": helper or helper_box()}
    return build_fleet(
        (name, {"box": box, "monitoring": spec, "ssh_hostname": box.address}) for name, box in boxes.items()
    )


def refusal(error: FleetError) -> dict[str, str]:
    return {problem.field: problem.message for problem in error.problems}


# --- the fleet knows each llama-server's RPC endpoints -----------------------------------------------------


def test_build_fleet_resolves_each_rpc_endpoint_from_the_inventory() -> None:
    (ref,) = FLEET.host("client").box.llama_server("chat").rpc
    assert (ref.host, ref.service, ref.endpoint) == ("helper", "rpc0", ENDPOINT)
    (device,) = FLEET.host("client").remote
    assert (device.user, device.name, device.endpoint) == ("chat", "rpc0@helper", ENDPOINT)
    assert FLEET.host("client").remote_of("chat") == (device,) and FLEET.host("helper").remote == ()
    # the same from (name, data) pairs, as the deploy builds it
    assert pair().host("client").box.llama_server("chat").rpc[0].endpoint == ENDPOINT


@pytest.mark.parametrize(
    ("listen", "address", "expected"),
    [("0.0.0.0", "10.0.0.2", "10.0.0.2:50052"), ("10.0.0.7", "10.0.0.2", "10.0.0.7:50052"),
     ("::", "fd00::2", "[fd00::2]:50052")],
)  # fmt: skip
def test_the_probed_endpoint_is_what_the_llama_server_dials(listen: str, address: str, expected: str) -> None:
    """fleet.peer_endpoint (the monitoring's, type-blind) and gpubox.servers.rpc.rpc_endpoint (what --rpc renders)
    agree."""
    server = RpcServer(name="rpc0", host=listen, allow_from=("10.0.0.1/32", "fd00::1/128"))
    box = Box(address=address, llama_cpp=LlamaCppBuild(commit=COMMIT), services=(server,))
    assert peer_endpoint(box, server) == rpc_endpoint(address, server) == expected


def test_build_fleet_refuses_a_reference_by_field() -> None:
    with pytest.raises(FleetError) as caught:
        pair(client=client_box(RpcRef(host="nowhere", service="rpc0")))
    assert "'nowhere' is no gpubox host of this inventory" in refusal(caught.value)["client.services.0.rpc.0.host"]
    with pytest.raises(FleetError) as caught:  # the helper does not admit the client
        pair(helper=helper_box(allow_from=("10.9.9.9/32",)))
    assert "add 10.0.0.1/32 to rpc0's allow_from on helper" in refusal(caught.value)["client.services.0.rpc.0"]


# --- the probes: from the client host only, through a loopback blackbox exporter ---------------------------


def test_one_probe_per_rpc_endpoint_on_the_client_host_only() -> None:
    (probe,) = probe_targets(FLEET.host("client"))
    assert probe.job == PROBE_JOB
    assert probe.probe == ENDPOINT and probe.port == 9115 and probe.path == "/probe"
    assert probe.labels == {
        "host": "client", "kind": KIND_RPC_PROBE, "service": "chat", "rpc": "rpc0@helper", "endpoint": ENDPOINT,
    }  # fmt: skip
    assert probe_targets(FLEET.host("helper")) == []
    # the RPC server has no /metrics: nothing scrapes it on its host
    assert [target.job for target in scrape_targets(FLEET.host("helper"))] == ["node@helper"]


def test_the_blackbox_exporter_runs_only_where_llama_servers_use_rpc_servers() -> None:
    assert prometheus.BLACKBOX in prometheus.daemons(FLEET, FLEET.host("client"))
    assert prometheus.BLACKBOX not in prometheus.daemons(FLEET, FLEET.host("helper"))
    assert prometheus.BLACKBOX.packages["apt"] == "prometheus-blackbox-exporter"
    files = monitoring_files(FLEET, {})
    assert "client/etc/prometheus/gpubox-blackbox.yml" in files
    assert "client/etc/systemd/system/prometheus-blackbox-exporter.service.d/gpubox.conf" in files
    assert not [path for path in files if path.startswith("helper/") and "blackbox" in path]
    assert "blackbox" not in files["helper/etc/prometheus/gpubox.yml"]


def test_the_blackbox_exporter_listens_on_loopback_with_gpubox_s_config() -> None:
    client = FLEET.host("client")
    drop_in = prometheus.drop_in(prometheus.BLACKBOX, "apt", FLEET, client)
    assert drop_in.splitlines()[2:4] == [
        "ExecStart=",
        "ExecStart=/usr/bin/prometheus-blackbox-exporter --config.file=/etc/prometheus/gpubox-blackbox.yml "
        "--web.listen-address=127.0.0.1:9115",
    ]
    moved = pair(client=client_box(monitoring=HostMonitoring(blackbox_port=9300)))
    assert "--web.listen-address=127.0.0.1:9300" in prometheus.arguments(
        prometheus.BLACKBOX, moved, moved.host("client")
    )
    by_path = {host_file.path: host_file for host_file in host_files(FLEET, client, "apt", {})}
    config = by_path[prometheus.BLACKBOX_CONFIG]
    assert yaml.safe_load(config.text) == {"modules": {"tcp_connect": {"prober": "tcp"}}}
    assert (config.mode, config.group, config.restarts) == ("0640", "prometheus", "blackbox-exporter")
    assert config.check == ("/usr/bin/prometheus-blackbox-exporter", "--config.check", "--config.file", "{}")
    # written before the Prometheus config whose probe jobs name its module
    paths = list(by_path)
    assert paths.index(prometheus.BLACKBOX_CONFIG) < paths.index(prometheus.PROMETHEUS_CONFIG)


def test_the_blackbox_exporter_accepts_its_config_and_its_check_refuses_a_broken_one(tmp_path: Path) -> None:
    assert BLACKBOX is not None
    good = tmp_path / "good.yml"
    good.write_text(prometheus.to_yaml(prometheus.blackbox_config()))
    bad = tmp_path / "bad.yml"
    bad.write_text("modules:\n  tcp_connect:\n    prober: tcp\n    timeout: soon\n")
    for path, code in ((good, 0), (bad, 1)):
        words = prometheus.validate_command(str(path), FLEET, FLEET.host("client"), "blackbox")
        check = [BLACKBOX if word == "/usr/bin/prometheus-blackbox-exporter" else word for word in words]
        result = subprocess.run(check, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == code, (path, result.stdout + result.stderr)


def test_the_probe_job_relabels_as_the_blackbox_docs_say_and_passes_promtool(tmp_path: Path) -> None:
    config = prometheus.prometheus_config(FLEET, FLEET.host("client"))
    probe = next(job for job in config["scrape_configs"] if job["job_name"] == PROBE_JOB)
    assert probe == {
        "job_name": PROBE_JOB,
        "metrics_path": "/probe",
        "params": {"module": ["tcp_connect"]},
        "static_configs": [{"targets": [ENDPOINT], "labels": probe_targets(FLEET.host("client"))[0].labels}],
        "relabel_configs": [
            {"source_labels": ["__address__"], "target_label": "__param_target"},
            {"source_labels": ["__param_target"], "target_label": "instance"},
            {"target_label": "__address__", "replacement": "127.0.0.1:9115"},
        ],
    }
    path = tmp_path / "gpubox.yml"
    path.write_text(prometheus.to_yaml(config))
    checked = promtool("check", "config", "--syntax-only", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # the client as an agent (another monitor) probes the same way
    agent = pair(monitor="helper", listen="0.0.0.0")
    agent_config = prometheus.prometheus_config(agent, agent.host("client"))
    assert PROBE_JOB in [job["job_name"] for job in agent_config["scrape_configs"]]
    path.write_text(prometheus.to_yaml(agent_config))
    checked = promtool("check", "config", "--agent", "--syntax-only", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_blackbox_port_is_checked_like_the_other_monitoring_ports() -> None:
    with pytest.raises(ValidationError) as caught:
        HostMonitoring(blackbox_port=9100)
    assert "port 9100 is node_exporter_port already" in problems_from(caught.value)[0].message
    with pytest.raises(ValidationError):
        HostMonitoring(agent_port=9200, blackbox_port=9200)
    with pytest.raises(FleetError) as caught:  # the client runs the exporter: its service's port is refused
        pair(client=client_box(port=9115))
    assert "port 9115 is service 'chat''s already" in refusal(caught.value)["client.monitoring.blackbox_port"]
    with pytest.raises(FleetError) as caught:  # the monitor's Prometheus port, on the client
        pair(port=9115)
    assert "the blackbox exporter" in refusal(caught.value)["monitoring.port"]
    # the helper runs no exporter: its port is free there
    lone = Box(llama_cpp=LlamaCppBuild(commit=COMMIT), address="10.0.0.2",
               services=(RpcServer(name="rpc0", port=9115, host="0.0.0.0", allow_from=("10.0.0.1/32",)),))  # fmt: skip
    assert pair(helper=lone).host("helper").box.services[0].port == 9115


# --- a real Prometheus scrapes the probe through a real blackbox exporter ------------------------------------


class HeldServer:
    """A TCP server that accepts like ggml-rpc-server: ``listen(1)``, one client served at a time (``hold``:
    the first connection is held, as a connected llama-server's is, and nothing else is accepted)."""

    def __init__(self, hold: bool) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(1)
        self.port: int = self.socket.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        if hold:
            self.held.append(socket.create_connection(("127.0.0.1", self.port)))
            self.held.append(self.socket.accept()[0])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        if not hold:
            self.thread.start()

    def _serve(self) -> None:
        self.socket.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            connection.close()  # the probe's connection: EOF at once, as rpc_serve_client returns

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)  # a blocked accept() keeps the listening socket open
        for held in self.held:
            held.close()
        self.socket.close()


@pytest.fixture
def blackbox(tmp_path: Path) -> Iterator[int]:
    """The blackbox exporter with the generated config on a free loopback port."""
    assert BLACKBOX is not None
    config = tmp_path / "blackbox.yml"
    config.write_text(prometheus.to_yaml(prometheus.blackbox_config()))
    port = free_port()
    log = (tmp_path / "blackbox.log").open("wb")
    process = subprocess.Popen(
        [BLACKBOX, "--config.file", str(config), f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "the blackbox exporter never started"
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def probe(port: int, target: str) -> float:
    response = requests.get(
        f"http://127.0.0.1:{port}/probe",
        params={"module": "tcp_connect", "target": target},
        headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"},  # as Prometheus sends it: the probe's timeout
        timeout=10,
    )
    line = next(line for line in response.text.splitlines() if line.startswith("probe_success "))
    return float(line.split()[1])


def test_a_busy_rpc_server_lets_no_probe_in_and_an_idle_one_does(blackbox: int) -> None:
    """Why the alert and top count a failed probe only while the llama-server is not up: ggml-rpc-server's
    ``listen(sockfd, 1)`` (ggml-rpc's transport.cpp) and its one client at a time."""
    busy = HeldServer(hold=True)
    try:
        results = [probe(blackbox, f"127.0.0.1:{busy.port}") for _ in range(4)]
    finally:
        busy.close()
    assert results[:2] == [1, 1] and results[2:] == [0, 0]  # the accept queue (backlog + 1) full, then timeouts
    idle = HeldServer(hold=False)
    try:
        assert [probe(blackbox, f"127.0.0.1:{idle.port}") for _ in range(4)] == [1, 1, 1, 1]
    finally:
        idle.close()
    port = idle.port  # nothing listens there now: refused
    assert probe(blackbox, f"127.0.0.1:{port}") == 0


def test_prometheus_scrapes_the_probe_job_with_its_labels(blackbox: int, tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    idle = HeldServer(hold=False)
    endpoint = f"127.0.0.1:{idle.port}"
    client = FLEET.host("client")
    (target,) = probe_targets(client)
    target = type(target)(**{**vars(target), "port": blackbox, "probe": endpoint,
                             "labels": {**target.labels, "endpoint": endpoint}})  # fmt: skip
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [prometheus.scrape_config(target)]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(prometheus.to_yaml(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        client_api = PrometheusClient(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                found = client_api.query(PROBE_QUERY.replace("max by (host, service, rpc) ", ""))
            except Exception:  # noqa: BLE001 - not up yet
                found = []
            if found:
                break
            assert time.monotonic() < deadline and process.poll() is None, "no probe_success series"
            time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        idle.close()
    (sample,) = found
    assert sample.value == 1
    names = ("host", "kind", "service", "rpc", "endpoint", "instance", "job")
    assert {name: sample.labels[name] for name in names} == {
        "host": "client", "kind": KIND_RPC_PROBE, "service": "chat", "rpc": "rpc0@helper", "endpoint": endpoint,
        "instance": endpoint, "job": PROBE_JOB,
    }  # fmt: skip


# --- the alert --------------------------------------------------------------------------------------------------

RULES_TEXT = rules_yaml(FLEET, {})
PROBE_LABELS = {**probe_targets(FLEET.host("client"))[0].labels, "job": PROBE_JOB, "instance": ENDPOINT}
CHAT_UP = {"host": "client", "kind": "llama-server", "service": "chat", "job": "chat@client",
           "instance": "127.0.0.1:8080"}  # fmt: skip


def rpc_rule() -> dict[str, Any]:
    rules = alert_rules(FLEET, {})["groups"]
    (rule,) = [r for g in rules for r in g["rules"] if r["alert"] == "GpuboxRpcDeviceUnreachable"]
    return rule


def firing() -> dict[str, Any]:
    rule = rpc_rule()
    return {
        "exp_labels": {**PROBE_LABELS, "severity": "critical"},
        "exp_annotations": {name: expand(text, "") for name, text in rule["annotations"].items()},
    }


def test_the_rule_names_the_rpc_server_and_the_llama_servers_on_it(tmp_path: Path) -> None:
    rule = rpc_rule()
    assert rule["for"] == "2m"  # Monitoring.down_for_s of the fixture
    assert rule["labels"] == {"severity": "critical", "host": "client", "service": "chat", "rpc": "rpc0@helper"}
    assert rule["expr"] == (
        f'(probe_success{{job="{PROBE_JOB}"}} == 0) unless on(host, service) (up{{job="chat@client"}} == 1)'
    )
    summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
    assert "rpc0@helper" in summary and ENDPOINT in summary and "chat@client" in summary
    assert "The llama-servers that put layers on it: chat@client" in description
    assert "Monitoring.down_for_s = 120" in description
    check_rules(RULES_TEXT, tmp_path)
    # no rule where no llama-server uses an RPC server
    assert "GpuboxRpcDeviceUnreachable" not in rules_yaml(pair(client=plain_client()), {})


def test_the_alert_fires_after_down_for_s_not_before_and_resolves(tmp_path: Path) -> None:
    alert = "GpuboxRpcDeviceUnreachable"
    # chat down, its device unreachable from 0 to 10m, reachable after
    down = [series(metrics.PROBE_SUCCESS, PROBE_LABELS, "0x10 1x10"), series("up", CHAT_UP, "0x20")]
    checks = [("1m", alert, []), ("5m", alert, [firing()]), ("15m", alert, [])]
    # chat up (holding the RPC server's one connection): the busy server's failed probes are no alert
    busy = [series(metrics.PROBE_SUCCESS, PROBE_LABELS, "0x20"), series("up", CHAT_UP, "1x20")]
    # the device reachable, chat down for its own reasons (GpuboxServiceDown's business)
    reachable = [series(metrics.PROBE_SUCCESS, PROBE_LABELS, "1x20"), series("up", CHAT_UP, "0x20")]
    quiet = [(at, alert, []) for at in ("5m", "15m")]
    run_rule_tests(RULES_TEXT, [case(down, checks), case(busy, quiet), case(reachable, quiet)], tmp_path)


# --- the RPC server's unit is watched like every unit ----------------------------------------------------------


def test_the_rpc_server_s_unit_state_and_restarts_are_written_and_alerted(tmp_path: Path) -> None:
    script = textfile.gpu_metrics_script(FLEET.host("helper").box, {})
    assert "unit_active rpc0.service" in script and "unit_restarts rpc0.service" in script
    rules = {(r["alert"], r["labels"]["host"], r["labels"].get("service"))
             for g in alert_rules(FLEET, {})["groups"] for r in g["rules"]}  # fmt: skip
    assert {("GpuboxUnitInactive", "helper", "rpc0"), ("GpuboxUnitRestarting", "helper", "rpc0")} <= rules
    assert ("GpuboxServiceDown", "helper", "rpc0") not in rules  # no /metrics to scrape
    unit = {"host": "helper", "kind": "node", "job": "node@helper", "instance": "127.0.0.1:9100",
            "service": "rpc0", "unit": "rpc0.service"}  # fmt: skip
    rule = next(r for g in alert_rules(FLEET, {})["groups"] for r in g["rules"]
                if r["alert"] == "GpuboxUnitInactive" and r["labels"]["host"] == "helper")  # fmt: skip
    expected = {"exp_labels": {**unit, "severity": "critical"},
                "exp_annotations": {name: expand(text, "") for name, text in rule["annotations"].items()}}  # fmt: skip
    run_rule_tests(RULES_TEXT, [case([series(metrics.UNIT_ACTIVE, unit, "0x10")],
                                     [("1m", "GpuboxUnitInactive", []), ("5m", "GpuboxUnitInactive", [expected])])],
                   tmp_path)  # fmt: skip


# --- the dashboard -----------------------------------------------------------------------------------------------

DASHBOARD = fleet_dashboard(FLEET)
QUERIES = panel_queries(DASHBOARD)
VARIABLES = {"$__rate_interval": "1m", "$host": ".*", "$service": ".*"}


def substituted(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def test_the_dashboard_shows_remote_devices_only_where_there_are_some() -> None:
    titles = [panel["title"] for panel in DASHBOARD["panels"]]
    assert {"RPC devices reachable", "RPC TCP probes"} <= set(titles)
    reachable = dict(QUERIES)["RPC devices reachable"]
    assert reachable == rpc_reachable_expr()
    assert 'probe_success{kind="rpc-probe",host=~"$host",service=~"$service"}' in reachable
    plain = pair(client=plain_client())
    assert not [title for title, _ in panel_queries(fleet_dashboard(plain)) if title.startswith("RPC")]


def test_the_rpc_panels_compute_what_they_say(tmp_path: Path) -> None:
    """Three clients' devices: connected (probe 0, llama-server up), idle (probe 1), gone (probe 0, down)."""
    wanted = [(title, expr) for title, expr in QUERIES if title.startswith("RPC")]
    rules = [{"record": f"gpubox_panel_{i}", "expr": substituted(expr)} for i, (_, expr) in enumerate(wanted)]
    rules.append({"record": "gpubox_top_probes", "expr": PROBE_QUERY})
    rules.append({"record": "gpubox_top_up", "expr": UP_QUERY})
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump({"groups": [{"name": "p", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool("check", "rules", "panels.yaml", cwd=tmp_path).stdout

    def labels(host: str, **extra: str) -> dict[str, str]:
        return {"host": host, "kind": KIND_RPC_PROBE, "service": "chat", "rpc": f"rpc0@{host}-helper",
                "endpoint": f"{host}:50052", "job": f"rpc-probe:rpc0@{host}-helper/chat@{host}",
                "instance": f"{host}:50052", **extra}  # fmt: skip

    def up(host: str) -> dict[str, str]:
        return {**CHAT_UP, "host": host, "job": f"chat@{host}"}

    states = {"connected": (0, 1), "idle": (1, 0), "gone": (0, 0)}
    input_series = [
        entry
        for host, (probe_value, up_value) in states.items()
        for entry in (series(metrics.PROBE_SUCCESS, labels(host), f"{probe_value}x20"),
                      series("up", up(host), f"{up_value}x20"))  # fmt: skip
    ]

    def samples(record: str, values: Mapping[str, int], keep: tuple[str, ...]) -> dict[str, Any]:
        return {"expr": record, "eval_time": "5m", "exp_samples": [
            {"labels": selector(record, {k: v for k, v in labels(host).items() if k in keep}), "value": value}
            for host, value in values.items()
        ]}  # fmt: skip

    all_labels = tuple(labels("x"))
    reachable_index = next(i for i, (title, _) in enumerate(wanted) if title == "RPC devices reachable")
    probes_index = next(i for i, (title, _) in enumerate(wanted) if title == "RPC TCP probes")
    reachable_labels = tuple(name for name in all_labels if name != "__name__")
    checks = [
        samples(f"gpubox_panel_{reachable_index}", {"connected": 1, "idle": 1, "gone": 0}, reachable_labels),
        samples(f"gpubox_panel_{probes_index}", {"connected": 0, "idle": 1, "gone": 0}, all_labels),
        samples("gpubox_top_probes", {"connected": 0, "idle": 1, "gone": 0}, ("host", "service", "rpc")),
    ]
    unit = {"rule_files": ["panels.yaml"], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": input_series, "promql_expr_test": checks}]}  # fmt: skip
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- gpubox top -------------------------------------------------------------------------------------------------


class Answers(PrometheusClient):
    """Prometheus's answers to top's queries, by query (what the panel test above evaluates with promtool)."""

    def __init__(self, answers: Mapping[str, list[Sample]]) -> None:
        super().__init__("http://prometheus.invalid:9090")
        self.answers = answers
        self.asked: list[str] = []

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        self.asked.append(promql)
        return self.answers.get(promql, [])

    def alerts(self) -> list[Any]:
        return []


def top_rows(probe: float | None, chat_up: float) -> dict[tuple[str, str], Any]:
    answers = {UP_QUERY: [Sample(labels={"job": "chat@client"}, value=chat_up)]}
    if probe is not None:
        answers[PROBE_QUERY] = [Sample(labels={"host": "client", "service": "chat", "rpc": "rpc0@helper"}, value=probe)]
    client = Answers(answers)
    rows = {(row.host, row.service): row for row in fleet_rows(FLEET, client)}
    assert PROBE_QUERY in client.asked
    return rows


@pytest.mark.parametrize(
    ("probe", "chat_up", "up", "in_use", "shown"),
    [
        (1.0, 0.0, True, False, "rpc0@helper up"),
        (0.0, 1.0, True, True, "rpc0@helper up (in use)"),
        (0.0, 0.0, False, False, "rpc0@helper DOWN"),
        (None, 1.0, None, False, "rpc0@helper ?"),
    ],
)
def test_top_shows_each_llama_server_s_remote_devices(
    probe: float | None, chat_up: float, up: bool | None, in_use: bool, shown: str
) -> None:
    rows = top_rows(probe, chat_up)
    (device,) = rows[("client", "chat")].remote
    assert (device.rpc, device.endpoint, device.up, device.in_use) == ("rpc0@helper", ENDPOINT, up, in_use)
    assert rows[("helper", "rpc0")].remote == ()
    console = Console(width=200, record=True)
    console.print(top_table(list(rows.values())))
    text = console.export_text()
    assert "remote devices" in text and shown in text


def test_top_without_rpc_asks_nothing_more_and_has_no_remote_column() -> None:
    plain = pair(client=plain_client())
    client = Answers({})
    rows = fleet_rows(plain, client)
    assert PROBE_QUERY not in client.asked
    console = Console(width=200, record=True)
    console.print(top_table(rows))
    assert "remote devices" not in console.export_text()
