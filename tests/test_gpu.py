import re
import subprocess
from pathlib import Path

import pytest
from pyinfra.api.exceptions import FactProcessError

from facts.gpu import NvidiaGpus
from gpubox.cuda import parse_nvcc_probe, parse_nvcc_version
from gpubox.gpu import (
    MINOR_NUMBERS_MARKER,
    Gpu,
    NvidiaSmiError,
    bus_id_key,
    cuda_architectures,
    gpu_probe_command,
    gpus_from_fact,
    parse_compute_apps_csv,
    parse_compute_apps_probe,
    parse_gpu_csv,
    parse_gpu_probe,
    parse_mib,
    parse_minor_numbers,
)

FIXTURES = Path(__file__).parent / "fixtures"
SMI = FIXTURES / "nvidia-smi"

H200_0 = Gpu(
    index=0,
    uuid="GPU-9221d4eb-2b4d-b7c1-2c6b-7a75ed88edf1",
    name="NVIDIA H200",
    pci_bus_id="00000000:00:06.0",
    driver_version="580.159.04",
    memory_total_mib=143771,
    memory_used_mib=0,
    memory_free_mib=143156,
    compute_capability="9.0",
)


def lines(name: str) -> list[str]:
    return (SMI / name).read_text().splitlines()


def test_noheader_csv_with_units() -> None:
    gpus = parse_gpu_csv(lines("query-noheader.csv"))
    assert [gpu.index for gpu in gpus] == [0, 1]
    assert gpus[0] == H200_0
    assert gpus[1].pci_bus_id == "00000000:00:07.0"


def test_nounits_csv() -> None:
    without_units = [line.replace(" MiB", "") for line in lines("query-noheader.csv")]
    assert parse_gpu_csv(without_units) == parse_gpu_csv(lines("query-noheader.csv"))


def test_csv_with_header_and_extra_columns() -> None:
    assert parse_gpu_csv(lines("query.csv")) == parse_gpu_csv(lines("query-noheader.csv"))


def test_not_available_values_are_none() -> None:
    row = "0, GPU-x, NVIDIA GeForce RTX 4090, 00000000:01:00.0, 550.54, [N/A], [Not Supported], [N/A], [N/A]"
    (gpu,) = parse_gpu_csv([row])
    assert gpu.memory_total_mib is None
    assert gpu.memory_used_mib is None
    assert gpu.compute_capability is None
    assert parse_mib("24564 MiB") == 24564


def test_bad_rows_raise() -> None:
    with pytest.raises(ValueError, match="fields"):
        parse_gpu_csv(["0, GPU-x, NVIDIA H200"])
    with pytest.raises(ValueError, match="MiB"):
        parse_mib("12 GiB")


def test_probe_without_nvidia_smi_is_empty() -> None:
    assert parse_gpu_probe(["NO_NVIDIA_SMI"]) == []
    assert parse_compute_apps_probe(["NO_NVIDIA_SMI"]) == []


def test_probe_with_driver_down_raises_not_empty() -> None:
    output = [*lines("driver-not-loaded.txt"), "NVIDIA_SMI_FAILED rc=9"]
    with pytest.raises(NvidiaSmiError, match="couldn't communicate with the NVIDIA driver") as error:
        parse_gpu_probe(output)
    assert error.value.returncode == 9
    with pytest.raises(NvidiaSmiError):
        parse_compute_apps_probe(output)


def test_fact_fails_when_driver_down() -> None:
    output = [*lines("driver-not-loaded.txt"), "NVIDIA_SMI_FAILED rc=9"]
    with pytest.raises(FactProcessError, match="exit code 9"):
        NvidiaGpus().process(output)


def test_probe_command_separates_the_three_cases() -> None:
    command = gpu_probe_command()
    assert "echo NO_NVIDIA_SMI" in command
    assert "--query-gpu=index,uuid,name,pci.bus_id,driver_version,memory.total" in command
    # One round trip: the minor numbers follow the CSV only when the query worked; its failure ends the output.
    assert "--format=csv,noheader,nounits 2>&1 && { echo NVIDIA_SMI_MINOR_NUMBERS; nvidia-smi -q" in command
    assert command.endswith('|| echo "NVIDIA_SMI_FAILED rc=$?"; fi')


