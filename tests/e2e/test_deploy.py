"""End to end: real SSH into a booted systemd host, a real llama.cpp build, a real model, every promise.

The tests depend on each other on purpose and must run in file order, as one chain, on one host
(`test_host` and `deployer` are module-scoped): each scenario starts from the state the previous one
left, as a user's box would. `test_first_converge` builds llama.cpp and deploys once (the slow part);
the rest reuse it: the rerun must be a no-op, the surgical redeploy and the rollbacks need a running
service and a `{unit}.prev` from earlier runs, the warm-ccache rebuild needs the first build's objects.
Selecting one test alone (`-k test_rerun_is_a_noop`) or running them in another order (xdist, a
random order) is not supported: on a fresh host its precondition is missing, and it fails for a
reason that is not a bug in gpubox. Run the whole module (`pytest tests/e2e/test_deploy.py`); each
other e2e module boots its own host(s) and runs alone. Timings go to the e2e report (see `record`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gpubox.smoke import requests_transport, run_smoke
from gpubox.spec import SmokeThresholds
from tests.testbed import TestHost, free_port, inventory_config, same_tree_commit
from tests.testbed.config import TestbedConfig

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
INVENTORY = "inventory/testbed.py"
FULL = "deploys/danarch4090.py"
SURGICAL = "deploys/gemma4_mtp.py"
UNIT = "/etc/systemd/system/gemma4.service"
MODEL = "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PREFIX = "/opt/llama.cpp"
REPORT = Path(os.environ.get("GPUBOX_E2E_REPORT", ROOT / ".cache" / "e2e-report.json"))
SMOKE_LINE = re.compile(
    r"smoke gemma4\.service: (?P<tok_s>[\d.]+) tok/s .*acceptance (?P<acceptance>[\d.]+) .*?(?P<seconds>[\d.]+) s: "
    r"(?P<verdict>passed|FAILED)"
)


def record(key: str, value: object) -> None:
    """Numbers for the README's table (a benchmark record, never asserted on)."""
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    numbers = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    numbers[key] = value
    REPORT.write_text(json.dumps(numbers, indent=2, sort_keys=True))


