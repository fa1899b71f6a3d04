"""`gpubox top` and `gpubox report` against a real Prometheus holding a synthetic fleet's history.

The history is backfilled: OpenMetrics text with 50 minutes of samples (every 15 s, ending 30 s
ago) for a 2-host fleet, labelled exactly as the fleet's scrape targets label them, turned into
TSDB blocks by ``promtool tsdb create-blocks-from openmetrics``; Prometheus loads them at start.
Its rule file holds always-firing alerts labelled like gpubox's own (host+service, host+gpu, host),
so ``/api/v1/alerts`` has something to attach to rows. No mocks: every figure comes back through
PromQL.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from rich.console import Console

from gpubox.bench import free_port
from gpubox.cli import main
from gpubox.cli_monitoring import parse_duration
from gpubox.monitoring import metrics
from gpubox.monitoring.fleet import Fleet, fleet_from_inventory, scrape_targets
from gpubox.monitoring.query import (
    GIB,
    FleetRow,
    GpuMemory,
    PrometheusClient,
    PrometheusError,
    fleet_rows,
    report_png,
    tokens_per_second_query,
    top_table,
)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
# Debian's prometheus is in .ci/apt-packages.txt: without it these tests fail (never skip).
assert PROMETHEUS is not None and PROMTOOL is not None, "needs prometheus and promtool: scripts/setup installs them"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEP_S = 15
HISTORY_S = 50 * 60
LAST_SAMPLE_AGO_S = 30

INVENTORY = '''
"""A 2-host fleet for gpubox top/report: a (the monitor) and b."""

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile, PiperInstall, PiperServer, WhisperCppBuild, WhisperServer
from gpubox.monitoring.spec import Monitoring

SHA = "a" * 64
COMMIT = "b" * 40
MONITORING = Monitoring(monitor="a", port={port}, rate_window_s=300)


def gguf(name):
    return ModelFile(path=f"/srv/models/{{name}}.gguf", sha256=SHA, architecture="llama")


box_a = Box(
    llama_cpp=LlamaCppBuild(commit=COMMIT),
    whisper_cpp=WhisperCppBuild(repo="https://github.com/ggml-org/whisper.cpp", commit=COMMIT),
    services=(
        LlamaServer(name="chat", gpus=(0,), model=gguf("big-model"), model_draft=gguf("small-model"),
                    spec_type="draft-simple", port=8080),
        WhisperServer(name="whisper", gpus=(1,), port=8090, model=ModelFile(
            path="/srv/models/ggml-tiny.en.bin", sha256=SHA, format="ggml-whisper", architecture="tiny.en")),
    ),
)
box_b = Box(
    llama_cpp=LlamaCppBuild(commit=COMMIT),
    piper=PiperInstall(version="1.3.0"),
    services=(
        LlamaServer(name="coder", gpus=(0, 1), model=gguf("coder-model"), port=8080),
        LlamaServer(name="ngram", model=gguf("tiny-model"), spec_type="ngram-simple", port=8081),
        PiperServer(name="piper", port=5000,
                    voice=ModelFile(path="/srv/models/voice.onnx", sha256=SHA, format="onnx"),
                    voice_config=ModelFile(path="/srv/models/voice.onnx.json", sha256=SHA, format="json")),
    ),
)

hosts = [
    ("a", {{"box": box_a, "monitoring": MONITORING, "ssh_hostname": "127.0.0.1"}}),
    ("b", {{"box": box_b, "monitoring": MONITORING, "ssh_hostname": "127.0.0.1"}}),
]
'''

# What the synthetic history says, per (host, service) and (host, gpu).
TOKENS_PER_S = {("a", "chat"): 40.0, ("b", "coder"): 80.0, ("b", "ngram"): 30.0}  # against 1 s/s of decode time
DRAFT_ACCEPTED_PER_S = {("a", "chat"): (10.0, 6.0), ("b", "coder"): (0.0, 0.0), ("b", "ngram"): (8.0, 4.0)}
# coder exposes zero draft counters; ngram served until DOWN_AGO_S ago, then its scrapes failed (up 0, no
# counters), so its counters' samples are still in the rate window's tail
DOWN_AGO_S = {("b", "ngram"): 120}
UNIT_ACTIVE = {("a", "chat"): 1, ("a", "whisper"): 1, ("b", "coder"): 1, ("b", "ngram"): 1, ("b", "piper"): 0}
VRAM_GIB = {("a", 0): (10.0, 12.0), ("a", 1): (2.0, 3.0), ("b", 0): (20.0, 22.0), ("b", 1): (23.0, 22.0)}

RULES = """
groups:
  - name: gpubox-test
    interval: 1s
    rules:
      - alert: GpuboxTestAlwaysFiring
        expr: vector(1)
        labels: {severity: warning, host: a, service: chat}
      - alert: GpuboxTestVramOverPlan
        expr: vector(1)
        labels: {severity: warning, host: b, gpu: "1"}
      - alert: GpuboxTestHostDown
        expr: vector(1)
        labels: {severity: critical, host: a}
