"""End to end: a deploy cut between its restart and its smoke test, two deploys at once, a controller killed.

- A cut after "Restart gemma4.service", as its smoke test starts: the new process is live and
  marked unverified on the host (/var/lib/gpubox/unverified/gemma4.service). The next run, with
  nothing else to change, smoke-tests it: a pass clears the mark, a miss rolls back to `.prev`, as
  the uncut run would have. A service stopped by hand and started by the deploy is smoke-tested too.
- Two runs 0.5 s apart: the second is refused at once, naming the first (controller, pid, start);
  `.prev` stays the real previous unit; a new model is placed, and the service restarted, once.
- A controller SIGKILLed or interrupted (SIGINT, as Ctrl-C) mid-run: the next run takes the lock
  and proceeds; after a kill it says whose lock it took over.

Each cut signals the controller's pyinfra as soon as it prints the start of a named operation, read
line by line from its output (never by timing). One host, booted for this module; the tests run in
file order, each from the state the previous left.
"""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import pytest

from gpubox.deploy_lock import record_file
from gpubox.unverified import mark_path
from tests.e2e.test_deploy import (
    FULL,
    MODEL,
    UNIT,
    Deployer,
    fact_loads,
    make_deployer,
    ops_reporting,
    plain,
    smoke_numbers,
)
from tests.e2e.test_interrupted import changed_model, cut, finish, spawn  # noqa: F401 (a fixture)
from tests.testbed import TestHost

pytestmark = pytest.mark.e2e

MARK = mark_path("gemma4.service")
HOLDER = record_file("deploy")
SMOKE = "Smoke test gemma4.service"
REFUSED = re.compile(r"another deploy holds the 'deploy' lock: (\S+)@(\S+) pid (\d+), started (\S+)")
TOOK_OVER = re.compile(
    r"took over the 'deploy' lock left by a deploy that ended without releasing it \((\S+)@(\S+) pid (\d+)"
)


@pytest.fixture(scope="module")
def deployer(test_host: TestHost, tmp_path_factory: pytest.TempPathFactory) -> Deployer:
    return make_deployer(test_host, tmp_path_factory)


def starts(operation: str) -> str:
    """The line pyinfra prints when an operation (named in full, or the end of its name) starts."""
    return rf"^--> Starting operation: (.* \| )?{re.escape(operation)}"


def results(output: str) -> dict[str, str]:
    """What each operation did (`Success`, `No changes`, `Error`) by the end of its name: from the run's
    results table, or, for a run cut before it, from the lines after each operation's start."""
    lines = plain(output).splitlines()
    start = next((index for index, line in enumerate(lines) if line.startswith("--> Results:")), None)
    if start is None:
        return {name.rsplit(" | ", 1)[-1]: result for name, result in ops_reporting(plain(output))}
    done = {}
    for line in lines[start + 2 :]:
        columns = re.split(r"\s{2,}", line.strip())
        if len(columns) != 5 or columns[0] == "Grand total":
            break
        name, _, success, error, _ = columns
        done[name.rsplit(" | ", 1)[-1]] = "Error" if error != "-" else "Success" if success != "-" else "No changes"
    return done


def outcome(output: str, operation: str) -> str | None:
    """What the operation named `operation` (its name's end) did in a run; None when it did not run."""
    return results(output).get(operation)


def holder_processes(deployer: Deployer) -> str:
    """The lock holders running on the host (their `sh -c` scripts name the lock)."""
    return deployer.host.run("pgrep -af '[g]pubox-lock' || true").stdout.strip()


def no_holder_left(deployer: Deployer, timeout: float = 10) -> None:
    """No lock holder runs on the host (within `timeout`: one ends as its connection closes)."""
    deadline = time.monotonic() + timeout
    while holder_processes(deployer) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert holder_processes(deployer) == "", "a lock holder outlived its run"


def marked(deployer: Deployer) -> bool:
    return deployer.host.run(f"test -e {MARK}").returncode == 0


def cmdline(deployer: Deployer) -> str:
    return deployer.sh(f"tr '\\0' ' ' < /proc/{deployer.main_pid()}/cmdline")


def test_first_converge(deployer: Deployer) -> None:
    result, elapsed = deployer.run(FULL, "-y")
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert smoke_numbers(output)["verdict"] == "passed"
    assert not marked(deployer), "a passed smoke test clears the mark"
    assert deployer.host.run(f"test -e {HOLDER}").returncode != 0, "a run that ends releases its lock and record"
    no_holder_left(deployer)
    print(f"first converge: {elapsed:.1f} s")