@pytest.mark.parametrize("name", ["compute-apps-noheader-nounits.csv", "compute-apps-noheader.csv", "compute-apps.csv"])
def test_compute_apps(name: str) -> None:
    # Captured on an H200 while a torch process (pid 473) held 2 GiB.
    apps = parse_compute_apps_csv(lines(name))
    assert [(app.pid, app.gpu_uuid, app.used_memory_mib) for app in apps] == [
        (473, "GPU-31415de2-9786-74b3-dcc8-420e69a456d7", 2566)
    ]
    assert parse_compute_apps_probe([]) == []


def grep_minor_lines(name: str) -> list[str]:
    """What the probe's `grep -E '^GPU |Minor Number'` keeps of a captured `nvidia-smi -q`."""
    return [line for line in lines(name) if re.search(r"^GPU |Minor Number", line)]


@pytest.mark.parametrize("name", ["nvidia-smi-q.txt", "nvidia-smi-q-b.txt"])
def test_minor_numbers_from_real_nvidia_smi_q(name: str) -> None:
    # Two 2x H200 boxes (driver 580.159.04): the whole `nvidia-smi -q` and its grepped lines agree.
    expected = {"0000:00:06.0": 0, "0000:00:07.0": 1}
    assert parse_minor_numbers(lines(name)) == expected
    assert parse_minor_numbers(grep_minor_lines(name)) == expected
    assert grep_minor_lines(name) == [
        "GPU 00000000:00:06.0",
        "    Minor Number                                       : 0",
        "GPU 00000000:00:07.0",
        "    Minor Number                                       : 1",
    ]


def test_probe_output_captured_on_the_gpu_machine() -> None:
    # gpu_probe_command()'s own output on a 2x H200 box (the isolation run in docs/gpu-validation.md).
    gpus = parse_gpu_probe(lines("probe-b.txt"))
    assert [(gpu.index, gpu.pci_bus_id, gpu.minor_number) for gpu in gpus] == [
        (0, "00000000:00:06.0", 0),
        (1, "00000000:00:07.0", 1),
    ]
    assert gpus[1].uuid == "GPU-0534a528-b87a-5385-7563-c5b4853f4762"


def test_minor_numbers_match_by_bus_id_not_by_order() -> None:
    # Derived from the real capture: the blocks of `nvidia-smi -q` swapped, and GPU 0's minor number set to 5
    # (a node numbering that is not the index, as after a GPU was removed): each CSV row still gets its own.
    grep = grep_minor_lines("nvidia-smi-q.txt")
    swapped = [*grep[2:], grep[0], grep[1].replace(": 0", ": 5")]
    output = [*lines("query-noheader.csv"), MINOR_NUMBERS_MARKER, *swapped]
    assert [(gpu.index, gpu.minor_number) for gpu in parse_gpu_probe(output)] == [(0, 5), (1, 1)]


def test_minor_number_unknown_or_not_available() -> None:
    csv_rows = lines("query-noheader.csv")
    # the probe before minor numbers (no marker), and `nvidia-smi -q` printing nothing after it
    assert [gpu.minor_number for gpu in parse_gpu_probe(csv_rows)] == [None, None]
    assert [gpu.minor_number for gpu in parse_gpu_probe([*csv_rows, MINOR_NUMBERS_MARKER])] == [None, None]
    not_available = ["GPU 00000000:00:06.0", "    Minor Number                                       : N/A"]
    gpus = parse_gpu_probe([*csv_rows, MINOR_NUMBERS_MARKER, *not_available])
    assert [gpu.minor_number for gpu in gpus] == [None, None]
    with pytest.raises(ValueError, match="minor number"):
        parse_minor_numbers(["GPU 00000000:00:06.0", "    Minor Number : zero"])


def test_bus_id_spellings() -> None:
    # nvidia-smi writes an 8-digit domain; /proc/driver/nvidia/gpus/<id>/information ("Bus Location") 4 digits.
    proc = (SMI / "proc-information-b.txt").read_text()
    assert re.findall(r"Bus Location:\s+(\S+)", proc) == ["0000:00:06.0", "0000:00:07.0"]
    assert re.findall(r"Device Minor:\s+(\d+)", proc) == ["0", "1"]
    assert bus_id_key("00000000:00:06.0") == bus_id_key("0000:00:06.0") == "0000:00:06.0"
    assert bus_id_key("00000000:C1:00.0") == "0000:c1:00.0"
    with pytest.raises(ValueError, match="PCI bus id"):
        bus_id_key("GPU-0534a528")