class Deployer:
    """Runs the real pyinfra CLI against the test host with a given inventory config."""

    def __init__(self, host: TestHost, config_path: Path, base: dict[str, Any]) -> None:
        self.host = host
        self.config_path = config_path
        self.base = base

    def write_config(self, **overrides: Any) -> TestbedConfig:
        """The base config with ``overrides``, validated (a wrong key fails here, by name) and written."""
        config = TestbedConfig.model_validate({**self.base, **overrides})
        config.write(self.config_path)
        return config

    def run(
        self, deploy: str, *flags: str, user: str = "root", **overrides: Any
    ) -> tuple[subprocess.CompletedProcess[str], float]:
        if user != "root":
            overrides["host_data"] = {**self.host.pyinfra_host_data(user), "_sudo": True}
        self.write_config(**overrides)
        started = time.monotonic()
        result = subprocess.run(
            [PYINFRA, *flags, INVENTORY, deploy],
            cwd=ROOT,
            env={**os.environ, "GPUBOX_TESTBED_CONFIG": str(self.config_path), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=3000,
            check=False,
        )
        elapsed = time.monotonic() - started
        print(result.stdout[-6000:], result.stderr[-12000:], sep="\n")
        return result, elapsed

    def sh(self, command: str) -> str:
        result = self.host.run(command)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        return result.stdout.strip()

    def main_pid(self) -> int:
        return int(self.sh("systemctl show --property MainPID --value gemma4.service"))

    def starts(self) -> int:
        """How many times systemd started the service (journal), to count restarts."""
        return int(self.sh("journalctl -u gemma4.service --no-pager -o cat | grep -c '^Started ' || true"))

    def file_state(self, path: str) -> str:
        return self.sh(f"stat -c '%Y %s' {path} && sha256sum {path} | cut -d' ' -f1")

    def wait_healthy(self, port: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.host.run(f"curl -sf http://127.0.0.1:{port}/health").returncode == 0:
                return
            time.sleep(1)
        raise AssertionError(f"llama-server never became healthy on port {port}")


ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")


def plain(output: str) -> str:
    """pyinfra's output without its color codes."""
    return ANSI_COLOR.sub("", output)


def fact_loads(output: str) -> list[str]:
    """The facts a run loaded (one round trip each), by name, from its `-v` output."""
    return re.findall(r"Loaded fact (\S+)", plain(output))


def ops_reporting(output: str) -> list[tuple[str, str]]:
    """(operation, outcome) pairs from pyinfra's run output."""
    pairs = []
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("--> Starting operation: "):
            name = line.removeprefix("--> Starting operation: ").strip()
            outcome = next(
                (
                    text.split("] ", 1)[1]
                    for text in lines[index + 1 : index + 8]
                    if "] " in text
                    and text.strip().startswith("[")
                    and text.split("] ", 1)[1] in ("Success", "No changes", "Skipped", "Error")
                ),
                "?",
            )
            pairs.append((name, outcome))
    return pairs


def make_deployer(host: TestHost, tmp_path_factory: pytest.TempPathFactory, **config: Any) -> Deployer:
    """A Deployer of the test host's box (inventory/testbed.py), with `config` added to its config."""
    base = inventory_config(host.pyinfra_host_name(), host.pyinfra_host_data()).changed(
        jobs=os.cpu_count() or 2, **config
    )
    return Deployer(host, tmp_path_factory.mktemp("e2e") / "config.json", base.model_dump(exclude_unset=True))


@pytest.fixture(scope="module")
def deployer(test_host: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Deployer:
    return make_deployer(test_host, tmp_path_factory)


def smoke_numbers(output: str) -> dict[str, float | str]:
    match = SMOKE_LINE.search(output)
    assert match, "no smoke summary line in the deploy output"
    return {
        "tok_s": float(match["tok_s"]),
        "acceptance": float(match["acceptance"]),
        "seconds": float(match["seconds"]),
        "verdict": match["verdict"],
    }


def test_first_converge(deployer: Deployer) -> None:
    result, elapsed = deployer.run(FULL, "-y")
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert "building llama.cpp" in output
    progress = re.findall(r"llama\.cpp build: (\d+)/(\d+) steps \((\d+)%\)", output)
    assert progress and progress[-1][2] == "100", "no build progress reached the controller"
    assert deployer.sh("systemctl is-active gemma4.service") == "active"
    assert deployer.sh("systemctl is-enabled gemma4.service") == "enabled"
    assert deployer.sh(f"readlink {PREFIX}/current") == f"builds/{deployer.base['commit']}-cpu"
    version = deployer.sh(f"{PREFIX}/current/llama-server --version 2>&1")
    assert deployer.base["commit"][:7] in version
    assert deployer.sh(f"sha256sum {MODEL} | cut -d' ' -f1") == deployer.base["model_sha256"]
    smoke = smoke_numbers(output)
    assert smoke["verdict"] == "passed"
    assert smoke["acceptance"] >= 0.5
    build_seconds = deployer.sh(f"stat -c %Y {PREFIX}/builds/{deployer.base['commit']}-cpu")
    record("first_converge_s", round(elapsed, 1))
    record("smoke", smoke)
    record("build_dir_mtime", build_seconds)


# Round trips of a no-op full deploy (facts loaded, each one command over SSH): a regression shows up here.
# 24 before facts were read once per run, 15 before every check of a run was read in one batch (operations.box_state).
NOOP_FACT_LOADS_MAX = 1  # everything a converged host's checks read, in one batched round trip


def test_rerun_is_a_noop(deployer: Deployer) -> None:
    pid = deployer.main_pid()
    result, elapsed = deployer.run(FULL, "-y", "-v")
    assert result.returncode == 0
    loads = re.findall(r"Loaded fact (\S+)(?: \((.*?)\))?", plain(result.stderr + result.stdout))
    record("noop_fact_loads", len(loads))
    record("noop_facts", [f"{name} {arguments}".strip() for name, arguments in loads])
    assert len(loads) <= NOOP_FACT_LOADS_MAX, loads
    assert len(set(loads)) == len(loads), f"a fact loaded twice: {loads}"
    outcomes = ops_reporting(result.stderr + result.stdout)
    assert outcomes, "no operations reported"
    changed = [(name, outcome) for name, outcome in outcomes if outcome not in ("No changes", "Skipped")]
    assert not changed, f"operations changed on a converged host: {changed}"
    assert deployer.main_pid() == pid
    record("noop_rerun_s", round(elapsed, 1))


def planned_changes(output: str) -> list[str]:
    """The rows of pyinfra's dry-run table ("Operation  Change  Conditional Change") that plan a change."""
    lines = plain(output).splitlines()
    header = next(index for index, line in enumerate(lines) if "Conditional Change" in line)
    rows = []
    for line in lines[header + 1 :]:
        columns = re.split(r"\s{2,}", line.strip())
        if len(columns) < 3:
            break
        rows.append(columns)
    assert rows, "no rows in the dry run's table"
    return [row[0] for row in rows if row[-1] != "-" or row[-2] != "-"]


def test_dry_run_on_a_converged_host_plans_nothing(deployer: Deployer) -> None:
    result, _ = deployer.run(FULL, "--dry")
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert planned_changes(output) == [], output
    assert "Roll back" not in output and "Smoke test" not in output and "Restart gemma4" not in output


def test_dry_diff_shows_the_unit_change_and_changes_nothing(deployer: Deployer) -> None:
    before = (deployer.file_state(UNIT), deployer.main_pid())
    result, _ = deployer.run(FULL, "--dry", "--diff", spec_draft_n_max=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert re.search(r"-\s+--spec-draft-n-max 3", output), "the unit's old line is not in the diff"
    assert re.search(r"\+\s+--spec-draft-n-max 2", output), "the unit's new line is not in the diff"
    assert (deployer.file_state(UNIT), deployer.main_pid()) == before
    assert any(name.endswith("| Restart gemma4.service") for name in planned_changes(output))


def test_surgical_redeploy_touches_only_the_unit(deployer: Deployer) -> None:
    commit = deployer.base["commit"]
    untouched = [f"{PREFIX}/builds/{commit}-cpu/llama-server", MODEL]
    before = {path: deployer.file_state(path) for path in untouched}
    current = deployer.sh(f"readlink {PREFIX}/current")
    starts = deployer.starts()
    result, elapsed = deployer.run(SURGICAL, "-y", spec_draft_n_max=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    names = [name for name, _ in ops_reporting(output)]
    assert not any("llama.cpp" in name or name.startswith("Model ") for name in names), names
    assert any("Unit /etc/systemd/system/gemma4.service" in name for name in names)
    assert "--spec-draft-n-max 2" in deployer.sh(f"cat {UNIT}")
    assert "--spec-draft-n-max 3" in deployer.sh(f"cat {UNIT}.prev")
    assert deployer.starts() == starts + 1, "the service must restart exactly once"
    assert {path: deployer.file_state(path) for path in untouched} == before
    assert deployer.sh(f"readlink {PREFIX}/current") == current
    assert smoke_numbers(output)["verdict"] == "passed"
    record("surgical_redeploy_s", round(elapsed, 1))


def test_smoke_failure_rolls_back_to_the_previous_unit(deployer: Deployer) -> None:
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=1, min_tokens_per_second=100000)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert smoke_numbers(output)["verdict"] == "FAILED"
    assert "min 100000" in output and "failed its smoke test" in output
    assert f"The previous unit ({UNIT}.prev) was restored, and gemma4.service restarted on it" in output
    assert not [name for name, _ in ops_reporting(output) if name.startswith(("Roll back", "Fail the deploy"))]
    unit = deployer.sh(f"cat {UNIT}")
    assert "--spec-draft-n-max 2" in unit, "the previous unit was not restored"
    deployer.wait_healthy(deployer.base["port"])
    assert "--spec-draft-n-max 2" in deployer.sh(f"tr '\\0' ' ' < /proc/{deployer.main_pid()}/cmdline")


def test_smoke_failure_after_a_build_switch_rolls_the_build_back(
    deployer: Deployer, llama_repo: tuple[Path, str]
) -> None:
    """A new llama.cpp commit whose service misses its smoke test: unit and `current` both go back."""
    repo, commit = llama_repo
    new_commit = same_tree_commit(repo, commit, "e2e: a new commit")
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2, commit=new_commit, min_tokens_per_second=100000)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "building llama.cpp" in output and smoke_numbers(output)["verdict"] == "FAILED"
    assert deployer.sh(f"readlink {PREFIX}/current") == f"builds/{commit}-cpu"
    assert deployer.sh(f"test -x {PREFIX}/builds/{new_commit}-cpu/llama-server && echo kept") == "kept"
    deployer.wait_healthy(deployer.base["port"])
    assert deployer.sh(f"readlink -f /proc/{deployer.main_pid()}/exe").startswith(f"{PREFIX}/builds/{commit}-cpu/")


def test_smoke_failure_on_a_first_deploy_stops_the_service_and_says_so(deployer: Deployer) -> None:
    """No `{unit}.prev` to restore: the deploy says the service was stopped, and it is; the next run starts it."""
    deployer.sh(f"systemctl stop gemma4.service && rm -f {UNIT} {UNIT}.prev && systemctl daemon-reload")
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2, min_tokens_per_second=100000)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "gemma4.service had no previous unit to restore (its first deploy): it was stopped" in output
    assert "was restored" not in output
    assert deployer.host.run("systemctl is-active gemma4.service").stdout.strip() == "inactive"
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2)
    assert result.returncode == 0
    deployer.wait_healthy(deployer.base["port"])


def test_model_with_wrong_checksum_is_refused(deployer: Deployer) -> None:
    before = (deployer.file_state(MODEL), deployer.main_pid())
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2, model_sha256="0" * 64)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "has sha256" in output and "nothing was uploaded" in output
    assert (deployer.file_state(MODEL), deployer.main_pid()) == before
    assert deployer.host.run(f"test -e {MODEL}.part").returncode != 0


