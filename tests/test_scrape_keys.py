"""The box deploy keeps a host's scrape credentials in step with its services' keys: what it writes is
what deploys/observability.py writes, read with the same facts (e2e: tests/e2e/test_keys_and_restarts.py)."""

from __future__ import annotations

from gpubox.monitoring import prometheus
from gpubox.monitoring.files import host_files, prometheus_config_file
from gpubox.monitoring.spec import Monitoring
from operations.monitoring import facts_read, scrape_key_reads
from tests.test_monitoring_fleet import box, fleet_of, llama

KEYED = box(llama(api_key_file="generate"))


def test_the_box_deploy_writes_the_prometheus_config_observability_writes() -> None:
    fleet = fleet_of(Monitoring(monitor="a"), a=KEYED)
    host = fleet.host("a")
    [written] = [file for file in host_files(fleet, host, "apt", {}) if file.path == prometheus.PROMETHEUS_CONFIG]
    assert prometheus_config_file(fleet, host) == written
    assert "credentials_file: /etc/prometheus/gpubox/gemma4.key" in written.text


def test_turning_a_key_on_changes_the_scrape_config() -> None:
    without = fleet_of(Monitoring(monitor="a"), a=box(llama()))
    with_key = fleet_of(Monitoring(monitor="a"), a=KEYED)
    assert "authorization" not in prometheus_config_file(without, without.host("a")).text
    assert "authorization" in prometheus_config_file(with_key, with_key.host("a")).text


def test_the_box_deploy_reads_what_observability_reads_of_the_keys() -> None:
    fleet = fleet_of(Monitoring(monitor="a"), a=KEYED)
    host = fleet.host("a")
    reads = scrape_key_reads(fleet, "a")
    assert [(fact.__name__, arguments) for fact, arguments in reads] == [
        ("FileContents", {"path": "/etc/prometheus/gpubox.yml"}),
        ("Sha1File", {"path": "/etc/gpubox/keys/gemma4.key"}),
        ("File", {"path": "/etc/prometheus/gpubox/gemma4.key"}),
        ("Sha1File", {"path": "/etc/prometheus/gpubox/gemma4.key"}),
    ]
    files = host_files(fleet, host, "apt", {})
    observed = facts_read(fleet, host, files, [])
    assert all(read in observed for read in reads)  # one set of fact arguments: loaded once whichever runs


def test_a_host_without_monitoring_reads_nothing_more() -> None:
    assert scrape_key_reads(None, "a") == []
    fleet = fleet_of(Monitoring(monitor="a"), a=KEYED)
    assert scrape_key_reads(fleet, "not-a-gpubox-host") == []

