"""Post-restart smoke tests on the host; a miss puts back what this run changed and fails the deploy.

One operation does all of it, so a healthy deploy lists only "Smoke test <unit>" and a converged
host (no restart) lists nothing at all: the rollback steps run, and are reported, only on a miss.
Which test a service gets is its type's ``SMOKE_KIND``: ``chat`` is measured in tok/s and acceptance
(llama-server), ``transcribe`` transcribes a WAV (whisper-server), ``speak`` speaks a sentence (piper),
``listening`` waits for its port (an RPC server, no HTTP), and any other type waits for its ``READY_PATH``
to say it has loaded (``ready``); a box with a speaker
and a listener speaks and hears it back (the round trip).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pyinfra import host
from pyinfra.api import OperationError, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.operations.util import any_changed

from facts.gpu import NvidiaComputeApps, NvidiaGpus
from gpubox import piper_install, speech
from gpubox.box import AnyService, Box
from gpubox.build import rollback_script as build_rollback_script
from gpubox.quoting import shell_word
from gpubox.servers.base import Service
from gpubox.smoke import (
    GpuProcesses,
    SmokeResult,
    command_transport,
    listening_command,
    run_smoke,
    smoke_table,
    wait_until_healthy,
)
from gpubox.spec import PiperInstall, SourceBuild
from gpubox.unverified import clear_command

from .failures import python_step
from .host_commands import connector_arguments, run, run_status
from .host_facts import fact_once
from .service import Restarted, previous_unit_path, unit_path

if TYPE_CHECKING:
    from rich.console import Console

    from gpubox.servers.llama import LlamaServer
    from gpubox.servers.piper import PiperServer
    from gpubox.servers.whisper import WhisperServer

READY_TIMEOUT_S = 120.0
"""How long the ``ready`` smoke test waits for a service's ``READY_PATH`` (a type with no thresholds)."""


@dataclass
class SmokeOutcome:
    """The smoke result of one deploy run."""

    result: SmokeResult | None = None
    errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.failures) or (self.result is not None and not self.result.passed)


def _gpu_processes(server: Service, arguments: Mapping[str, Any]) -> GpuProcesses:
    stdout, _ = run_status(f"systemctl show --property MainPID --value {shell_word(server.unit_name)}", arguments)
    return GpuProcesses(pid=int(stdout.strip() or 0), compute_apps=host.get_fact(NvidiaComputeApps))


def _smoke(measure: Callable[[SmokeOutcome], None], outcome: SmokeOutcome) -> None:
    """Never raises: whatever goes wrong is a miss, so the rollback still runs."""
    try:
        measure(outcome)
    except Exception as error:  # noqa: BLE001
        outcome.errors.append(f"the smoke test could not run: {type(error).__name__}: {error}")


def base_url(server: Service) -> str:
    """Where a client on the host reaches the service."""
    client_host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
    return f"http://[{client_host}]:{server.port}" if ":" in client_host else f"http://{client_host}:{server.port}"


