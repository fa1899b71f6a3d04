"""A fleet's monitoring from the inventory: refusals by field, scrape targets, and the generated
Prometheus, agent and Alertmanager configs, checked by Debian's promtool and amtool."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, SmokeThresholds
from gpubox.monitoring import prometheus
from gpubox.monitoring.fleet import FleetError, build_fleet, planned_gpu_bytes, scrape_targets
from gpubox.monitoring.spec import Monitoring
from gpubox.spec import HostMonitoring, problems_from

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
MODEL = ModelFile(path="/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf", sha256="a" * 64, architecture="llama")


def llama(name: str = "gemma4", port: int = 8080, **fields: Any) -> LlamaServer:
    return LlamaServer(
        name=name, model=MODEL, port=port, parallel=1, smoke=SmokeThresholds(min_tokens_per_second=50), **fields
    )


def box(*services: LlamaServer, **fields: Any) -> Box:
    return Box(llama_cpp=LlamaCppBuild(commit=COMMIT), services=services or (llama(),), **fields)


def fleet_of(monitoring: Monitoring, **boxes: Box) -> Any:
    return build_fleet(
        (name, {"box": value, "monitoring": monitoring, "ssh_hostname": "127.0.0.1"}) for name, value in boxes.items()
    )


def refusal(error: FleetError) -> dict[str, str]:
    return {problem.field: problem.message for problem in error.problems}


def test_a_monitor_outside_the_inventory_is_refused_naming_the_field() -> None:
    with pytest.raises(FleetError) as caught:
        fleet_of(Monitoring(monitor="nowhere"), a=box())
    assert "'nowhere' is not a gpubox host of this inventory: name one of ['a']" in refusal(caught.value)[
        "monitoring.monitor"
    ]


def test_prometheus_on_a_port_a_service_uses_is_refused() -> None:
    with pytest.raises(FleetError) as caught:
        fleet_of(Monitoring(monitor="a", port=8080), a=box())
    assert "port 8080 is taken on a by service 'gemma4'" in refusal(caught.value)["monitoring.port"]
    with pytest.raises(FleetError) as caught:
        fleet_of(Monitoring(monitor="a", webhook_url="http://127.0.0.1:5001/", alertmanager_port=9100), a=box())
    assert "node-exporter" in refusal(caught.value)["monitoring.alertmanager_port"]


def test_a_duplicate_scrape_job_is_refused() -> None:
    """A service called `node` would scrape as `node@a`, the node-exporter's job."""
    with pytest.raises(FleetError) as caught:
        fleet_of(Monitoring(monitor="a"), a=box(llama("node")))
    assert "scrape job 'node@a'" in refusal(caught.value)["a.services"]


def test_the_exporter_on_a_service_port_is_refused_by_the_box() -> None:
    with pytest.raises(ValidationError) as caught:
        box(monitoring=HostMonitoring(node_exporter_port=8080))
    problems = {problem.field: problem.message for problem in problems_from(caught.value)}
    assert "port 8080 is already used by service 'gemma4'" in problems["monitoring.node_exporter_port"]


def test_a_llama_server_without_metrics_is_refused() -> None:
    with pytest.raises(FleetError) as caught:
        fleet_of(Monitoring(monitor="a"), a=box(llama(metrics=False)))
    assert "set metrics=True" in refusal(caught.value)["a.services.0.metrics"]


def test_hosts_with_different_monitoring_specs_are_refused() -> None:
    entries = [
        ("a", {"box": box(), "monitoring": Monitoring(monitor="a")}),
        ("b", {"box": box(), "monitoring": Monitoring(monitor="b")}),
    ]
    with pytest.raises(FleetError, match="different `monitoring` specs"):
        build_fleet(entries)