def test_kill_9_is_restarted_by_systemd(deployer: Deployer) -> None:
    pid = deployer.main_pid()
    deployer.sh(f"kill -9 {pid}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and deployer.main_pid() in (0, pid):
        time.sleep(0.5)
    assert deployer.main_pid() not in (0, pid)
    result = run_smoke(
        requests_transport(f"http://127.0.0.1:{deployer.base['port']}"),
        SmokeThresholds(min_tokens_per_second=1, min_acceptance=0.5, n_predict=32, runs=1, timeout_s=120),
    )
    assert result.passed, result.failures


def test_reboot_brings_the_service_back(deployer: Deployer) -> None:
    deployer.host.reboot()
    deployer.wait_healthy(deployer.base["port"])
    assert deployer.sh("systemctl is-active gemma4.service") == "active"


def test_failed_build_keeps_current_and_the_service(deployer: Deployer) -> None:
    current = deployer.sh(f"readlink {PREFIX}/current")
    pid = deployer.main_pid()
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2, commit="f" * 40)
    assert result.returncode != 0
    assert deployer.sh(f"readlink {PREFIX}/current") == current
    assert deployer.main_pid() == pid
    deployer.wait_healthy(deployer.base["port"], timeout=10)


def test_non_root_ssh_user_with_sudo(deployer: Deployer) -> None:
    result, _ = deployer.run(FULL, "-y", user="deployer", spec_draft_n_max=3)
    assert result.returncode == 0
    assert "--spec-draft-n-max 3" in deployer.sh(f"cat {UNIT}")
    assert smoke_numbers(result.stdout + result.stderr)["verdict"] == "passed"