"""
ALERTS = {"GpuboxTestAlwaysFiring", "GpuboxTestVramOverPlan", "GpuboxTestHostDown"}


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{name}="{value}"' for name, value in sorted(labels.items())) + "}"


def openmetrics(fleet: Fleet, now: int) -> str:
    """The fleet's history as OpenMetrics text: counters advancing steadily, gauges flat."""
    times = list(range(now - HISTORY_S, now - LAST_SAMPLE_AGO_S + 1, STEP_S))
    families: dict[tuple[str, str], list[str]] = {}

    def add(family: str, kind: str, name: str, labels: dict[str, str], value_at: object, until: int) -> None:
        lines = families.setdefault((family, kind), [])
        lines += [f"{name}{_labels(labels)} {value_at(t)} {t}" for t in times if t <= until]  # type: ignore[operator]

    def counter(name: str, labels: dict[str, str], per_s: float, until: int) -> None:
        add(name.removesuffix("_total"), "counter", name, labels, lambda t: per_s * (t - times[0]), until)

    def gauge(name: str, labels: dict[str, str], value: object) -> None:
        add(name, "gauge", name, labels, value if callable(value) else lambda t: value, now)

    for host in fleet.hosts:
        for target in scrape_targets(host):
            labels = {**target.labels, "job": target.job}
            key = (host.name, target.labels.get("service", ""))
            if target.labels["kind"] == "llama-server":
                down_at = now - DOWN_AGO_S.get(key, -1)
                gauge("up", labels, lambda t, down_at=down_at: int(t < down_at))
                if key in TOKENS_PER_S:
                    counter(metrics.LLAMA_TOKENS_PREDICTED, labels, TOKENS_PER_S[key], down_at)
                    counter(metrics.LLAMA_TOKENS_PREDICTED_SECONDS, labels, 1.0, down_at)
                if key in DRAFT_ACCEPTED_PER_S:
                    drafted, accepted = DRAFT_ACCEPTED_PER_S[key]
                    counter(metrics.LLAMA_DRAFT_TOKENS, labels, drafted, down_at)
                    counter(metrics.LLAMA_ACCEPTED_TOKENS, labels, accepted, down_at)
                continue
            gauge("up", labels, 1)
            for service in host.box.services:
                unit = {"service": service.name, "unit": f"{service.name}.service"}
                gauge(metrics.UNIT_ACTIVE, {**labels, **unit}, UNIT_ACTIVE[(host.name, service.name)])
            for (vram_host, gpu), (used, planned) in VRAM_GIB.items():
                if vram_host == host.name:
                    card = {"gpu": str(gpu), "uuid": f"GPU-{host.name}-{gpu}", "name": "NVIDIA RTX 4090"}
                    gauge(metrics.GPU_MEMORY_USED, {**labels, **card}, used * GIB)
                    gauge(metrics.GPU_PLANNED_MEMORY, {**labels, "gpu": str(gpu)}, planned * GIB)
    text = []
    for (family, kind), lines in families.items():
        text += [f"# TYPE {family} {kind}", *lines]
    return "\n".join([*text, "# EOF"]) + "\n"


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"prometheus was not ready in 30 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Fleet]]:
    """A Prometheus with the fleet's backfilled history: (its URL, the inventory, the fleet)."""
    assert PROMETHEUS is not None and PROMTOOL is not None
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    inventory = root / "fleet.py"
    inventory.write_text(INVENTORY.format(port=port))
    fleet = fleet_from_inventory(inventory)
    history = root / "history.om"
    history.write_text(openmetrics(fleet, int(time.time())))
    data = root / "data"
    subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(history), str(data)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    (root / "rules.yml").write_text(RULES)
    (root / "prometheus.yml").write_text(
        textwrap.dedent("""\
            global:
              evaluation_interval: 1s
            rule_files: [rules.yml]
        """)
    )
    url = f"http://127.0.0.1:{port}"
    log = root / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_ready(url, process, log)
        client = PrometheusClient(url)
        deadline = time.monotonic() + 20
        while {alert.name for alert in client.alerts() if alert.state == "firing"} != ALERTS:
            assert time.monotonic() < deadline, f"the test alerts never fired:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url, inventory, fleet
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def rows(prometheus: tuple[str, Path, Fleet]) -> dict[tuple[str, str], FleetRow]:
    url, _, fleet = prometheus
    return {(row.host, row.service): row for row in fleet_rows(fleet, PrometheusClient(url))}