def test_a_loopback_prometheus_other_machines_write_to_is_refused() -> None:
    entries = [
        ("a", {"box": box(), "monitoring": Monitoring(monitor="a"), "ssh_hostname": "10.0.0.1"}),
        ("b", {"box": box(), "monitoring": Monitoring(monitor="a"), "ssh_hostname": "10.0.0.2"}),
    ]
    with pytest.raises(FleetError) as caught:
        build_fleet(entries)
    assert "set listen to an address they reach" in refusal(caught.value)["monitoring.listen"]
    fleet = build_fleet(
        (name, {**data, "monitoring": Monitoring(monitor="a", listen="0.0.0.0")}) for name, data in entries
    )
    assert fleet.prometheus_url == "http://10.0.0.1:9090"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("retention", "15 days", "retention is a Prometheus duration"),
        ("webhook_url", "ftp://x/", "webhook_url must be an http:// or https:// URL"),
        ("listen", "localhost", "listen must be an IP address"),
    ],
)
def test_monitoring_fields_are_refused_by_name(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Monitoring(monitor="a", **{field: value})
    problems = {problem.field: problem.message for problem in problems_from(caught.value)}
    assert message in problems[field]


def three_hosts() -> Any:
    return fleet_of(
        Monitoring(monitor="a", webhook_url="http://127.0.0.1:5001/hook", scrape_interval_s=5),
        a=box(llama(spec_type="none")),
        b=box(llama(api_key_file="generate", gpus=(0, 1))),
        c=box(llama(port=8081), monitoring=HostMonitoring(node_exporter_port=9200, agent_port=9201)),
    )


def test_each_host_scrapes_its_own_services_and_exporter_with_the_fleet_labels() -> None:
    fleet = three_hosts()
    targets = {target.job: target for host in fleet.hosts for target in scrape_targets(host)}
    assert sorted(targets) == ["gemma4@a", "gemma4@b", "gemma4@c", "node@a", "node@b", "node@c"]
    assert targets["gemma4@b"].labels == {
        "host": "b",
        "kind": "llama-server",
        "service": "gemma4",
        "gpu": "0,1",
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "spec_type": "none",
    }
    assert targets["gemma4@b"].credentials_file == "/etc/prometheus/gpubox/gemma4.key"
    assert targets["gemma4@b"].key_source == "/etc/gpubox/keys/gemma4.key"
    assert targets["gemma4@a"].credentials_file is None
    assert targets["node@c"].port == 9200


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)


