"""The GPU textfile: a script each host runs from a systemd timer, writing gpubox's metrics for node-exporter.

``gpu_metrics_script`` renders a POSIX sh script (run as root by ``gpubox-gpu-metrics.service``,
started every ``Box.monitoring.gpu_metrics_interval_s`` by ``gpubox-gpu-metrics.timer``) that writes
``metrics.TEXTFILE_DIR/metrics.TEXTFILE_NAME``:

- from ``nvidia-smi --query-gpu=<GPU_METRICS_QUERY_FIELDS> --format=csv,noheader,nounits`` (the real
  output is tests/fixtures/nvidia-smi/gpu-metrics-*-noheader-nounits.csv): each GPU's memory used and
  total (MiB * 1048576), utilisation (% / 100), temperature and power, labelled ``gpu`` (the index),
  ``uuid`` and ``name``; a value nvidia-smi can't give (``[N/A]``, ``[Not Supported]``) is left out;
  ``gpubox_nvidia_smi_up`` 1, or 0 (and no GPU samples) when nvidia-smi is missing or fails;
- from the ``Box``, rendered here with prometheus_client: the planned VRAM per GPU and which service
  is pinned to which GPU;
- from systemd, per service of the box: whether its unit is active, and its ``NRestarts``;
- when it wrote the file.

The file is written to a temporary name in the same directory (``.<name>.XXXXXX``, which
node-exporter's ``*.prom`` glob never reads), made world-readable, then renamed over the target: the
collector sees the old file or the new one, never a partial one.

Label values are escaped as the Prometheus text format says (backslash, double quote, newline): the
ones known when rendering by prometheus_client, the GPU names and UUIDs nvidia-smi prints by the
script's awk. Every value that reaches the shell goes through ``gpubox.quoting.shell_word``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from posixpath import join as posix_join

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from gpubox.box import Box
from gpubox.monitoring import metrics
from gpubox.quoting import exec_word, path_list_entry, shell_join, shell_word

GPU_METRICS_QUERY_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.used",
    "memory.total",
    "utilization.gpu",
    "temperature.gpu",
    "power.draw",
)
"""The ``--query-gpu`` fields, in the order of the captured fixtures (and of the awk's columns)."""

SCRIPT_PATH = "/usr/local/lib/gpubox/gpu-metrics.sh"
SERVICE_UNIT = "gpubox-gpu-metrics.service"
TIMER_UNIT = "gpubox-gpu-metrics.timer"
UNIT_DIR = "/etc/systemd/system"
NVIDIA_SMI_TIMEOUT_S = 20
"""nvidia-smi hangs on a wedged GPU: after this long it counts as failed (``gpubox_nvidia_smi_up 0``)."""
SERVICE_TIMEOUT_S = 60

MIB = 1048576

HELP = {
    metrics.GPU_MEMORY_USED: "GPU memory in use (nvidia-smi memory.used), bytes.",
    metrics.GPU_MEMORY_TOTAL: "GPU memory in all (nvidia-smi memory.total), bytes.",
    metrics.GPU_UTILIZATION: "GPU utilisation (nvidia-smi utilization.gpu / 100).",
    metrics.GPU_TEMPERATURE: "GPU temperature (nvidia-smi temperature.gpu), degrees Celsius.",
    metrics.GPU_POWER: "GPU power draw (nvidia-smi power.draw), watts; absent when nvidia-smi can not tell.",
    metrics.GPU_PLANNED_MEMORY: "The VRAM plan total for the GPU (its services plus the reserve), bytes.",
    metrics.GPU_SERVICE_INFO: "1 for each service pinned to the GPU.",
    metrics.NVIDIA_SMI_UP: "1 when nvidia-smi answered, 0 when it is missing or failed (driver not loaded).",
    metrics.UNIT_ACTIVE: "1 when systemd says the unit of the service is active.",
    metrics.UNIT_RESTARTS: "NRestarts of the unit of the service (systemd: automatic restarts since it was started).",
    metrics.TEXTFILE_UPDATED: "When the gpubox GPU metrics script last wrote this file, seconds since the epoch.",
}

# Each per-GPU metric: (name, column counted back from the last, scale). The awk reads the columns of
# GPU_METRICS_QUERY_FIELDS from the end, so a GPU name with a comma in it still parses.
GPU_SAMPLES: tuple[tuple[str, int, float], ...] = (
    (metrics.GPU_MEMORY_USED, 4, MIB),
    (metrics.GPU_MEMORY_TOTAL, 3, MIB),
    (metrics.GPU_UTILIZATION, 2, 0.01),
    (metrics.GPU_TEMPERATURE, 1, 1),
    (metrics.GPU_POWER, 0, 1),
)

# POSIX awk (Debian's mawk): one nvidia-smi row -> one sample of `metric`, or nothing when the value
# is no number ([N/A], [Not Supported]). `esc` escapes a label value by hand: gsub's replacement
# backslashes differ between awks.
GPU_SAMPLES_AWK = r"""
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t\r]+$/, "", s); return s }
function esc(s,    out, i, c) {
	out = ""
	for (i = 1; i <= length(s); i++) {
		c = substr(s, i, 1)
		if (c == "\\") out = out "\\\\"
		else if (c == "\"") out = out "\\\""
		else if (c == "\n") out = out "\\n"
		else out = out c
	}
	return out
}
BEGIN { FS = "," }
NF >= 8 {
	gpu = trim($1)
	if (gpu !~ /^[0-9]+$/) next
	name = $3
	for (i = 4; i <= NF - 5; i++) name = name "," $i
	value = trim($(NF - column))
	if (value !~ /^-?[0-9]+(\.[0-9]+)?$/) next
	printf "%s{gpu=\"%s\",name=\"%s\",uuid=\"%s\"} %.15g\n", metric, gpu, esc(trim(name)), esc(trim($2)), value * scale
}
"""


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(families: Sequence[Metric]) -> str:
    """The families in Prometheus's text format, as prometheus_client writes them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode()


def _header(name: str) -> str:
    """The ``# HELP`` and ``# TYPE`` lines of one of the script's metrics (no sample)."""
    family = (
        CounterMetricFamily(name, HELP[name]) if name == metrics.UNIT_RESTARTS else GaugeMetricFamily(name, HELP[name])
    )
    return exposition([family])


def sample_name(name: str, labels: Mapping[str, str]) -> str:
    """``name{labels}`` of a sample as prometheus_client writes it (label values escaped), without the value."""
    family = GaugeMetricFamily(name, "-", labels=list(labels))
    family.add_metric(list(labels.values()), 0)
    line = exposition([family]).splitlines()[-1]
    value = " 0.0"
    assert line.endswith(value), line
    return line.removesuffix(value)


def static_metrics(box: Box | None, planned_bytes: Mapping[int, int]) -> str:
    """The metrics known when rendering: each planned GPU's total, and each service pinned to a GPU."""
    planned = GaugeMetricFamily(metrics.GPU_PLANNED_MEMORY, HELP[metrics.GPU_PLANNED_MEMORY], labels=["gpu"])
    for gpu, used in sorted(planned_bytes.items()):
        planned.add_metric([str(gpu)], used)
    info = GaugeMetricFamily(
        metrics.GPU_SERVICE_INFO, HELP[metrics.GPU_SERVICE_INFO], labels=["gpu", "service", "unit"]
    )
    for service in box.services if box is not None else ():
        for gpu in service.placement:
            info.add_metric([str(gpu), service.name, service.unit_name], 1)
    return exposition([planned, info])


def textfile_path(textfile_dir: str = metrics.TEXTFILE_DIR, textfile_name: str = metrics.TEXTFILE_NAME) -> str:
    return posix_join(textfile_dir, textfile_name)


def gpu_metrics_script(
    box: Box | None,
    planned_bytes: Mapping[int, int],
    textfile_dir: str = metrics.TEXTFILE_DIR,
    textfile_name: str = metrics.TEXTFILE_NAME,
) -> str:
    """The script's whole text: the same box, plan and paths always render the same bytes.

    ``box``: None on a gateway-only host (nvidia-smi's state and the time only). ``planned_bytes``: each
    GPU index's planned total in bytes (``fleet.planned_gpu_bytes``; may be empty). ``textfile_dir`` must
    exist on the host (node-exporter's package makes the default one).
    """
    if not textfile_name.endswith(".prom") or "/" in textfile_name:
        raise ValueError(f"textfile_name must be a file name ending in .prom, got {textfile_name!r}")
    query = shell_join([
        "timeout",
        str(NVIDIA_SMI_TIMEOUT_S),
        "nvidia-smi",
        f"--query-gpu={','.join(GPU_METRICS_QUERY_FIELDS)}",
        "--format=csv,noheader,nounits",
    ])
    gpu_lines = []
    for name, column, scale in GPU_SAMPLES:
        gpu_lines += [
            f"\tprintf '%s' {shell_word(_header(name))}",
            f"\tif [ \"$smi_up\" = 1 ]; then gpu_samples {shell_join([name, str(column), str(scale)])}; fi",
        ]
    active_lines = [f"\tprintf '%s' {shell_word(_header(metrics.UNIT_ACTIVE))}"]
    restart_lines = [f"\tprintf '%s' {shell_word(_header(metrics.UNIT_RESTARTS))}"]
    for service in box.services if box is not None else ():
        labels = {"service": service.name, "unit": service.unit_name}
        unit = shell_word(service.unit_name, "a unit name")
        active_lines.append(
            f"\tprintf '%s %s\\n' {shell_word(sample_name(metrics.UNIT_ACTIVE, labels))} \"$(unit_active {unit})\""
        )
        restart_lines.append(f"\tunit_restarts {unit} {shell_word(sample_name(metrics.UNIT_RESTARTS, labels))}")
    body = "\n".join([
        f"\tprintf '%s' {shell_word(static_metrics(box, planned_bytes))}",
        f"\tprintf '%s' {shell_word(_header(metrics.NVIDIA_SMI_UP))}",
        f"\tprintf '%s %s\\n' {shell_word(metrics.NVIDIA_SMI_UP)} \"$smi_up\"",
        *gpu_lines,
        *active_lines,
        *restart_lines,
        f"\tprintf '%s' {shell_word(_header(metrics.TEXTFILE_UPDATED))}",
        f"\tprintf '%s %s\\n' {shell_word(metrics.TEXTFILE_UPDATED)} \"$(date +%s)\"",
    ])
    return f"""\
#!/bin/sh
# Managed by gpubox: edits are overwritten on the next deploy.
# Writes gpubox's GPU and unit metrics for node-exporter's textfile collector (gpubox/monitoring/textfile.py).
set -eu
target={shell_word(textfile_path(textfile_dir, textfile_name), "the textfile path")}
tmp=$(mktemp {shell_word(posix_join(textfile_dir, f".{textfile_name}.XXXXXX"), "the textfile directory")})
trap 'rm -f "$tmp"' EXIT
trap 'exit 1' HUP INT TERM

smi_up=0
smi=
if ! command -v nvidia-smi >/dev/null 2>&1; then
	echo "gpu-metrics: no nvidia-smi on PATH" >&2
elif smi=$({query}); then
	smi_up=1
else
	printf 'gpu-metrics: nvidia-smi failed (exit code %s): %s\\n' "$?" "$smi" >&2
	smi=
fi

# gpu_samples METRIC COLUMN SCALE: one sample per GPU row of nvidia-smi's CSV.
gpu_samples() {{
	printf '%s\\n' "$smi" | awk -v metric="$1" -v column="$2" -v scale="$3" {shell_word(GPU_SAMPLES_AWK)}
}}

unit_active() {{
	if [ "$(systemctl is-active "$1" 2>/dev/null)" = active ]; then echo 1; else echo 0; fi
}}

# unit_restarts UNIT SAMPLE: the sample, or nothing when systemd gives no number.
unit_restarts() {{
	restarts=$(systemctl show -p NRestarts --value "$1" 2>/dev/null) || restarts=
	case $restarts in
	'' | *[!0-9]*) ;;
	*) printf '%s %s\\n' "$2" "$restarts" ;;
	esac
}}

{{
{body}
}} >"$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$target"
"""


def service_unit(script_path: str = SCRIPT_PATH, textfile_dir: str = metrics.TEXTFILE_DIR) -> str:
    """``gpubox-gpu-metrics.service``: runs the script once, as root (nvidia-smi and systemctl need it).

    The OS is read-only to it but for ``textfile_dir``, where it writes.
    """
    return f"""\
# Managed by gpubox: edits are overwritten on the next deploy.
[Unit]
Description=gpubox GPU and unit metrics for node-exporter's textfile collector

[Service]
Type=oneshot
ExecStart={exec_word("/bin/sh")} {exec_word(script_path, "the script path")}
TimeoutStartSec={SERVICE_TIMEOUT_S}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={path_list_entry(textfile_dir, "the textfile directory")}
"""


def service_path() -> str:
    """Where ``service_unit``'s text goes on the host."""
    return f"{UNIT_DIR}/{SERVICE_UNIT}"


def timer_path() -> str:
    """Where ``timer_unit``'s text goes on the host."""
    return f"{UNIT_DIR}/{TIMER_UNIT}"


def timer_unit(interval_s: int) -> str:
    """``gpubox-gpu-metrics.timer``: starts the service at boot and every ``interval_s`` seconds after
    (``Box.monitoring.gpu_metrics_interval_s``)."""
    if interval_s < 1:
        raise ValueError(f"the interval is a whole number of seconds >= 1, got {interval_s!r}")
    return f"""\
# Managed by gpubox: edits are overwritten on the next deploy.
[Unit]
Description=gpubox GPU and unit metrics every {interval_s} s

[Timer]
Unit={SERVICE_UNIT}
OnBootSec={interval_s}s
OnUnitActiveSec={interval_s}s
AccuracySec=1s

[Install]
WantedBy=timers.target
"""