def test_rebuild_with_warm_ccache(deployer: Deployer) -> None:
    """A new build directory for the same commit: every object comes from ccache."""
    commit = deployer.base["commit"]
    deployer.sh(f"rm -rf {PREFIX}/work/{commit}-cpu {PREFIX}/builds/{commit}-cpu.partial")
    deployer.sh(f"mv {PREFIX}/builds/{commit}-cpu {PREFIX}/builds/{commit}-cpu.old")
    result, elapsed = deployer.run(FULL, "-y", spec_draft_n_max=3)
    assert result.returncode == 0
    output = result.stdout + result.stderr
    assert "building llama.cpp" in output
    assert f"pruned builds/{commit}-cpu.old" in output
    kept = deployer.sh(f"ls {PREFIX}/builds").split()
    assert kept == [f"{commit}-cpu"], "builds beyond current and previous are pruned"
    record("ccache_rebuild_converge_s", round(elapsed, 1))
    stats = deployer.sh(
        "CCACHE_DIR=/var/cache/ccache-shared ccache --print-stats 2>/dev/null"
        " | grep -E '^(direct_cache_hit|preprocessed_cache_hit|cache_miss)' || true"
    )
    record("ccache_stats_after_rebuild", stats)


def test_bench_against_the_deployed_service(deployer: Deployer, smollm2: Path, tmp_path: Path) -> None:
    """`gpubox bench --url` on the e2e host's SmolLM2 service: table, JSON and plot."""
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("gpubox")), "bench", "--url",
            f"http://127.0.0.1:{deployer.base['port']}", "--quick", "--n-predict", "32", "--runs", "2",
            "--rounds", "1", "--ctx-size", "4096", "--model-file", str(smollm2), "--bandwidth-gbs", "20",
            "--json", str(report), "--plot", str(plot),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    results = json.loads(report.read_text())["results"]
    assert results and all(item["single_tokens_per_second"] > 0 for item in results)
    assert plot.stat().st_size > 0
    record("bench_url", [
        {key: item.get(key) for key in ("config", "single_tokens_per_second", "aggregate_tokens_per_second",
                                        "acceptance", "latency_p50_s", "latency_p95_s")}
        for item in results
    ])  # fmt: skip