def fake_nvidia_smi(tmp_path: Path, query_exit: int = 0, q_exit: int = 0) -> dict[str, str]:
    """A `nvidia-smi` that prints the captured CSV for --query-gpu and the captured `nvidia-smi -q` for -q."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-q" ]; then cat {SMI / "nvidia-smi-q.txt"}; exit {q_exit}; fi\n'
        f'if [ {query_exit} -ne 0 ]; then cat {SMI / "driver-not-loaded.txt"}; exit {query_exit}; fi\n'
        f"sed 's/ MiB//g' {SMI / 'query-noheader.csv'}\n"
    )
    fake.chmod(0o755)
    return {"PATH": f"{tmp_path}:/usr/bin:/bin"}


def test_minor_numbers_through_the_real_shell_command(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path)
    output = subprocess.run(["/bin/sh", "-c", gpu_probe_command()], env=env, capture_output=True, text=True, check=True)
    gpus = parse_gpu_probe(output.stdout.splitlines())
    assert [(gpu.index, gpu.minor_number) for gpu in gpus] == [(0, 0), (1, 1)]
    assert gpus[0] == H200_0.model_copy(update={"minor_number": 0})
    # `nvidia-smi -q` failing does not fail the fact: the minor numbers are unknown
    env = fake_nvidia_smi(tmp_path, q_exit=9)
    output = subprocess.run(["/bin/sh", "-c", gpu_probe_command()], env=env, capture_output=True, text=True, check=True)
    assert [gpu.index for gpu in parse_gpu_probe(output.stdout.splitlines())] == [0, 1]
    # the query failing still ends the output with its exit code (no minor-number lines)
    env = fake_nvidia_smi(tmp_path, query_exit=9)
    output = subprocess.run(["/bin/sh", "-c", gpu_probe_command()], env=env, capture_output=True, text=True, check=True)
    assert MINOR_NUMBERS_MARKER not in output.stdout
    with pytest.raises(NvidiaSmiError, match="exit code 9"):
        parse_gpu_probe(output.stdout.splitlines())


def test_driver_failure_through_the_real_shell_command(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\ncat {SMI / 'driver-not-loaded.txt'}\nexit 9\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    output = subprocess.run(["/bin/sh", "-c", gpu_probe_command()], env=env, capture_output=True, text=True, check=True)
    assert output.stdout.splitlines()[-1] == "NVIDIA_SMI_FAILED rc=9"
    with pytest.raises(NvidiaSmiError, match="exit code 9"):
        parse_gpu_probe(output.stdout.splitlines())
    no_smi = subprocess.run(
        ["/bin/sh", "-c", gpu_probe_command()], env={"PATH": str(tmp_path / "empty")}, capture_output=True, text=True
    )
    assert parse_gpu_probe(no_smi.stdout.splitlines()) == []


def test_cuda_architectures() -> None:
    ada = H200_0.model_copy(update={"compute_capability": "8.9"})
    blackwell = H200_0.model_copy(update={"compute_capability": "12.0"})
    unknown = H200_0.model_copy(update={"compute_capability": None})
    assert cuda_architectures([H200_0, blackwell, ada, H200_0, unknown]) == ["89", "90", "120"]
    assert cuda_architectures([]) == []


def test_gpus_from_fact_json_roundtrip() -> None:
    gpus = parse_gpu_csv(lines("query-noheader.csv"))
    assert gpus_from_fact([gpu.to_json() for gpu in gpus]) == gpus
    assert gpus_from_fact(gpus) == gpus


def test_records_are_frozen_and_strict() -> None:
    with pytest.raises(ValueError):
        Gpu.model_validate({**H200_0.to_json(), "extra": 1})
    with pytest.raises(ValueError):
        H200_0.index = 3  # type: ignore[misc]


def test_nvcc_version_fixture() -> None:
    output = (FIXTURES / "cuda" / "nvcc-probe-13.0.txt").read_text().splitlines()
    toolkit = parse_nvcc_probe(output)
    assert toolkit is not None
    assert (toolkit.nvcc_path, toolkit.release, toolkit.version) == ("/usr/local/bin/nvcc", "13.0", "13.0.88")
    assert toolkit.build == "cuda_13.0.r13.0/compiler.36424714_0"
    assert toolkit.release_tuple == (13, 0)
    assert parse_nvcc_probe([]) is None


def test_nvcc_that_prints_no_release_raises() -> None:
    with pytest.raises(ValueError, match="no CUDA release"):
        parse_nvcc_version("/opt/cuda/bin/nvcc", ["/opt/cuda/bin/nvcc: error while loading shared libraries"])
