"""End to end: deploys cut short, hashes counted, and model files that left the box.

A laptop that sleeps or a link that drops mid-deploy is the common fault. Each cut here kills the
controller's pyinfra (SIGKILL to its process group) as soon as it prints the start of a named
operation, read line by line from its output: never by timing. After each cut the old service must
keep serving, nothing half-written may be live (the model path holds a whole file, `current` a
whole build, the unit the old or the new text), and the next run must converge and say what it did.

Every sha256 the host computes is counted: a shim in /usr/local/bin (first on PATH) logs the file
each `sha256sum` reads, then runs the real one.

One host, booted for this module; the tests run in file order, each from the state the previous left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from gpubox.quoting import shell_word
from gpubox.verified import stamp_path
from tests.e2e.test_deploy import (
    FULL,
    INVENTORY,
    MODEL,
    PREFIX,
    PYINFRA,
    ROOT,
    SURGICAL,
    UNIT,
    Deployer,
    ops_reporting,
    plain,
    smoke_numbers,
)
from tests.testbed import TestHost, inventory_config, same_tree_commit, sha256_file

pytestmark = pytest.mark.e2e

DRAFTER = "/srv/models/drafter/SmolLM2-135M-Instruct.Q4_1.gguf"
MOVED_DRAFTER = "/srv/models/drafter-moved/SmolLM2-135M-Instruct.Q4_1.gguf"
HASH_LOG = "/var/log/gpubox-sha256sum.log"
SHIM = f"""#!/bin/sh
# Counts hashes for the e2e tests: the file named, or the file on stdin.
if [ $# -gt 0 ]; then printf '%s\\n' "$*" >> {HASH_LOG}; else readlink /proc/$$/fd/0 >> {HASH_LOG}; fi
exec /usr/bin/sha256sum "$@"
"""


@pytest.fixture(scope="module")
def deployer(test_host: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Deployer:
    base = inventory_config(test_host.pyinfra_host_name(), test_host.pyinfra_host_data()).changed(
        jobs=os.cpu_count() or 2
    )
    return Deployer(
        test_host, tmp_path_factory.mktemp("interrupted") / "config.json", base.model_dump(exclude_unset=True)
    )


@pytest.fixture(scope="module")
def changed_model(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Another SmolLM2 file for the model's path: a byte appended (still a valid llama GGUF), so
    another sha256. The drafter stays the original (the test bed's drafter defaults to the model's file)."""
    copy = tmp_path_factory.mktemp("changed") / "SmolLM2-changed.gguf"
    copy.write_bytes(smollm2.read_bytes() + b"\0")
    return {
        "model_source": str(copy), "model_sha256": sha256_file(copy),
        "drafter_source": str(smollm2), "drafter_sha256": sha256_file(smollm2),
    }  # fmt: skip


def hashes(deployer: Deployer) -> Counter[str]:
    """The files the host hashed since the last call (and start counting again)."""
    logged = deployer.sh(f"cat {HASH_LOG} 2>/dev/null; : > {HASH_LOG}")
    return Counter(line for line in logged.splitlines() if line)


def starts(operation: str) -> str:
    """The line pyinfra prints when an operation (named in full, or the end of its name) starts."""
    return rf"^--> Starting operation: (.* \| )?{re.escape(operation)}"


def spawn(deployer: Deployer, deploy: str = FULL, *flags: str) -> subprocess.Popen[str]:
    """`pyinfra -y` on the test host's config as it is now (write it first), in its own process group."""
    return subprocess.Popen(
        [PYINFRA, "-y", *flags, INVENTORY, deploy],
        cwd=ROOT,
        env={
            **os.environ, "GPUBOX_TESTBED_CONFIG": str(deployer.config_path), "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1",  # each line as it is printed
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip


def finish(process: subprocess.Popen[str], timeout: float = 900) -> str:
    output, _ = process.communicate(timeout=timeout)
    print(output[-6000:])
    return output


def cut(
    deployer: Deployer,
    pattern: str,
    deploy: str = FULL,
    sig: int = signal.SIGKILL,
    before: Callable[[], None] = lambda: None,
    **overrides: Any,
) -> tuple[str, int, int]:
    """Run `deploy` (the full one by default) and send `sig` to its controller as soon as it prints a line
    matching `pattern` (SIGKILL: its whole process group, as a dying laptop; SIGINT: the controller only, as
    Ctrl-C), after calling `before`. Returns what it printed, its pid and its exit status."""
    deployer.write_config(**overrides)
    process = spawn(deployer, deploy)
    watchdog = threading.Timer(900, process.kill)
    watchdog.start()
    lines, signalled = [], False
    try:
        assert process.stdout is not None
        for text in process.stdout:
            lines.append(text)
            if not signalled and re.search(pattern, plain(text)):
                signalled = True
                before()
                if sig == signal.SIGKILL:
                    os.killpg(process.pid, sig)
                    break
                process.send_signal(sig)
        process.wait(timeout=120)
    finally:
        watchdog.cancel()
    output = "".join(lines)
    print(output[-6000:])
    assert signalled, f"pyinfra never printed a line like {pattern!r} (exit {process.returncode})"
    return output, process.pid, process.returncode


def run_until(deployer: Deployer, deploy: str, pattern: str, **overrides: Any) -> str:
    """Run `pyinfra -y` and SIGKILL its process group as soon as it prints a line matching `pattern`.

    Returns what it printed. Fails when no such line came (pyinfra ran to its end).
    """
    output, _, returncode = cut(deployer, pattern, deploy=deploy, **overrides)
    assert returncode == -signal.SIGKILL
    return output


def still_serving(deployer: Deployer, pid: int) -> None:
    """The service that ran before the cut still runs and answers."""
    assert deployer.main_pid() == pid, "the service was restarted by a cut run"
    base = f"http://127.0.0.1:{deployer.base['port']}"
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    answer = requests.post(f"{base}/completion", json={"prompt": "Hello", "n_predict": 8}, timeout=120)
    assert answer.status_code == 200 and answer.json()["content"]


def host_state(deployer: Deployer) -> dict[str, str]:
    """What is live: the model's sha256, the build `current` names (its llama-server must run), the unit."""
    current = deployer.sh(f"readlink {PREFIX}/current")
    deployer.sh(f"{PREFIX}/current/llama-server --version 2>&1")  # a whole build: it runs
    return {
        "model": deployer.sh(f"/usr/bin/sha256sum {MODEL} | cut -d' ' -f1"),
        "current": current,
        "unit": deployer.sh(f"cat {UNIT}"),
    }


def outcomes(output: str) -> dict[str, str]:
    """What each operation did, from the run's results table (`Success`, `No changes`, `Error`), by
    the end of its name (a deploy's prefix dropped). Every operation it started is in the table."""
    lines = plain(output).splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("--> Results:")) + 2
    done = {}
    for line in lines[start:]:
        columns = re.split(r"\s{2,}", line.strip())
        if len(columns) != 5 or columns[0] == "Grand total":
            break
        name, _, success, error, unchanged = columns
        outcome = "Error" if error != "-" else "Success" if success != "-" else "No changes"
        done[name.rsplit(" | ", 1)[-1]] = outcome
    assert done.keys() >= {name.rsplit(" | ", 1)[-1] for name, _ in ops_reporting(output)}
    return done


def test_first_converge(deployer: Deployer) -> None:
    deployer.sh(f"printf %s {shell_word(SHIM)} > /usr/local/bin/sha256sum && chmod 0755 /usr/local/bin/sha256sum")
    assert deployer.sh("command -v sha256sum") == "/usr/local/bin/sha256sum"
    result, _ = deployer.run(FULL, "-y")
    assert result.returncode == 0
    assert smoke_numbers(result.stdout + result.stderr)["verdict"] == "passed"
    placed = hashes(deployer)
    # Each fresh file is hashed once, as its .part (the stamp reuses that verification).
    assert placed == {f"{MODEL}.part": 1, f"{DRAFTER}.part": 1}, placed


def test_surgical_dry_run_on_a_converged_host_hashes_nothing(deployer: Deployer) -> None:
    """The stamps vouch for the unchanged drafter: no multi-GB read in a dry run (it hashed the drafter before)."""
    hashes(deployer)
    result, _ = deployer.run(SURGICAL, "--dry")
    assert result.returncode == 0
    assert "Drafter is a llama GGUF" in result.stdout + result.stderr
    assert hashes(deployer) == Counter()


def test_dry_diff_with_a_changed_model_says_what_and_hashes_nothing_its_stamp_vouches_for(
    deployer: Deployer, changed_model: dict[str, str]
) -> None:
    old = deployer.sh(f"/usr/bin/sha256sum {MODEL} | cut -d' ' -f1")
    hashes(deployer)
    result, _ = deployer.run(FULL, "--dry", "--diff", **changed_model)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    size = Path(changed_model["model_source"]).stat().st_size
    assert f"{MODEL}: sha256 {old} -> {changed_model['model_sha256']}" in output
    assert f"from controller file {changed_model['model_source']}: {size:,} bytes" in output
    counted = hashes(deployer)
    # Nothing: the old model's stamp vouches for its (old) sha256, so the change needs no rehash of a
    # multi-GB file (it was hashed once, and twice before that); the drafter's stamp vouches for it too.
    assert counted == {}, counted
    assert deployer.sh(f"/usr/bin/sha256sum {MODEL} | cut -d' ' -f1") == old


def test_cut_during_the_model_placement(deployer: Deployer, changed_model: dict[str, str]) -> None:
    """Killed as the model's placement starts, with a .part left by an earlier cut upload: the old
    model keeps serving; the next run starts the upload over, places, stamps, restarts, smokes."""
    pid, before = deployer.main_pid(), host_state(deployer)
    deployer.sh(f"head -c 1000000 {MODEL} > {MODEL}.part")  # what an earlier cut upload left
    run_until(deployer, FULL, starts(f"Model {MODEL}"), **changed_model)
    still_serving(deployer, pid)
    assert host_state(deployer) == before, "a cut placement changed what is live"

    result, _ = deployer.run(FULL, "-y", **changed_model)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert f"a cut upload left {MODEL}.part at 1,000,000 bytes" in output
    assert smoke_numbers(output)["verdict"] == "passed"
    done = outcomes(output)
    assert (done[f"Model {MODEL}"], done[f"Model {MODEL} verified"], done["Restart gemma4.service"]) == (
        "Success", "Success", "Success"
    )  # fmt: skip
    assert host_state(deployer)["model"] == changed_model["model_sha256"]
    assert deployer.host.run(f"test -e {MODEL}.part").returncode != 0
    deployer.base.update(changed_model)  # the box now has the changed model


def test_cut_during_the_llama_cpp_build(deployer: Deployer, llama_repo: tuple[Path, str]) -> None:
    """Killed at the new commit's first build progress line (ninja running on the host): `current`
    stays a whole build, the service on the old one; the next run builds, switches, restarts, smokes."""
    repo, commit = llama_repo
    new_commit = same_tree_commit(repo, commit, "e2e: cut build")
    pid, before = deployer.main_pid(), host_state(deployer)
    output = run_until(deployer, FULL, r"llama\.cpp build: \d+/\d+ steps", commit=new_commit)
    assert re.search(starts(f"llama.cpp build {new_commit[:12]}"), output, re.MULTILINE)
    still_serving(deployer, pid)
    cut = host_state(deployer)
    # `current` may only ever name a whole build: the old one (the new one switched in only after its install).
    assert cut == before, f"what is live changed with the build cut: {cut['current']}"
    print("build processes left on the host:", deployer.host.run("pgrep -a 'ninja|cc1plus' || true").stdout)

    result, _ = deployer.run(FULL, "-y", commit=new_commit)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert smoke_numbers(output)["verdict"] == "passed"
    done = outcomes(output)
    assert (done[f"llama.cpp build {new_commit[:12]} -> {PREFIX}/current"], done["Restart gemma4.service"]) == (
        "Success", "Success"
    )  # fmt: skip
    assert deployer.sh(f"readlink {PREFIX}/current") == f"builds/{new_commit}-cpu"
    assert deployer.sh(f"readlink -f /proc/{deployer.main_pid()}/exe").startswith(f"{PREFIX}/builds/{new_commit}-cpu/")
    deployer.base["commit"] = new_commit


def test_cut_after_the_unit_is_written(deployer: Deployer) -> None:
    """Killed between the unit's rename and the restart: the old process serves; the unit on disk
    is the whole new text; the next run must still restart the service on it and smoke it."""
    pid, before = deployer.main_pid(), host_state(deployer)
    run_until(deployer, FULL, starts("systemd daemon-reload"), spec_draft_n_max=2)
    still_serving(deployer, pid)
    cut = host_state(deployer)
    assert cut["unit"] != before["unit"] and "--spec-draft-n-max 2" in cut["unit"]

    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert host_state(deployer)["unit"] == cut["unit"], "the unit on disk was a whole text: the same"
    cmdline = deployer.sh(f"tr '\\0' ' ' < /proc/{deployer.main_pid()}/cmdline")
    assert "--spec-draft-n-max 2" in cmdline, f"the service still runs the unit from before the cut: {cmdline}"
    assert smoke_numbers(output)["verdict"] == "passed"


def test_models_that_left_the_box_are_reported_then_removed(deployer: Deployer) -> None:
    """The drafter moves: its old file is reported; with gpubox_remove_unused_models it is kept while
    the previous unit (a rollback's) names it, and deleted with its stamp once none does."""
    moved = {"drafter_path": MOVED_DRAFTER}
    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=3, **moved)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert re.search(rf"{re.escape(DRAFTER)} is no longer in the box \(9\d MiB\): set remove_unused_models", output)

    remove = ("--data", "gpubox_remove_unused_models=true")
    result, _ = deployer.run(FULL, "-y", *remove, spec_draft_n_max=3, **moved)
    assert result.returncode == 0
    assert f"{UNIT}.prev still names it" in result.stdout + result.stderr
    assert deployer.host.run(f"test -f {DRAFTER}").returncode == 0

    result, _ = deployer.run(FULL, "-y", *remove, spec_draft_n_max=2, **moved)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert f"{DRAFTER} is no longer in the box" in output and "deleting it and its stamp" in output
    assert outcomes(output)["Models no longer in the box"] == "Success"
    gone = deployer.host.run(f"test -e {DRAFTER} || test -e {stamp_path(DRAFTER)} || echo gone").stdout.strip()
    assert gone == "gone"
    assert deployer.sh(f"test -f {MOVED_DRAFTER} && test -f {stamp_path(MOVED_DRAFTER)} && echo kept") == "kept"
    assert deployer.sh(f"test -f {MODEL} && echo kept") == "kept"