def _measure(server: LlamaServer, outcome: SmokeOutcome, arguments: Mapping[str, Any]) -> None:
    assert server.smoke is not None
    transport = command_transport(lambda command: run_status(command, arguments), base_url(server),
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
    console = stderr_console()
    console.print(f"[bold]{host.name}[/] smoke test of {server.unit_name}")
    console.print(smoke_table(result))
    host.log(summary_line(server, result, time.monotonic() - started))


def stderr_console() -> Console:
    """The console a smoke test draws its table on (rich is loaded then, not by a no-op run)."""
    from gpubox.tables import stderr_console as console

    return console()


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


def _wait_ready(server: Service, timeout_s: float, arguments: Mapping[str, Any]) -> str | None:
    """Wait until the service's ``READY_PATH`` says it has loaded (``ready``); the failure to report when it
    never does."""
    transport = command_transport(lambda command: run_status(command, arguments), base_url(server))
    wait = wait_until_healthy(
        transport, timeout_s, path=server.READY_PATH, ready=lambda answer: server.ready(answer.status, answer.body)
    )
    return None if wait.healthy else f"not ready after {wait.waited_s:.0f} s: {wait.last_answer}"


def _measure_ready(server: Service, outcome: SmokeOutcome, arguments: Mapping[str, Any]) -> None:
    """The ``ready`` smoke test: its ``READY_PATH`` answers that it has loaded, within ``READY_TIMEOUT_S``."""
    not_ready = _wait_ready(server, READY_TIMEOUT_S, arguments)
    if not_ready:
        outcome.failures.append(not_ready)
    host.log(f"smoke {server.unit_name}: GET {server.READY_PATH}: {'FAILED' if not_ready else 'passed'}")


def _measure_listening(server: Service, outcome: SmokeOutcome, arguments: Mapping[str, Any]) -> None:
    """The ``listening`` smoke test (a server without HTTP: an RPC server): its port listens within
    ``READY_TIMEOUT_S``. Its clients' own smoke tests then prove what it serves."""
    _, status = run_status(f"( {listening_command(server.port, READY_TIMEOUT_S)} )", arguments)
    if status != 0:
        outcome.failures.append(f"nothing listens on port {server.port} after {READY_TIMEOUT_S:.0f} s")
    host.log(f"smoke {server.unit_name}: listening on port {server.port}: {'passed' if status == 0 else 'FAILED'}")


def transcribe(
    server: WhisperServer, wav: str, expected: str, arguments: Mapping[str, Any]
) -> speech.TranscriptCheck:
    """POST a WAV on the host to the whisper-server and judge what it heard, and how fast."""
    assert server.smoke is not None
    stdout, _ = run_status(speech.wav_probe_command(wav), arguments)
    audio = speech.parse_wav_probe(stdout)
    command = speech.transcribe_command(base_url(server), wav, server.smoke.timeout_s, language=server.language)
    heard, seconds = speech.parse_transcription(*run_status(command, arguments))
    return speech.TranscriptCheck.judge(
        expected,
        heard,
        audio.duration_s,
        seconds,
        max_wer=server.smoke.max_word_error_rate,
        max_rtf=server.smoke.max_real_time_factor,
    )


def synthesize(server: PiperServer, text: str, out_path: str, arguments: Mapping[str, Any]) -> speech.SpeechCheck:
    """Have the piper service speak ``text`` into a WAV on the host, and judge it."""
    timeout = server.smoke.timeout_s if server.smoke is not None else 120
    command = speech.synthesize_command(base_url(server), "/synthesize", text, out_path, timeout)
    status, seconds, content_type = speech.parse_synthesis(*run_status(f"umask 077; {command}", arguments))
    wav, wav_error = None, ""
    try:
        wav = speech.parse_wav_probe(run_status(speech.wav_probe_command(out_path), arguments)[0])
    except speech.WavError as error:
        wav_error = str(error)
    gpu_failures = _piper_gpu_failures(server, arguments)
    return speech.SpeechCheck.judge(text, wav, seconds, status, content_type, wav_error, gpu_failures)


def _piper_gpu_failures(server: PiperServer, arguments: Mapping[str, Any]) -> list[str] | None:
    """A piper service with ``cuda``: whether it holds memory on its GPU (onnxruntime falls back to the CPU
    silently); None when it runs on the CPU or the host lists no GPU."""
    if not server.cuda or not server.gpus:
        return None
    gpus = {gpu.index: gpu.uuid for gpu in fact_once(NvidiaGpus)}
    if not gpus:
        return None
    processes = _gpu_processes(server, arguments)
    expected = {gpus[index] for index in server.gpus if index in gpus}
    return speech.piper_gpu_failures(processes.pid, expected, processes.compute_apps)


def smoke_wav(server: Service) -> str:
    """A scratch WAV on the host for a smoke test (the deploy user's, removed after)."""
    return f"/tmp/gpubox-smoke-{server.name}.wav"


def _print(title: str, transcripts: list[speech.TranscriptCheck], syntheses: list[speech.SpeechCheck]) -> None:
    console = stderr_console()
    console.print(f"[bold]{host.name}[/] {title}")
    console.print(speech.speech_table(transcripts, syntheses))


def _measure_whisper(server: WhisperServer, audio: str, outcome: SmokeOutcome, arguments: Mapping[str, Any]) -> None:
    assert server.smoke is not None
    not_ready = _wait_ready(server, server.smoke.timeout_s, arguments)
    if not_ready:
        outcome.failures.append(not_ready)
        return
    check = transcribe(server, audio, server.smoke.expected_text, arguments)
    outcome.failures += check.failures
    _print(f"smoke test of {server.unit_name}", [check], [])
    host.log(
        f"smoke {server.unit_name}: WER {check.wer:.2f} (max {check.max_wer:g}), RTF {check.rtf:.3f} "
        f"(max {check.max_rtf:g}), heard {check.heard!r}: {'passed' if check.passed else 'FAILED'}"
    )


def _measure_piper(server: PiperServer, outcome: SmokeOutcome, arguments: Mapping[str, Any]) -> None:
    assert server.smoke is not None
    not_ready = _wait_ready(server, server.smoke.timeout_s, arguments)
    if not_ready:
        outcome.failures.append(not_ready)
        return
    wav = smoke_wav(server)
    try:
        check = synthesize(server, server.smoke.text, wav, arguments)
    finally:
        run_status(f"rm -f {shell_word(wav)}", arguments)
    outcome.failures += check.failures
    _print(f"smoke test of {server.unit_name}", [], [check])
    duration = f"{check.wav.duration_s:.2f} s" if check.wav is not None else "no WAV"
    host.log(
        f"smoke {server.unit_name}: {duration} of speech in {check.seconds:.2f} s "
        f"(plausible {check.min_s:.1f}-{check.max_s:.1f} s): {'passed' if check.passed else 'FAILED'}"
    )


def _measure_round_trip(
    piper: PiperServer, whisper: WhisperServer, outcome: SmokeOutcome, arguments: Mapping[str, Any]
) -> None:
    """piper speaks its smoke sentence, whisper transcribes it: the words must come back."""
    assert piper.smoke is not None and whisper.smoke is not None
    for server, timeout in ((piper, piper.smoke.timeout_s), (whisper, whisper.smoke.timeout_s)):
        not_ready = _wait_ready(server, timeout, arguments)
        if not_ready:
            outcome.failures.append(f"{server.unit_name}: {not_ready}")
            return
    wav = smoke_wav(piper)
    try:
        spoken = synthesize(piper, piper.smoke.text, wav, arguments)
        heard = transcribe(whisper, wav, piper.smoke.text, arguments) if spoken.passed else None
    finally:
        run_status(f"rm -f {shell_word(wav)}", arguments)
    outcome.failures += spoken.failures + (heard.failures if heard is not None else [])
    _print(f"round trip {piper.unit_name} -> {whisper.unit_name}", [heard] if heard else [], [spoken])
    if heard is not None:
        host.log(
            f"round trip {piper.unit_name} -> {whisper.unit_name}: said {piper.smoke.text!r}, heard {heard.heard!r}, "
            f"WER {heard.wer:.2f}: {'passed' if heard.passed and spoken.passed else 'FAILED'}"
        )


@dataclass(frozen=True)
class Rollback:
    """What a miss puts back besides the unit: the install (llama.cpp, whisper.cpp, piper), when this
    run switched it."""

    build: SourceBuild | PiperInstall | None = None
    build_switched: Callable[[], bool] = lambda: False


def _install_rollback(install: SourceBuild | PiperInstall) -> tuple[str, str]:
    """The script switching an install's `current` back, and what it is called in the message."""
    if isinstance(install, PiperInstall):
        return piper_install.rollback_script(install), "piper's `current` back on the previous install"
    return build_rollback_script(install), f"{install.PROJECT.name}'s `current` back on the previous build"


def rollback_script(server: Service, build: SourceBuild | PiperInstall | None) -> str:
    """Restore `{unit}.prev` (and `current` -> `previous`), reload, restart on it; stop when there is no `.prev`.
    Then clear the service's unverified mark: what runs now is what ran before (or nothing).

    Prints what it did, one word a line (`unit-restored`, `no-previous-unit`, `build-restored`), for the message.
    """
    unit, previous = shell_word(unit_path(server)), shell_word(previous_unit_path(server))
    name = shell_word(server.unit_name)
    lines = [
        f"if [ -f {previous} ]; then cp -p {previous} {unit} && echo unit-restored; else echo no-previous-unit; fi",
    ]
    if build is not None:
        lines.append(f"{_install_rollback(build)[0]} && echo build-restored")
    lines += [
        "systemctl daemon-reload",
        f"if [ -f {previous} ]; then systemctl restart {name}; else systemctl stop {name}; fi",
        clear_command(server.unit_name),
    ]
    return "\n".join(lines)


def what_rollback_did(server: Service, printed: str, build: SourceBuild | PiperInstall | None = None) -> str:
    """The sentence the failed deploy ends with: what is on the host now, not what was hoped for."""
    words = set(printed.split())
    what = _install_rollback(build)[1] if build is not None else "llama.cpp's `current` back on the previous build"
    restored = f" and {what}" if "build-restored" in words else ""
    if "unit-restored" in words:
        return (
            f"The previous unit ({previous_unit_path(server)}) was restored{restored}, and {server.unit_name} "
            f"restarted on it."
        )
    return (
        f"{server.unit_name} had no previous unit to restore (its first deploy){restored}: it was stopped and is "
        f"not serving. Fix the spec or its smoke thresholds and deploy again."
    )


def _roll_back(server: Service, rollback: Rollback, arguments: Mapping[str, Any]) -> str:
    build = rollback.build if rollback.build_switched() else None
    return what_rollback_did(server, run(rollback_script(server, build), arguments).stdout, build)


def _smoke_or_roll_back(
    measure: Callable[[SmokeOutcome], None],
    rollbacks: list[tuple[Service, Rollback, Callable[[], bool]]],
    arguments: Mapping[str, Any],
    missed: str,
    verified: Sequence[Service] = (),
) -> None:
    """Measure; on a pass clear the unverified marks of ``verified``; on a miss roll back every
    service whose restart this run made or found unverified (``rollbacks``: the service, its install's
    rollback, whether it restarted), and fail the deploy with ``missed`` (what failed), the failures
    and what is on the host now."""
    outcome = SmokeOutcome()
    _smoke(measure, outcome)
    if not outcome.failed:
        if verified:
            run(" && ".join(clear_command(server.unit_name) for server in verified), arguments)
        return
    failures = list(outcome.errors) + outcome.failures + (outcome.result.failures if outcome.result is not None else [])
    done = [_roll_back(server, rollback, arguments) for server, rollback, restarted in rollbacks if restarted()]
    raise OperationError(f"{missed}: " + "; ".join(failures) + ". " + " ".join(done))


def _measurement(server: Service, audio: str | None, arguments: Mapping[str, Any]) -> Callable[[SmokeOutcome], None]:
    """The smoke test of the service's ``SMOKE_KIND`` (``ready``: its ``READY_PATH`` answers)."""
    if server.SMOKE_KIND == "chat":
        return lambda outcome: _measure(cast("LlamaServer", server), outcome, arguments)
    if server.SMOKE_KIND == "transcribe":
        assert audio is not None, f"{server.unit_name}: a transcribe smoke test needs a WAV"
        return lambda outcome: _measure_whisper(cast("WhisperServer", server), audio, outcome, arguments)
    if server.SMOKE_KIND == "speak":
        return lambda outcome: _measure_piper(cast("PiperServer", server), outcome, arguments)
    if server.SMOKE_KIND == "listening":
        return lambda outcome: _measure_listening(server, outcome, arguments)
    return lambda outcome: _measure_ready(server, outcome, arguments)


@operation(is_idempotent=False)
def check(  # type: ignore[no-untyped-def]
    server: AnyService, rollback: Rollback | None = None, audio: str | None = None, clear_mark: bool = True
):
    """
    Smoke test the restarted service by its ``SMOKE_KIND``: a llama-server's tok/s (and acceptance
    with a drafter), a whisper-server's transcript of a WAV (word error rate, real-time factor), a
    piper service's WAV of a sentence (plausible length), another type's ``READY_PATH`` answering.
    A pass clears the service's unverified mark. On a miss, restore ``{unit}.prev`` (and the previous
    install when this run, or the cut run that marked the service, switched it), restart on it, or stop
    the service when it has no previous unit, clear the mark, and fail the deploy saying which.

    + server: the service (``smoke_tested``: with its ``smoke`` thresholds, where its type has them)
    + rollback: the install to switch back, and whether this run switched it (evaluated on a miss)
    + audio: the WAV on the host a ``transcribe`` smoke test sends (the service's ``smoke_audio``)
    + clear_mark: clear the mark on a pass (not when the speech round trip verifies the service too)

    **Example:**

    .. code:: python

        smoke.check(name="Smoke test gemma4.service", server=server, _if=any_changed(restart))
    """
    arguments = connector_arguments()
    measure = _measurement(server, audio, arguments)
    rollbacks = [(server, rollback or Rollback(), lambda: True)]
    missed = f"{server.unit_name} failed its smoke test"
    verified = [server] if clear_mark else []
    yield python_step(_smoke_or_roll_back, measure, rollbacks, arguments, missed, verified)


@operation(is_idempotent=False)
def round_trip(  # type: ignore[no-untyped-def]
    piper: AnyService,
    whisper: AnyService,
    rollbacks: list[tuple[Service, Rollback, Callable[[], bool]]],
):
    """
    piper speaks its smoke sentence into a WAV, whisper transcribes it, the words must match (the
    whisper smoke's word error rate). A pass clears both services' unverified marks. On a miss, each
    of the two that this run restarted (or found unverified) is rolled back as its own smoke test would.

    + piper: the ``speak`` service (piper: its ``smoke.text`` is said)
    + whisper: the ``transcribe`` service (whisper-server: its ``smoke`` thresholds judge the transcript)
    + rollbacks: (service, its install's rollback, whether this run restarted it) for both

    **Example:**

    .. code:: python

        smoke.round_trip(name="Round trip piper -> whisper", piper=tts, whisper=stt, rollbacks=[...])
    """
    arguments = connector_arguments()
    speaker, listener = cast("PiperServer", piper), cast("WhisperServer", whisper)
    measure = lambda outcome: _measure_round_trip(speaker, listener, outcome, arguments)  # noqa: E731
    missed = f"the round trip {piper.unit_name} -> {whisper.unit_name} failed"
    yield python_step(_smoke_or_roll_back, measure, rollbacks, arguments, missed, [piper, whisper])


def round_trip_pair(box: Box) -> tuple[PiperServer, WhisperServer] | None:
    """The services the speech round trip checks: the box's first ``speak`` and first ``transcribe``
    service (piper, whisper-server), when both are smoke-tested (have thresholds)."""
    speakers = [server for server in box.services if server.SMOKE_KIND == "speak"]
    listeners = [server for server in box.services if server.SMOKE_KIND == "transcribe"]
    if not (speakers and listeners and speakers[0].smoke_tested and listeners[0].smoke_tested):
        return None
    return cast("PiperServer", speakers[0]), cast("WhisperServer", listeners[0])


def _install_switched(restarted: Restarted | None, metas: Sequence[OperationMeta]) -> Callable[[], bool]:
    """Whether the install was switched by this run (its op metas), or by the cut run that left the mark."""
    by_mark = restarted is not None and restarted.unverified is not None and restarted.unverified.install_switched
    return lambda: by_mark or (bool(metas) and any_changed(*metas)())


def round_trip_test(
    box: Box, restarts: Mapping[str, Restarted | None], install_metas: Mapping[str, list[OperationMeta]]
) -> None:
    """
    The round trip of the box's first piper and first whisper-server (both with smoke thresholds),
    after a restart or start of either, or when either is unverified; a miss rolls back whichever of
    the two this run restarted (or found unverified), a pass clears both marks.

    + box: the host's Box
    + restarts: what can put a new process of each service live, by name (``service.server``'s answer)
    + install_metas: each install's op metas by its prefix

    **Example:**

    .. code:: python

        smoke.round_trip_test(box, restarts, install_metas)
    """
    pair = round_trip_pair(box)
    if pair is None:
        return
    planned = [restarted for restarted in (restarts[server.name] for server in pair) if restarted is not None]
    if not any(restarted.planned for restarted in planned):
        return
    rollbacks = []
    for server in pair:
        install, prefix = box.install_of(server), box.prefix_of(server)
        restarted = restarts[server.name]
        happened = restarted.happened if restarted is not None else (lambda: False)
        switched = _install_switched(restarted, install_metas[prefix] if prefix is not None else [])
        rollbacks.append((server, Rollback(install, switched), happened))
    round_trip(
        name=f"Round trip {pair[0].unit_name} -> {pair[1].unit_name}",
        piper=pair[0],
        whisper=pair[1],
        rollbacks=rollbacks,
        _if=lambda: any(restarted.happened() for restarted in planned),
    )


def smoke_test(
    server: Service,
    restart: Restarted | None,
    build: SourceBuild | PiperInstall | None = None,
    build_metas: list[OperationMeta] | None = None,
    box: Box | None = None,
) -> None:
    """
    The smoke test, after a restart or a start, or of a service an earlier run left unverified (it
    was cut before its smoke test passed): nothing when none of them is planned (``restart`` None or
    not ``planned``) or the service is not ``smoke_tested`` (its type's thresholds unset).

    + server: the service
    + restart: what can put a new process of it live (``service.server``'s answer), or None
    + build: the install the service runs from (``Box.install_of``; None: none), switched back on a miss
      when ``build_metas`` changed (or the unverified mark says the cut run switched it)
    + build_metas: the install's op metas
    + box: the host's Box: a service its speech round trip checks keeps its mark for the round trip

    **Example:**

    .. code:: python

        smoke.smoke_test(server, restarted, box.llama_cpp, build_metas, box=box)
    """
    if restart is None or not restart.planned or not server.smoke_tested:
        return
    rollback = Rollback(build, _install_switched(restart, build_metas or [])) if build is not None else None
    audio = server.smoke_audio(build.prefix if build is not None else None)
    pair = round_trip_pair(box) if box is not None else None
    in_round_trip = pair is not None and any(server.unit_name == paired.unit_name for paired in pair)
    name = f"Smoke test {server.unit_name}"
    check(
        name=name, server=server, rollback=rollback, audio=audio, clear_mark=not in_round_trip, _if=restart.happened
    )