def test_the_seed_recipe_with_a_gemma4_mtp_drafter(deployer: Deployer, tmp_path: Path) -> None:
    """The seed's code path for real: a (tiny, random) gemma4 target and its gemma4-assistant
    drafter, `--spec-type draft-mtp`, converged by the full deploy, then redeployed surgically."""
    from tests.testbed import sha256_file
    from tests.testbed.tiny_gemma4 import write_tiny_gemma4

    target, assistant = write_tiny_gemma4(tmp_path)
    gemma = {
        "model_path": "/srv/models/tiny-gemma4.gguf", "model_architecture": "gemma4",
        "model_sha256": sha256_file(target), "model_source": str(target),
        "drafter_path": "/srv/models/tiny-gemma4-assistant.gguf", "drafter_architecture": "gemma4-assistant",
        "drafter_sha256": sha256_file(assistant), "drafter_source": str(assistant),
        "spec_type": "draft-mtp", "min_acceptance": None,
    }  # fmt: skip
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=3, **gemma)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert "--spec-type draft-mtp" in deployer.sh(f"cat {UNIT}")
    smoke = smoke_numbers(output)
    assert smoke["verdict"] == "passed"  # acceptance is a number only when tokens were drafted
    record("tiny_gemma4_mtp_smoke", smoke)

    starts = deployer.starts()
    result, elapsed = deployer.run(SURGICAL, "-y", spec_draft_n_max=2, **gemma)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    checks = dict(ops_reporting(output))
    assert checks["llama-server supports --spec-type draft-mtp"] == "No changes"  # read from --help, passed
    assert checks["Drafter is a gemma4-assistant GGUF"] == "No changes"  # read from the GGUF header, passed
    assert "--spec-draft-n-max 2" in deployer.sh(f"cat {UNIT}")
    assert deployer.starts() == starts + 1
    record("tiny_gemma4_mtp_surgical_s", round(elapsed, 1))