def test_a_noop_rerun_still_reads_everything_in_one_round_trip(deployer: Deployer) -> None:
    """The marks are read with the run's other facts: a converged host's run loads one fact."""
    pid = deployer.main_pid()
    result, elapsed = deployer.run(FULL, "-y", "-v")
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert len(fact_loads(output)) == 1, fact_loads(output)
    assert not [pair for pair in ops_reporting(plain(output)) if pair[1] not in ("No changes", "Skipped")]
    assert deployer.main_pid() == pid
    print(f"no-op rerun with the lock: {elapsed:.1f} s")


def test_a_cut_after_the_restart_is_smoke_tested_by_the_next_run(deployer: Deployer) -> None:
    """Killed as the smoke test starts: the new unit is live and marked. The next run finds nothing to
    change but the mark: it smoke-tests the live service (no restart), passes, and clears the mark."""
    output, pid, _ = cut(deployer, starts(SMOKE), spec_draft_n_max=2)
    assert outcome(output, "Restart gemma4.service") == "Success"
    assert marked(deployer)
    mark = deployer.sh(f"cat {MARK}")
    assert f"pid {pid}" in mark and "install=kept" in mark, mark
    assert "--spec-draft-n-max 2" in deployer.sh(f"cat {UNIT}") and "--spec-draft-n-max 3" in deployer.sh(
        f"cat {UNIT}.prev"
    )
    live = deployer.main_pid()
    assert "--spec-draft-n-max 2" in cmdline(deployer)

    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert "its smoke test never passed (that run was cut): it is smoke-tested now" in output
    assert smoke_numbers(output)["verdict"] == "passed"
    assert outcome(output, SMOKE) == "Success"
    assert outcome(output, "Restart gemma4.service") is None, "nothing changed: no restart"
    assert deployer.main_pid() == live
    assert not marked(deployer)
    took = TOOK_OVER.search(plain(output))
    assert took and int(took[3]) == pid, "the killed run's lock is taken over, naming it"
    deployer.base["spec_draft_n_max"] = 2

    result, _ = deployer.run(FULL, "-y")
    assert result.returncode == 0
    assert outcome(result.stdout + result.stderr, SMOKE) is None, "verified: the next run smoke-tests nothing"


def test_a_cut_after_a_restart_whose_smoke_fails_is_rolled_back_by_the_next_run(deployer: Deployer) -> None:
    """The same cut with a smoke test that must fail: the next run fails it and rolls back to `.prev`,
    as the uncut run does (it exited 0 with the failing unit live before)."""
    failing = {"spec_draft_n_max": 1, "min_tokens_per_second": 100000}
    output, _, _ = cut(deployer, starts(SMOKE), **failing)
    assert outcome(output, "Restart gemma4.service") == "Success" and marked(deployer)
    assert "--spec-draft-n-max 1" in cmdline(deployer), "the failing unit is live after the cut"

    result, _ = deployer.run(FULL, "-y", **failing)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert smoke_numbers(output)["verdict"] == "FAILED" and "failed its smoke test" in output
    assert f"The previous unit ({UNIT}.prev) was restored, and gemma4.service restarted on it" in output
    assert outcome(output, "Restart gemma4.service") is None
    assert "--spec-draft-n-max 2" in deployer.sh(f"cat {UNIT}")
    deployer.wait_healthy(deployer.base["port"])
    assert "--spec-draft-n-max 2" in cmdline(deployer)
    assert not marked(deployer), "the previous unit runs again: nothing is unverified"

    # The failed run released its lock on its way out: the next run takes it, no takeover.
    result, _ = deployer.run(FULL, "-y")
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "took over" not in output
    assert outcome(output, SMOKE) is None


def test_a_service_stopped_by_hand_is_started_and_smoke_tested(deployer: Deployer) -> None:
    deployer.sh("systemctl stop gemma4.service")
    result, _ = deployer.run(FULL, "-y")
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert outcome(output, "gemma4.service running and enabled at boot") == "Success"
    assert outcome(output, "Restart gemma4.service") is None
    assert outcome(output, SMOKE) == "Success" and smoke_numbers(output)["verdict"] == "passed"
    assert deployer.sh("systemctl is-active gemma4.service") == "active"
    assert not marked(deployer)


def _two_at_once(deployer: Deployer, **overrides: Any) -> tuple[tuple[int, str, int], tuple[int, str, int]]:
    """Two full deploys of one config, the second started 0.5 s after the first: (pid, output, exit) of each,
    the one that ran first."""
    deployer.write_config(**overrides)
    first = spawn(deployer)
    time.sleep(0.5)
    second = spawn(deployer)
    outputs = [finish(first), finish(second)]
    runs = [(process.pid, output, process.returncode) for process, output in zip((first, second), outputs, strict=True)]
    winners = [run for run in runs if run[2] == 0]
    assert len(winners) == 1, f"one deploy at a time: exits {[run[2] for run in runs]}"
    loser = next(run for run in runs if run[2] != 0)
    return winners[0], loser