def test_the_monitor_config_passes_promtool_and_scrapes_with_a_key_file(tmp_path: Path) -> None:
    fleet = three_hosts()
    config = prometheus.server_config(fleet)
    assert [job["job_name"] for job in config["scrape_configs"]] == ["gemma4@a", "node@a"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    assert config["global"] == {"scrape_interval": "5s", "evaluation_interval": "15s"}
    path = tmp_path / "gpubox.yml"
    path.write_text(prometheus.to_yaml(config))
    checked = promtool("check", "config", "--syntax-only", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "--web.enable-remote-write-receiver" in prometheus.arguments(prometheus.PROMETHEUS, fleet, fleet.monitor)


def test_an_agent_config_remote_writes_to_the_monitor_and_passes_promtool_agent(tmp_path: Path) -> None:
    fleet = three_hosts()
    config = prometheus.agent_config(fleet, fleet.host("b"))
    assert config["remote_write"] == [{"url": "http://127.0.0.1:9090/api/v1/write"}]
    keyed = next(job for job in config["scrape_configs"] if job["job_name"] == "gemma4@b")
    assert keyed["authorization"] == {"type": "Bearer", "credentials_file": "/etc/prometheus/gpubox/gemma4.key"}
    assert "rule_files" not in config and "alerting" not in config
    path = tmp_path / "agent.yml"
    path.write_text(prometheus.to_yaml(config))
    checked = promtool("check", "config", "--agent", "--syntax-only", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # and the agent's flags: agent mode, its own storage, loopback only
    flags = prometheus.arguments(prometheus.PROMETHEUS, fleet, fleet.host("c"))
    assert flags[0] == "--enable-feature=agent" and "--web.listen-address=127.0.0.1:9201" in flags


def test_a_single_host_fleet_needs_no_remote_write_receiver() -> None:
    fleet = fleet_of(Monitoring(monitor="a"), a=box())
    flags = prometheus.arguments(prometheus.PROMETHEUS, fleet, fleet.monitor)
    assert "--web.enable-remote-write-receiver" not in flags
    assert "--web.listen-address=127.0.0.1:9090" in flags
    assert [daemon.role for daemon in prometheus.daemons(fleet, fleet.monitor)] == ["node-exporter", "prometheus"]


def test_the_alertmanager_config_posts_to_the_webhook_and_passes_amtool(tmp_path: Path) -> None:
    fleet = three_hosts()
    text = prometheus.to_yaml(prometheus.alertmanager_config(fleet))
    document = yaml.safe_load(text)
    assert document["receivers"][0]["webhook_configs"] == [{"url": "http://127.0.0.1:5001/hook", "send_resolved": True}]
    path = tmp_path / "am.yml"
    path.write_text(text)
    checked = subprocess.run(["amtool", "check-config", str(path)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    flags = prometheus.arguments(prometheus.ALERTMANAGER, fleet, fleet.monitor)
    assert "--cluster.listen-address=" in flags  # no gossip listener on every interface


def test_a_drop_in_replaces_the_distro_units_exec_start() -> None:
    fleet = three_hosts()
    text = prometheus.drop_in(prometheus.NODE_EXPORTER, "apt", fleet, fleet.host("c"))
    lines = text.splitlines()
    assert lines[1:3] == ["[Service]", "ExecStart="]
    assert lines[3] == (
        "ExecStart=/usr/bin/prometheus-node-exporter --web.listen-address=127.0.0.1:9200 "
        "--collector.textfile.directory=/var/lib/prometheus/node-exporter"
    )
    assert prometheus.NODE_EXPORTER.drop_in_path("apt") == (
        "/etc/systemd/system/prometheus-node-exporter.service.d/gpubox.conf"
    )


def test_the_install_keeps_debian_from_starting_the_daemons_with_their_defaults() -> None:
    script = prometheus.apt_install_without_starting(["prometheus", "prometheus-node-exporter"])
    assert subprocess.run(["sh", "-n", "-c", script], check=False).returncode == 0
    lines = script.splitlines()
    policy = next(index for index, line in enumerate(lines) if "exit 101" in line)
    install = next(index for index, line in enumerate(lines) if line.startswith("apt-get install"))
    assert policy < install and "trap 'rm -f /usr/sbin/policy-rc.d' EXIT" in script
    assert lines[install].endswith("--force-confold prometheus prometheus-node-exporter")


def test_the_planned_vram_comes_from_the_headers_as_gpubox_plan_makes_it() -> None:
    from gpubox.inventory import load_inventory

    (home,) = load_inventory("inventory/home.py")
    planned, missing = planned_gpu_bytes(home.data["box"], Path("inventory/gguf-headers"), Path("inventory"))
    assert missing == []
    # GPU 0: gemma4's planned load plus the 9,500 MiB reserve; GPU 1: whisper and piper
    assert set(planned) == {0, 1}
    assert 9500 * 2**20 < planned[0] < 24564 * 2**20
    assert 0 < planned[1] < 8192 * 2**20


def test_gpubox_monitoring_writes_every_file_the_deploy_renders_and_promtool_accepts_them(tmp_path: Path) -> None:
    from gpubox.cli import main

    out = tmp_path / "out"
    assert main(["monitoring", "inventory/home.py", "--out", str(out)]) == 0
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    # each file where the deploy puts it, under the host's name
    assert written == [
        "danarch4090/etc/grafana/provisioning/dashboards/gpubox.yaml",
        "danarch4090/etc/grafana/provisioning/datasources/gpubox.yaml",
        "danarch4090/etc/prometheus/gpubox-rules.yml",
        "danarch4090/etc/prometheus/gpubox.yml",
        "danarch4090/etc/systemd/system/gpubox-gpu-metrics.service",
        "danarch4090/etc/systemd/system/gpubox-gpu-metrics.timer",
        "danarch4090/etc/systemd/system/prometheus-node-exporter.service.d/gpubox.conf",
        "danarch4090/etc/systemd/system/prometheus.service.d/gpubox.conf",
        "danarch4090/usr/local/lib/gpubox/gpu-metrics.sh",
        "danarch4090/var/lib/grafana/dashboards/gpubox/gpubox-fleet.json",
    ]
    monitor = out / "danarch4090" / "etc" / "prometheus"
    checked = promtool("check", "config", "--syntax-only", str(monitor / "gpubox.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = promtool("check", "rules", str(monitor / "gpubox-rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = (monitor / "gpubox-rules.yml").read_text()
    # the seed's thresholds and plan reach the rules: 100 tok/s, 50% acceptance, GPU 0's plan + 1 GiB
    assert "< 100" in rules and "< 0.5" in rules and "GpuboxGpuMemoryOverPlan" in rules
    script = (out / "danarch4090" / "usr" / "local" / "lib" / "gpubox" / "gpu-metrics.sh").read_text()
    assert 'gpubox_gpu_service_info{gpu="0",service="gemma4",unit="gemma4.service"} 1.0' in script


def test_each_host_writes_its_own_files_and_each_change_sets_off_the_right_thing() -> None:
    from gpubox.monitoring.files import host_files

    fleet = three_hosts()
    monitor = {f.path: f for f in host_files(fleet, fleet.host("a"), "apt", {})}
    agent = {f.path: f for f in host_files(fleet, fleet.host("b"), "apt", {})}
    for monitor_only in ("/etc/prometheus/gpubox-rules.yml", "/etc/prometheus/gpubox-alertmanager.yml"):
        assert monitor_only in monitor and monitor_only not in agent
    # rules are written before the config that names them (the config's check reads them)
    paths = list(monitor)
    assert paths.index("/etc/prometheus/gpubox-rules.yml") < paths.index("/etc/prometheus/gpubox.yml")
    drop_in = agent["/etc/systemd/system/prometheus.service.d/gpubox.conf"]
    assert drop_in.restarts == "prometheus" and drop_in.reloads is None
    config = agent["/etc/prometheus/gpubox.yml"]
    assert config.reloads == "prometheus" and config.check == ("promtool", "check", "config", "--agent", "{}")
    assert (config.mode, config.group) == ("0640", "prometheus")
    assert monitor["/etc/prometheus/gpubox-alertmanager.yml"].reloads == "alertmanager"
    assert agent["/usr/local/lib/gpubox/gpu-metrics.sh"].gpu_metrics
    assert agent["/usr/local/lib/gpubox/gpu-metrics.sh"].mode == "0755"
