"""The GPU textfile script, run by /bin/sh here with a fake nvidia-smi (printing the real captures) and a
fake systemctl on PATH; its output read back by prometheus_client's parser and `promtool check metrics`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpubox import Box, LlamaCppBuild, LlamaServer, ModelFile
from gpubox.monitoring import metrics
from gpubox.monitoring.textfile import (
    GPU_METRICS_QUERY_FIELDS,
    SCRIPT_PATH,
    SERVICE_UNIT,
    TIMER_UNIT,
    gpu_metrics_script,
    service_path,
    service_unit,
    static_metrics,
    timer_path,
    timer_unit,
)
from gpubox.spec import HostMonitoring

NVIDIA_SMI = Path(__file__).parent / "fixtures" / "nvidia-smi"
IDLE = (NVIDIA_SMI / "gpu-metrics-idle-noheader-nounits.csv").read_text()
BUSY = (NVIDIA_SMI / "gpu-metrics-busy-noheader-nounits.csv").read_text()
BAD_FIELD = (NVIDIA_SMI / "gpu-metrics-bad-field.txt").read_text()
DRIVER_NOT_LOADED = (NVIDIA_SMI / "driver-not-loaded.txt").read_text()
UUID = "GPU-1071322f-0882-1130-0fe9-abac9fef8da0"
MIB = 1048576
QUERY_ARGS = [f"--query-gpu={','.join(GPU_METRICS_QUERY_FIELDS)}", "--format=csv,noheader,nounits"]
GPU_METRICS = (
    metrics.GPU_MEMORY_USED,
    metrics.GPU_MEMORY_TOTAL,
    metrics.GPU_UTILIZATION,
    metrics.GPU_TEMPERATURE,
    metrics.GPU_POWER,
)
ALL_METRICS = (
    *GPU_METRICS,
    metrics.GPU_PLANNED_MEMORY,
    metrics.GPU_SERVICE_INFO,
    metrics.NVIDIA_SMI_UP,
    metrics.UNIT_ACTIVE,
    metrics.UNIT_RESTARTS,
    metrics.TEXTFILE_UPDATED,
)
RESTARTS_FAMILY = metrics.UNIT_RESTARTS.removesuffix("_total")
"""prometheus_client names a counter's family without `_total`; its samples keep it."""
MODEL = ModelFile(path="/srv/models/m.gguf", sha256="d" * 64, architecture="llama")


def llama(name: str, port: int, gpus: tuple[int, ...]) -> LlamaServer:
    return LlamaServer(name=name, model=MODEL, port=port, gpus=gpus)


BOX = Box(
    llama_cpp=LlamaCppBuild(commit="0" * 40),
    services=(llama("chat", 8080, (0, 1)), llama("coder", 8081, (1,)), llama("cpu-embed", 8082, ())),
)
PLAN = {0: 40 * 1024 * MIB, 1: 90 * 1024 * MIB}


@dataclass
class Run:
    returncode: int
    stderr: str
    text: str
    directory: Path
    nvidia_smi_calls: list[list[str]]

    def families(self) -> dict[str, list[Sample]]:
        """Samples by family name (a counter's family name is without `_total`; its samples keep it)."""
        families: dict[str, list[Sample]] = {}
        for family in text_string_to_metric_families(self.text):
            assert family.name not in families, f"family {family.name} appears twice"
            families[family.name] = list(family.samples)
        return families

    def gpu_sample(self, metric: str, gpu: str = "0") -> Sample:
        [sample] = [s for s in self.families()[metric] if s.labels["gpu"] == gpu]
        return sample


def fake_program(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}")
    path.chmod(0o755)