def test_planner_matches_the_deployed_llama_servers_buffers(deployer: Deployer, smollm2: Path) -> None:
    """The VRAM planner's terms for the deployed SmolLM2 (q8_0 KV, flash attention, ctx 4096) against
    the buffers the host's own llama-server logs at load (a benchmark: printed, 5% checked)."""
    from gpubox.gguf_header import read_gguf_header
    from gpubox.vram import (
        MIB,
        compute_buffer_bytes,
        kv_cache_split,
        kv_cells,
        model_shape,
        parse_memory_breakdown,
        weight_split,
    )

    port = free_port()
    log = deployer.sh(
        f"{PREFIX}/current/llama-server --model {MODEL} --ctx-size 4096 --cache-type-k q8_0 --cache-type-v q8_0"
        f" --flash-attn on --parallel 1 --port {port} -lv 4 > /tmp/buffers.log 2>&1 & server=$!;"
        " for i in $(seq 120); do grep -q 'model loaded' /tmp/buffers.log && break; sleep 0.5; done;"
        " kill $server; cat /tmp/buffers.log"
    )
    measured = parse_memory_breakdown(log)
    header = read_gguf_header(smollm2)
    shape, cells = model_shape(header), kv_cells(4096, 1, 0)
    weights = weight_split(header, 0).cpu_bytes / MIB
    kv = kv_cache_split(shape, cells, "q8_0", "q8_0", flash_attn=True, gpu_layers=0).cpu_bytes / MIB
    compute = compute_buffer_bytes(shape, cells.full, flash_attn=True) / MIB
    logged = {"weights": measured.total("model"), "KV": measured.total("KV"), "compute": measured.total("compute")}
    planned = {"weights": weights, "KV": kv, "compute": compute}
    print({name: f"planned {planned[name]:.1f} MiB, logged {logged[name]:.1f} MiB" for name in planned})
    record("planner_vs_deployed_llama_server_mib", {name: [round(planned[name], 1), round(logged[name], 1)]
                                                    for name in planned})  # fmt: skip
    assert logged["KV"] > 0 and logged["weights"] > 0
    assert abs(sum(planned.values()) - sum(logged.values())) <= 0.05 * sum(logged.values())


# A space, a `$`, a backtick, a `"` and a `%`: each is carried into the shell scripts, the unit's
# ExecStart and ReadOnlyPaths= by gpubox.quoting, or (in a build prefix) refused by field.
SPECIAL_DIR = '/srv/my models/$HOME `id` "q" 100%'


def test_special_characters_in_model_paths_deploy_serve_and_rerun_as_a_noop(deployer: Deployer) -> None:
    special = {
        "model_path": f"{SPECIAL_DIR}/SmolLM2 $1.gguf",
        "drafter_path": f"{SPECIAL_DIR}/drafter/`SmolLM2` %n.gguf",
    }
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=3, **special)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert smoke_numbers(output)["verdict"] == "passed"
    quoted = SPECIAL_DIR.replace("'", "'\\''")
    assert deployer.sh(f"sha256sum '{quoted}/SmolLM2 $1.gguf' | cut -d' ' -f1") == deployer.base["model_sha256"]
    cmdline = deployer.sh(f"tr '\\0' '\\n' < /proc/{deployer.main_pid()}/cmdline").splitlines()
    assert cmdline[cmdline.index("--model") + 1] == special["model_path"]
    assert cmdline[cmdline.index("--model-draft") + 1] == special["drafter_path"]
    # systemctl prints each path double-quoted, with `\\` before `$`, a backtick, `"` and `\\`.
    shown = deployer.sh("systemctl show --property ReadOnlyPaths --value gemma4.service")
    read_only = [re.sub(r"\\(.)", r"\1", path) for path in re.findall(r'"((?:[^"\\]|\\.)*)"', shown)]
    assert read_only == [SPECIAL_DIR, f"{SPECIAL_DIR}/drafter"]
    verify = deployer.host.run(f"systemd-analyze verify {UNIT}")
    assert "ignoring" not in verify.stderr and "gemma4.service" not in verify.stderr, verify.stderr

    pid = deployer.main_pid()
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=3, **special)
    assert result.returncode == 0
    outcomes = ops_reporting(result.stdout + result.stderr)
    changed = [pair for pair in outcomes if pair[1] not in ("No changes", "Skipped")]
    assert not changed, f"a second run with special characters changed: {changed}"
    assert deployer.main_pid() == pid