def _refused_naming(loser: tuple[int, str, int], winner: tuple[int, str, int]) -> None:
    refused = REFUSED.search(plain(loser[1]))
    assert refused, "the second deploy is refused, naming the holder"
    assert int(refused[3]) == winner[0], f"it names the running deploy's pid: {refused.group(0)}"
    assert refused[2] and refused[4].endswith("Z")
    assert "Starting operation" not in plain(loser[1]), "refused at once: before any operation"


def test_two_deploys_changing_the_unit_at_once(deployer: Deployer) -> None:
    """Before, both wrote the unit and `.prev` ended equal to the new unit: the rollback target was lost."""
    previous = deployer.sh(f"cat {UNIT}")
    starts_before = deployer.starts()
    started = time.monotonic()
    winner, loser = _two_at_once(deployer, spec_draft_n_max=3)
    elapsed = time.monotonic() - started
    _refused_naming(loser, winner)
    assert "--spec-draft-n-max 3" in deployer.sh(f"cat {UNIT}")
    assert deployer.sh(f"cat {UNIT}.prev") == previous, "`.prev` is the real previous unit"
    assert deployer.starts() == starts_before + 1
    assert smoke_numbers(winner[1])["verdict"] == "passed"
    deployer.base["spec_draft_n_max"] = 3
    print(f"two deploys changing the unit: {elapsed:.1f} s")


def test_two_deploys_placing_a_new_model_at_once(
    deployer: Deployer, changed_model: dict[str, str]  # noqa: F811 (the fixture imported above)
) -> None:
    """Before, the second took the first's upload in progress for a leftover `.part`, restarted it, and
    the service restarted twice."""
    starts_before = deployer.starts()
    winner, loser = _two_at_once(deployer, **changed_model)
    _refused_naming(loser, winner)
    assert deployer.starts() == starts_before + 1, "the service restarts once"
    assert deployer.sh(f"/usr/bin/sha256sum {MODEL} | cut -d' ' -f1") == changed_model["model_sha256"]
    assert deployer.host.run(f"test -e {MODEL}.part").returncode != 0
    assert smoke_numbers(winner[1])["verdict"] == "passed"
    deployer.base.update(changed_model)


def test_a_killed_controllers_lock_is_taken_over(deployer: Deployer) -> None:
    """SIGKILL mid-run (its unit being written): the host's holder ends with the connection, the lock is
    free, and the next run proceeds at once, saying whose lock it took over."""
    output, pid, _ = cut(deployer, starts(f"Unit {UNIT}"), spec_draft_n_max=2)
    no_holder_left(deployer)  # the killed run's holder ended with its connection
    assert f"pid={pid}" in deployer.sh(f"cat {HOLDER}"), "its record stays, for the next run to name"

    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    took = TOOK_OVER.search(plain(output))
    assert took and int(took[3]) == pid
    assert "--spec-draft-n-max 2" in cmdline(deployer) and smoke_numbers(output)["verdict"] == "passed"
    assert deployer.host.run(f"test -e {HOLDER}").returncode != 0
    deployer.base["spec_draft_n_max"] = 2


def test_an_interrupted_controller_releases_its_lock(deployer: Deployer) -> None:
    """Ctrl-C (SIGINT) mid-run: pyinfra disconnects on its way out and releases the lock then (its record
    goes with it); the next run proceeds and converges, with nothing to take over."""
    held: list[str] = []
    output, pid, code = cut(
        deployer, starts(f"Unit {UNIT}"), sig=signal.SIGINT, before=lambda: held.append(deployer.sh(f"cat {HOLDER}")),
        spec_draft_n_max=3,
    )  # fmt: skip
    assert f"pid={pid}" in held[0], "the interrupted run held the lock"
    print(f"interrupted controller exited {code}")
    no_holder_left(deployer)
    assert deployer.host.run(f"test -e {HOLDER}").returncode != 0, "released, not dropped: no record left"

    result, _ = deployer.run(FULL, "-y", spec_draft_n_max=3)
    output = result.stdout + result.stderr
    assert result.returncode == 0
    assert "another deploy holds" not in output and "took over" not in output
    assert "--spec-draft-n-max 3" in cmdline(deployer) and not marked(deployer)
    deployer.base["spec_draft_n_max"] = 3
