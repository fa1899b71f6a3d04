"""NVIDIA GPUs as seen by ``nvidia-smi``: typed records and the parsers behind ``facts.gpu``.

The probe command prints one of three things, and :func:`parse_gpu_probe` tells them apart:

- ``NO_NVIDIA_SMI``: the host has no ``nvidia-smi``; it has no usable NVIDIA GPU: ``[]``.
- the CSV rows of ``--query-gpu``: one :class:`Gpu` per row; then the line ``NVIDIA_SMI_MINOR_NUMBERS``
  and the ``GPU <bus id>`` / ``Minor Number : N`` lines of ``nvidia-smi -q`` (the query has no field for
  the minor number, which names the device node ``/dev/nvidia<N>``), matched to the rows by PCI bus id.
- whatever ``nvidia-smi`` printed, then ``NVIDIA_SMI_FAILED rc=N``: the tool is there but the
  driver does not answer. That is a broken box, not a box without GPUs, so it raises
  :class:`NvidiaSmiError` instead of returning an empty list.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gpubox.records import Record

NO_NVIDIA_SMI = "NO_NVIDIA_SMI"
NVIDIA_SMI_FAILED = "NVIDIA_SMI_FAILED"
MINOR_NUMBERS_MARKER = "NVIDIA_SMI_MINOR_NUMBERS"

GPU_QUERY_FIELDS = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "driver_version",
    "memory.total",
    "memory.used",
    "memory.free",
    "compute_cap",
)
COMPUTE_APPS_QUERY_FIELDS = ("pid", "gpu_uuid", "used_memory")

# nvidia-smi prints these instead of a value the device or driver cannot give.
_NOT_AVAILABLE = {"[N/A]", "N/A", "[Not Supported]", "Not Supported", "[Unknown Error]", ""}
_MIB_RE = re.compile(r"^(\d+)(?:\s*MiB)?$")
_FAILED_RE = re.compile(rf"^{NVIDIA_SMI_FAILED} rc=(\d+)$")
# `nvidia-smi -q`: a GPU's block starts with an unindented `GPU 00000000:00:06.0`; inside it, indented,
# `Minor Number : 0` (`N/A` where the driver has no device node for it, e.g. under WSL).
_Q_GPU_RE = re.compile(r"^GPU\s+([0-9A-Fa-f]+:[0-9A-Fa-f]+:[0-9A-Fa-f]+\.[0-9A-Fa-f]+)\s*$")
_Q_MINOR_RE = re.compile(r"^\s+Minor Number\s*:\s*(\S.*?)\s*$")
_BUS_ID_RE = re.compile(r"^([0-9A-Fa-f]+):([0-9A-Fa-f]+):([0-9A-Fa-f]+)\.([0-9A-Fa-f]+)$")


class Gpu(Record):
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    driver_version: str
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_free_mib: int | None
    compute_capability: str | None
    """``major.minor`` as nvidia-smi prints it, e.g. ``"9.0"`` for an H100/H200."""
    minor_number: int | None = None
    """The driver's minor number: the GPU's device node is ``/dev/nvidia<minor_number>`` (not the index)."""


class ComputeApp(Record):
    """One process holding memory on a GPU (``nvidia-smi --query-compute-apps``)."""

    pid: int
    gpu_uuid: str
    used_memory_mib: int | None


class NvidiaSmiError(RuntimeError):
    """``nvidia-smi`` is installed but failed, usually because the driver is not loaded."""

    def __init__(self, output: str, returncode: int | None) -> None:
        self.output = output
        self.returncode = returncode
        super().__init__(
            f"nvidia-smi failed (exit code {returncode}): {output or '(no output)'}; "
            "the NVIDIA driver is installed wrong or not loaded (reboot after installing it?)"
        )


CPU = "cpu"
"""How a service pinned to no GPU is shown everywhere (`check`, units, monitoring labels, `top`): it runs on the CPU."""


def gpu_list(gpus: Sequence[int]) -> str:
    """A service's pinned GPUs as every table, unit and label shows them: ``0,1``, or ``cpu`` for none."""
    return ",".join(str(gpu) for gpu in gpus) or CPU