@pytest.mark.parametrize("character", [" ", "$", "`", '"', "%"])
def test_special_characters_in_the_build_prefix_are_refused_by_field(deployer: Deployer, character: str) -> None:
    before = (deployer.file_state(UNIT), deployer.main_pid(), deployer.sh("ls /opt"))
    result, _ = deployer.run(FULL, "-y", prefix=f"/opt/llama{character}cpp")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # one message naming the spec and the field (config.py reads the inventory first), no traceback
    assert re.search(r"LlamaCppBuild is refused while the inventory imports\n\s+prefix: ", plain(output)), output
    assert "no spaces, quotes" in output and "Traceback" not in output
    assert "Connecting to hosts" not in output
    assert (deployer.file_state(UNIT), deployer.main_pid(), deployer.sh("ls /opt")) == before


def test_a_generated_api_key_is_made_once_and_never_shown(deployer: Deployer) -> None:
    key_file = "/etc/gpubox/keys/gemma4.key"
    result, _ = deployer.run(FULL, "-y", "-vvv", "--diff", spec_draft_n_max=3, api_key_file="generate")
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert smoke_numbers(output)["verdict"] == "passed"  # the smoke read the key on the host
    key = deployer.sh(f"cat {key_file}")
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert deployer.sh(f"stat -c '%U:%G %a' {key_file}") == "root:llama 640"
    processes = deployer.sh("ps -eo args")
    assert key not in output and key not in processes
    assert f"--api-key-file {key_file}" in processes
    port = deployer.base["port"]
    url = f"http://127.0.0.1:{port}/completion"
    refused = deployer.sh(f"curl -s -o /dev/null -w '%{{http_code}}' -X POST {url} -d '{{}}'")
    assert refused == "401"

    result, _ = deployer.run(FULL, "-y", "-v", spec_draft_n_max=3, api_key_file="generate")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and key not in output
    changed = [pair for pair in ops_reporting(output) if pair[1] not in ("No changes", "Skipped")]
    assert not changed, f"a second run with a generated key changed: {changed}"
    assert deployer.sh(f"cat {key_file}") == key


def test_the_running_service_is_hardened(deployer: Deployer) -> None:
    """What this host's systemd enforces of the unit's hardening (gpubox/unit.py), read off the running
    llama-server: no capabilities, umask 0077, a seccomp filter, no new privileges; and the filter's order
    (llama.cpp's affinity and priority calls allowed back after `~@resources`) as systemd applies it.
    systemd-nspawn enforces neither IPAddressAllow/Deny nor DevicePolicy: tests/test_hardening.py
    proves those by rendering."""
    pid = deployer.main_pid()
    assert pid > 0
    status = dict(
        line.split(":", 1) for line in deployer.sh(f"cat /proc/{pid}/status").splitlines() if ":" in line
    )
    status = {key: value.strip() for key, value in status.items()}
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[capabilities] == "0000000000000000", (capabilities, status[capabilities])
    assert (status["Umask"], status["Seccomp"], status["NoNewPrivs"]) == ("0077", "2", "1")
    assert deployer.sh("systemctl show -p MemoryDenyWriteExecute --value gemma4.service") == "yes"
    # The unit's own seccomp lines, in a transient unit as the service user: allowed back, and still denied.
    lines = deployer.sh(f"grep -E '^(User|NoNewPrivileges|SystemCall)' {UNIT}").splitlines()
    properties = " ".join(f"'--property={line}'" for line in lines)
    probe = (
        "taskset -c 0 true && nice -n 5 true && chrt -o 0 true && echo scheduling allowed; "
        "ionice -c 3 true 2>&1 || echo ioprio_set denied"
    )
    output = deployer.sh(f"systemd-run --wait --pipe --quiet {properties} sh -c '{probe}'")
    assert "scheduling allowed" in output and "ioprio_set denied" in output, output
    assert "Operation not permitted" in output, output  # EPERM, not a SIGSYS kill
