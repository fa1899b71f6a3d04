"""Post-restart smoke test on the host; a miss restores the previous unit and fails the deploy."""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pyinfra import host
from pyinfra.api import FunctionCommand, OperationError, StringCommand, deploy, operation
from pyinfra.operations import server as server_ops
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed
from rich.console import Console

from facts.gpu import NvidiaComputeApps, NvidiaGpus
from gpubox.build import rollback_script
from gpubox.smoke import GpuProcesses, SmokeResult, command_transport, run_smoke, smoke_table
from gpubox.spec import LlamaCppBuild, LlamaServer

from .service import previous_unit_path, unit_path

EXIT_MARKER = "__gpubox_exit="


@dataclass
class SmokeOutcome:
    """The smoke result of one deploy run, read by the rollback operations' `_if`."""

    result: SmokeResult | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or (self.result is not None and not self.result.passed)


def _run_on_host(command: str) -> tuple[str, int]:
    """Run a command on the host; its stdout and exit code (pyinfra reports success only)."""
    _, output = host.run_shell_command(StringCommand(f"{command}; printf '\\n{EXIT_MARKER}%s\\n' \"$?\""))
    lines = output.stdout_lines
    exit_code = int(lines[-1].removeprefix(EXIT_MARKER)) if lines and lines[-1].startswith(EXIT_MARKER) else 255
    return "\n".join(lines[:-1]) + "\n", exit_code


def _gpu_processes(server: LlamaServer) -> GpuProcesses:
    stdout, _ = _run_on_host(f"systemctl show --property MainPID --value {shlex.quote(server.unit_name)}")
    return GpuProcesses(pid=int(stdout.strip() or 0), compute_apps=host.get_fact(NvidiaComputeApps))


def _smoke(server: LlamaServer, outcome: SmokeOutcome) -> None:
    """Never raises: whatever goes wrong is a miss, so the rollback operations still run."""
    try:
        _measure(server, outcome)
    except Exception as error:  # noqa: BLE001
        outcome.errors.append(f"the smoke test could not run: {type(error).__name__}: {error}")


def _measure(server: LlamaServer, outcome: SmokeOutcome) -> None:
    assert server.smoke is not None
    client_host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    base_url = f"http://[{client_host}]:{server.port}" if ":" in client_host else f"http://{client_host}:{server.port}"
    transport = command_transport(_run_on_host, base_url, api_key_file=server.api_key_file)
    expected_uuids: frozenset[str] = frozenset()
    gpu_probe = None
    if server.gpus:
        gpus = {gpu.index: gpu.uuid for gpu in host.get_fact(NvidiaGpus)}
        expected_uuids = frozenset(gpus[index] for index in server.gpus if index in gpus)
        if gpus:
            gpu_probe = lambda: _gpu_processes(server)  # noqa: E731
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


@operation(is_idempotent=False)
def check(server: LlamaServer, outcome: SmokeOutcome):  # type: ignore[no-untyped-def]
    """Measure tok/s (and acceptance with a drafter) of the running service against its thresholds."""
    yield FunctionCommand(_smoke, (server, outcome), {})


def _raise_miss(server: LlamaServer, outcome: SmokeOutcome) -> None:
    failures = list(outcome.errors)
    if outcome.result is not None:
        failures += outcome.result.failures
    raise OperationError(
        f"{server.unit_name} failed its smoke test: " + "; ".join(failures)
        + f". The previous unit ({previous_unit_path(server)}) was restored (and the previous llama.cpp build, "
        f"when this run had switched it) and the service restarted."
    )


@operation(is_idempotent=False)
def fail_on_miss(server: LlamaServer, outcome: SmokeOutcome):  # type: ignore[no-untyped-def]
    yield FunctionCommand(_raise_miss, (server, outcome), {})


@deploy("llama-server smoke test")
def smoke_test(
    server: LlamaServer, restart_meta: object, build: LlamaCppBuild | None = None, build_metas: Sequence[object] = ()
) -> SmokeOutcome:
    """After a restart only: smoke; on a miss, restore `{unit}.prev` (and, when this run switched the
    llama.cpp build, `current` back to `previous`), restart, and fail the deploy."""
    outcome = SmokeOutcome()
    if server.smoke is None:
        return outcome
    restarted = any_changed(restart_meta)  # type: ignore[arg-type]

    def missed() -> bool:
        return outcome.failed

    check(name=f"Smoke test {server.unit_name}", server=server, outcome=outcome, _if=restarted)
    previous = shlex.quote(previous_unit_path(server))
    server_ops.shell(
        name=f"Roll back {server.unit_name} to its previous unit",
        commands=[f"if [ -f {previous} ]; then cp -p {previous} {shlex.quote(unit_path(server))}; fi"],
        _if=missed,
    )
    if build is not None and build_metas:
        build_switched = any_changed(*build_metas)  # type: ignore[arg-type]
        server_ops.shell(
            name=f"Roll back {build.prefix}/current to the previous build",
            commands=[rollback_script(build)],
            _if=lambda: missed() and build_switched(),
        )
    systemd.daemon_reload(name="systemd daemon-reload after rollback", _if=missed)
    systemd.service(
        name=f"Restart {server.unit_name} on its previous unit",
        service=server.unit_name,
        running=True,
        restarted=True,
        _if=missed,
    )
    fail_on_miss(name=f"Fail the deploy: {server.unit_name} missed its smoke thresholds", server=server,
                 outcome=outcome, _if=missed)
    return outcome