def run_script(
    tmp_path: Path,
    *,
    nvidia_smi: tuple[str, int] | None,
    units: dict[str, tuple[str, str]] | None = None,
    box: Box = BOX,
    plan: dict[int, int] | None = None,
    awk_fails: bool = False,
) -> Run:
    """Render the script for `box` and run it with /bin/sh.

    `nvidia_smi`: what the fake prints on stdout and its exit code; None: no nvidia-smi on PATH.
    `units`: per unit, what `systemctl is-active` and `systemctl show -p NRestarts --value` print.
    """
    bin_dir, out_dir = tmp_path / "bin", tmp_path / "textfile"
    bin_dir.mkdir(exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    calls = tmp_path / "nvidia-smi-calls.jsonl"
    if nvidia_smi is not None:
        output, code = nvidia_smi
        fake_program(
            bin_dir / "nvidia-smi",
            f"with open({str(calls)!r}, 'a') as log:\n    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
            f"sys.stdout.write({output!r})\nsys.exit({code})\n",
        )
    states = units if units is not None else {s.unit_name: ("active", "0") for s in box.services}
    fake_program(
        bin_dir / "systemctl",
        f"states = {states!r}\n"
        "args = sys.argv[1:]\n"
        "if args[:1] == ['is-active'] and len(args) == 2:\n"
        "    state = states.get(args[1], ('inactive', '0'))[0]\n"
        "    print(state)\n"
        "    sys.exit(0 if state == 'active' else 3)\n"
        "if args[:4] == ['show', '-p', 'NRestarts', '--value'] and len(args) == 5:\n"
        "    print(states.get(args[4], ('inactive', '0'))[1])\n"
        "    sys.exit(0)\n"
        "sys.exit(f'unexpected systemctl call {args}')\n",
    )
    if awk_fails:
        fake_program(bin_dir / "awk", "sys.exit(2)\n")
    # No real nvidia-smi may answer instead of (or in place of the missing) fake.
    system_path = [d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "nvidia-smi").exists()]
    script = tmp_path / "gpu-metrics.sh"
    script.write_text(gpu_metrics_script(box, PLAN if plan is None else plan, str(out_dir)))
    proc = subprocess.run(
        ["/bin/sh", str(script)],
        env={"PATH": os.pathsep.join([str(bin_dir), *system_path]), "LC_ALL": "C"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    target = out_dir / metrics.TEXTFILE_NAME
    return Run(
        returncode=proc.returncode,
        stderr=proc.stderr,
        text=target.read_text() if target.exists() else "",
        directory=out_dir,
        nvidia_smi_calls=[json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else [],
    )


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(promtool).exists(), "promtool is missing: apt-get install prometheus"
    return subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )


# -- nvidia-smi's real output ----------------------------------------------------------------------


def test_busy_gpu_values(tmp_path: Path) -> None:
    run = run_script(tmp_path, nvidia_smi=(BUSY, 0))
    assert run.returncode == 0, run.stderr
    assert run.nvidia_smi_calls == [QUERY_ARGS]
    families = run.families()
    assert [s.value for s in families[metrics.NVIDIA_SMI_UP]] == [1]
    labels = {"gpu": "0", "uuid": UUID, "name": "NVIDIA H200"}
    assert {name: [(s.name, s.labels, s.value) for s in families[name]] for name in GPU_METRICS} == {
        metrics.GPU_MEMORY_USED: [(metrics.GPU_MEMORY_USED, labels, 2575 * MIB)],
        metrics.GPU_MEMORY_TOTAL: [(metrics.GPU_MEMORY_TOTAL, labels, 143771 * MIB)],
        metrics.GPU_UTILIZATION: [(metrics.GPU_UTILIZATION, labels, 1.0)],
        metrics.GPU_TEMPERATURE: [(metrics.GPU_TEMPERATURE, labels, 52)],
        metrics.GPU_POWER: [(metrics.GPU_POWER, labels, 378.83)],
    }


def test_idle_gpu_values(tmp_path: Path) -> None:
    run = run_script(tmp_path, nvidia_smi=(IDLE, 0))
    assert run.returncode == 0, run.stderr
    assert run.gpu_sample(metrics.GPU_MEMORY_USED).value == 0
    assert run.gpu_sample(metrics.GPU_MEMORY_TOTAL).value == 143771 * MIB
    assert run.gpu_sample(metrics.GPU_UTILIZATION).value == 0
    assert run.gpu_sample(metrics.GPU_TEMPERATURE).value == 39
    assert run.gpu_sample(metrics.GPU_POWER).value == 81.48


def test_every_gpu_row_gives_its_samples(tmp_path: Path) -> None:
    """Two GPUs are two rows (as in query.csv of the 2x H200 box)."""
    second = BUSY.replace("0, GPU-1071322f", "1, GPU-2071322f").replace(", 2575,", ", 1024,")
    run = run_script(tmp_path, nvidia_smi=(BUSY + second, 0))
    assert run.returncode == 0, run.stderr
    for metric in GPU_METRICS:
        assert sorted(s.labels["gpu"] for s in run.families()[metric]) == ["0", "1"]
    assert run.gpu_sample(metrics.GPU_MEMORY_USED, "1").value == 1024 * MIB
    assert run.gpu_sample(metrics.GPU_MEMORY_USED, "1").labels["uuid"] == UUID.replace("GPU-1", "GPU-2")
    assert run.gpu_sample(metrics.GPU_MEMORY_USED, "0").value == 2575 * MIB


@pytest.mark.parametrize("missing", ["[N/A]", "[Not Supported]", "[Unknown Error]"])
def test_a_value_nvidia_smi_cannot_give_is_left_out(tmp_path: Path, missing: str) -> None:
    run = run_script(tmp_path, nvidia_smi=(BUSY.replace("378.83", missing), 0))
    assert run.returncode == 0, run.stderr
    families = run.families()
    assert families[metrics.GPU_POWER] == []
    assert run.gpu_sample(metrics.GPU_TEMPERATURE).value == 52
    assert "N/A" not in run.text and "Supported" not in run.text and "Error" not in run.text
    assert promtool_check(run.text).returncode == 0


@pytest.mark.parametrize(
    ("output", "code"), [(DRIVER_NOT_LOADED, 9), (BAD_FIELD, 2)], ids=["driver-not-loaded", "bad-field"]
)
def test_failing_nvidia_smi_is_down_without_gpu_samples(tmp_path: Path, output: str, code: int) -> None:
    run = run_script(tmp_path, nvidia_smi=(output, code))
    assert run.returncode == 0, run.stderr
    assert run.nvidia_smi_calls == [QUERY_ARGS]
    families = run.families()
    assert [s.value for s in families[metrics.NVIDIA_SMI_UP]] == [0]
    assert all(families[metric] == [] for metric in GPU_METRICS)
    assert f"exit code {code}" in run.stderr
    # what doesn't come from nvidia-smi is still there
    assert len(families[metrics.GPU_SERVICE_INFO]) == 3
    assert len(families[metrics.UNIT_ACTIVE]) == 3


def test_missing_nvidia_smi_is_down(tmp_path: Path) -> None:
    run = run_script(tmp_path, nvidia_smi=None)
    assert run.returncode == 0, run.stderr
    families = run.families()
    assert [s.value for s in families[metrics.NVIDIA_SMI_UP]] == [0]
    assert all(families[metric] == [] for metric in GPU_METRICS)
    assert len(families[RESTARTS_FAMILY]) == 3


@pytest.mark.parametrize(
    "nvidia_smi", [(BUSY, 0), (IDLE, 0), (DRIVER_NOT_LOADED, 9), None], ids=["busy", "idle", "failed", "missing"]
)
def test_promtool_accepts_the_file(tmp_path: Path, nvidia_smi: tuple[str, int] | None) -> None:
    run = run_script(tmp_path, nvidia_smi=nvidia_smi)
    assert run.returncode == 0, run.stderr
    check = promtool_check(run.text)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_metric_has_help_and_type_once(tmp_path: Path) -> None:
    text = run_script(tmp_path, nvidia_smi=(BUSY, 0)).text
    lines = text.splitlines()
    for metric in ALL_METRICS:
        kind = "counter" if metric == metrics.UNIT_RESTARTS else "gauge"
        assert sum(line.startswith(f"# HELP {metric} ") for line in lines) == 1, metric
        assert lines.count(f"# TYPE {metric} {kind}") == 1, metric
    assert sum(line.startswith("# TYPE ") for line in lines) == len(ALL_METRICS)
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families[RESTARTS_FAMILY] == "counter"
    assert len(families) == len(ALL_METRICS)


# -- what the box says: plan, pinning, units -------------------------------------------------------


def test_planned_memory_and_service_pinning(tmp_path: Path) -> None:
    families = run_script(tmp_path, nvidia_smi=(BUSY, 0)).families()
    assert {s.labels["gpu"]: s.value for s in families[metrics.GPU_PLANNED_MEMORY]} == {
        "0": 40 * 1024 * MIB,
        "1": 90 * 1024 * MIB,
    }
    assert sorted((s.labels["gpu"], s.labels["service"], s.labels["unit"], s.value)
                  for s in families[metrics.GPU_SERVICE_INFO]) == [
        ("0", "chat", "chat.service", 1),
        ("1", "chat", "chat.service", 1),
        ("1", "coder", "coder.service", 1),
    ]


def test_no_plan_no_planned_samples(tmp_path: Path) -> None:
    run = run_script(tmp_path, nvidia_smi=(BUSY, 0), plan={})
    assert run.returncode == 0, run.stderr
    assert run.families()[metrics.GPU_PLANNED_MEMORY] == []
    assert promtool_check(run.text).returncode == 0


@pytest.mark.parametrize("no_number", ["", "[not set]"])
def test_unit_state_and_restarts(tmp_path: Path, no_number: str) -> None:
    units = {
        "chat.service": ("active", "0"),
        "coder.service": ("failed", "7"),
        "cpu-embed.service": ("activating", no_number),
    }
    families = run_script(tmp_path, nvidia_smi=(BUSY, 0), units=units).families()
    assert {(s.labels["service"], s.labels["unit"]): s.value for s in families[metrics.UNIT_ACTIVE]} == {
        ("chat", "chat.service"): 1,
        ("coder", "coder.service"): 0,
        ("cpu-embed", "cpu-embed.service"): 0,
    }
    restarts = families[RESTARTS_FAMILY]
    assert {s.name for s in restarts} == {metrics.UNIT_RESTARTS}
    # systemd printing no number leaves the sample out rather than writing a bad one
    assert {s.labels["service"]: s.value for s in restarts} == {"chat": 0, "coder": 7}


def test_textfile_updated_is_now(tmp_path: Path) -> None:
    import time

    before = int(time.time())
    [sample] = run_script(tmp_path, nvidia_smi=(BUSY, 0)).families()[metrics.TEXTFILE_UPDATED]
    assert before <= sample.value <= time.time() + 1


# -- escaping --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ['NVIDIA "H200"', "NVIDIA H200 \\ 141GB", 'a\\"b', "NVIDIA H200, SXM"])
def test_gpu_name_is_escaped(tmp_path: Path, name: str) -> None:
    run = run_script(tmp_path, nvidia_smi=(BUSY.replace("NVIDIA H200", name), 0))
    assert run.returncode == 0, run.stderr
    for metric in GPU_METRICS:
        assert run.gpu_sample(metric).labels == {"gpu": "0", "uuid": UUID, "name": name}
    assert run.gpu_sample(metrics.GPU_POWER).value == 378.83
    check = promtool_check(run.text)
    assert check.returncode == 0, check.stdout + check.stderr


def test_service_name_is_escaped(tmp_path: Path) -> None:
    """Service names are validated (no quotes), but the rendering escapes whatever it is given."""
    weird = 'we"ird\\name\nx'
    service = LlamaServer.model_construct(**(dict(llama("x", 8080, (0,))) | {"name": weird}))
    box = Box.model_construct(**(dict(BOX) | {"services": (service,)}))
    unit = f"{weird}.service"
    run = run_script(tmp_path, nvidia_smi=(BUSY, 0), box=box, units={unit: ("active", "4")})
    assert run.returncode == 0, run.stderr
    families = run.families()
    [info] = families[metrics.GPU_SERVICE_INFO]
    assert info.labels == {"gpu": "0", "service": weird, "unit": unit}
    [active] = families[metrics.UNIT_ACTIVE]
    assert (active.labels, active.value) == ({"service": weird, "unit": unit}, 1)
    [restarts] = families[RESTARTS_FAMILY]
    assert (restarts.labels, restarts.value) == ({"service": weird, "unit": unit}, 4)
    assert 'service="we\\"ird\\\\name\\nx"' in run.text
    check = promtool_check(run.text)
    assert check.returncode == 0, check.stdout + check.stderr


def test_static_metrics_escape_label_values() -> None:
    service = LlamaServer.model_construct(**(dict(llama("x", 8080, (3,))) | {"name": 'q"b\\s'}))
    box = Box.model_construct(**(dict(BOX) | {"services": (service,)}))
    text = static_metrics(box, {3: 5})
    assert 'gpubox_gpu_service_info{gpu="3",service="q\\"b\\\\s",unit="q\\"b\\\\s.service"} 1.0' in text
    assert 'gpubox_gpu_planned_memory_bytes{gpu="3"} 5.0' in text


# -- writing the file ------------------------------------------------------------------------------


def test_an_old_file_is_replaced_whole_and_no_temp_file_stays(tmp_path: Path) -> None:
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    old = "# old\n" + "gpubox_gpu_power_watts{gpu=\"9\"} 1\n" * 5000
    (out_dir / metrics.TEXTFILE_NAME).write_text(old)
    run = run_script(tmp_path, nvidia_smi=(BUSY, 0))
    assert run.returncode == 0, run.stderr
    assert sorted(path.name for path in run.directory.iterdir()) == [metrics.TEXTFILE_NAME]
    assert "# old" not in run.text and 'gpu="9"' not in run.text
    assert run.text.endswith("\n") and run.text.count("\n") < 100
    assert stat.S_IMODE((run.directory / metrics.TEXTFILE_NAME).stat().st_mode) == 0o644


def test_a_failed_run_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    out_dir = tmp_path / "textfile"
    out_dir.mkdir()
    (out_dir / metrics.TEXTFILE_NAME).write_text("# old\n")
    run = run_script(tmp_path, nvidia_smi=(BUSY, 0), awk_fails=True)
    assert run.returncode != 0
    assert run.text == "# old\n"
    assert sorted(path.name for path in run.directory.iterdir()) == [metrics.TEXTFILE_NAME]


def test_the_temp_file_is_in_the_target_directory_and_no_prom_file() -> None:
    script = gpu_metrics_script(BOX, PLAN, "/var/lib/x y")
    assert "target='/var/lib/x y/gpubox.prom'\n" in script
    assert "tmp=$(mktemp '/var/lib/x y/.gpubox.prom.XXXXXX')\n" in script
    assert 'mv -f "$tmp" "$target"\n' in script
    with pytest.raises(ValueError, match="ending in .prom"):
        gpu_metrics_script(BOX, PLAN, "/tmp", "gpubox.txt")


def test_rendering_is_deterministic() -> None:
    assert gpu_metrics_script(BOX, PLAN) == gpu_metrics_script(BOX, dict(reversed(PLAN.items())))
    assert f"mktemp {metrics.TEXTFILE_DIR}/.{metrics.TEXTFILE_NAME}.XXXXXX" in gpu_metrics_script(BOX, {})


# -- the units -------------------------------------------------------------------------------------


def test_service_and_timer_units(tmp_path: Path) -> None:
    box = Box(llama_cpp=BOX.llama_cpp, services=BOX.services, monitoring=HostMonitoring(gpu_metrics_interval_s=7))
    service = service_unit()
    timer = timer_unit(box.monitoring.gpu_metrics_interval_s)
    assert SCRIPT_PATH == "/usr/local/lib/gpubox/gpu-metrics.sh"
    assert (SERVICE_UNIT, TIMER_UNIT) == ("gpubox-gpu-metrics.service", "gpubox-gpu-metrics.timer")
    assert service_path() == f"/etc/systemd/system/{SERVICE_UNIT}"
    assert timer_path() == f"/etc/systemd/system/{TIMER_UNIT}"
    assert "Type=oneshot\n" in service
    assert f"ExecStart=/bin/sh {SCRIPT_PATH}\n" in service
    assert f"ReadWritePaths={metrics.TEXTFILE_DIR}\n" in service
    for line in ("OnBootSec=7s", "OnUnitActiveSec=7s", "AccuracySec=1s", f"Unit={SERVICE_UNIT}"):
        assert f"\n{line}\n" in timer
    assert 'ExecStart=/bin/sh "/opt/my scripts/m.sh"\n' in service_unit("/opt/my scripts/m.sh")
    with pytest.raises(ValueError):
        timer_unit(0)

    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: scripts/setup installs it"
    (tmp_path / SERVICE_UNIT).write_text(service)
    (tmp_path / TIMER_UNIT).write_text(timer)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / SERVICE_UNIT), str(tmp_path / TIMER_UNIT)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "gpubox-gpu-metrics" not in result.stderr, result.stderr


def test_the_scripts_output_on_a_real_h200_passes_promtool_and_parses() -> None:
    """tests/fixtures/nvidia-smi/gpubox-prom-h200.prom: the script run with the real nvidia-smi of an H200."""
    text = (Path(__file__).parent / "fixtures" / "nvidia-smi" / "gpubox-prom-h200.prom").read_text()
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    samples = {
        sample.name: sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples["gpubox_nvidia_smi_up"].value == 1
    total = samples["gpubox_gpu_memory_total_bytes"]
    assert total.value == 143771 * 1048576 and total.labels["name"] == "NVIDIA H200"
    assert total.labels["uuid"] == "GPU-dc20fa11-5a82-d8c5-294f-125008fda326" and total.labels["gpu"] == "0"
    assert samples["gpubox_gpu_temperature_celsius"].value == 33
    assert 50 < samples["gpubox_gpu_power_watts"].value < 700
    assert samples["gpubox_gpu_planned_memory_bytes"].value == 13_574_564_048