def test_fleet_rows_one_per_service_of_every_type(prometheus: tuple[str, Path, Fleet]) -> None:
    url, _, fleet = prometheus
    listed = [(row.host, row.service, row.type, row.gpus) for row in fleet_rows(fleet, PrometheusClient(url))]
    assert listed == [
        ("a", "chat", "llama-server", (0,)),
        ("a", "whisper", "whisper-server", (1,)),
        ("b", "coder", "llama-server", (0, 1)),
        ("b", "ngram", "llama-server", ()),
        ("b", "piper", "piper", ()),
    ]


def test_speed_is_the_counters_ratio_and_acceptance_accepted_over_drafted(
    rows: dict[tuple[str, str], FleetRow],
) -> None:
    chat, coder = rows["a", "chat"], rows["b", "coder"]
    assert chat.tokens_per_second == pytest.approx(40.0, abs=0.5)
    assert coder.tokens_per_second == pytest.approx(80.0, abs=1.0)
    assert chat.drafting and chat.acceptance == pytest.approx(0.6, abs=0.01)
    # coder does not draft (its draft counters are 0, 0/0 is NaN): no acceptance, not 0
    assert not coder.drafting and coder.acceptance is None
    # ngram drafts but is down (its last counters are in the window's tail); whisper and piper have no speed
    for key in (("b", "ngram"), ("a", "whisper"), ("b", "piper")):
        assert rows[key].tokens_per_second is None and rows[key].acceptance is None, key


def test_up_from_scrapes_for_llama_servers_and_from_systemd_for_speech(rows: dict[tuple[str, str], FleetRow]) -> None:
    assert rows["a", "chat"].up is True
    assert rows["b", "coder"].up is True
    assert rows["b", "ngram"].up is False  # up{job="ngram@b"} is 0, though its unit is active
    assert rows["a", "whisper"].up is True  # gpubox_unit_active 1
    assert rows["b", "piper"].up is False  # gpubox_unit_active 0


def test_vram_used_and_planned_per_gpu_of_the_service(rows: dict[tuple[str, str], FleetRow]) -> None:
    assert rows["a", "chat"].vram == (GpuMemory(gpu=0, used_bytes=10 * GIB, planned_bytes=12 * GIB),)
    assert rows["a", "whisper"].vram == (GpuMemory(gpu=1, used_bytes=2 * GIB, planned_bytes=3 * GIB),)
    assert rows["b", "coder"].vram == (
        GpuMemory(gpu=0, used_bytes=20 * GIB, planned_bytes=22 * GIB),
        GpuMemory(gpu=1, used_bytes=23 * GIB, planned_bytes=22 * GIB),
    )
    assert [memory.over_plan for memory in rows["b", "coder"].vram] == [False, True]
    assert rows["b", "ngram"].vram == ()


def test_firing_alerts_land_on_their_service_gpu_or_host_rows(rows: dict[tuple[str, str], FleetRow]) -> None:
    assert rows["a", "chat"].alerts == ("GpuboxTestAlwaysFiring", "GpuboxTestHostDown")
    assert rows["a", "whisper"].alerts == ("GpuboxTestHostDown",)  # host-wide: every row of a
    assert rows["b", "coder"].alerts == ("GpuboxTestVramOverPlan",)  # GPU 1 of b is coder's
    assert rows["b", "ngram"].alerts == ()  # on the CPU
    assert rows["b", "piper"].alerts == ()


def test_top_table_renders_the_rows(rows: dict[tuple[str, str], FleetRow]) -> None:
    console = Console(record=True, width=200)
    console.print(top_table(list(rows.values())))
    text = console.export_text()
    lines = {name: next(line for line in text.splitlines() if f" {name} " in line) for name in ("chat", "coder")}
    assert "40.0" in lines["chat"] and "60%" in lines["chat"] and "0: 10.0/12.0 GiB" in lines["chat"]
    assert "GpuboxTestAlwaysFiring" in lines["chat"]
    assert (
        "80.0" in lines["coder"] and "0: 20.0/22.0 GiB" in lines["coder"] and "GpuboxTestVramOverPlan" in lines["coder"]
    )
    assert "1: 23.0/22.0 GiB" in text
    assert text.count("DOWN") == 2  # ngram's scrape and piper's unit


def _cells(text: str, service: str) -> list[str]:
    """The cells of ``service``'s row in a rendered table."""
    line = next(line for line in text.splitlines() if f" {service} " in line)
    return [cell.strip() for cell in re.split("[│┃]", line)[1:-1]]