def nvidia_smi_query_command(query: str, fields: Sequence[str]) -> str:
    """Shell command that prints ``NO_NVIDIA_SMI``, the CSV rows, or the failure and its code.

    It always exits 0 so that pyinfra hands the output to the fact's ``process()``.
    """
    query_call = f"nvidia-smi --{query}={','.join(fields)} --format=csv,noheader,nounits"
    return (
        f"if ! command -v nvidia-smi >/dev/null 2>&1; then echo {NO_NVIDIA_SMI}; "
        f'else {query_call} 2>&1 || echo "{NVIDIA_SMI_FAILED} rc=$?"; fi'
    )


# The lines of `nvidia-smi -q` that carry each GPU's bus id and minor number.
MINOR_NUMBERS_GREP = "grep -E '^GPU |Minor Number'"


def gpu_probe_command() -> str:
    """The ``--query-gpu`` CSV, then (one round trip) the bus id and minor number lines of ``nvidia-smi -q``.

    A failing ``nvidia-smi -q`` (or ``grep`` finding nothing) leaves the minor numbers unknown (None),
    it does not fail the fact; a failing query still ends with ``NVIDIA_SMI_FAILED rc=N``.
    """
    query_call = f"nvidia-smi --query-gpu={','.join(GPU_QUERY_FIELDS)} --format=csv,noheader,nounits"
    minor_numbers = f"{{ echo {MINOR_NUMBERS_MARKER}; nvidia-smi -q 2>/dev/null | {MINOR_NUMBERS_GREP}; true; }}"
    return (
        f"if ! command -v nvidia-smi >/dev/null 2>&1; then echo {NO_NVIDIA_SMI}; "
        f'else {query_call} 2>&1 && {minor_numbers} || echo "{NVIDIA_SMI_FAILED} rc=$?"; fi'
    )


def compute_apps_probe_command() -> str:
    return nvidia_smi_query_command("query-compute-apps", COMPUTE_APPS_QUERY_FIELDS)


def optional_value(field: str) -> str | None:
    field = field.strip()
    return None if field in _NOT_AVAILABLE else field


def parse_mib(field: str) -> int | None:
    """``"143771"`` (``nounits``) or ``"143771 MiB"`` (with units) -> 143771; ``[N/A]`` -> None."""
    value = optional_value(field)
    if value is None:
        return None
    match = _MIB_RE.match(value)
    if match is None:
        raise ValueError(f"not a MiB amount: {field!r}")
    return int(match.group(1))


def _csv_rows(lines: Iterable[str]) -> list[list[str]]:
    rows = csv.reader((line for line in lines if line.strip()), skipinitialspace=True)
    return [[field.strip() for field in row] for row in rows]


def _is_header(row: list[str]) -> bool:
    return bool(row) and row[0] == "index"


def parse_gpu_csv(lines: Iterable[str]) -> list[Gpu]:
    """Rows of ``nvidia-smi --query-gpu=<GPU_QUERY_FIELDS> --format=csv[,noheader][,nounits]``.

    Accepts the header line and the units (``MiB``) too, and ignores columns past the ninth,
    so a wider capture such as ``tests/fixtures/nvidia-smi/query.csv`` parses as well.
    """
    gpus: list[Gpu] = []
    for row in _csv_rows(lines):
        if _is_header(row):
            continue
        if len(row) < len(GPU_QUERY_FIELDS):
            raise ValueError(f"nvidia-smi row has {len(row)} fields, expected {len(GPU_QUERY_FIELDS)}: {row}")
        index, uuid, name, bus_id, driver, total, used, free, compute_cap = row[: len(GPU_QUERY_FIELDS)]
        gpus.append(
            Gpu(
                index=int(index),
                uuid=uuid,
                name=name,
                pci_bus_id=bus_id,
                driver_version=driver,
                memory_total_mib=parse_mib(total),
                memory_used_mib=parse_mib(used),
                memory_free_mib=parse_mib(free),
                compute_capability=optional_value(compute_cap),
            )
        )
    return gpus


def parse_compute_apps_csv(lines: Iterable[str]) -> list[ComputeApp]:
    """Rows of ``nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits``.

    Checked against real output on an H200 (``tests/fixtures/nvidia-smi/compute-apps*.csv``): with the
    header and units too; no processes, no rows. Not yet seen with a running llama-server.
    """
    apps: list[ComputeApp] = []
    for row in _csv_rows(lines):
        if row and row[0] == "pid":
            continue
        if len(row) < len(COMPUTE_APPS_QUERY_FIELDS):
            raise ValueError(f"nvidia-smi compute-apps row has {len(row)} fields, expected 3: {row}")
        pid, gpu_uuid, used_memory = row[: len(COMPUTE_APPS_QUERY_FIELDS)]
        apps.append(ComputeApp(pid=int(pid), gpu_uuid=gpu_uuid, used_memory_mib=parse_mib(used_memory)))
    return apps


