"""Post-restart smoke test on the host; a miss puts back what this run changed and fails the deploy.

One operation does all of it, so a healthy deploy lists only "Smoke test <unit>" and a converged
host (no restart) lists nothing at all: the rollback steps run, and are reported, only on a miss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pyinfra import host
from pyinfra.api import FunctionCommand, OperationError, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.operations.util import any_changed
from rich.console import Console

from facts.gpu import NvidiaComputeApps, NvidiaGpus
from gpubox.build import rollback_script as build_rollback_script
from gpubox.quoting import shell_word
from gpubox.servers.llama import LlamaServer
from gpubox.smoke import GpuProcesses, SmokeResult, command_transport, run_smoke, smoke_table
from gpubox.spec import LlamaCppBuild

from .host_commands import connector_arguments, run, run_status
from .host_facts import fact_once
from .service import previous_unit_path, unit_path


@dataclass
class SmokeOutcome:
    """The smoke result of one deploy run."""

    result: SmokeResult | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or (self.result is not None and not self.result.passed)


def _gpu_processes(server: LlamaServer, arguments: Mapping[str, Any]) -> GpuProcesses:
    stdout, _ = run_status(f"systemctl show --property MainPID --value {shell_word(server.unit_name)}", arguments)
    return GpuProcesses(pid=int(stdout.strip() or 0), compute_apps=host.get_fact(NvidiaComputeApps))


def _smoke(server: LlamaServer, outcome: SmokeOutcome, arguments: Mapping[str, Any]) -> None:
    """Never raises: whatever goes wrong is a miss, so the rollback still runs."""
    try:
        _measure(server, outcome, arguments)
    except Exception as error:  # noqa: BLE001
        outcome.errors.append(f"the smoke test could not run: {type(error).__name__}: {error}")


def _measure(server: LlamaServer, outcome: SmokeOutcome, arguments: Mapping[str, Any]) -> None:
    assert server.smoke is not None
    client_host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    base_url = f"http://[{client_host}]:{server.port}" if ":" in client_host else f"http://{client_host}:{server.port}"
    transport = command_transport(lambda command: run_status(command, arguments), base_url,
                                  api_key_file=server.api_key_file)
    expected_uuids: frozenset[str] = frozenset()
    gpu_probe = None
    if server.gpus:
        gpus = {gpu.index: gpu.uuid for gpu in fact_once(NvidiaGpus)}
        expected_uuids = frozenset(gpus[index] for index in server.gpus if index in gpus)
        if gpus:
            gpu_probe = lambda: _gpu_processes(server, arguments)  # noqa: E731
    started = time.monotonic()
    result = run_smoke(transport, server.smoke, gpu_probe=gpu_probe, expected_gpu_uuids=expected_uuids)
    outcome.result = result
    console = Console(width=120, stderr=True)
    console.print(f"[bold]{host.name}[/] smoke test of {server.unit_name}")
    console.print(smoke_table(result))
    host.log(summary_line(server, result, time.monotonic() - started))


def summary_line(server: LlamaServer, result: SmokeResult, seconds: float) -> str:
    """One line a person (or a test) can read the verdict and the numbers from."""
    assert server.smoke is not None
    speed = "-" if result.tokens_per_second is None else f"{result.tokens_per_second:.1f}"
    acceptance = "-" if result.acceptance is None else f"{result.acceptance:.2f}"
    verdict = "passed" if result.passed else "FAILED"
    return (
        f"smoke {server.unit_name}: {speed} tok/s (min {server.smoke.min_tokens_per_second:g}), "
        f"acceptance {acceptance} (min {server.smoke.min_acceptance}), {seconds:.1f} s: {verdict}"
    )


@dataclass(frozen=True)
class Rollback:
    """What a miss puts back besides the unit: the llama.cpp build, when this run switched it."""

    build: LlamaCppBuild | None = None
    build_switched: Callable[[], bool] = lambda: False


def rollback_script(server: LlamaServer, build: LlamaCppBuild | None) -> str:
    """Restore `{unit}.prev` (and `current` -> `previous`), reload, restart on it; stop when there is no `.prev`.

    Prints what it did, one word a line (`unit-restored`, `no-previous-unit`, `build-restored`), for the message.
    """
    unit, previous = shell_word(unit_path(server)), shell_word(previous_unit_path(server))
    name = shell_word(server.unit_name)
    lines = [
        f"if [ -f {previous} ]; then cp -p {previous} {unit} && echo unit-restored; else echo no-previous-unit; fi",
    ]
    if build is not None:
        lines.append(f"{build_rollback_script(build)} && echo build-restored")
    lines += [
        "systemctl daemon-reload",
        f"if [ -f {previous} ]; then systemctl restart {name}; else systemctl stop {name}; fi",
    ]
    return "\n".join(lines)


def what_rollback_did(server: LlamaServer, printed: str) -> str:
    """The sentence the failed deploy ends with: what is on the host now, not what was hoped for."""
    words = set(printed.split())
    build = " and llama.cpp's `current` back on the previous build" if "build-restored" in words else ""
    if "unit-restored" in words:
        return (
            f"The previous unit ({previous_unit_path(server)}) was restored{build}, and {server.unit_name} "
            f"restarted on it."
        )
    return (
        f"{server.unit_name} had no previous unit to restore (its first deploy){build}: it was stopped and is "
        f"not serving. Fix the spec or its smoke thresholds and deploy again."
    )


def _smoke_or_roll_back(server: LlamaServer, rollback: Rollback, arguments: Mapping[str, Any]) -> None:
    outcome = SmokeOutcome()
    _smoke(server, outcome, arguments)
    if not outcome.failed:
        return
    build = rollback.build if rollback.build_switched() else None
    output = run(rollback_script(server, build), arguments)
    failures = list(outcome.errors) + (outcome.result.failures if outcome.result is not None else [])
    raise OperationError(
        f"{server.unit_name} failed its smoke test: " + "; ".join(failures)
        + ". " + what_rollback_did(server, output.stdout)
    )


@operation(is_idempotent=False)
def check(server: LlamaServer, rollback: Rollback | None = None):  # type: ignore[no-untyped-def]
    """
    Measure tok/s (and acceptance with a drafter) of the running service against its thresholds; on a
    miss, restore ``{unit}.prev`` (and the previous llama.cpp build when this run switched it), restart
    on it, or stop the service when it has no previous unit, and fail the deploy saying which.

    + server: the service, with its ``smoke`` thresholds
    + rollback: the build to switch back, and whether this run switched it (evaluated on a miss)

    **Example:**

    .. code:: python

        smoke.check(name="Smoke test gemma4.service", server=server, _if=any_changed(restart))
    """
    yield FunctionCommand(_smoke_or_roll_back, (server, rollback or Rollback(), connector_arguments()), {})


def smoke_test(
    server: LlamaServer,
    restart: OperationMeta | None,
    build: LlamaCppBuild | None = None,
    build_metas: list[OperationMeta] | None = None,
) -> None:
    """
    The smoke test, after a restart only: nothing when ``restart`` is None (nothing could change) or
    the service has no ``smoke`` thresholds.

    + server: the service
    + restart: the restart's op meta (from ``service.llama_server``), or None
    + build: the llama.cpp build, switched back on a miss when ``build_metas`` changed
    + build_metas: the build's op metas

    **Example:**

    .. code:: python

        smoke.smoke_test(server, restart, box.llama_cpp, build_metas)
    """
    if restart is None or server.smoke is None:
        return
    rollback = Rollback(build, any_changed(*build_metas)) if build is not None and build_metas else None
    check(name=f"Smoke test {server.unit_name}", server=server, rollback=rollback, _if=any_changed(restart))