def test_a_down_service_shows_no_speed_from_its_rate_window_tail(
    prometheus: tuple[str, Path, Fleet], rows: dict[tuple[str, str], FleetRow]
) -> None:
    url, _, fleet = prometheus
    # Prometheus still rates ngram's last counters (they are in the rate window): that tail is not a speed
    window = f"{fleet.monitoring.rate_window_s}s"
    tail = {(one.labels["host"], one.labels["service"]): one.value for one in PrometheusClient(url).query(
        tokens_per_second_query(window))}  # fmt: skip
    assert tail["b", "ngram"] == pytest.approx(TOKENS_PER_S["b", "ngram"], abs=1.0)
    ngram = rows["b", "ngram"]
    assert ngram.up is False and ngram.drafting
    assert ngram.tokens_per_second is None and ngram.acceptance is None
    console = Console(record=True, width=200)
    console.print(top_table(list(rows.values())))
    text = console.export_text()
    cells = dict(zip(_cells(text, "service"), _cells(text, "ngram"), strict=True))
    assert (cells["up"], cells["tok/s"], cells["accept"]) == ("DOWN", "-", "-")


def test_cli_top_without_a_terminal_prints_one_table_and_exits(prometheus: tuple[str, Path, Fleet]) -> None:
    url, inventory, _ = prometheus
    # stdout is a pipe: a live display would print nothing and never end
    done = subprocess.run(
        [sys.executable, "-m", "gpubox.cli", "top", str(inventory), "--url", url, "--interval", "0.2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("gpubox fleet") == 1
    for expected in ("chat", "whisper", "coder", "ngram", "piper", "40.0", "80.0", "60%"):
        assert expected in done.stdout, expected


def test_cli_top_once_reads_the_monitor_named_by_the_inventory(
    prometheus: tuple[str, Path, Fleet], capsys: pytest.CaptureFixture[str]
) -> None:
    url, inventory, _ = prometheus
    assert main(["top", str(inventory), "--once"]) == 0  # no --url: Monitoring(monitor="a", port=...)
    out = capsys.readouterr().out
    print(out)  # shown with -s: the table the README quotes
    assert url in out
    for expected in ("chat", "whisper", "coder", "ngram", "piper", "40.0", "80.0", "60%", "GpuboxTestAlwaysFiring"):
        assert expected in out, expected


def test_report_png_plots_each_series(prometheus: tuple[str, Path, Fleet], tmp_path: Path) -> None:
    url, _, fleet = prometheus
    drawn = report_png(fleet, PrometheusClient(url), 3600, tmp_path / "report.png")
    assert drawn.tokens_per_second == ["chat@a", "coder@b", "ngram@b"]  # ngram's history, before it went down
    assert drawn.acceptance == ["chat@a", "ngram@b"]  # the drafting services with data
    assert drawn.counts == {"tokens_per_second": 3, "acceptance": 2, "vram_used": 4, "vram_planned": 4}
    assert drawn.vram_used == ["a GPU 0 used", "a GPU 1 used", "b GPU 0 used", "b GPU 1 used"]
    assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_cli_report_writes_a_png(
    prometheus: tuple[str, Path, Fleet], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, inventory, _ = prometheus
    png = tmp_path / "out.png"
    assert main(["report", str(inventory), "--since", "1h", "--png", str(png), "--url", url]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "3 tok/s series, 2 acceptance series, 4 GPU(s) used / 4 planned" in out


def test_prometheus_errors_name_the_url_and_prometheus_s_message(prometheus: tuple[str, Path, Fleet]) -> None:
    url, _, _ = prometheus
    with pytest.raises(PrometheusError) as raised:
        PrometheusClient(url).query("rate(")
    assert f"{url}/api/v1/query" in str(raised.value) and "bad_data" in str(raised.value)


@pytest.mark.parametrize("command", [["top", "--once"], ["report", "--since", "30m"]])
def test_unreachable_prometheus_exits_2_naming_the_url(
    prometheus: tuple[str, Path, Fleet], command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, inventory, _ = prometheus
    dead = f"http://127.0.0.1:{free_port()}"
    argv = [command[0], str(inventory), *command[1:], "--url", dead, "--timeout", "2"]
    if command[0] == "report":
        argv += ["--png", str(tmp_path / "never.png")]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert dead in out and "unreachable" in out
    assert not (tmp_path / "never.png").exists()


def test_an_inventory_without_monitoring_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = tmp_path / "unmonitored.py"
    inventory.write_text(INVENTORY.format(port=9090).replace('"monitoring": MONITORING, ', ""))
    assert main(["top", str(inventory), "--once"]) == 2
    assert "no host carries `monitoring`" in capsys.readouterr().out


def test_durations() -> None:
    assert [parse_duration(text) for text in ("30m", "1h", "2d", "1h30m", "45s", "1w")] == [
        1800, 3600, 172800, 5400, 45, 604800,
    ]  # fmt: skip
    for bad in ("", "1x", "h", "0m", "1.5h", "-1h"):
        with pytest.raises(Exception, match="duration"):
            parse_duration(bad)