def _probe_rows(lines: Sequence[str]) -> list[str] | None:
    """The CSV lines of a probe's output; None when the host has no nvidia-smi.

    Raises NvidiaSmiError when nvidia-smi ran and failed.
    """
    stripped = [line.rstrip() for line in lines]
    if stripped and stripped[0] == NO_NVIDIA_SMI:
        return None
    if stripped:
        failed = _FAILED_RE.match(stripped[-1])
        if failed is not None:
            message = " ".join(line.strip() for line in stripped[:-1] if line.strip())
            raise NvidiaSmiError(message, int(failed.group(1)))
    return stripped


def bus_id_key(bus_id: str) -> str:
    """A PCI bus id in one spelling: nvidia-smi's ``00000000:00:06.0`` and /proc's ``0000:00:06.0`` agree."""
    match = _BUS_ID_RE.match(bus_id.strip())
    if match is None:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16):x}"


def parse_minor_numbers(lines: Iterable[str]) -> dict[str, int | None]:
    """``nvidia-smi -q`` (whole, or only its ``GPU <bus id>`` and ``Minor Number`` lines) -> bus id -> minor.

    The keys are :func:`bus_id_key` spellings; ``N/A`` reads as None. Real output of a 2x H200 box:
    ``tests/fixtures/nvidia-smi/nvidia-smi-q-h200x2.txt`` and ``minor-numbers-h200x2.txt``.
    """
    minors: dict[str, int | None] = {}
    current: str | None = None
    for line in lines:
        gpu = _Q_GPU_RE.match(line.rstrip())
        if gpu is not None:
            current = bus_id_key(gpu.group(1))
            continue
        minor = _Q_MINOR_RE.match(line)
        if minor is not None and current is not None and current not in minors:
            value = optional_value(minor.group(1))
            if value is not None and not value.isdigit():
                raise ValueError(f"not a minor number: {line!r}")
            minors[current] = None if value is None else int(value)
    return minors


def with_minor_numbers(gpus: Iterable[Gpu], minors: Mapping[str, int | None]) -> list[Gpu]:
    """Each GPU with the minor number listed for its PCI bus id (None when not listed)."""
    return [gpu.model_copy(update={"minor_number": minors.get(bus_id_key(gpu.pci_bus_id))}) for gpu in gpus]


def parse_gpu_probe(lines: Sequence[str]) -> list[Gpu]:
    """Output of :func:`gpu_probe_command` -> the GPUs; ``[]`` without nvidia-smi; raises NvidiaSmiError.

    Output without the minor-number part (an older probe) gives GPUs whose ``minor_number`` is None.
    """
    rows = _probe_rows(lines)
    if rows is None:
        return []
    if MINOR_NUMBERS_MARKER not in rows:
        return parse_gpu_csv(rows)
    split = rows.index(MINOR_NUMBERS_MARKER)
    return with_minor_numbers(parse_gpu_csv(rows[:split]), parse_minor_numbers(rows[split + 1 :]))


def parse_compute_apps_probe(lines: Sequence[str]) -> list[ComputeApp]:
    """Output of :func:`compute_apps_probe_command`; ``[]`` without nvidia-smi; raises NvidiaSmiError."""
    rows = _probe_rows(lines)
    return [] if rows is None else parse_compute_apps_csv(rows)


def gpus_from_fact(data: Iterable[Gpu | dict[str, Any]]) -> list[Gpu]:
    """Typed GPUs from ``host.get_fact(NvidiaGpus)``, or from its JSON form (``pyinfra ... fact`` output)."""
    return [gpu if isinstance(gpu, Gpu) else Gpu.model_validate(gpu) for gpu in data]


def cuda_architectures(gpus: Iterable[Gpu]) -> list[str]:
    """``CMAKE_CUDA_ARCHITECTURES`` values for the GPUs: ``"8.9"`` -> ``"89"``, deduplicated, sorted."""
    architectures = {gpu.compute_capability.replace(".", "") for gpu in gpus if gpu.compute_capability is not None}
    return sorted(architectures, key=int)
