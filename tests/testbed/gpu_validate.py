"""Validate gpubox on a real NVIDIA GPU machine and write docs/gpu-validation.md.

Steps (each records into WORKDIR/state.json; a failed step is recorded and the next ones run):

  prepare  unpack a trimmed llama.cpp tarball, `git init` + commit it; its sha is the pinned commit
  facts    pyinfra @local fact facts.gpu.NvidiaGpus / facts.cuda.CudaToolkit, NVML with bandwidth
  build    the real operations.source_build.build on @local (pyinfra -y @local build_deploy.py), timed,
           run twice (the second must change nothing), then ninja once more ("no work to do")
  smoke    one SmolLM2 service per GPU, pinned, started with its rendered unit's ExecStart and
           Environment; run_smoke with a GPU-residency probe, drafter off and on (draft-simple)
  mtp      the seed's draft-mtp path: write the tiny random Gemma 4 target + gemma4-assistant drafter
           (tests.testbed.tiny_gemma4, tokenizer from --vocab), serve them pinned to GPU 0 with the
           seed's recipe shape (spec_type draft-mtp, n-max 3, -ngl/-ngld 99, q8_0 KV, FA on, fit off,
           parallel 1), started from the rendered unit; one /completion (64 tokens, ignore_eos, temp 0):
           draft_n > 0, /metrics counters, the log lines of the drafter and its shared KV, residency
  bench    gpubox.bench sweep: parallel 1 and 4, drafter off and on, draft n-max 1..4
  vram     gpubox.vram's estimate vs nvidia-smi's per-process memory at two context sizes
  report   the markdown report

  scripts/gpu-validate all --workdir /root/gv --tarball llama.tgz --model /root/models/X.gguf
      --vocab /root/models/ggml-vocab-gemma-4.gguf --out report.md   (one command line)

The vocab is llama.cpp's models/ggml-vocab-gemma-4.gguf (the trimmed tarball has no models/).

Two more steps, not part of `all` (they need two GPUs and build llama-server their own way):

  isobuild   plain cmake + ninja, llama-server only, two builds side by side: sm90 (CUDA architectures
             `90`, SASS) and ptx80 (`80-virtual`, PTX only), plus a tiny CUDA program of each kind
  isolation  the unit's GPU wall without systemd: each case renders the one-GPU unit with the host's GPU
             records (minor numbers from the NvidiaGpus probe), covers every NVIDIA node its DeviceAllow=
             leaves out inside `unshare --mount` (bind-mounted /dev/null, or a nodev copy: EACCES), pins
             CUDA_VISIBLE_DEVICES by uuid or by index, optionally execs under PR_SET_MDWE, and runs
             gpubox.smoke.run_smoke with the compute-apps probe against the service's GPU uuid

  scripts/gpu-validate prepare isobuild --workdir /root/gv --tarball llama.tgz --jobs 24
  scripts/gpu-validate isolation report --workdir /root/gv --model /root/models/X.gguf --iso-deadline 330

The speech service and the seed's two-GPU layout, not part of `all` either:

  seedbuild   start isobuild's sm90 llama-server build (plain cmake, llama-server only) in the background;
              seedlayout waits for it (so it runs beside the whisper step's build)
  whisper     unpack the trimmed whisper.cpp tarball (git init + commit, like prepare), fetch it into
              /opt/whisper.cpp/src with gpubox.build.fetch_script, then gpubox.build.build_script(
              WhisperCppBuild, "cuda", architectures from the GPU probe, nvcc, ccache=False): timed; the
              stamp read back with installed_command/is_installed. Then whisper-server (tiny.en) started from
              its rendered unit, pinned to GPU 1 (the seed's speech GPU; GPU 0 on a one-GPU machine): /health
              polled from the start, samples/jfk.wav and the piper round-trip WAV transcribed 3 times each
              with gpubox.speech.transcribe_command (curl), judged by TranscriptCheck (WER, RTF); nvidia-smi's
              memory of its pid against gpubox.vram.speech_terms and whisper's logged buffer sizes
  seedlayout  SmolLM2's llama-server pinned to GPU 0 and whisper-server pinned to GPU 1, both started from
              their rendered units (render_unit with the probe's GPU records), both answering a request at
              the same time; nvidia-smi's compute apps must list each pid on its own GPU's uuid only

  scripts/gpu-validate prepare seedbuild whisper seedlayout report --workdir /root/gv --tarball llama.tgz
      --whisper-tarball whisper.tgz --jobs 16 --out report.md
  (scripts/gpu-pack --gpus 2 packs the tarballs, models, WAV and wheels and prints the device calls that run this.)

On one GPU (scripts/gpu-pack's default list: `all`'s steps with these three and whisper):

  whisperbuild  start the whisper step's build (the product's fetch and build scripts) in a thread, beside
                llama.cpp's build; whisper and whispersizes wait for it
  piper         piper's cuda venv the product's way (piper-tts and onnxruntime-gpu from --piper-requirements,
                the machine's nvidia-* wheels linked in), then piper --cuda from its rendered unit, the CUDA
                toolkit hidden: without gpubox's preload hook (the smoke's GPU check must fail: onnxruntime
                falls back to the CPU), with it (fox x 3, a paragraph: RTF, nvidia-smi's memory of the pid),
                and without it, toolkit visible; onnxruntime's CUDA context on a one-Conv model. Its fox WAV
                is the whisper step's round trip (--roundtrip-wav)
  whispersizes  every whisper size (--whisper-sizes) as a random-weight model with the real hyperparameters
                (tests.testbed.random_whisper), served from its unit, jfk.wav greedy then sampled
                (2 decoders): whisper.cpp's logged buffers against nvidia-smi's memory of the pid

  scripts/gpu-validate prepare facts whisperbuild build smoke mtp bench vram piper whisper whispersizes rpc report
      --workdir /root/gv --tarball llama.tgz --whisper-tarball whisper.tgz --jobs 16 --out report.md

llama.cpp's RPC server (issue 24; one GPU is enough), in gpu-pack's one-GPU list and on its own:

  rpc   build llama.cpp with CUDA and GGML_RPC the product's way (gpubox.build's fetch and build scripts for
        the LlamaCppBuild a box with an RpcServer gets: `Box.install_of`, targets + ggml-rpc-server), then
        for each of RPC_CONTEXTS: ggml-rpc-server pinned to GPU 0 from its rendered unit (LLAMA_CACHE in
        the workdir), and SmolLM2's llama-server with no CUDA device (CUDA_VISIBLE_DEVICES="") and every
        layer on it (`--rpc 127.0.0.1:50052 --tensor-split 1 --fit off -ngl all`, the endpoint resolved by
        gpubox.peers.resolve_peers over two boxes sharing 127.0.0.1), FA on, f16 KV, parallel 1; after load
        and one completion, nvidia-smi's memory of the RPC server's pid against the planner's device terms
        (gpubox.vram.device_terms) plus CUDA_CONTEXT_MIB, and llama-server's logged RPC0 buffers (-lv 4)

  scripts/gpu-validate prepare rpc report --workdir /root/gv --tarball llama.tgz --jobs 16 --out report.md

The report starts with a reproduction check against docs/gpu-validation.md's H200 numbers (REFERENCE_PROCESS_MIB):
each process's GPU memory within 1 %, the planner within 5 %, every smoke's verdict, the build a no-op on rerun.
"""

# The logic of scripts/gpu-validate (a thin entry point). Pure pieces (the argument parser, the command
# lines, services and configs of each step, output parsers, numbers, the markdown report from a state
# dict) come first in each section; the step_* functions and the helpers above them run the processes.

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import requests
from rich.console import Console, RenderableType

from gpubox import bench, piper_install, switch
from gpubox import build as plan
from gpubox.box import Box
from gpubox.gguf_header import read_gguf_header
from gpubox.gpu import (
    ComputeApp,
    Gpu,
    compute_apps_probe_command,
    gpu_probe_command,
    gpus_from_fact,
    parse_compute_apps_probe,
    parse_gpu_probe,
)
from gpubox.peers import resolve_peers
from gpubox.servers.base import Service, binary_path
from gpubox.servers.llama import LlamaServer
from gpubox.servers.piper import PiperServer, SpeechSmoke
from gpubox.servers.rpc import RpcRef, RpcServer
from gpubox.servers.whisper import JFK_TEXT, TranscriptionSmoke, WhisperServer
from gpubox.smoke import (
    GpuProcesses,
    TransportError,
    check_gpu_residency,
    listening_command,
    read_spec_counters,
    requests_transport,
    run_smoke,
    smoke_table,
    wait_until_healthy,
)
from gpubox.spec import LlamaCppBuild, ModelFile, SmokeThresholds, WhisperCppBuild
from gpubox.speech import (
    SpeechCheck,
    SpeechError,
    TranscriptCheck,
    parse_transcription,
    parse_wav_header,
    piper_gpu_failures,
    transcribe_command,
)
from gpubox.unit import render_unit, server_environment
from gpubox.vram import (
    CUDA_CONTEXT_MIB,
    MIB,
    WHISPER_CUDA_CONTEXT_MIB,
    WHISPER_STATE_MIB,
    WHISPER_WEIGHTS_MIB,
    ServicePlan,
    device_terms,
    load_model_header,
    parse_memory_breakdown,
    plan_service,
    speech_terms,
)
from tests.testbed.gpu_pack import ROUNDTRIP_TEXT
from tests.testbed.random_whisper import WHISPER_DIMS, planner_size, write_random_whisper
from tests.testbed.tiny_gemma4 import write_tiny_gemma4

if TYPE_CHECKING:
    from gpubox.nvml import NvmlGpu

Json = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
BUILD_DEPLOY = REPO / "scripts" / "gpu_validate" / "build_deploy.py"

PREFIX = "/opt/llama.cpp"
WHISPER_PREFIX = "/opt/whisper.cpp"
# SmolLM2-Instruct ends a raw prompt at once (EOS after 1 token): the smoke prompt uses its chat template.
CHAT_PROMPT = (
    "<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a map.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
FIXED_DATE = "2026-01-01T00:00:00+0000"
FACTS = ("facts.gpu.NvidiaGpus", "facts.cuda.CudaToolkit")
MACHINE_COMMAND = (
    "uname -a; nproc; grep -m1 'model name' /proc/cpuinfo; free -g | head -2; nvidia-smi -L; "
    "nvcc --version | tail -2; cmake --version | head -1; ninja --version; gcc --version | head -1"
)
BUILD_ATTEMPTS = ("first", "second (no-op)")
BUILD_SPEC_ENV = "GPUBOX_VALIDATE_BUILD"

STEP_NAMES = ("prepare", "facts", "build", "smoke", "mtp", "bench", "vram")
MODEL_STEPS = ("smoke", "bench", "vram", "isolation", "seedlayout")  # they wait for --model (it may still be arriving)
BUILD_STEPS = ("bench", "vram", "smoke", "mtp")  # skipped when the build failed
# Not part of `all` (two GPUs, their own plain-cmake builds): `isobuild` then `isolation`.
# Not part of `all` either (their own builds; seedlayout needs two GPUs): the speech steps.
SPEECH_STEP_NAMES = ("seedbuild", "whisper", "seedlayout")
# One GPU (scripts/gpu-pack's one-GPU list): whisper.cpp built in the background beside llama.cpp, piper on
# CUDA, and the planner's whisper terms measured for every size with random-weight models.
ONE_GPU_SPEECH_STEPS = ("whisperbuild", "piper", "whispersizes")
PIPER_PREFIX = "/opt/piper"
# llama.cpp's RPC server (issue 24): its own build (GGML_RPC on), then the model on it; one GPU is enough.
RPC_STEP_NAMES = ("rpc",)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="+",
                        choices=[*STEP_NAMES, "isobuild", "isolation", *SPEECH_STEP_NAMES, *ONE_GPU_SPEECH_STEPS,
                                 *RPC_STEP_NAMES, "report", "all"])
    parser.add_argument("--workdir", default="/root/gv")
    parser.add_argument("--tarball", default=str(REPO / ".gpu" / "llama.tgz"))
    parser.add_argument("--src", default="/root/llama-src")
    parser.add_argument("--model", default="/root/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--vocab", default="/root/models/ggml-vocab-gemma-4.gguf",
                        help="llama.cpp's models/ggml-vocab-gemma-4.gguf, for the mtp step's tiny Gemma 4 pair")
    parser.add_argument("--wait-model", type=float, default=900.0, help="seconds to wait for the model file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--out", default=None, help="report path (default WORKDIR/gpu-validation.md)")
    parser.add_argument("--iso-deadline", type=float, default=480.0,
                        help="seconds after which the isolation step skips the cases left")
    parser.add_argument("--whisper-tarball", default=str(REPO / ".gpu-pack" / "whisper.tgz"),
                        help="the trimmed whisper.cpp tree (scripts/gpu-pack)")
    parser.add_argument("--whisper-src", default="/root/whisper-src")
    parser.add_argument("--whisper-model", default="/root/models/ggml-tiny.en.bin",
                        help="Whisper tiny.en as a ggml model (whisper_tiny_en_ggml())")
    parser.add_argument("--jfk", default=None, help="samples/jfk.wav (default: the unpacked whisper.cpp tree's)")
    parser.add_argument("--roundtrip-wav", default="/root/models/roundtrip-fox.wav",
                        help="piper's WAV of --roundtrip-text (made where piper runs: scripts/gpu-pack)")
    parser.add_argument("--roundtrip-text", default=ROUNDTRIP_TEXT)
    parser.add_argument("--voice", default="/root/models/en_US-joe-medium.onnx",
                        help="the piper voice (its .onnx.json beside it)")
    parser.add_argument("--piper-requirements", default="/root/pack/piper.txt",
                        help="piper's wheels, pinned by hash (scripts/gpu-pack writes it)")
    parser.add_argument("--wheels", default="/root/pack/wheels", help="where the wheels of --piper-requirements are")
    parser.add_argument("--piper-prefix", default=PIPER_PREFIX)
    parser.add_argument("--whisper-sizes", nargs="+", default=list(WHISPER_SIZE_NAMES), choices=list(WHISPER_DIMS),
                        help="the whispersizes step's random-weight models")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def selected_steps(requested: Sequence[str]) -> list[str]:
    """The steps to run, in order; `all` is every step and then the report."""
    return [*STEP_NAMES, "report"] if "all" in requested else list(requested)


def skip_reason(step: str, errors: Mapping[str, str]) -> str | None:
    """Why a step is not run (the steps that need the build, after it failed); None to run it."""
    if step in BUILD_STEPS and "build" in errors:
        return "skipped: the build failed"
    if step == "isolation" and "isobuild" in errors:
        return "skipped: the isobuild step failed"
    if step in ("seedbuild", "seedlayout") and "prepare" in errors:
        return "skipped: the prepare step failed"
    if step == "rpc" and "prepare" in errors:
        return "skipped: the prepare step failed"
    if step == "seedlayout" and "seedbuild" in errors:
        return "skipped: the seedbuild step failed"
    if step in ("whisper", "whispersizes") and "whisperbuild" in errors:
        return "skipped: the whisperbuild step failed"
    return None


def report_path(args: argparse.Namespace) -> Path:
    return Path(args.out or Path(args.workdir) / "gpu-validation.md")


# --------------------------------------------------------------------------- state and processes


class State:
    """WORKDIR/state.json, saved on every assignment; a missing key reads as None."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "state.json"
        self.data: Json = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def __getitem__(self, key: str) -> Any:
        return self.data.get(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()


def log(message: str) -> None:
    print(f"[gpu-validate {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(
    command: str | list[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> tuple[int, str]:
    """Run a command; (exit code, combined output)."""
    result = subprocess.run(
        command, shell=isinstance(command, str), cwd=cwd, env=env, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return result.returncode, result.stdout


def pyinfra_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyinfra", *args]


def pyinfra_env(base: Mapping[str, str], repo: Path = REPO) -> dict[str, str]:
    """`base` with the repo first on PYTHONPATH (pyinfra imports facts/, operations/ and gpubox from it)."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    return env


def run_pyinfra(
    command: list[str], extra_env: Mapping[str, str] | None = None, timeout: float | None = None
) -> tuple[int, str]:
    env = {**pyinfra_env(os.environ), **(extra_env or {})}
    return sh(command, cwd=REPO, env=env, timeout=timeout)


def rich_text(renderable: RenderableType) -> str:
    with open(os.devnull, "w") as sink:
        console = Console(record=True, width=150, file=sink)
        console.print(renderable)
        return console.export_text()


# --------------------------------------------------------------------------- prepare


def git_commands(src: Path, message: str = "llama.cpp 0c1e57098 (trimmed)") -> list[str]:
    """Make the unpacked tree a git repository with one commit (served to the build by file://)."""
    git = f"git -C {shlex.quote(str(src))}"
    return [
        f"{git} init -q",
        f"{git} config uploadpack.allowReachableSHA1InWant true",
        f"{git} config uploadpack.allowAnySHA1InWant true",
        f"{git} config core.autocrlf false",
        f"{git} add -A -f",
        f"{git} -c user.name=gpubox -c user.email=gpubox@localhost commit -q -m {shlex.quote(message)}",
    ]


def git_env(base: Mapping[str, str]) -> dict[str, str]:
    """Fixed author and committer dates: the same tarball gives the same sha."""
    return {**base, "GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE}


def prepared_record(src: Path, sha: str) -> Json:
    return {"src": str(src), "commit": sha.strip(), "repo": f"file://{src}"}


def unpack_committed(tarball: str, src: Path, message: str) -> str:
    """Unpack `tarball` into `src` and commit it (once: an existing repository is kept); its full sha."""
    if not (src / ".git").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        code, out = sh(["tar", "xzf", tarball, "-C", str(src)])
        if code:
            raise RuntimeError(out)
        env = git_env(os.environ)
        for command in git_commands(src, message):
            code, out = sh(command, env=env)
            if code:
                raise RuntimeError(f"{command}: {out}")
    code, sha = sh(["git", "-C", str(src), "rev-parse", "HEAD"])
    if code:
        raise RuntimeError(sha)
    return sha.strip()


LLAMA_SOURCE_FILE = "llama-source.json"
"""What scripts/gpu-pack writes into llama.tgz: the tree's origin (upstream commit, the package it came in)."""


def step_prepare(args: argparse.Namespace, state: State) -> None:
    src = Path(args.src)
    sha = unpack_committed(args.tarball, src, "llama.cpp 0c1e57098 (trimmed)")
    record = prepared_record(src, sha)
    if (src / LLAMA_SOURCE_FILE).is_file():
        record["source"] = json.loads((src / LLAMA_SOURCE_FILE).read_text())
    state["prepare"] = record
    log(f"llama.cpp source {src} at {sha}")


# --------------------------------------------------------------------------- facts


def fact_json(output: str) -> Any:
    """The JSON object `pyinfra @local fact X` prints ({"@local": value})."""
    start = output.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(output[start:])
            if isinstance(value, dict) and "@local" in value:
                return value["@local"]
        except ValueError:
            pass
        start = output.find("{", start + 1)
    raise ValueError("no fact JSON in pyinfra's output:\n" + output[-2000:])


def fact_record(code: int, seconds: float, output: str) -> Json:
    record: Json = {"exit": code, "seconds": round(seconds, 2)}
    try:
        record["value"] = fact_json(output)
    except ValueError as error:
        record["error"] = str(error)
    return record


def nvml_rows(gpus: Iterable[NvmlGpu]) -> list[Json]:
    return [
        {**gpu.model_dump(mode="json"), "peak_memory_bandwidth_tb_s": gpu.peak_memory_bandwidth_bytes_per_s / 1e12}
        for gpu in gpus
    ]


def fact_gpus(facts: Mapping[str, Any]) -> list[Json]:
    """The GPUs the NvidiaGpus fact listed (the facts step's record)."""
    return list(facts["facts.gpu.NvidiaGpus"]["value"])


def fact_gpu_records(facts: Mapping[str, Any]) -> list[Gpu]:
    """The NvidiaGpus fact's GPU records, which the unit is rendered with (UUID pinning, device nodes)."""
    return gpus_from_fact(fact_gpus(facts))


def gpu_indices(facts: Mapping[str, Any]) -> list[int]:
    return [gpu["index"] for gpu in fact_gpus(facts)]


def uuid_of(facts: Mapping[str, Any], index: int) -> str:
    for gpu in fact_gpus(facts):
        if gpu["index"] == index:
            return str(gpu["uuid"])
    raise KeyError(index)


def local_gpus() -> list[NvmlGpu]:
    # gpubox.nvml imports pynvml at load: imported here, where the GPUs are read, so that this module
    # (its parser, command builders and report, and their tests) loads on a machine without pynvml.
    from gpubox.nvml import local_gpus as nvml_local_gpus

    return nvml_local_gpus()


def gpu_used_mib() -> dict[int, int]:
    return {gpu.index: gpu.memory_used_mib or 0 for gpu in local_gpus()}


def compute_apps() -> list[ComputeApp]:
    _, out = sh(compute_apps_probe_command())
    return parse_compute_apps_probe(out.splitlines())


def step_facts(args: argparse.Namespace, state: State) -> None:
    result: Json = {}
    for name in FACTS:
        started = time.monotonic()
        code, out = run_pyinfra(pyinfra_command("@local", "fact", name), timeout=300)
        result[name] = fact_record(code, time.monotonic() - started, out)
    try:
        result["nvml"] = nvml_rows(local_gpus())
    except Exception as error:  # noqa: BLE001
        result["nvml_error"] = f"{type(error).__name__}: {error}"
    _, out = sh(MACHINE_COMMAND)
    result["machine"] = out
    state["facts"] = result
    log(f"facts: {len(result['facts.gpu.NvidiaGpus'].get('value') or [])} GPU(s), "
        f"toolkit {result['facts.cuda.CudaToolkit'].get('value')}")


# --------------------------------------------------------------------------- build


def build_spec(prepared: Mapping[str, Any], jobs: int) -> LlamaCppBuild:
    """The build of the prepared tree at its pinned commit: CUDA, llama-server and llama-bench."""
    return LlamaCppBuild(
        repo=prepared["repo"], commit=prepared["commit"], cuda="on", prefix=PREFIX,
        targets=("llama-server", "llama-bench"), jobs=jobs,
    )


def build_deploy_invocation(spec_file: Path) -> tuple[list[str], dict[str, str]]:
    """`pyinfra -y @local build_deploy.py` and the environment naming the spec file it builds."""
    return pyinfra_command("-y", "@local", str(BUILD_DEPLOY)), {BUILD_SPEC_ENV: str(spec_file)}


def build_run_record(attempt: str, code: int, seconds: float, output: str) -> Json:
    return {"run": attempt, "exit": code, "seconds": round(seconds, 1), "output_tail": output[-3500:]}


def ninja_again_command(spec: LlamaCppBuild) -> list[str]:
    """Build the targets once more in the build's work dir: a no-op build has nothing to do."""
    return ["cmake", "--build", plan.work_dir(spec, "cuda"), "--target", *spec.targets]


def ninja_again_record(code: int, output: str) -> Json:
    return {
        "exit": code, "output": output if len(output) < 1500 else output[:700] + "\n...\n" + output[-700:],
        "no_work": "no work to do" in output,
    }


def version_command() -> list[str]:
    return [f"{PREFIX}/current/llama-server", "--version"]


def current_command(spec: LlamaCppBuild) -> str:
    """The `current` link, the ninja steps logged and the architectures in the build log."""
    log_file = plan.log_path(spec, "cuda")
    return (f"readlink {PREFIX}/current; grep -c '^\\[' {log_file} || true; "
            f"grep -m3 -i 'CUDA_ARCHITECTURES\\|Using CUDA architectures' {log_file} || true")


def step_build(args: argparse.Namespace, state: State) -> None:
    spec = build_spec(state["prepare"], args.jobs)
    gpus = gpus_from_fact(state["facts"]["facts.gpu.NvidiaGpus"].get("value") or [])
    architectures = plan.resolve_architectures(spec, gpus)
    spec_file = Path(args.workdir) / "build.json"
    spec_file.write_text(spec.model_dump_json())
    command, env = build_deploy_invocation(spec_file)
    result: Json = {"spec": spec.model_dump(mode="json"), "architectures": architectures, "runs": []}
    state["build"] = result
    for attempt in BUILD_ATTEMPTS:
        log(f"pyinfra -y @local build_deploy.py: {attempt} run")
        started = time.monotonic()
        code, out = run_pyinfra(command, extra_env=env, timeout=3600)
        seconds = time.monotonic() - started
        (Path(args.workdir) / f"pyinfra-build-{len(result['runs'])}.log").write_text(out)
        result["runs"].append(build_run_record(attempt, code, seconds, out))
        state["build"] = result
        log(f"{attempt}: exit {code} in {seconds:.0f} s")
        if code:
            raise RuntimeError(f"pyinfra build failed (exit {code}):\n{out[-3000:]}")
    code, out = sh(ninja_again_command(spec))
    result["ninja_again"] = ninja_again_record(code, out)
    code, out = sh(version_command())
    result["version"] = out.strip()[-600:]
    code, out = sh(current_command(spec))
    result["current"] = out
    state["build"] = result


# --------------------------------------------------------------------------- services


def model_record(path: str) -> Json:
    """What the state keeps of --model: path, sha256 (read once) and size."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"path": path, "sha256": digest, "size": Path(path).stat().st_size}


def model_file(info: Mapping[str, Any]) -> ModelFile:
    return ModelFile(path=info["path"], sha256=info["sha256"], architecture="llama")


def state_model_file(args: argparse.Namespace, state: State) -> ModelFile:
    """--model as a ModelFile, hashed on first use and recorded in the state."""
    if state["model"] is None:
        state["model"] = model_record(args.model)
    return model_file(state["model"])


def smoke_service(
    model: ModelFile,
    gpu: int,
    *,
    draft: bool,
    ctx: int = 4096,
    parallel: int = 1,
    min_tps: float = 50.0,
    extra_args: tuple[str, ...] = (),
) -> LlamaServer:
    """The SmolLM2 service pinned to `gpu`; with `draft`, the model drafts for itself (draft-simple, n-max 4)."""
    return LlamaServer(
        name=f"smollm2-gpu{gpu}{'-draft' if draft else ''}",
        gpus=(gpu,), model=model, model_draft=model if draft else None,
        spec_type="draft-simple" if draft else "none", spec_draft_n_max=4 if draft else None,
        ctx_size=ctx, n_gpu_layers="all", flash_attn="on", parallel=parallel, port=8180 + gpu, extra_args=extra_args,
        smoke=SmokeThresholds(min_tokens_per_second=min_tps, min_acceptance=0.5 if draft else None,
                              n_predict=128, runs=3, timeout_s=180, prompts=(CHAT_PROMPT,)),
    )


def parse_unit(text: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart's argv and the Environment= pairs of a rendered unit, unquoted as systemd does."""
    env: dict[str, str] = {}
    exec_parts: list[str] = []
    collecting = False
    for line in text.splitlines():
        if line.startswith("Environment="):
            for word in shlex.split(line[len("Environment="):]):
                key, _, value = word.partition("=")
                env[key] = value.replace("$$", "$").replace("%%", "%")
        elif line.startswith("ExecStart=") or collecting:
            part = line[len("ExecStart="):] if line.startswith("ExecStart=") else line
            collecting = part.endswith("\\")
            exec_parts.append(part[:-1] if collecting else part)
    argv = [word.replace("$$", "$").replace("%%", "%") for word in shlex.split(" ".join(exec_parts))]
    return argv, env


def install_prefix(server: Service) -> str:
    """Where the service's program is installed: llama.cpp's prefix, whisper.cpp's or piper's."""
    if isinstance(server, PiperServer):
        return PIPER_PREFIX
    return WHISPER_PREFIX if isinstance(server, WhisperServer) else PREFIX


def unit_command(
    server: Service, gpus: Sequence[Gpu] = (), binary: str | None = None
) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, unit text): what the rendered unit starts, checked against argv/server_environment.

    `gpus`: the host's GPU records (the NvidiaGpus fact's: UUID and minor number), as the unit operation
    renders with; the unit pins its GPUs by UUID. `binary`: the program the unit names (default: the
    service's program in its install's `current`, as the deploy renders it).
    """
    program = binary or server.binary(install_prefix(server))
    text = render_unit(server, program, gpus)
    argv, env = parse_unit(text)
    if argv != server.argv(program) or env != server_environment(server, gpus):
        raise RuntimeError(f"unit text does not parse back to the server's argv/server_environment:\n{text}")
    return argv, env, text


def process_env(base: Mapping[str, str], unit_env: Mapping[str, str]) -> dict[str, str]:
    """The server process's environment: `base` overlaid with the unit's Environment= (the GPU pinning)."""
    return {**base, **unit_env}


class Server:
    """A server (llama-server, whisper-server) started from its rendered unit's ExecStart and Environment=,
    logging to WORKDIR."""

    def __init__(
        self,
        server: Any,
        workdir: Path,
        tag: str,
        *,
        launch: tuple[list[str], dict[str, str], str] | None = None,
        gpus: Sequence[Gpu] = (),
        binary: str | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        """`launch`: (argv, environment, unit text) to start instead of the unit's (the isolation step's).

        `gpus`: the host's GPU records the unit is rendered with (`fact_gpu_records`). `binary`: the
        program the unit names, when it is not the install's `current` one (a plain cmake build's).
        `base_env`: the environment the unit's is laid over (default this process's; piper's leaves out
        PYTHONPATH, which points at the run's own wheels). `server` is a `Service` (typed Any: the steps
        read their own service type's fields from it).
        """
        self.server = server
        self.started = time.monotonic()
        self.argv, self.env, self.unit = launch or unit_command(server, gpus, binary)
        self.log_path = workdir / f"server-{tag}.log"
        self.log: IO[bytes] = open(self.log_path, "w+b")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.argv, env=process_env(os.environ if base_env is None else base_env, self.env), stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def wait_healthy(server: Server, timeout_s: float = 180) -> bool:
    def sleep(seconds: float) -> None:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.server.PROGRAM} exited {server.process.returncode}:\n"
                               f"{server.log_text()[-2500:]}")
        time.sleep(seconds)

    return wait_until_healthy(requests_transport(server.url), timeout_s, sleep=sleep, poll_interval_s=0.25).healthy


# --------------------------------------------------------------------------- smoke


def step_smoke(args: argparse.Namespace, state: State) -> None:
    facts = state["facts"]
    results: list[Json] = []
    state["smoke"] = results
    for draft in (False, True):
        idle = gpu_used_mib()
        servers = [Server(smoke_service(state_model_file(args, state), gpu, draft=draft), Path(args.workdir),
                          f"smoke-gpu{gpu}-{'draft' if draft else 'nodraft'}", gpus=fact_gpu_records(facts))
                   for gpu in gpu_indices(facts)]
        try:
            for server in servers:
                gpu = server.server.gpus[0]
                expected = {uuid_of(facts, gpu)}
                seen: Json = {}

                def probe(server: Server = server, seen: Json = seen) -> GpuProcesses:
                    apps = compute_apps()
                    seen["apps"] = [app.model_dump(mode="json") for app in apps]
                    return GpuProcesses(pid=server.process.pid, compute_apps=apps)

                assert server.server.smoke is not None
                result = run_smoke(requests_transport(server.url), server.server.smoke, gpu_probe=probe,
                                   expected_gpu_uuids=expected)
                used = gpu_used_mib()
                results.append({
                    "service": server.server.name, "gpu": gpu, "uuid": uuid_of(facts, gpu), "draft": draft,
                    "pid": server.process.pid, "environment": server.env, "argv": server.argv,
                    "unit": server.unit, "result": result.model_dump(mode="json"),
                    "table": rich_text(smoke_table(result)), "compute_apps": seen.get("apps"),
                    "gpu_used_mib_idle": idle, "gpu_used_mib_serving": used,
                })
                state["smoke"] = results
                log(f"smoke {server.server.name}: passed={result.passed} tok/s={result.tokens_per_second} "
                    f"acceptance={result.acceptance} failures={result.failures}")
        finally:
            for server in servers:
                server.stop()


# --------------------------------------------------------------------------- draft-mtp (tiny Gemma 4)

MTP_PROMPT = "The tiny Gemma says hello to its assistant."
MTP_N_PREDICT = 64
MTP_WARMUP_N_PREDICT = 8
MTP_CTX = 262144  # the seed's context; the tiny target's KV at q8_0 is a few tens of MiB
# What the server log must show: the drafter loaded as its own model, and its layers reading the
# target's KV cache (the gemma4-assistant share callback) instead of owning one.
MTP_LOG_PATTERNS = {
    "draft model loaded": r"loading draft model",
    "drafter shares the target's KV cache": r"llama_kv_cache: +layer +\d+: sharing with layer \d+",
}
MTP_LOG_CONTEXT = re.compile(
    r"loading (draft )?model|sharing with layer|draft|mtp|speculative|gemma4|offload|CUDA|KV buffer|"
    r"model buffer|n_ctx|flash|fit|splits", re.IGNORECASE,
)


def hashed_model_file(path: Path, architecture: str) -> ModelFile:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelFile(path=str(path), sha256=digest, architecture=architecture)


def mtp_service(target: ModelFile, assistant: ModelFile, gpu: int) -> LlamaServer:
    """The seed's recipe shape for the tiny Gemma 4 pair, pinned to `gpu`."""
    return LlamaServer(
        name=f"tiny-gemma4-mtp-gpu{gpu}", gpus=(gpu,),
        model=target, model_draft=assistant,
        spec_type="draft-mtp", spec_draft_n_max=3, spec_draft_ngl=99, ctx_size=MTP_CTX, n_gpu_layers=99,
        cache_type_k="q8_0", cache_type_v="q8_0", parallel=1, flash_attn="on", fit="off", metrics=True,
        port=8190 + gpu,
    )


def mtp_completion_body(n_predict: int) -> Json:
    return {"prompt": MTP_PROMPT, "n_predict": n_predict, "temperature": 0, "ignore_eos": True, "cache_prompt": False}


def spec_metric_lines(text: str) -> list[str]:
    """The speculative-decoding samples of a /metrics page."""
    return [line for line in text.splitlines()
            if not line.startswith("#") and ("spec" in line or "draft" in line)]


def metrics_lines(url: str) -> list[str]:
    return spec_metric_lines(requests.get(f"{url}/metrics", timeout=10).text)


def mtp_log_record(log_text: str) -> Json:
    """The server log's lines the mtp step keeps: per MTP_LOG_PATTERNS, the loading context, the tail."""
    lines = log_text.splitlines()
    return {
        "log_found": {name: [line for line in lines if re.search(pattern, line)][:12]
                      for name, pattern in MTP_LOG_PATTERNS.items()},
        "log_context": [line for line in lines if MTP_LOG_CONTEXT.search(line) and "print_timing" not in line][:60],
        "log_tail": lines[-15:],
    }


def metrics_delta(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> dict[str, float] | None:
    """How far the /metrics spec-decode counters moved; None when /metrics lacks them."""
    if after is None:
        return None
    return {
        "draft_tokens": after["draft_tokens"] - (before["draft_tokens"] if before else 0.0),
        "accepted_tokens": after["accepted_tokens"] - (before["accepted_tokens"] if before else 0.0),
    }


def mtp_failures(result: Mapping[str, Any]) -> list[str]:
    failures: list[str] = []
    timings = result.get("timings") or {}
    if timings.get("predicted_n") != MTP_N_PREDICT:
        failures.append(f"predicted_n {timings.get('predicted_n')} != {MTP_N_PREDICT}")
    if not (timings.get("draft_n") or 0) > 0:
        failures.append(f"no tokens drafted: draft_n={timings.get('draft_n')}")
    for name, found in (result.get("log_found") or {}).items():
        if not found:
            failures.append(f"the server log lacks: {name}")
    delta = metrics_delta(result.get("metrics_before"), result.get("metrics_after"))
    if delta is None:
        failures.append("/metrics lacks the spec-decode counters")
    else:
        drafted, accepted = delta["draft_tokens"], delta["accepted_tokens"]
        if (drafted, accepted) != (timings.get("draft_n"), timings.get("draft_n_accepted")):
            failures.append(f"/metrics moved by {drafted:g} drafted / {accepted:g} accepted, timings say "
                            f"{timings.get('draft_n')} / {timings.get('draft_n_accepted')}")
    if not result.get("residency_checked"):
        failures.append("nvidia-smi lists no compute app for the server's pid")
    failures.extend(result.get("residency_failures") or [])
    return failures


def gguf_file_record(path: Path) -> Json:
    header = read_gguf_header(path)
    return {
        "path": str(path), "size": path.stat().st_size, "architecture": header.architecture,
        "block_count": header.block_count, "embedding_length": header.arch_get("embedding_length"),
    }


def step_mtp(args: argparse.Namespace, state: State) -> None:
    vocab = Path(args.vocab)
    if not vocab.is_file():
        raise RuntimeError(f"{vocab} is missing: ship llama.cpp's models/ggml-vocab-gemma-4.gguf (--vocab)")
    result: Json = {"vocab": str(vocab), "vocab_size": vocab.stat().st_size, "failures": []}
    state["mtp"] = result
    started = time.monotonic()
    target, assistant = write_tiny_gemma4(Path(args.workdir) / "tiny-gemma4", seed=0, vocab_gguf=vocab)
    result["write_seconds"] = round(time.monotonic() - started, 2)
    result["files"] = [gguf_file_record(path) for path in (target, assistant)]
    gpu = gpu_indices(state["facts"])[0]
    uuid = uuid_of(state["facts"], gpu)
    service = mtp_service(hashed_model_file(target, "gemma4"), hashed_model_file(assistant, "gemma4-assistant"), gpu)
    idle = gpu_used_mib()
    server = Server(service, Path(args.workdir), f"mtp-gpu{gpu}", gpus=fact_gpu_records(state["facts"]))
    result.update({"service": service.name, "gpu": gpu, "uuid": uuid, "pid": server.process.pid,
                   "argv": server.argv, "environment": server.env, "unit": server.unit, "gpu_used_mib_idle": idle})
    state["mtp"] = result
    try:
        started = time.monotonic()
        result["healthy"] = wait_healthy(server)
        result["load_seconds"] = round(time.monotonic() - started, 2)
        if not result["healthy"]:
            raise RuntimeError(f"not healthy:\n{server.log_text()[-2500:]}")
        transport = requests_transport(server.url)
        warm = requests.post(f"{server.url}/completion", json=mtp_completion_body(MTP_WARMUP_N_PREDICT), timeout=300)
        result["warmup_timings"] = warm.json().get("timings") if warm.ok else warm.text[-500:]
        before = read_spec_counters(transport)
        started = time.monotonic()
        response = requests.post(f"{server.url}/completion", json=mtp_completion_body(MTP_N_PREDICT), timeout=300)
        result["wall_seconds"] = round(time.monotonic() - started, 3)
        if not response.ok:
            raise RuntimeError(f"/completion answered {response.status_code}: {response.text[-1000:]}")
        answer = response.json()
        timings = answer["timings"]
        after = read_spec_counters(transport)
        apps = compute_apps()
        result["compute_apps"] = [app.model_dump(mode="json") for app in apps]
        result["gpu_used_mib_serving"] = gpu_used_mib()
        result["residency_failures"] = check_gpu_residency(server.process.pid, {uuid}, apps)
        result["residency_checked"] = any(app.pid == server.process.pid for app in apps)
        result["timings"] = timings
        result["content_head"] = answer.get("content", "")[:200]
        result["metrics_before"] = before.model_dump() if before else None
        result["metrics_after"] = after.model_dump() if after else None
        result["metrics_lines"] = metrics_lines(server.url)
    finally:
        server.stop()
        result.update(mtp_log_record(server.log_path.read_text(errors="replace")))
        state["mtp"] = result
    delta = metrics_delta(result.get("metrics_before"), result.get("metrics_after"))
    if delta is not None:
        result["metrics_delta"] = delta
    failures = mtp_failures(result)
    result["failures"] = failures
    result["passed"] = not failures
    state["mtp"] = result
    log(f"mtp: passed={not failures} draft_n={timings.get('draft_n')} accepted={timings.get('draft_n_accepted')} "
        f"tok/s={timings.get('predicted_per_second')} failures={failures}")
    if failures:
        raise RuntimeError("draft-mtp check failed: " + "; ".join(failures))


# --------------------------------------------------------------------------- bench

BENCH_N_PREDICT = 128


def bench_configs() -> list[bench.BenchConfig]:
    """parallel 1 and 4, drafter off and on with n-max 1..4, short and long prompts."""
    return bench.sweep((1, 4), True, (1, 2, 3, 4), ("short", "long"))


def bench_bandwidth(nvml: Sequence[Mapping[str, Any]]) -> float | None:
    """GPU 0's NVML peak memory bandwidth in bytes/s (the roofline's numerator); None without NVML."""
    return float(nvml[0]["peak_memory_bandwidth_tb_s"]) * 1e12 if nvml else None


def step_bench(args: argparse.Namespace, state: State) -> None:
    service = smoke_service(state_model_file(args, state), gpu_indices(state["facts"])[0], draft=True)
    configs = bench_configs()
    n_predict = BENCH_N_PREDICT
    long_tokens = bench.long_prompt_tokens(service.ctx_size, 4, n_predict)
    bandwidth = bench_bandwidth(state["facts"].get("nvml") or [])
    bytes_per_token = state["model"]["size"]
    roofline = bench.roofline_tokens_per_second(bandwidth, bytes_per_token) if bandwidth else None
    done: list[Json] = []

    def progress(measurement: bench.BenchMeasurement) -> None:
        done.append(measurement.model_dump(mode="json"))
        state["bench"] = {"results": done, "partial": True}
        log(f"bench {measurement.config.label}: {measurement.single_tokens_per_second:.1f} single, "
            f"{measurement.aggregate_tokens_per_second:.1f} aggregate, acceptance {measurement.acceptance}")

    started = time.monotonic()
    results = bench.bench_local(
        service, binary_path(PREFIX), configs, n_predict=n_predict, long_tokens=long_tokens,
        single_runs=3, aggregate_rounds=2, roofline=roofline, progress=progress, log_dir=Path(args.workdir),
    )
    report = bench.BenchReport(target=service.name, objective="single", n_predict=n_predict,
                               bandwidth_bytes_per_s=bandwidth, bytes_per_token=bytes_per_token, results=results)
    state["bench"] = {
        "report": report.model_dump(mode="json"), "table": rich_text(bench.bench_table(report)),
        "seconds": round(time.monotonic() - started, 1), "advice": bench.parallel_speculation_advice(report),
    }


# --------------------------------------------------------------------------- vram

VRAM_CONTEXTS = (4096, 65536)
# -lv 4: this llama-server logs its buffer sizes only at verbosity 4 (its default is 3).
VRAM_EXTRA_ARGS = ("-lv", "4")


def gpu_logged(lines: Iterable[Sequence[Any]]) -> dict[str, float]:
    """MiB per kind of the buffers on CUDA devices (CUDA0, CUDA1...), not CUDA_Host pinned memory."""
    listed = [tuple(line) for line in lines]
    kinds = ("model", "KV", "compute", "output", "RS")
    return {kind: sum(mib for k, device, mib in listed if k == kind and re.fullmatch(r"CUDA[0-9]+", device))
            for kind in kinds}


def vram_row(
    ctx: int,
    draft: bool,
    healthy: bool,
    estimate: ServicePlan,
    own_apps: Sequence[ComputeApp],
    apps_on_gpu: Sequence[ComputeApp],
    gpu_used_delta_mib: int,
    breakdown_lines: Sequence[tuple[str, str, float]],
) -> Json:
    """One server's estimate vs measurement: the process's memory (nvidia-smi), else the GPU's delta over idle."""
    logged = gpu_logged(breakdown_lines)
    logged_total = sum(logged.values())
    process_mib = sum(app.used_memory_mib or 0 for app in own_apps) if own_apps else None
    measured = process_mib if process_mib else gpu_used_delta_mib
    estimate_mib = estimate.gpu_total / MIB
    return {
        "ctx": ctx, "draft": draft, "healthy": healthy,
        "estimate_mib": round(estimate_mib, 1),
        "estimate_terms_mib": {k: round(v / MIB, 1) for k, v in estimate.terms().items()},
        "kv_cells": str(estimate.kv_cells),
        "process_mib": process_mib, "gpu_used_delta_mib": gpu_used_delta_mib, "measured_mib": measured,
        "gap_mib": round(estimate_mib - measured, 1),
        "gap_pct": round(100 * (estimate_mib - measured) / measured, 1) if measured else None,
        "logged_cuda_mib": {k: round(v, 2) for k, v in logged.items()},
        "logged_cuda_total_mib": round(logged_total, 1),
        "measured_minus_logged_mib": round(measured - logged_total, 1),
        "breakdown_lines": [list(line) for line in breakdown_lines],
        "compute_apps_on_gpu": [app.model_dump(mode="json") for app in apps_on_gpu],
    }


def step_vram(args: argparse.Namespace, state: State) -> None:
    header = load_model_header(args.model)
    gpu = gpu_indices(state["facts"])[0]
    uuid = uuid_of(state["facts"], gpu)
    rows: list[Json] = []
    state["vram"] = rows
    for ctx in VRAM_CONTEXTS:
        for draft in (False, True):
            service = smoke_service(state_model_file(args, state), gpu, draft=draft, ctx=ctx,
                                    extra_args=VRAM_EXTRA_ARGS)
            estimate = plan_service(service, header, header if draft else None)
            idle = gpu_used_mib()[gpu]
            server = Server(service, Path(args.workdir), f"vram-{ctx}-{'draft' if draft else 'nodraft'}",
                            gpus=fact_gpu_records(state["facts"]))
            try:
                healthy = wait_healthy(server)
                time.sleep(1.0)
                apps = [app for app in compute_apps() if app.gpu_uuid == uuid]
                own = [app for app in apps if app.pid == server.process.pid]
                used = gpu_used_mib()[gpu]
                breakdown = parse_memory_breakdown(server.log_text())
            finally:
                server.stop()
            row = vram_row(ctx, draft, healthy, estimate, own, apps, used - idle, breakdown.lines)
            rows.append(row)
            state["vram"] = rows
            log(f"vram ctx={ctx} draft={draft}: estimate {estimate.gpu_total / MIB:.0f} MiB, measured "
                f"{row['measured_mib']} MiB (process {row['process_mib']}, delta {row['gpu_used_delta_mib']}), "
                f"logged {sum(gpu_logged(breakdown.lines).values()):.0f} MiB")


# --------------------------------------------------------------------------- GPU isolation (two GPUs)
#
# The GPU wall of a service's unit (DevicePolicy=closed + DeviceAllow= its /dev/nvidia<minor>,
# /dev/nvidiactl, /dev/nvidia-uvm; CUDA_VISIBLE_DEVICES=<uuid>) proved without systemd: a mount
# namespace (`unshare -m`) bind-mounts over every NVIDIA node the unit leaves out, then execs the server.
# `null` hides a node behind /dev/null (it opens, every ioctl fails); `nodev` behind a copy of the node on
# a nodev tmpfs (open fails with EACCES, as the device cgroup's EPERM does). MDWE is the kernel's
# PR_SET_MDWE (what MemoryDenyWriteExecute= asks for), set by a wrapper that then execs the server.

ISOLATION_STEP_NAMES = ("isobuild", "isolation")
ISO_FLAVORS = {"sm90": "90", "ptx80": "80-virtual"}  # flavor -> CMAKE_CUDA_ARCHITECTURES
ISO_KERNEL_GENCODE = {"sm90": "arch=compute_90,code=sm_90", "ptx80": "arch=compute_80,code=compute_80"}
ISO_PORT = 8280
ISO_NODEV_DIR = "/run/gpubox-nodev"
ISO_PTX_TIMEOUT_S = 200.0  # the PTX-only build's server: the driver JIT-compiles at load
NO_USABLE_GPU = "no usable GPU found"
ISO_LOG_PATTERN = re.compile(
    r"no usable GPU|ggml_cuda_init|CUDA|Device \d+:|offload|model buffer|error|fail|warning: no|cudaMalloc",
    re.IGNORECASE,
)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
MDWE_CODE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "u = ctypes.c_ulong\n"
    f"if libc.prctl(ctypes.c_int({PR_SET_MDWE}), u({PR_MDWE_REFUSE_EXEC_GAIN}), u(0), u(0), u(0)) != 0:\n"
    "    raise OSError(ctypes.get_errno(), 'prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
# Run under MDWE: an anonymous writable+executable mapping must be refused (the inheritance across exec).
WX_MAP_CODE = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC); print('W+X')"
NODE_CHECK_CODE = (
    "import errno, json, os, sys\n"
    "out = {}\n"
    "for path in sys.argv[1:]:\n"
    "    try:\n"
    "        fd = os.open(path, os.O_RDWR)\n"
    "    except OSError as e:\n"
    "        out[path] = errno.errorcode.get(e.errno, str(e.errno))\n"
    "        continue\n"
    "    rdev = os.fstat(fd).st_rdev\n"
    "    os.close(fd)\n"
    "    out[path] = f'opens {os.major(rdev)}:{os.minor(rdev)}'\n"
    "print(json.dumps(out))\n"
)
KERNEL_SOURCE = r"""#include <cstdio>
#include <cuda_runtime.h>
__global__ void add_index(int *x) { x[threadIdx.x] += threadIdx.x + 1; }
int main() {
    int host[32] = {0};
    int *dev = nullptr;
    cudaError_t e = cudaMalloc(&dev, sizeof host);
    if (e != cudaSuccess) { printf("cudaMalloc: %s\n", cudaGetErrorString(e)); return 2; }
    cudaMemcpy(dev, host, sizeof host, cudaMemcpyHostToDevice);
    add_index<<<1, 32>>>(dev);
    e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) { printf("kernel: %s\n", cudaGetErrorString(e)); return 3; }
    cudaMemcpy(host, dev, sizeof host, cudaMemcpyDeviceToHost);
    int sum = 0;
    for (int v : host) sum += v;
    printf("ok sum=%d (expected 528)\n", sum);
    return sum == 528 ? 0 : 4;
}
"""


@dataclass(frozen=True)
class IsolationCase:
    """One server start: the service is for GPU `gpu` (nvidia-smi index); how it is pinned and walled."""

    name: str
    gpu: int
    pin: str  # "uuid" (the unit's) or "index"
    hide: str  # "null", "nodev" or "none" (no wall)
    mdwe: bool = False
    flavor: str = "sm90"
    what: str = ""


ISOLATION_CASES = (
    IsolationCase("a", 1, "uuid", "null", what="the unit's wall and pin: GPU 1's node only, CUDA_VISIBLE_DEVICES=uuid"),
    IsolationCase("b", 1, "index", "null", what="the same wall, pinned by index: CUDA_VISIBLE_DEVICES=1"),
    IsolationCase("d-sm90", 1, "uuid", "null", mdwe=True, what="case a under PR_SET_MDWE (sm_90 SASS build)"),
    IsolationCase("a-nodev", 1, "uuid", "nodev", what="case a, hidden nodes fail to open (EACCES)"),
    IsolationCase("b-nodev", 1, "index", "nodev", what="case b, hidden nodes fail to open (EACCES)"),
    IsolationCase("index-nowall", 1, "index", "none", what="no wall, CUDA_VISIBLE_DEVICES=1 (today's units)"),
    IsolationCase("gpu0-uuid", 0, "uuid", "null", what="GPU 0's service: GPU 0's node only, pinned by uuid"),
    IsolationCase("gpu0-index", 0, "index", "null", what="GPU 0's service: GPU 0's node only, pinned by index 0"),
    IsolationCase("d-ptx80-mdwe", 1, "uuid", "null", mdwe=True, flavor="ptx80",
                  what="case a, PTX-only build (80-virtual): the driver must JIT, under PR_SET_MDWE"),
    IsolationCase("d-ptx80", 1, "uuid", "null", flavor="ptx80", what="the PTX-only build without MDWE (control)"),
)


def iso_build_dir(workdir: Path, flavor: str) -> Path:
    return workdir / f"iso-{flavor}"


def iso_binary(workdir: Path, flavor: str) -> Path:
    return iso_build_dir(workdir, flavor) / "bin" / "llama-server"


def iso_kernel_binary(workdir: Path, flavor: str) -> Path:
    return workdir / f"iso-kernel-{flavor}"


def iso_build_spec(prepared: Mapping[str, Any], jobs: int) -> LlamaCppBuild:
    return LlamaCppBuild(
        repo=prepared["repo"], commit=prepared["commit"], cuda="on", prefix=PREFIX, targets=("llama-server",),
        jobs=jobs, extra_cmake_args=("-DLLAMA_OPENSSL=OFF",),
    )


def iso_build_script(src: Path, build_dir: Path, architectures: str, jobs: int, spec: LlamaCppBuild) -> str:
    """`cmake` configure (gpubox's own arguments, no ccache) then `cmake --build --target llama-server`."""
    configure = plan.cmake_configure_args(spec, "cuda", [architectures], ccache=False)
    configure[configure.index("-S") + 1] = str(src)
    configure[configure.index("-B") + 1] = str(build_dir)
    build = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)]
    return f"{shlex.join(configure)} && {shlex.join(build)}"


def kernel_compile_command(source: Path, out: Path, flavor: str) -> list[str]:
    return ["nvcc", "-O2", "-gencode", ISO_KERNEL_GENCODE[flavor], "-o", str(out), str(source)]


def fatbin_summary(text: str) -> dict[str, list[str]]:
    """`cuobjdump --list-elf` / `--list-ptx` output -> the architectures of its cubins (SASS) and PTX."""
    elf = sorted(set(re.findall(r"\.(sm_\d+[af]?)\.cubin", text)))
    ptx = sorted(set(re.findall(r"\.(sm_\d+[af]?|compute_\d+[af]?)\.ptx", text)))
    return {"sass": elf, "ptx": ptx}


def unit_device_allow(text: str) -> list[str]:
    """The device nodes of a rendered unit's `DeviceAllow=` lines."""
    return [line[len("DeviceAllow="):].split()[0] for line in text.splitlines() if line.startswith("DeviceAllow=")]


def design_device_allow(gpu: Gpu) -> list[str]:
    """What the unit allows a one-GPU service: its GPU's node (by minor number) and the two shared ones."""
    if gpu.minor_number is None:
        raise ValueError(f"GPU {gpu.index} has no minor number: its device node is unknown")
    return ["/dev/nvidiactl", "/dev/nvidia-uvm", f"/dev/nvidia{gpu.minor_number}"]


def hidden_nodes(present: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The NVIDIA device nodes the wall leaves out: every present one not allowed."""
    allowed_set = set(allowed)
    return sorted(node for node in present if node not in allowed_set)


def pin_value(gpu: Gpu, pin: str) -> str:
    return gpu.uuid if pin == "uuid" else str(gpu.index)


def hide_script(hidden: Sequence[str], method: str, rdev: Mapping[str, tuple[int, int]]) -> str:
    """Shell run inside `unshare -m`: cover each hidden node, then exec "$@" (the pid stays the server's)."""
    lines = ["set -e"]
    if method == "nodev" and hidden:
        lines += [f"mkdir -p {ISO_NODEV_DIR}", f"mount -t tmpfs -o nodev,mode=0755 gpubox-nodev {ISO_NODEV_DIR}"]
    for number, node in enumerate(hidden):
        if method == "null":
            lines.append(f"mount --bind /dev/null {shlex.quote(node)}")
        elif method == "nodev":
            major, minor = rdev[node]
            copy = f"{ISO_NODEV_DIR}/n{number}"
            lines += [f"mknod {copy} c {major} {minor}", f"mount --bind {copy} {shlex.quote(node)}"]
        else:
            raise ValueError(f"unknown hiding method {method!r}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def isolated_argv(script: str, argv: Sequence[str]) -> list[str]:
    """`argv` run in a private mount namespace after `script` (unshare execs, so the pid is argv's)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "gpubox-wall", *argv]


def mdwe_argv(argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """`argv` exec'd under PR_SET_MDWE (PR_MDWE_REFUSE_EXEC_GAIN): what MemoryDenyWriteExecute=yes asks for."""
    return [python, "-c", MDWE_CODE, *argv]


def case_launch(
    case: IsolationCase,
    unit_argv: Sequence[str],
    unit_env: Mapping[str, str],
    gpu: Gpu,
    hidden: Sequence[str],
    rdev: Mapping[str, tuple[int, int]],
    binary: str,
) -> tuple[list[str], dict[str, str]]:
    """The case's argv (wall, MDWE, then the unit's ExecStart on `binary`) and environment (the unit's, re-pinned)."""
    argv = [binary, *unit_argv[1:]]
    if case.mdwe:
        argv = mdwe_argv(argv)
    if case.hide != "none":
        argv = isolated_argv(hide_script(hidden, case.hide, rdev), argv)
    env = {**unit_env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": pin_value(gpu, case.pin)}
    if case.flavor != "sm90":
        env["CUDA_CACHE_DISABLE"] = "1"  # the driver JIT-compiles the PTX every time, from no cache
    return argv, env


def held_mib(pid: int, apps: Iterable[ComputeApp]) -> dict[str, int | None]:
    """GPU uuid -> MiB the process holds there (nvidia-smi's compute apps)."""
    held: dict[str, int | None] = {}
    for app in apps:
        if app.pid == pid:
            before = held.get(app.gpu_uuid, 0)
            held[app.gpu_uuid] = None if before is None or app.used_memory_mib is None else before + app.used_memory_mib
    return held


def iso_log_lines(text: str, limit: int = 25) -> list[str]:
    return [line for line in text.splitlines() if ISO_LOG_PATTERN.search(line)][:limit]


def case_outcome(record: Mapping[str, Any]) -> str:
    """Where the case's server ran, in words: `GPU <index>`, `CPU (no usable GPU)`, `did not serve`, ..."""
    if not record.get("healthy"):
        return "did not serve"
    held = record.get("held_mib") or {}
    on = [gpu for gpu, uuid in (record.get("uuids") or {}).items() if uuid in held]
    if on:
        return "GPU " + ",".join(str(gpu) for gpu in on)
    if any(NO_USABLE_GPU in line for line in record.get("log_lines") or []):
        return "CPU (no usable GPU)"
    return "CPU"


def present_nvidia_nodes() -> list[str]:
    """The NVIDIA character devices under /dev (the GPUs', nvidiactl, nvidia-uvm*, nvidia-modeset, caps)."""
    paths = [*Path("/dev").glob("nvidia*"), *Path("/dev/nvidia-caps").glob("*")]
    return sorted(str(path) for path in paths if path.is_char_device())


def node_rdev(paths: Iterable[str]) -> dict[str, tuple[int, int]]:
    return {path: (os.major(os.stat(path).st_rdev), os.minor(os.stat(path).st_rdev)) for path in paths}


def step_isobuild(args: argparse.Namespace, state: State) -> None:
    """Plain cmake builds of llama-server for the isolation step (sm_90 SASS, PTX only), side by side."""
    workdir = Path(args.workdir)
    src = Path(state["prepare"]["src"])
    spec = iso_build_spec(state["prepare"], args.jobs)
    result: Json = {"builds": {}, "kernels": {}}
    state["isobuild"] = result
    source = workdir / "iso-kernel.cu"
    source.write_text(KERNEL_SOURCE)
    for flavor in ISO_FLAVORS:
        code, out = sh(kernel_compile_command(source, iso_kernel_binary(workdir, flavor), flavor))
        result["kernels"][flavor] = {"exit": code, "output": out[-1500:], "command": kernel_compile_command(
            source, iso_kernel_binary(workdir, flavor), flavor)}
    running: dict[str, tuple[subprocess.Popen[bytes], float, Path]] = {}
    for flavor, architectures in ISO_FLAVORS.items():
        script = iso_build_script(src, iso_build_dir(workdir, flavor), architectures, args.jobs, spec)
        log_file = workdir / f"iso-build-{flavor}.log"
        with open(log_file, "wb") as sink:
            process = subprocess.Popen(script, shell=True, stdout=sink, stderr=subprocess.STDOUT)
        running[flavor] = (process, time.monotonic(), log_file)
        result["builds"][flavor] = {"architectures": architectures, "command": script}
    for flavor, (process, started, log_file) in running.items():
        code = process.wait()
        record = result["builds"][flavor]
        record.update({"exit": code, "seconds": round(time.monotonic() - started, 1),
                       "output_tail": log_file.read_text(errors="replace")[-2500:]})
        lib = iso_build_dir(workdir, flavor) / "bin" / "libggml-cuda.so"
        if code == 0 and lib.exists():
            quoted = shlex.quote(str(lib))
            _, listing = sh(f"cuobjdump --list-elf {quoted}; cuobjdump --list-ptx {quoted}")
            record["fatbin"] = fatbin_summary(listing)
        state["isobuild"] = result
        log(f"isobuild {flavor}: exit {code} in {record['seconds']} s {record.get('fatbin')}")
    failed = [flavor for flavor, record in result["builds"].items() if record["exit"] and flavor == "sm90"]
    if failed:
        raise RuntimeError(f"the sm90 build failed:\n{result['builds']['sm90']['output_tail']}")


def run_wrapped(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 120) -> Json:
    started = time.monotonic()
    try:
        code, out = sh(list(argv), env={**os.environ, **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"argv": list(argv), "exit": None, "output": f"timed out after {timeout:g} s"}
    return {"argv": list(argv), "exit": code, "output": out[-1500:], "seconds": round(time.monotonic() - started, 2)}


def run_isolation_case(
    case: IsolationCase,
    args: argparse.Namespace,
    gpus: Sequence[Gpu],
    model: ModelFile,
    present: Sequence[str],
    rdev: Mapping[str, tuple[int, int]],
) -> Json:
    workdir = Path(args.workdir)
    gpu = next(g for g in gpus if g.index == case.gpu)
    service = smoke_service(model, case.gpu, draft=False).model_copy(update={"port": ISO_PORT})
    record: Json = {"case": case.name, "what": case.what, "gpu": case.gpu, "pin": case.pin, "hide": case.hide,
                    "mdwe": case.mdwe, "flavor": case.flavor, "uuids": {g.index: g.uuid for g in gpus}}
    try:
        unit = render_unit(service, binary_path(PREFIX), gpus)
        unit_argv, unit_env = parse_unit(unit)
        allowed = unit_device_allow(unit)
        record["wall_from"] = "render_unit"
    except Exception as error:  # noqa: BLE001 - the unit module is another engineer's work in progress
        unit = render_unit(service, binary_path(PREFIX))
        unit_argv, unit_env = parse_unit(unit)
        allowed = design_device_allow(gpu)
        record["wall_from"] = f"the design (render_unit with GPU records failed: {error})"
    record["unit_device_allow"] = allowed
    record["unit_environment"] = unit_env
    hidden = hidden_nodes(present, allowed) if case.hide != "none" else []
    record["hidden"] = hidden
    binary = iso_binary(workdir, case.flavor)
    if not binary.exists():
        record["skipped"] = f"{binary} was not built"
        return record
    argv, env = case_launch(case, unit_argv, unit_env, gpu, hidden, rdev, str(binary))
    record["environment"] = {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_CACHE_DISABLE")
                             if k in env}
    if case.hide != "none":
        check = run_wrapped(isolated_argv(hide_script(hidden, case.hide, rdev),
                                          [sys.executable, "-c", NODE_CHECK_CODE, *present]))
        try:
            record["nodes_seen"] = json.loads(check["output"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            record["nodes_seen"] = check
    server = Server(service, workdir, f"iso-{case.name}", launch=(argv, env, unit))
    record.update({"pid": server.process.pid, "argv": argv})
    started = time.monotonic()
    try:
        timeout = ISO_PTX_TIMEOUT_S if case.flavor != "sm90" else 120.0
        try:
            record["healthy"] = wait_healthy(server, timeout)
        except RuntimeError as error:
            record["healthy"] = False
            record["exited"] = str(error)[-1500:]
        record["load_seconds"] = round(time.monotonic() - started, 1)
        if record["healthy"]:
            seen: Json = {}

            def probe() -> GpuProcesses:
                apps = compute_apps()
                seen["apps"] = [app.model_dump(mode="json") for app in apps]
                seen["held"] = held_mib(server.process.pid, apps)
                return GpuProcesses(pid=server.process.pid, compute_apps=apps)

            assert service.smoke is not None
            result = run_smoke(requests_transport(server.url), service.smoke, gpu_probe=probe,
                               expected_gpu_uuids={gpu.uuid})
            record["smoke"] = {"passed": result.passed, "failures": result.failures,
                               "tokens_per_second": result.tokens_per_second, "gpu_failures": result.gpu_failures}
            record["smoke_table"] = rich_text(smoke_table(result))
            record["compute_apps"] = seen.get("apps")
            record["held_mib"] = seen.get("held")
            record["gpu_used_mib"] = gpu_used_mib()
    finally:
        server.stop()
        log_text = server.log_path.read_text(errors="replace")
        record["log_lines"] = iso_log_lines(log_text)
        record["log_tail"] = log_text.splitlines()[-12:]
    record["outcome"] = case_outcome(record)
    return record


def step_isolation(args: argparse.Namespace, state: State) -> None:
    """The GPU wall on two GPUs: which GPU each pinned, walled server runs on; the smoke's verdict; MDWE."""
    started = time.monotonic()
    _, probe_output = sh(gpu_probe_command())
    gpus = parse_gpu_probe(probe_output.splitlines())
    present = present_nvidia_nodes()
    rdev = node_rdev(present)
    _, listing = sh("ls -l /dev/nvidia* /dev/nvidia-caps 2>&1; uname -r; unshare --version")
    result: Json = {
        "probe_command": gpu_probe_command(), "probe_output": probe_output,
        "gpus": [gpu.to_json() for gpu in gpus], "nodes": {node: list(rdev[node]) for node in present},
        "node_listing": listing, "cases": [], "checks": {},
    }
    state["isolation"] = result
    if len(gpus) < 2:
        raise RuntimeError(f"the isolation step needs two GPUs, this machine has {len(gpus)}")
    # MDWE itself: refused W+X mapping after the wrapper's exec; the tiny CUDA program with and without.
    checks = result["checks"]
    checks["wx_map_plain"] = run_wrapped([sys.executable, "-c", WX_MAP_CODE])
    checks["wx_map_mdwe"] = run_wrapped(mdwe_argv([sys.executable, "-c", WX_MAP_CODE]))
    workdir = Path(args.workdir)
    pin = {"CUDA_VISIBLE_DEVICES": gpus[1].uuid, "CUDA_CACHE_DISABLE": "1"}
    for flavor in ISO_FLAVORS:
        binary = iso_kernel_binary(workdir, flavor)
        if binary.exists():
            checks[f"kernel_{flavor}_plain"] = run_wrapped([str(binary)], pin)
            checks[f"kernel_{flavor}_mdwe"] = run_wrapped(mdwe_argv([str(binary)]), pin)
    state["isolation"] = result
    model = state_model_file(args, state)
    for case in ISOLATION_CASES:
        if time.monotonic() - started > args.iso_deadline:
            result["cases"].append({"case": case.name, "what": case.what, "skipped": "out of time"})
            continue
        log(f"isolation case {case.name}: {case.what}")
        try:
            record = run_isolation_case(case, args, gpus, model, present, rdev)
        except Exception:  # noqa: BLE001 - recorded; the next case still runs
            record = {"case": case.name, "what": case.what, "error": traceback.format_exc()[-2500:]}
        result["cases"].append(record)
        state["isolation"] = result
        log(f"isolation case {case.name}: {record.get('outcome')} held={record.get('held_mib')} "
            f"smoke={record.get('smoke')}")


# --------------------------------------------------------------------------- whisper-server (speech to text)
#
# whisper.cpp is built by the product's own scripts: gpubox.build.fetch_script clones the pinned commit into
# {prefix}/src, gpubox.build.build_script(WhisperCppBuild, "cuda", ...) configures, builds, installs into
# builds/, writes the gpubox-build.json stamp and switches `current`. whisper-server then runs from its
# rendered unit (render_unit with the probe's GPU records: CUDA_VISIBLE_DEVICES=<uuid>), like the llama
# services above.

WHISPER_PORT = 8090
WHISPER_GPU = 1  # the seed's speech GPU (inventory/home.py); GPU 0 on a one-GPU machine
WHISPER_RUNS = 3
WHISPER_MODEL_ARCHITECTURE = "tiny.en"
WHISPER_MAX_WER = 0.2
WHISPER_MAX_RTF = 0.5  # the seed's TranscriptionSmoke(max_real_time_factor=0.5)
WHISPER_REQUEST_TIMEOUT_S = 120.0
# whisper.cpp's own log of what it allocates (src/whisper.cpp: whisper_model_load, whisper_init_state), in MB
# of 10^6 bytes: "model size    =   77.11 MB", "kv self size  =    3.15 MB", "compute buffer (conv)   = ...".
WHISPER_BUFFER_RE = re.compile(
    r"(model\s+size|kv\s+(?:self|cross|pad)\s+size|compute buffer \((?:conv|encode|cross|decode)\))"
    r"\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*MB"
)
WHISPER_LOG_PATTERN = re.compile(
    r"ggml_cuda_init|CUDA|backend|GPU|Device \d|flash|model size|kv \w+\s+size|compute buffer|error|fail|"
    r"listening|system_info",
    re.IGNORECASE,
)


def whisper_build_spec(prepared: Mapping[str, Any], jobs: int) -> WhisperCppBuild:
    """The deploy's whisper.cpp build of the prepared tree at its pinned commit: CUDA, whisper-server."""
    return WhisperCppBuild(repo=prepared["repo"], commit=prepared["commit"], cuda="on", prefix=WHISPER_PREFIX,
                           jobs=jobs)


def whisper_gpu(indices: Sequence[int]) -> int:
    """The GPU whisper-server is pinned to: GPU 1, as in the seed, or the only one."""
    return WHISPER_GPU if WHISPER_GPU in indices else indices[-1]


def whisper_model_file(info: Mapping[str, Any]) -> ModelFile:
    return ModelFile(path=info["path"], sha256=info["sha256"], format="ggml-whisper",
                     architecture=WHISPER_MODEL_ARCHITECTURE)


def whisper_service(model: ModelFile, gpu: int, port: int = WHISPER_PORT) -> WhisperServer:
    """The seed's whisper service (English, flash attention, its smoke thresholds) with tiny.en, pinned to `gpu`."""
    return WhisperServer(
        name=f"whisper-gpu{gpu}", gpus=(gpu,), model=model, language="en", flash_attn=True, port=port,
        smoke=TranscriptionSmoke(max_word_error_rate=WHISPER_MAX_WER, max_real_time_factor=WHISPER_MAX_RTF,
                                 timeout_s=WHISPER_REQUEST_TIMEOUT_S),
    )


def stamp_check_record(output: str, spec: WhisperCppBuild, flavor: plan.Flavor) -> Json:
    """What the deploy's no-op check sees after the build: the stamp's text, and whether `current` points here."""
    found = switch.parse_installed(output.splitlines())
    matches, points_here = plan.is_installed(found, spec, flavor)
    return {"stamp": found.stamp, "current": found.current, "stamp_matches": matches,
            "current_points_here": points_here}


def health_transitions(samples: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """[seconds, answer] samples of /health -> the first sample of each run of equal answers."""
    out: list[list[Any]] = []
    for seconds, answer in samples:
        if not out or out[-1][1] != answer:
            out.append([seconds, answer])
    return out


def whisper_buffers_mb(log_text: str) -> dict[str, float]:
    """whisper.cpp's logged buffer sizes (MB = 10^6 bytes), by name (`kv pad  size` is logged with two spaces:
    names are read with their spaces collapsed); the last state's when it logs several."""
    return {" ".join(name.split()): float(value) for name, value in WHISPER_BUFFER_RE.findall(log_text)}


def mb_to_mib(mb: float) -> float:
    return mb * 1e6 / MIB


def whisper_vram_record(
    service: WhisperServer, model_bytes: int, buffers_mb: Mapping[str, float], process_mib: int | None
) -> Json:
    """The planner's whisper term (gpubox.vram.speech_terms, with its table's weights and with the file's size)
    against nvidia-smi's memory of the process and whisper's logged buffers."""
    planned = {k: v / MIB for k, v in speech_terms(service).items()}
    planned_file = {k: v / MIB for k, v in speech_terms(service, model_bytes).items()}
    logged = {name: mb_to_mib(mb) for name, mb in buffers_mb.items()}
    weights = logged.get("model size", 0.0)
    state_mib = sum(v for k, v in logged.items() if k != "model size")
    logged_total = weights + state_mib
    planned_total = sum(planned.values())
    planned_file_total = sum(planned_file.values())
    size = (service.model.architecture or "").removesuffix(".en")
    return {
        "planned_terms_mib": {k: round(v, 1) for k, v in planned.items()},
        "planned_total_mib": round(planned_total, 1),
        "planned_file_terms_mib": {k: round(v, 1) for k, v in planned_file.items()},
        "planned_file_total_mib": round(planned_file_total, 1),
        "table": {"weights_mib": WHISPER_WEIGHTS_MIB.get(size), "state_mib": WHISPER_STATE_MIB.get(size)},
        "model_bytes": model_bytes,
        "logged_mb": dict(buffers_mb),
        "logged_mib": {k: round(v, 2) for k, v in logged.items()},
        "logged_weights_mib": round(weights, 1),
        "logged_state_mib": round(state_mib, 1),
        "logged_total_mib": round(logged_total, 1),
        "process_mib": process_mib,
        "gap_mib": None if process_mib is None else round(planned_total - process_mib, 1),
        "gap_file_mib": None if process_mib is None else round(planned_file_total - process_mib, 1),
        "measured_minus_logged_mib": None if process_mib is None else round(process_mib - logged_total, 1),
    }


def transcript_record(audio: str, run: int, expected: str, heard: str, audio_s: float, seconds: float) -> Json:
    """One transcription judged as the deploy's smoke test judges it (gpubox.speech.TranscriptCheck)."""
    check = TranscriptCheck.judge(expected, heard, audio_s, seconds, max_wer=WHISPER_MAX_WER, max_rtf=WHISPER_MAX_RTF)
    return {"audio": audio, "run": run, "heard": heard, "expected": expected, "audio_s": round(audio_s, 3),
            "seconds": round(seconds, 4), "rtf": round(check.rtf, 4), "wer": round(check.wer, 4),
            "passed": check.passed, "failures": check.failures}


def transcript_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Json]:
    """Per audio: runs, median seconds / RTF, WER of each run, the distinct transcripts, all passed."""
    out: dict[str, Json] = {}
    for audio in dict.fromkeys(r["audio"] for r in records):
        runs = [r for r in records if r["audio"] == audio]
        ok = [r for r in runs if "error" not in r]
        out[audio] = {
            "runs": len(runs), "answered": len(ok),
            "median_seconds": round(statistics.median(r["seconds"] for r in ok), 4) if ok else None,
            "median_rtf": round(statistics.median(r["rtf"] for r in ok), 4) if ok else None,
            "wers": [r["wer"] for r in ok], "transcripts": list(dict.fromkeys(r["heard"] for r in ok)),
            "passed": bool(ok) and len(ok) == len(runs) and all(r["passed"] for r in ok),
        }
    return out


def wav_seconds(path: Path) -> float:
    data = path.read_bytes()
    return parse_wav_header(data[:65536], file_size=len(data)).duration_s


def transcribe(url: str, wav: Path, timeout: float) -> tuple[str, float, str]:
    """(text, seconds, client): gpubox.speech.transcribe_command run here (curl), parsed by parse_transcription.

    Without curl on the machine, requests posts the same form and its answer is printed the way the curl
    command prints it, so parse_transcription reads both.
    """
    if shutil.which("curl"):
        result = subprocess.run(["sh", "-c", transcribe_command(url, str(wav), timeout, language="en")],
                                capture_output=True, text=True, timeout=timeout + 10)
        if result.returncode and result.stderr:
            raise TransportError(f"curl exit {result.returncode}: {result.stderr.strip()[-300:]}")
        text, seconds = parse_transcription(result.stdout, result.returncode)
        return text, seconds, "curl"
    started = time.monotonic()
    with open(wav, "rb") as fh:
        response = requests.post(f"{url}/inference", files={"file": (wav.name, fh, "audio/wav")},
                                 data={"response_format": "json", "temperature": "0", "language": "en"},
                                 timeout=timeout)
    stdout = f"{response.text}\n{response.status_code}\n{time.monotonic() - started:.6f}"
    text, seconds = parse_transcription(stdout, 0)
    return text, seconds, "requests (no curl on the machine)"


def poll_health(server: Server, timeout_s: float = 180.0, interval_s: float = 0.05) -> list[list[Any]]:
    """/health from the process's start until 200: [seconds since start, status code or `refused`] samples."""
    samples: list[list[Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer: Any = requests.get(f"{server.url}/health", timeout=2).status_code
        except requests.RequestException:
            answer = "refused"
        samples.append([round(time.monotonic() - server.started, 3), answer])
        if answer == 200:
            return samples
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.server.PROGRAM} exited {server.process.returncode}:\n"
                               f"{server.log_text()[-2500:]}")
        time.sleep(interval_s)
    return samples


def gpu_records() -> tuple[str, list[Gpu]]:
    """The NvidiaGpus fact's probe, run here: its output and the GPU records the units are rendered with."""
    _, output = sh(gpu_probe_command())
    return output, parse_gpu_probe(output.splitlines())


def whisper_log_lines(text: str, limit: int = 40) -> list[str]:
    """whisper-server's device and buffer lines, each once (system_info is logged per request)."""
    return list(dict.fromkeys(line.rstrip() for line in text.splitlines() if WHISPER_LOG_PATTERN.search(line)))[:limit]


def whisper_model_record(path: str) -> Json:
    data = Path(path).read_bytes()
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def build_whisper(args: argparse.Namespace, result: Json, gpus: Sequence[Gpu]) -> WhisperCppBuild:
    """Unpack and commit the tarball, then the product's fetch and build scripts; the timings and the stamp."""
    src = Path(args.whisper_src)
    sha = unpack_committed(args.whisper_tarball, src, "whisper.cpp f24588a (trimmed)")
    result["prepared"] = prepared_record(src, sha)
    spec = whisper_build_spec(result["prepared"], args.jobs)
    architectures = plan.resolve_architectures(spec, gpus)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    script = plan.build_script(spec, "cuda", architectures, nvcc, ccache=False)
    result.update({"spec": spec.model_dump(mode="json"), "architectures": architectures, "nvcc": nvcc,
                   "configure": plan.cmake_configure_args(spec, "cuda", architectures, nvcc, ccache=False)})
    (Path(args.workdir) / "whisper-build.sh").write_text(script)
    for name, text in (("fetch", plan.fetch_script(spec)), ("build", script)):
        log(f"whisper: gpubox {name} script")
        started = time.monotonic()
        code, out = sh(["sh", "-c", text], timeout=3000)
        seconds = round(time.monotonic() - started, 1)
        result[f"{name}_run"] = {"exit": code, "seconds": seconds, "output_tail": out[-3000:]}
        log(f"whisper {name}: exit {code} in {seconds} s")
        if code:
            _, tail = sh(["tail", "-n", "40", plan.log_path(spec, "cuda")])
            result[f"{name}_run"]["log_tail"] = tail
            raise RuntimeError(f"the whisper.cpp {name} script failed (exit {code}):\n{out[-2500:]}")
    _, out = sh(switch.installed_command(plan.stamp_path(spec, "cuda"), plan.current_link(spec)))
    result["stamp_check"] = stamp_check_record(out, spec, "cuda")
    binary = shlex.quote(spec_binary(spec))
    _, out = sh(f"ls {shlex.quote(plan.install_dir(spec, 'cuda'))}; readelf -d {binary} | grep NEEDED; "
                f"ls -l {binary} | awk '{{print $5}}'")
    result["installed"] = out
    _, listing = sh(f"cuobjdump --list-elf {binary}; cuobjdump --list-ptx {binary}")
    result["fatbin"] = fatbin_summary(listing)
    _, help_text = sh(["cat", f"{spec_binary(spec)}.help"])
    result["help_option_lines"] = sum(1 for line in help_text.splitlines() if line.lstrip().startswith("-"))
    return spec


def spec_binary(spec: WhisperCppBuild) -> str:
    return binary_path(spec.prefix, spec.PROJECT.server)


WHISPER_BUILDS: dict[str, tuple[threading.Thread, Json]] = {}
"""whisper.cpp's build started by whisperbuild in this run (a thread), joined by whisper / whispersizes."""


def step_whisperbuild(args: argparse.Namespace, state: State) -> None:
    """Start whisper.cpp's build (build_whisper: the product's fetch and build scripts) in a thread, beside
    llama.cpp's; the whisper and whispersizes steps wait for it."""
    probe_output, gpus = gpu_records()
    result: Json = {"probe_output": probe_output, "gpus": [gpu.to_json() for gpu in gpus], "background": True}
    if not gpus:
        raise RuntimeError(f"the GPU probe found no GPU:\n{probe_output}")

    def build() -> None:
        started = time.monotonic()
        try:
            build_whisper(args, result, gpus)
        except Exception:  # noqa: BLE001 - the step that joins it reports it
            result["build_error"] = traceback.format_exc()
        finally:
            result["build_step_seconds"] = round(time.monotonic() - started, 1)

    thread = threading.Thread(target=build, name="whisperbuild", daemon=True)
    thread.start()
    WHISPER_BUILDS["whisper"] = (thread, result)
    state["whisperbuild"] = {"started": True, "jobs": args.jobs}


def whisper_build_record(args: argparse.Namespace, state: State) -> tuple[Json, list[Gpu]]:
    """whisper.cpp built: the background build's record (joined once) or, with none started, a build now."""
    running = WHISPER_BUILDS.pop("whisper", None)
    if running is not None:
        thread, result = running
        thread.join()
        state["whisper"] = result
        state["whisperbuild"] = {**(state["whisperbuild"] or {}), "seconds": result.get("build_step_seconds"),
                                 "exit": 1 if result.get("build_error") else 0}
        if result.get("build_error"):
            raise RuntimeError(f"the whisper.cpp build failed:\n{result['build_error']}")
        return result, [Gpu.model_validate(gpu) for gpu in result["gpus"]]
    if state["whisper"] and (state["whisper"].get("build_run") or {}).get("exit") == 0:
        return state["whisper"], [Gpu.model_validate(gpu) for gpu in state["whisper"]["gpus"]]
    probe_output, gpus = gpu_records()
    result = {"probe_output": probe_output, "gpus": [gpu.to_json() for gpu in gpus]}
    state["whisper"] = result
    if not gpus:
        raise RuntimeError(f"the GPU probe found no GPU:\n{probe_output}")
    started = time.monotonic()
    try:
        build_whisper(args, result, gpus)
    finally:
        result["build_step_seconds"] = round(time.monotonic() - started, 1)
        state["whisper"] = result
    return result, gpus


def step_whisper(args: argparse.Namespace, state: State) -> None:  # noqa: C901
    """Build whisper.cpp the deploy's way, then serve tiny.en pinned to GPU 1 and transcribe two WAVs 3 times."""
    workdir = Path(args.workdir)
    result, gpus = whisper_build_record(args, state)
    wait_for_model(args.whisper_model, args.wait_model)
    if state["whisper_model"] is None:
        state["whisper_model"] = whisper_model_record(args.whisper_model)
    model = whisper_model_file(state["whisper_model"])
    gpu = whisper_gpu([g.index for g in gpus])
    uuid = next(g.uuid for g in gpus if g.index == gpu)
    service = whisper_service(model, gpu)
    jfk = Path(args.jfk or Path(args.whisper_src) / "samples" / "jfk.wav")
    audios = [("jfk.wav", jfk, JFK_TEXT), ("piper round trip", Path(args.roundtrip_wav), args.roundtrip_text)]
    result["audio"] = {name: {"path": str(path), "seconds": round(wav_seconds(path), 3) if path.is_file() else None,
                              "expected": text} for name, path, text in audios}
    idle = gpu_used_mib()
    server = Server(service, workdir, f"whisper-gpu{gpu}", gpus=gpus)
    result.update({"service": service.name, "gpu": gpu, "uuid": uuid, "pid": server.process.pid, "argv": server.argv,
                   "environment": server.env, "unit": server.unit, "gpu_used_mib_idle": idle})
    state["whisper"] = result
    transcripts: list[Json] = []
    try:
        samples = poll_health(server)
        result["health"] = health_transitions(samples)
        result["health_polls"] = len(samples)
        healthy = bool(samples) and samples[-1][1] == 200
        result["healthy"] = healthy
        result["healthy_after_s"] = samples[-1][0] if healthy else None
        if not healthy:
            raise RuntimeError(f"whisper-server not healthy:\n{server.log_text()[-2500:]}")
        for name, path, expected in audios:
            if not path.is_file():
                transcripts.append({"audio": name, "run": 0, "error": f"{path} is missing"})
                continue
            audio_s = wav_seconds(path)
            for run in range(1, WHISPER_RUNS + 1):
                try:
                    heard, seconds, client = transcribe(server.url, path, WHISPER_REQUEST_TIMEOUT_S)
                    transcripts.append(transcript_record(name, run, expected, heard, audio_s, seconds))
                    result["client"] = client
                except (SpeechError, TransportError, subprocess.TimeoutExpired, requests.RequestException) as error:
                    transcripts.append({"audio": name, "run": run, "error": f"{type(error).__name__}: {error}"})
                result["transcripts"] = transcripts
                state["whisper"] = result
                log(f"whisper {name} run {run}: {transcripts[-1]}")
        apps = compute_apps()
        result["compute_apps"] = [app.model_dump(mode="json") for app in apps]
        result["held_mib"] = held_mib(server.process.pid, apps)
        result["residency_failures"] = check_gpu_residency(server.process.pid, {uuid}, apps)
        result["gpu_used_mib_serving"] = gpu_used_mib()
    finally:
        server.stop()
        log_text = server.log_path.read_text(errors="replace")
        result["log_lines"] = whisper_log_lines(log_text)
        result["log_tail"] = log_text.splitlines()[-15:]
        result["buffers_mb"] = whisper_buffers_mb(log_text)
        state["whisper"] = result
    own = result.get("held_mib") or {}
    process_mib = own.get(uuid)
    result["vram"] = whisper_vram_record(service, state["whisper_model"]["size"], result["buffers_mb"], process_mib)
    result["summary"] = transcript_summary(transcripts)
    failures = [f"{r['audio']} run {r['run']}: {r['error']}" for r in transcripts if "error" in r]
    failures += [f"{r['audio']} run {r['run']}: {f}" for r in transcripts if "error" not in r for f in r["failures"]]
    failures += result.get("residency_failures") or []
    if not result["stamp_check"]["stamp_matches"] or not result["stamp_check"]["current_points_here"]:
        failures.append(f"the stamp check after the build: {result['stamp_check']}")
    result["failures"] = failures
    result["passed"] = not failures
    state["whisper"] = result
    log(f"whisper: passed={not failures} summary={result['summary']} vram={result['vram']}")
    if failures:
        raise RuntimeError("whisper step: " + "; ".join(failures))


# --------------------------------------------------------------------------- the seed's layout (two GPUs)
#
# The seed's box: the LLM on GPU 0, speech on GPU 1. Both servers are started from their rendered units
# (CUDA_VISIBLE_DEVICES=<uuid>) and answer a request at the same time; nvidia-smi's compute apps must then
# list each pid on its own GPU's uuid and nowhere else.

SEED_LLAMA_GPU = 0
SEED_N_PREDICT = 256
BACKGROUND: dict[str, tuple[subprocess.Popen[bytes], float, Path]] = {}
"""Builds started in the background by a step of this run (seedbuild), waited for by a later one."""


def seed_llama_binary(workdir: Path, exists: Callable[[str], bool] = os.path.exists) -> str:
    """The llama-server seedlayout runs: seedbuild's, or else the `build` step's install (`current`)."""
    built = str(iso_binary(workdir, "sm90"))
    installed = binary_path(PREFIX)
    return installed if not exists(built) and exists(installed) else built


def layout_failures(expected: Mapping[int, str], apps: Sequence[ComputeApp], names: Mapping[int, str]) -> list[str]:
    """Each pid must be listed on its own GPU's uuid, and only there."""
    failures: list[str] = []
    for pid, uuid in expected.items():
        held = sorted({app.gpu_uuid for app in apps if app.pid == pid})
        if not held:
            failures.append(f"{names.get(pid, pid)} (pid {pid}) is not among nvidia-smi's compute apps")
        elif held != [uuid]:
            failures.append(f"{names.get(pid, pid)} (pid {pid}) is on {', '.join(held)}; expected {uuid} only")
    return failures


def layout_rows(apps: Sequence[ComputeApp], names: Mapping[int, str], gpus: Sequence[Gpu]) -> list[Json]:
    """nvidia-smi's compute apps with the service of each pid and the index of each uuid."""
    index = {gpu.uuid: gpu.index for gpu in gpus}
    return [{"pid": app.pid, "service": names.get(app.pid, "(other)"), "gpu": index.get(app.gpu_uuid),
             "gpu_uuid": app.gpu_uuid, "used_memory_mib": app.used_memory_mib} for app in apps]


def overlap_seconds(a: Sequence[float], b: Sequence[float]) -> float:
    """How long two (start, end) intervals overlap."""
    return round(max(0.0, min(a[1], b[1]) - max(a[0], b[0])), 4)


def seed_completion_body(n_predict: int = SEED_N_PREDICT) -> Json:
    return {"prompt": CHAT_PROMPT, "n_predict": n_predict, "temperature": 0, "ignore_eos": True,
            "cache_prompt": False}


def step_seedbuild(args: argparse.Namespace, state: State) -> None:
    """Start isobuild's sm90 llama-server build in the background (seedlayout waits for it)."""
    workdir = Path(args.workdir)
    binary = iso_binary(workdir, "sm90")
    if binary.exists():
        state["seedbuild"] = {"reused": str(binary)}
        return
    spec = iso_build_spec(state["prepare"], args.jobs)
    script = iso_build_script(Path(state["prepare"]["src"]), iso_build_dir(workdir, "sm90"), "90", args.jobs, spec)
    log_file = workdir / "seed-build-sm90.log"
    with open(log_file, "wb") as sink:
        process = subprocess.Popen(script, shell=True, stdout=sink, stderr=subprocess.STDOUT)
    BACKGROUND["seedbuild"] = (process, time.monotonic(), log_file)
    state["seedbuild"] = {"command": script, "pid": process.pid, "log": str(log_file), "jobs": args.jobs}


def wait_seedbuild(args: argparse.Namespace, state: State) -> Json:
    record: Json = dict(state["seedbuild"] or {})
    running = BACKGROUND.pop("seedbuild", None)
    if running:
        process, started, log_file = running
        code = process.wait()
        record.update({"exit": code, "seconds": round(time.monotonic() - started, 1),
                       "output_tail": log_file.read_text(errors="replace")[-2000:]})
        state["seedbuild"] = record
        log(f"seedbuild: exit {code} after {record['seconds']} s")
    return record


def step_seedlayout(args: argparse.Namespace, state: State) -> None:  # noqa: C901
    """SmolLM2 on GPU 0 and whisper-server on GPU 1, each from its unit, serving at once: who is where."""
    workdir = Path(args.workdir)
    result: Json = {"build": wait_seedbuild(args, state)}
    state["seedlayout"] = result
    probe_output, gpus = gpu_records()
    result.update({"probe_output": probe_output, "gpus": [gpu.to_json() for gpu in gpus]})
    if len(gpus) < 2:
        raise RuntimeError(f"the seed's layout needs two GPUs, this machine has {len(gpus)}")
    llama_binary = seed_llama_binary(workdir)
    whisper_binary = binary_path(WHISPER_PREFIX, "whisper-server")
    for binary in (llama_binary, whisper_binary):
        if not Path(binary).exists():
            raise RuntimeError(f"{binary} is missing: run seedbuild (llama-server) and whisper (whisper-server) first")
    if state["whisper_model"] is None:
        wait_for_model(args.whisper_model, args.wait_model)
        state["whisper_model"] = whisper_model_record(args.whisper_model)
    llama = smoke_service(state_model_file(args, state), SEED_LLAMA_GPU, draft=False)
    whisper = whisper_service(whisper_model_file(state["whisper_model"]), whisper_gpu([g.index for g in gpus]))
    uuids = {g.index: g.uuid for g in gpus}
    idle = gpu_used_mib()
    servers = [Server(llama, workdir, "seed-llama", gpus=gpus, binary=llama_binary),
               Server(whisper, workdir, "seed-whisper", gpus=gpus)]
    names = {server.process.pid: server.server.name for server in servers}
    expected = {server.process.pid: uuids[server.server.gpus[0]] for server in servers}
    result["services"] = [
        {"service": s.server.name, "program": s.server.PROGRAM, "gpu": s.server.gpus[0],
         "uuid": uuids[s.server.gpus[0]], "pid": s.process.pid, "argv": s.argv, "environment": s.env, "unit": s.unit}
        for s in servers
    ]
    result["gpu_used_mib_idle"] = idle
    state["seedlayout"] = result
    jfk = Path(args.jfk or Path(args.whisper_src) / "samples" / "jfk.wav")
    jfk_s = wav_seconds(jfk)
    try:
        for record, server in zip(result["services"], servers, strict=True):
            samples = poll_health(server)
            record["healthy_after_s"] = samples[-1][0] if samples and samples[-1][1] == 200 else None
            if record["healthy_after_s"] is None:
                raise RuntimeError(f"{server.server.name} not healthy:\n{server.log_text()[-2500:]}")
        llama_url, whisper_url = servers[0].url, servers[1].url
        # Warm-up: the first request of each pays for its CUDA graphs and kernels' first loads.
        requests.post(f"{llama_url}/completion", json=seed_completion_body(8), timeout=120)
        transcribe(whisper_url, jfk, WHISPER_REQUEST_TIMEOUT_S)
        answers: Json = {}
        t0 = time.monotonic()

        def ask_llama() -> None:
            started = time.monotonic() - t0
            response = requests.post(f"{llama_url}/completion", json=seed_completion_body(), timeout=300)
            timings = response.json().get("timings", {}) if response.ok else {}
            answers["llama"] = {"interval": [round(started, 4), round(time.monotonic() - t0, 4)],
                                "status": response.status_code, "predicted_n": timings.get("predicted_n"),
                                "tokens_per_second": timings.get("predicted_per_second")}

        def ask_whisper() -> None:
            started = time.monotonic() - t0
            try:
                text, seconds, _ = transcribe(whisper_url, jfk, WHISPER_REQUEST_TIMEOUT_S)
                check = TranscriptCheck.judge(JFK_TEXT, text, jfk_s, seconds, max_wer=WHISPER_MAX_WER,
                                              max_rtf=WHISPER_MAX_RTF)
                answer: Json = {"text": text, "seconds": seconds, "rtf": round(check.rtf, 4),
                                "wer": round(check.wer, 4)}
            except (SpeechError, TransportError) as error:
                answer = {"error": str(error)}
            answers["whisper"] = {**answer, "interval": [round(started, 4), round(time.monotonic() - t0, 4)]}

        threads = [threading.Thread(target=ask_llama), threading.Thread(target=ask_whisper)]
        for thread in threads:
            thread.start()
        time.sleep(0.05)
        during = compute_apps()
        for thread in threads:
            thread.join(timeout=320)
        after = compute_apps()
        result["requests"] = answers
        if "llama" in answers and "whisper" in answers:
            result["overlap_s"] = overlap_seconds(answers["llama"]["interval"], answers["whisper"]["interval"])
        result["compute_apps_during"] = layout_rows(during, names, gpus)
        result["compute_apps_after"] = layout_rows(after, names, gpus)
        result["gpu_used_mib_serving"] = gpu_used_mib()
        result["failures"] = layout_failures(expected, after, names)
        result["failures_during"] = layout_failures(expected, during, names)
    finally:
        for server in servers:
            server.stop()
        result["log_lines"] = {s.server.name: (whisper_log_lines(s.log_path.read_text(errors="replace"), 15)
                                               if s.server.PROGRAM == "whisper-server" else
                                               iso_log_lines(s.log_path.read_text(errors="replace"), 15))
                               for s in servers}
        state["seedlayout"] = result
    failures = list(result["failures"])
    for name in ("llama", "whisper"):
        answer = result["requests"].get(name) or {}
        if answer.get("error") or answer.get("status", 200) != 200 or not answer:
            failures.append(f"the {name} request failed: {answer}")
    result["passed"] = not failures
    state["seedlayout"] = result
    log(f"seedlayout: passed={not failures} apps={result['compute_apps_after']} requests={result['requests']}")
    if failures:
        raise RuntimeError("seed layout: " + "; ".join(failures))



# --------------------------------------------------------------------------- piper on CUDA (one GPU)
#
# piper's venv the way gpubox.piper_install's cuda flavor makes it: piper-tts[http] and onnxruntime-gpu from
# the carried wheels (pip --require-hashes --no-deps), the CUDA/cuDNN libraries as the nvidia-* wheels the
# `[cuda,cudnn]` extras install (the machine's own, PyTorch's: over a GiB, too big to carry; linked into the
# venv's site-packages, where pip would put them), and the product's preload hook
# (piper_install.gpu_preload_lines). The server runs from its rendered unit, as the others; the CUDA toolkit
# of the machine is hidden from it (a private mount namespace), as on a host with the driver only. Cases:
# the venv without the hook (what a bare `pip install onnxruntime-gpu[cuda,cudnn]` gives), then with it.

PIPER_PORT = 5000
PIPER_RUNS = 3
PIPER_REQUEST_TIMEOUT_S = 120.0
PIPER_LONG_TEXT = (
    "Speech synthesis turns written text into sound. This paragraph is longer than the smoke test's sentence, "
    "so the voice model runs over many more phonemes at once, and onnxruntime's memory arena grows to hold the "
    "larger tensors. The planner must leave room for that, not only for the model's weights and the context."
)
NVIDIA_PACKAGES = ("nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "nvidia-curand", "nvidia-cufft",
                   "nvidia-cudnn-cu13", "nvidia-nvjitlink")  # fmt: skip
NVIDIA_CODE = (
    "import importlib.metadata as m, importlib.util, json, sys\n"
    "spec = importlib.util.find_spec('nvidia')\n"
    "versions = {}\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        versions[name] = m.version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        versions[name] = None\n"
    "print(json.dumps({'dirs': list(spec.submodule_search_locations) if spec else [], 'versions': versions}))\n"
)
HIDE_TOOLKIT = (
    "mkdir -p /run/gpubox-empty; for d in /usr/local/cuda*; do [ -d \"$d\" ] && mount --bind /run/gpubox-empty "
    "\"$d\"; done; exec \"$@\""
)
"""Run argv with the machine's CUDA toolkit out of sight (a host with the driver only)."""
CUDA_MAPS_RE = re.compile(r"(/\S*lib(?:cudart|cublasLt|cublas|cudnn|curand|cufft|nvrtc)[^/\s]*\.so[.\d]*)$")
PIPER_LOG_PATTERN = re.compile(r"cuda|provider|onnxruntime|cudnn|cublas|fail|error|warn|Running on", re.IGNORECASE)
ORT_BASELINE_MODEL_CODE = (
    "import sys, numpy as np, onnx\n"
    "from onnx import helper as h, numpy_helper, TensorProto\n"
    "x = h.make_tensor_value_info('x', TensorProto.FLOAT, [1, 1, 64])\n"
    "y = h.make_tensor_value_info('y', TensorProto.FLOAT, [1, 1, 62])\n"
    "w = numpy_helper.from_array(np.ones((1, 1, 3), np.float32), 'w')\n"
    "g = h.make_graph([h.make_node('Conv', ['x', 'w'], ['y'])], 'g', [x], [y], [w])\n"
    "m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)])\n"
    "m.ir_version = 9\n"
    "onnx.save(m, sys.argv[1])\n"
)
ORT_BASELINE_RUN_CODE = (
    "import sys, time, numpy as np, onnxruntime as ort\n"
    "s = ort.InferenceSession(sys.argv[1], providers=[('CUDAExecutionProvider', "
    "{'cudnn_conv_algo_search': 'HEURISTIC'})])\n"
    "s.run(None, {'x': np.ones((1, 1, 64), np.float32)})\n"
    "print('providers', s.get_providers(), flush=True)\n"
    "time.sleep(float(sys.argv[2]))\n"
)
"""onnxruntime's CUDA provider on a one-Conv model: the process's memory is piper's context term."""


def requirement_wheels(requirements_text: str, wheels: Path) -> list[tuple[str, Path | None]]:
    """(name==version, its wheel in `wheels` or None) for each line of a pinned requirements file."""
    out: list[tuple[str, Path | None]] = []
    for line in requirements_text.splitlines():
        if not line.strip():
            continue
        pin = line.split()[0]
        name, version = pin.split("==")
        found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
        out.append((pin, found[0] if found else None))
    return out


def wait_for_wheels(requirements: Path, wheels: Path, timeout_s: float) -> list[Path]:
    """The wheels of `requirements` once all are there (they arrive with later device calls)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if requirements.is_file():
            found = requirement_wheels(requirements.read_text(), wheels)
            if all(path is not None for _, path in found):
                return [path for _, path in found if path is not None]
        if time.monotonic() > deadline:
            raise RuntimeError(f"piper's wheels ({requirements}) did not all arrive within {timeout_s:g} s")
        time.sleep(2)


def piper_venv_paths(install_prefix: str, venv_name: str) -> tuple[str, str]:
    """(venv, current link) of the install at the product's layout: {prefix}/venvs/NAME, {prefix}/current."""
    return f"{install_prefix}/venvs/{venv_name}", f"{install_prefix}/current"


def env_without(base: Mapping[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in base.items() if k not in names}


def site_packages(python: str) -> str:
    code, out = sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   env=env_without(os.environ, "PYTHONPATH"))
    if code:
        raise RuntimeError(out)
    return out.strip()


def loaded_cuda_libraries(pid: int) -> list[str]:
    """The CUDA/cuDNN shared libraries a process has mapped (/proc/PID/maps): where they were loaded from."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return sorted({m.group(1) for line in text.splitlines() if (m := CUDA_MAPS_RE.search(line))})


def make_piper_venv(args: argparse.Namespace, result: Json) -> str:
    """piper's cuda venv at the product's layout, from the carried wheels, the image's nvidia-* linked in."""
    wheels = wait_for_wheels(Path(args.piper_requirements), Path(args.wheels), args.wait_model)
    venv, current = piper_venv_paths(args.piper_prefix, f"{piper_install_version(wheels)}-cuda")
    env = env_without(os.environ, "PYTHONPATH")
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)
    code, out = sh(["python3", "-m", "venv", "--without-pip", venv], env=env)
    if code:
        raise RuntimeError(f"python3 -m venv: {out}")
    site = site_packages(f"{venv}/bin/python3")
    code, out = sh(["python3", "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
                    "--no-compile", "--require-hashes", "-r", args.piper_requirements, "--find-links", args.wheels,
                    "--target", site], env=env, timeout=900)  # fmt: skip
    if code:
        raise RuntimeError(f"pip install of piper's wheels: {out[-2000:]}")
    code, out = sh(["python3", "-c", NVIDIA_CODE, *NVIDIA_PACKAGES], env=env)
    nvidia = json.loads(out.strip().splitlines()[-1]) if code == 0 else {"dirs": [], "error": out}
    result["nvidia"] = nvidia
    if not nvidia.get("dirs"):
        raise RuntimeError(f"no nvidia-* wheels in the machine's python3: {out[-500:]}")
    source = nvidia["dirs"][0]
    os.symlink(source, f"{site}/nvidia")
    _, du = sh(["sh", "-c", f"du -sb {shlex.quote(source)}/*/ {shlex.quote(source)}"])
    result["nvidia_bytes"] = {line.split()[1].rstrip("/"): int(line.split()[0]) for line in du.splitlines()
                              if len(line.split()) == 2}  # fmt: skip
    Path(current).unlink(missing_ok=True)
    Path(current).symlink_to(f"venvs/{Path(venv).name}")
    result.update({"venv": venv, "site": site, "wheels": [w.name for w in wheels],
                   "install_seconds": round(time.monotonic() - started, 1)})
    return site


def piper_install_version(wheels: Sequence[Path]) -> str:
    return next(w.name.split("-")[1] for w in wheels if w.name.startswith("piper_tts-"))


def piper_service(voice: ModelFile, voice_config: ModelFile, gpu: int) -> PiperServer:
    """The seed's piper service (joe medium, --cuda on its GPU, the smoke sentence) pinned to `gpu`."""
    return PiperServer(name=f"piper-gpu{gpu}", gpus=(gpu,), voice=voice, voice_config=voice_config,
                       port=PIPER_PORT, smoke=SpeechSmoke())  # fmt: skip


def wait_piper_ready(server: Server, timeout_s: float = 180.0) -> float | None:
    """Seconds from the start until /info answers 200 (the product's readiness for piper); None if never."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"piper exited {server.process.returncode}:\n{server.log_text()[-2500:]}")
        try:
            if requests.get(f"{server.url}/info", timeout=2).status_code == 200:
                return round(time.monotonic() - server.started, 2)
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return None


def synthesis_record(label: str, text: str, server: Server, uuid: str, save_to: Path | None) -> Json:
    """One POST /synthesize judged as the product's smoke test judges it, the GPU check included."""
    started = time.monotonic()
    response = requests.post(f"{server.url}/synthesize", json={"text": text}, timeout=PIPER_REQUEST_TIMEOUT_S)
    seconds = time.monotonic() - started
    wav, wav_error = None, ""
    try:
        wav = parse_wav_header(response.content[:65536], file_size=len(response.content))
    except SpeechError as error:
        wav_error = str(error)
    apps = compute_apps()
    check = SpeechCheck.judge(text, wav, seconds, response.status_code, response.headers.get("content-type", ""),
                              wav_error, piper_gpu_failures(server.process.pid, {uuid}, apps))  # fmt: skip
    if save_to is not None and wav is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        save_to.write_bytes(response.content)
    audio_s = wav.duration_s if wav is not None else None
    return {"label": label, "words": len(text.split()), "seconds": round(seconds, 4),
            "audio_s": None if audio_s is None else round(audio_s, 3),
            "rtf": round(seconds / audio_s, 4) if audio_s else None, "status": response.status_code,
            "passed": check.passed, "failures": check.failures, "gpu_failures": list(check.gpu_failures or ()),
            "held_mib": held_mib(server.process.pid, apps), "table": rich_text(speech_table_of(check))}


def speech_table_of(check: SpeechCheck) -> RenderableType:
    from gpubox.speech import speech_table

    return speech_table((), (check,))


def run_piper_case(
    args: argparse.Namespace, name: str, service: PiperServer, gpus: Sequence[Gpu], uuid: str, *,
    texts: Sequence[tuple[str, str]], hide_toolkit: bool, save_to: Path | None = None,
) -> Json:  # fmt: skip
    """Start piper from its unit (the toolkit hidden or not), wait for /info, synthesize `texts`, read memory."""
    argv, env, unit = unit_command(service, gpus)
    launch = (isolated_argv(HIDE_TOOLKIT, argv) if hide_toolkit else argv, env, unit)
    server = Server(service, Path(args.workdir), f"piper-{name}", launch=launch,
                    base_env=env_without(os.environ, "PYTHONPATH"))  # fmt: skip
    record: Json = {"case": name, "hide_toolkit": hide_toolkit, "pid": server.process.pid, "argv": argv,
                    "environment": env, "unit": unit, "runs": []}  # fmt: skip
    try:
        record["ready_s"] = wait_piper_ready(server)
        if record["ready_s"] is None:
            raise RuntimeError(f"piper never answered /info:\n{server.log_text()[-2500:]}")
        record["cuda_libraries"] = loaded_cuda_libraries(server.process.pid)
        for index, (label, text) in enumerate(texts):
            record["runs"].append(synthesis_record(label, text, server, uuid, save_to if index == 0 else None))
            log(f"piper {name} {label}: {record['runs'][-1]['seconds']} s, held {record['runs'][-1]['held_mib']}, "
                f"failures {record['runs'][-1]['failures']}")
        record["cuda_libraries"] = loaded_cuda_libraries(server.process.pid)
    finally:
        server.stop()
        text = server.log_path.read_text(errors="replace")
        record["log_lines"] = list(dict.fromkeys(line for line in text.splitlines()
                                                 if PIPER_LOG_PATTERN.search(line)))[:30]  # fmt: skip
    return record


def ort_baseline(args: argparse.Namespace, python: str, uuid: str) -> Json:
    """onnxruntime-gpu's CUDA provider running a one-Conv model in piper's venv: its process memory."""
    model = Path(args.workdir) / "ort-baseline.onnx"
    code, out = sh(["python3", "-c", ORT_BASELINE_MODEL_CODE, str(model)], env=env_without(os.environ, "PYTHONPATH"))
    if code:
        return {"error": f"writing the model: {out[-800:]}"}
    argv = isolated_argv(HIDE_TOOLKIT, [python, "-c", ORT_BASELINE_RUN_CODE, str(model), "20"])
    process = subprocess.Popen(argv, env=env_without(os.environ, "PYTHONPATH"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip())
            if line.startswith("providers"):
                break
        time.sleep(1.0)
        apps = compute_apps()
        return {"providers": lines[-1] if lines else "", "held_mib": held_mib(process.pid, apps).get(uuid),
                "output": lines[-10:], "cuda_libraries": loaded_cuda_libraries(process.pid)}
    finally:
        process.kill()
        process.wait()


def step_piper(args: argparse.Namespace, state: State) -> None:
    """piper's venv with onnxruntime-gpu, then piper --cuda without and with gpubox's preload hook; the planner."""
    result: Json = {"failures": []}
    state["piper"] = result
    site = make_piper_venv(args, result)
    state["piper"] = result
    _, gpus = gpu_records()
    gpu = gpus[0].index
    uuid = gpus[0].uuid
    voice_path = Path(args.voice)
    wait_for_model(str(voice_path), args.wait_model)
    wait_for_model(f"{voice_path}.json", args.wait_model)
    voice = ModelFile(path=str(voice_path), sha256=hashlib.sha256(voice_path.read_bytes()).hexdigest(), format="onnx")
    config_path = Path(f"{voice_path}.json")
    config = ModelFile(path=str(config_path), sha256=hashlib.sha256(config_path.read_bytes()).hexdigest(),
                       format="json")  # fmt: skip
    service = piper_service(voice, config, gpu)
    result.update({"service": service.name, "gpu": gpu, "uuid": uuid, "voice_bytes": voice_path.stat().st_size})
    fox = [("fox", args.roundtrip_text)]
    cases: list[Json] = []
    result["cases"] = cases
    cases.append(run_piper_case(args, "no-hook", service, gpus, uuid, texts=fox, hide_toolkit=True))
    state["piper"] = result
    python = f"{result['venv']}/bin/python3"
    code, out = sh(["sh", "-c", "\n".join(["set -eu", *piper_install.gpu_preload_lines(python)])])
    result["hook"] = {"exit": code, "output": out[-500:], "files": sorted(p.name for p in Path(site).glob("gpubox*"))}
    texts = [*(("fox", args.roundtrip_text) for _ in range(PIPER_RUNS)), ("paragraph", PIPER_LONG_TEXT)]
    cases.append(run_piper_case(args, "hook", service, gpus, uuid, texts=texts, hide_toolkit=True,
                                save_to=Path(args.roundtrip_wav)))  # fmt: skip
    state["piper"] = result
    cases.append(run_piper_case(args, "no-hook-toolkit-visible", service, gpus, uuid, texts=fox, hide_toolkit=False))
    result["baseline"] = ort_baseline(args, python, uuid)
    state["piper"] = result
    failures = []
    if all(run["passed"] for run in cases[0]["runs"]):
        failures.append("without the hook (toolkit hidden) piper passed its GPU check: nothing shows it was needed")
    failures += [f"hook {run['label']}: {f}" for run in cases[1]["runs"] for f in run["failures"]]
    result["failures"] = failures
    result["passed"] = not failures
    state["piper"] = result
    if failures:
        raise RuntimeError("piper step: " + "; ".join(failures))


# --------------------------------------------------------------------------- whisper sizes (random weights)
#
# whisper.cpp's state (KV self/cross/pad, compute buffers) depends on the model's dimensions, not its weights:
# each size is a random-weight ggml model with the real hyperparameters (tests.testbed.random_whisper),
# written on the machine, served by the product's whisper-server build from its rendered unit, and sent
# jfk.wav twice: greedy (temperature 0, no fallback: the state whisper.cpp logs) and sampled (temperature
# 0.2, best_of 2 by the server's default: whisper.cpp re-creates its self-attention KV cache for 2 decoders,
# (2 + 2) x the greedy one, what a fallback from temperature 0 costs), nvidia-smi reading the process after
# each.

WHISPER_SIZE_NAMES = ("tiny.en", "base", "small", "medium", "large-v3", "large-v3-turbo")
WHISPER_SIZE_PORT = 8091
WHISPER_SIZE_REQUESTS = (
    ("greedy", {"temperature": "0", "temperature_inc": "0"}),
    ("sampled", {"temperature": "0.2", "temperature_inc": "0"}),
)
WHISPER_SIZE_TIMEOUT_S = 300.0


def inference(url: str, wav: Path, fields: Mapping[str, str], timeout: float) -> tuple[float, str]:
    """(seconds, the text's head) of one POST /inference of `wav` with the form `fields`."""
    started = time.monotonic()
    with open(wav, "rb") as fh:
        response = requests.post(f"{url}/inference", files={"file": (wav.name, fh, "audio/wav")},
                                 data={"response_format": "json", **fields}, timeout=timeout)  # fmt: skip
    seconds = time.monotonic() - started
    text = response.json().get("text", "") if response.ok else f"HTTP {response.status_code}: {response.text[:200]}"
    return round(seconds, 3), " ".join(str(text).split())[:160]


def whisper_size_record(name: str, file_bytes: int, write_s: float, buffers_mb: Mapping[str, float]) -> Json:
    logged = {k: mb_to_mib(v) for k, v in buffers_mb.items()}
    return {
        "name": name, "size": planner_size(name), "dims": vars(WHISPER_DIMS[name]), "file_bytes": file_bytes,
        "write_seconds": round(write_s, 1), "logged_mb": dict(buffers_mb),
        "logged_weights_mib": round(logged.get("model size", 0.0), 1),
        "logged_state_mib": round(sum(v for k, v in logged.items() if k != "model size"), 1),
        "logged_kv_self_mib": round(logged.get("kv self size", 0.0), 2),
    }  # fmt: skip


def measure_whisper_size(args: argparse.Namespace, name: str, gpu: int, uuid: str, gpus: Sequence[Gpu]) -> Json:
    """One size: write its random model, serve it, transcribe jfk.wav greedy then sampled, read nvidia-smi."""
    workdir = Path(args.workdir)
    path = workdir / "random-whisper" / f"ggml-{name}-random.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    file_bytes = write_random_whisper(WHISPER_DIMS[name], path)
    write_s = time.monotonic() - started
    model = ModelFile(path=str(path), sha256="0" * 64, format="ggml-whisper", architecture=planner_size(name))
    service = whisper_service(model, gpu, port=WHISPER_SIZE_PORT)
    jfk = Path(args.jfk or Path(args.whisper_src) / "samples" / "jfk.wav")
    server = Server(service, workdir, f"whisper-size-{name}", gpus=gpus)
    held: Json = {}
    requests_done: Json = {}
    try:
        samples = poll_health(server)
        healthy_after = samples[-1][0] if samples and samples[-1][1] == 200 else None
        if healthy_after is None:
            raise RuntimeError(f"whisper-server ({name}) not healthy:\n{server.log_text()[-2000:]}")
        held["load"] = held_mib(server.process.pid, compute_apps()).get(uuid)
        for label, fields in WHISPER_SIZE_REQUESTS:
            seconds, text = inference(server.url, jfk, fields, WHISPER_SIZE_TIMEOUT_S)
            requests_done[label] = {"seconds": seconds, "text": text, **fields}
            held[label] = held_mib(server.process.pid, compute_apps()).get(uuid)
            log(f"whispersizes {name} {label}: {seconds} s, {held[label]} MiB")
    finally:
        server.stop()
        log_text = server.log_path.read_text(errors="replace")
        path.unlink(missing_ok=True)
    record = whisper_size_record(name, file_bytes, write_s, whisper_buffers_mb(log_text))
    record.update({"healthy_after_s": healthy_after, "held_mib": held, "requests": requests_done,
                   "log_lines": whisper_log_lines(log_text, 25)})  # fmt: skip
    return record


def step_whispersizes(args: argparse.Namespace, state: State) -> None:
    """Every whisper size's process memory against whisper.cpp's logged buffers (random weights)."""
    _, gpus = whisper_build_record(args, state)
    gpu = whisper_gpu([g.index for g in gpus])
    uuid = next(g.uuid for g in gpus if g.index == gpu)
    rows: list[Json] = []
    result: Json = {"gpu": gpu, "uuid": uuid, "rows": rows, "failures": []}
    state["whispersizes"] = result
    for name in args.whisper_sizes:
        try:
            rows.append(measure_whisper_size(args, name, gpu, uuid, gpus))
        except Exception as error:  # noqa: BLE001 - the next size still runs
            result["failures"].append(f"{name}: {type(error).__name__}: {error}"[:1500])
        state["whispersizes"] = result
    if result["failures"]:
        raise RuntimeError("whispersizes: " + "; ".join(result["failures"]))


# --------------------------------------------------------------------------- llama.cpp RPC (issue 24)
#
# One GPU: ggml-rpc-server holds GPU 0, llama-server sees no CUDA device and puts every layer on it. The
# RPC server's process memory (nvidia-smi) is what the planner budgets on the lending host: the client's
# device terms (weights, KV, compute) plus CUDA_CONTEXT_MIB for the rpc-server process (gpubox.vram.lent_shares).

RPC_CONTEXTS = (4096, 65536)
RPC_PORT = 50052
RPC_LLAMA_PORT = 8190
RPC_ADDRESS = "127.0.0.1"
RPC_CLIENT_HOST = "client"
RPC_SERVER_HOST = "lender"
RPC_SERVICE = "rpc-gpu0"
RPC_N_PREDICT = 32
RPC_LISTEN_TIMEOUT_S = 60.0
RPC_LOG_PATTERN = re.compile(r"RPC|rpc|buffer size|offload|device|ggml_cuda_init|CUDA", re.IGNORECASE)


def rpc_build_spec(prepared: Mapping[str, Any], jobs: int) -> LlamaCppBuild:
    """The box's llama.cpp as written (CUDA, llama-server); the box adds GGML_RPC and ggml-rpc-server."""
    return LlamaCppBuild(
        repo=prepared["repo"], commit=prepared["commit"], cuda="on", prefix=PREFIX, targets=("llama-server",),
        jobs=jobs,
    )


def rpc_boxes(build: LlamaCppBuild, model: ModelFile, ctx: int, gpu: int = 0) -> dict[str, Box]:
    """Two boxes sharing 127.0.0.1 (as tests/fixtures/inventories/rpc_pair.py): the lender's RPC server pinned
    to `gpu`, and the client's llama-server with no GPU and every layer on it."""
    rpc = RpcServer(name=RPC_SERVICE, gpus=(gpu,), port=RPC_PORT)
    client = LlamaServer(
        name="smollm2-rpc", model=model, rpc=(RpcRef(host=RPC_SERVER_HOST, service=RPC_SERVICE),),
        tensor_split=(1.0,), fit="off", n_gpu_layers="all", ctx_size=ctx, parallel=1, flash_attn="on",
        port=RPC_LLAMA_PORT, extra_args=VRAM_EXTRA_ARGS,
    )  # fmt: skip
    return {
        RPC_CLIENT_HOST: Box(llama_cpp=build, address=RPC_ADDRESS, services=(client,)),
        RPC_SERVER_HOST: Box(llama_cpp=build, address=RPC_ADDRESS, services=(rpc,)),
    }


def rpc_pair(boxes: Mapping[str, Box]) -> tuple[LlamaServer, RpcServer, LlamaCppBuild]:
    """The client with its RpcRef resolved (gpubox.peers), the RPC server, and the build the lender's box makes."""
    resolved, problems = resolve_peers(boxes)
    refused = [f"{host}: {problem.field}: {problem.message}" for host, found in problems.items() for problem in found]
    if refused:
        raise RuntimeError("resolve_peers refused the pair:\n" + "\n".join(refused))
    client = resolved[RPC_CLIENT_HOST].services[0]
    rpc = resolved[RPC_SERVER_HOST].services[0]
    assert isinstance(client, LlamaServer) and isinstance(rpc, RpcServer)
    build = resolved[RPC_SERVER_HOST].install_of(rpc)
    assert isinstance(build, LlamaCppBuild)
    return client, rpc, build


def rpc_logged(lines: Iterable[Sequence[Any]]) -> dict[str, float]:
    """MiB per kind of the buffers on the RPC devices (RPC0[host:port], ...)."""
    listed = [tuple(line) for line in lines]
    return {kind: sum(mib for k, device, mib in listed if k == kind and re.match(r"RPC[0-9]+\[", device))
            for kind in ("model", "KV", "compute", "output", "RS")}


def rpc_row(
    ctx: int,
    terms: Mapping[str, int],
    rpc_pid: int,
    client_pid: int,
    apps: Sequence[ComputeApp],
    breakdown_lines: Sequence[tuple[str, str, float]],
) -> Json:
    """The planner's device terms + CUDA_CONTEXT_MIB against nvidia-smi's memory of the RPC server's pid."""
    planned_terms = {k: round(v / MIB, 1) for k, v in terms.items()}
    planned_terms["headroom"] = float(CUDA_CONTEXT_MIB)  # the rpc-server process's own (lent_shares)
    planned = round(sum(v for k, v in terms.items() if k != "headroom") / MIB + CUDA_CONTEXT_MIB, 1)
    held = [app.used_memory_mib or 0 for app in apps if app.pid == rpc_pid]
    measured = sum(held) if held else None
    logged = rpc_logged(breakdown_lines)
    logged_total = round(sum(logged.values()), 2)
    return {
        "ctx": ctx, "planned_terms_mib": planned_terms, "planned_mib": planned,
        "rpc_server_mib": measured,
        "client_on_gpu_mib": sum(app.used_memory_mib or 0 for app in apps if app.pid == client_pid) or None,
        "gap_mib": round(planned - measured, 1) if measured else None,
        "gap_pct": round(100 * (planned - measured) / measured, 1) if measured else None,
        "logged_rpc_mib": {k: round(v, 2) for k, v in logged.items()},
        "logged_rpc_total_mib": logged_total,
        "measured_minus_logged_mib": round(measured - logged_total, 1) if measured else None,
        "breakdown_lines": [list(line) for line in breakdown_lines],
        "compute_apps": [app.model_dump(mode="json") for app in apps],
    }


def rpc_log_lines(text: str, limit: int = 60) -> list[str]:
    return list(dict.fromkeys(line.rstrip() for line in text.splitlines() if RPC_LOG_PATTERN.search(line)))[:limit]


def gpu_memory_used() -> str:
    _, out = sh(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader"])
    return out.strip()


def rpc_completion(url: str) -> Json:
    started = time.monotonic()
    answer = requests.post(f"{url}/completion", json={
        "prompt": CHAT_PROMPT, "n_predict": RPC_N_PREDICT, "temperature": 0, "cache_prompt": False,
    }, timeout=120)  # fmt: skip
    answer.raise_for_status()
    body = answer.json()
    timings = body.get("timings") or {}
    return {"seconds": round(time.monotonic() - started, 3), "tokens_predicted": body.get("tokens_predicted"),
            "predicted_per_second": timings.get("predicted_per_second"), "content": str(body.get("content"))[:300]}


def build_rpc(args: argparse.Namespace, result: Json, spec: LlamaCppBuild, gpus: Sequence[Gpu]) -> None:
    """The product's fetch and build scripts for the lender's build (GGML_RPC, ggml-rpc-server): timed."""
    architectures = plan.resolve_architectures(spec, gpus)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    script = plan.build_script(spec, "cuda", architectures, nvcc, ccache=False)
    result.update({"spec": spec.model_dump(mode="json"), "architectures": architectures,
                   "build_name": plan.build_name(spec, "cuda"),
                   "configure": plan.cmake_configure_args(spec, "cuda", architectures, nvcc, ccache=False)})
    (Path(args.workdir) / "rpc-build.sh").write_text(script)
    for name, text in (("fetch", plan.fetch_script(spec)), ("build", script)):
        log(f"rpc: gpubox {name} script")
        started = time.monotonic()
        code, out = sh(["sh", "-c", text], timeout=3000)
        seconds = round(time.monotonic() - started, 1)
        result[f"{name}_run"] = {"exit": code, "seconds": seconds, "output_tail": out[-3000:]}
        log(f"rpc {name}: exit {code} in {seconds} s")
        if code:
            _, tail = sh(["tail", "-n", "40", plan.log_path(spec, "cuda")])
            result[f"{name}_run"]["log_tail"] = tail
            raise RuntimeError(f"the llama.cpp {name} script (GGML_RPC) failed (exit {code}):\n{out[-2500:]}")
    _, out = sh(switch.installed_command(plan.stamp_path(spec, "cuda"), plan.current_link(spec)))
    result["installed_check"] = out[-1500:]
    _, out = sh(f"ls {shlex.quote(plan.install_dir(spec, 'cuda'))}")
    result["installed"] = out
    rpc_binary = binary_path(spec.prefix, "ggml-rpc-server")
    result["help_saved"] = Path(f"{rpc_binary}.help").read_text(errors="replace") \
        if Path(f"{rpc_binary}.help").is_file() else None
    code, out = sh([rpc_binary, "--help"], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    result["help_run"] = {"exit": code, "output": out}
    _, out = sh([binary_path(spec.prefix, "llama-server"), "--version"], timeout=60)
    result["version"] = out.strip()[-600:]


def measure_rpc(args: argparse.Namespace, ctx: int, client: LlamaServer, rpc: RpcServer, gpus: Sequence[Gpu]) -> Json:
    """One context: a fresh RPC server on GPU 0, the client loaded on it and answering once; the memory."""
    workdir = Path(args.workdir)
    header = load_model_header(args.model)
    terms = device_terms(client, header)[0]
    argv, env, unit = unit_command(rpc, gpus)
    cache = workdir / f"rpc-cache-{ctx}"
    cache.mkdir(parents=True, exist_ok=True)
    env = {**env, "LLAMA_CACHE": str(cache)}  # the unit's is /var/cache/gpubox-rpc/<name> (CacheDirectory=)
    record: Json = {"ctx": ctx, "rpc_argv": argv, "rpc_env": env, "rpc_unit": unit, "idle": gpu_memory_used()}
    lender = Server(rpc, workdir, f"rpc-server-{ctx}", launch=(argv, env, unit))
    llama: Server | None = None
    try:
        code, _ = sh(["sh", "-c", listening_command(rpc.port, RPC_LISTEN_TIMEOUT_S)])
        record["listening_s"] = round(time.monotonic() - lender.started, 2)
        if code:
            raise RuntimeError(f"ggml-rpc-server did not listen on {rpc.port}:\n{lender.log_text()[-2500:]}")
        llama = Server(client, workdir, f"rpc-client-{ctx}", gpus=gpus)
        record.update({"client_argv": llama.argv, "client_env": llama.env, "client_unit": llama.unit})
        record["healthy"] = wait_healthy(llama)
        record["healthy_s"] = round(time.monotonic() - llama.started, 2)
        time.sleep(1.0)
        loaded = compute_apps()
        record["after_load"] = [app.model_dump(mode="json") for app in loaded]
        record["completion"] = rpc_completion(llama.url)
        time.sleep(1.0)
        apps = compute_apps()
        record["gpu_used"] = gpu_memory_used()
        breakdown = parse_memory_breakdown(llama.log_text())
        record.update(rpc_row(ctx, terms, lender.process.pid, llama.process.pid, apps, breakdown.lines))
        record["rpc_pid"] = lender.process.pid
        record["client_pid"] = llama.process.pid
        record["client_log_lines"] = rpc_log_lines(llama.log_text())
    finally:
        if llama is not None:
            llama.stop()
            record["client_log_tail"] = llama.log_path.read_text(errors="replace")[-4000:]
        lender.stop()
        record["rpc_log_tail"] = lender.log_path.read_text(errors="replace")[-4000:]
    log(f"rpc ctx={ctx}: planned {record.get('planned_mib')} MiB, ggml-rpc-server held {record.get('rpc_server_mib')} "
        f"MiB ({record.get('gap_pct')} %), logged RPC0 {record.get('logged_rpc_total_mib')} MiB")
    return record


def step_rpc(args: argparse.Namespace, state: State) -> None:
    """llama.cpp built with GGML_RPC the product's way; SmolLM2 with every layer on a ggml-rpc-server on GPU 0."""
    probe_output, gpus = gpu_records()
    if not gpus:
        raise RuntimeError(f"the GPU probe found no GPU:\n{probe_output}")
    result: Json = {"gpus": [gpu.to_json() for gpu in gpus], "contexts": []}
    state["rpc"] = result
    written = rpc_build_spec(state["prepare"], args.jobs)
    placeholder = ModelFile(path=args.model, sha256="0" * 64, architecture="llama")
    _, _, spec = rpc_pair(rpc_boxes(written, placeholder, RPC_CONTEXTS[0], gpus[0].index))
    started = time.monotonic()
    try:
        build_rpc(args, result, spec, gpus)
    finally:
        result["build_step_seconds"] = round(time.monotonic() - started, 1)
        state["rpc"] = result
    wait_for_model(args.model, args.wait_model)
    model = state_model_file(args, state)
    for ctx in RPC_CONTEXTS:
        client, rpc, _ = rpc_pair(rpc_boxes(written, model, ctx, gpus[0].index))
        try:
            result["contexts"].append(measure_rpc(args, ctx, client, rpc, gpus))
        except Exception:  # noqa: BLE001 - recorded; the next context still runs
            result["contexts"].append({"ctx": ctx, "error": traceback.format_exc()})
        state["rpc"] = result
    failed = [c["ctx"] for c in result["contexts"] if c.get("error")]
    if failed:
        raise RuntimeError(f"rpc: contexts {failed} failed (see the state's rpc.contexts)")



# --------------------------------------------------------------------------- report


def fence(text: str) -> str:
    return "\n```\n" + text.rstrip() + "\n```\n\n"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def tokens_per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def bench_label(c: Mapping[str, Any]) -> str:
    drafting = f"draft n-max {c['draft_n_max']}" if c["draft"] else "no draft"
    return f"np={c['parallel']} {drafting} {c['context']}"


def bench_results(bench_state: Mapping[str, Any]) -> list[Json]:
    """The sweep's measurements: the final report's, or the partial list of a sweep that did not finish."""
    return list(bench_state["report"]["results"] if bench_state.get("report") else bench_state["results"])


def summary(state: Mapping[str, Any]) -> str:  # noqa: C901
    """One row per step, from this run's state."""
    rows: list[tuple[str, str]] = []
    timings = state.get("step_seconds") or {}
    errors = state.get("errors") or {}
    build = state.get("build")
    if build and build.get("runs"):
        first = build["runs"][0]
        rows.append(("build", f"exit {first['exit']}, {first['seconds']} s (architectures "
                              f"`{';'.join(build['architectures'])}`)"))
        if len(build["runs"]) > 1:
            rows.append(("no-op", f"exit {build['runs'][1]['exit']}, {build['runs'][1]['seconds']} s"))
    for row in state.get("smoke") or []:
        r = row["result"]
        acc = r["acceptance"]
        rows.append((f"smoke {row['service']}", f"passed={r['passed']}, {tokens_per_second(r['tokens_per_second'])} "
                     "tok/s" + ("" if acc is None else f", acceptance {acc:.1%}")))
    mtp = state.get("mtp")
    if mtp:
        t = mtp.get("timings") or {}
        text = (f"passed={mtp.get('passed')}, draft_n {t.get('draft_n')}, accepted {t.get('draft_n_accepted')}, "
                f"{t.get('predicted_per_second', 0):.1f} tok/s") if t else "no answer"
        rows.append(("draft-mtp (tiny Gemma 4)", text))
    bench_state = state.get("bench")
    if bench_state:
        results = bench_results(bench_state)
        if results:
            best = max(results, key=lambda r: r["single_tokens_per_second"])
            agg = max(results, key=lambda r: r["aggregate_tokens_per_second"])
            rows.append(("bench", f"{len(results)} configurations; best single {best['single_tokens_per_second']:.1f} "
                                  f"tok/s ({bench_label(best['config'])}), best aggregate "
                                  f"{agg['aggregate_tokens_per_second']:.1f} tok/s ({bench_label(agg['config'])})"))
    vram = state.get("vram")
    if vram:
        gaps = [row["gap_mib"] for row in vram]
        rows.append(("vram", f"estimate - measured {min(gaps):g} .. {max(gaps):g} MiB over {len(vram)} servers"))
    rows.extend(speech_summary_rows(state))
    for step, error in errors.items():
        rows.append((f"FAILED {step}", error.strip().splitlines()[-1][:200] if error.strip() else "?"))
    if timings:
        rows.append(("step seconds", ", ".join(f"{k} {v:g}" for k, v in timings.items())))
    return ("\n## Summary\n\n| what | result |\n| --- | --- |\n"
            + "".join(f"| {k} | {v.replace('|', '/')} |\n" for k, v in rows) + "\n")


def speech_summary_rows(state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The summary's rows of the whisper and seedlayout steps."""
    rows: list[tuple[str, str]] = []
    w = state.get("whisper") or {}
    build = w.get("build_run")
    if build:
        check = w.get("stamp_check") or {}
        rows.append(("whisper build", f"exit {build['exit']}, {build['seconds']} s (gpubox build_script, "
                                      f"architectures `{';'.join(w.get('architectures') or [])}`); stamp seen: "
                                      f"{check.get('stamp_matches')}, current: {check.get('current_points_here')}"))
    for audio, summary_ in (w.get("summary") or {}).items():
        rows.append((f"whisper {audio}", f"passed={summary_['passed']}, median RTF {summary_['median_rtf']}, "
                                         f"WER {summary_['wers']}, \"{' / '.join(summary_['transcripts'])}\""))
    v = w.get("vram")
    if v:
        rows.append(("whisper VRAM", f"planned {v['planned_total_mib']:g} MiB, measured {mib(v['process_mib'])} MiB "
                                     f"(logged buffers {v['logged_total_mib']:g} MiB)"))
    piper = state.get("piper") or {}
    for case in piper.get("cases") or []:
        runs = case["runs"]
        held = max_held((run.get("held_mib") or {}).get(piper.get("uuid")) for run in runs)
        rtfs = [run["rtf"] for run in runs if run.get("rtf") is not None]
        rows.append((f"piper --cuda, {case['case']}", f"smoke passed {all(run['passed'] for run in runs)}, GPU "
                     f"{mib(held)} MiB, median RTF {statistics.median(rtfs) if rtfs else '-'}"))  # fmt: skip
    sizes = (state.get("whispersizes") or {}).get("rows") or []
    if sizes:
        rows.append(("whisper sizes", ", ".join(f"{r['name']} {mib(max_held((r.get('held_mib') or {}).values()))} MiB"
                                                for r in sizes)))  # fmt: skip
    s = state.get("seedlayout") or {}
    if "failures" in s:
        placed = ", ".join(f"{r['service']} pid {r['pid']} on GPU {r['gpu']} ({r['used_memory_mib']} MiB)"
                           for r in s.get("compute_apps_after") or [])
        rows.append(("seed layout", f"each pid on its own GPU only: {not s['failures']}; {placed}"))
    return rows


def machine_section(facts: Mapping[str, Any]) -> str:
    out: list[str] = ["\n## Machine\n"]
    if facts.get("machine"):
        out.append(fence(facts["machine"]))
    for name in FACTS:
        fact = facts.get(name)
        if fact:
            out.append(f"`pyinfra @local fact {name}` (exit {fact['exit']}, {fact['seconds']} s):\n")
            out.append(fence(json.dumps(fact.get("value", fact.get("error")), indent=1)))
    if facts.get("nvml"):
        out.append("NVML (`gpubox.nvml.local_gpus()`):\n")
        out.append("| GPU | name | memory MiB | CC | bus bits | max mem clock MHz | peak bandwidth |\n"
                   "| --- | --- | --- | --- | --- | --- | --- |\n")
        for gpu in facts["nvml"]:
            out.append(f"| {gpu['index']} | {gpu['name']} | {gpu['memory_total_mib']} | {gpu['compute_capability']} | "
                       f"{gpu['memory_bus_width_bits']} | {gpu['max_memory_clock_mhz']} | "
                       f"{gpu['peak_memory_bandwidth_tb_s']:.2f} TB/s |\n")
        out.append("\n")
    if facts.get("nvml_error"):
        out.append(f"NVML failed: `{facts['nvml_error']}`\n\n")
    return "".join(out)


def build_section(prepared: Mapping[str, Any] | None, build: Mapping[str, Any] | None) -> str:
    out: list[str] = ["\n## Build\n"]
    if prepared:
        out.append(f"{source_text(prepared.get('source'))}, committed on the machine at `{prepared['commit']}` in "
                   f"`{prepared['src']}`: the commit built. The `LlamaCppBuild` pins that full sha with "
                   f"`repo={prepared['repo']}`.\n\n")
    if build:
        out.append(f"CUDA architectures resolved from the facts: `{';'.join(build['architectures'])}`; "
                   f"spec: `{json.dumps(build['spec'])}`\n\n")
        out.append("| run | exit | wall time |\n| --- | --- | --- |\n")
        for run in build["runs"]:
            out.append(f"| `pyinfra -y @local build_deploy.py`, {run['run']} | {run['exit']} | {run['seconds']} s |\n")
        out.append("\n")
        if len(build["runs"]) > 1:
            out.append("The second run's pyinfra output (the operations report no change):\n")
            out.append(fence(build["runs"][1]["output_tail"][-2500:]))
        if build.get("ninja_again"):
            ninja = build["ninja_again"]
            out.append(f"`cmake --build` once more: exit {ninja['exit']}, "
                       f"\"no work to do\": {ninja['no_work']}\n")
            out.append(fence(ninja["output"]))
        if build.get("version"):
            out.append("`/opt/llama.cpp/current/llama-server --version`:\n" + fence(build["version"]))
        if build.get("current"):
            out.append("`current` link, ninja steps logged, architectures in the log:\n" + fence(build["current"]))
    return "".join(out)


def source_text(source: Mapping[str, Any] | None) -> str:
    """What the built tree is: llama.cpp <upstream> (of llama-cpp-python 0.3.36), trimmed, its backends."""
    if not source:
        return "llama.cpp 0c1e57098's tree (trimmed: no models/docs/tests, CUDA and CPU backends only)"
    backends = ", ".join(b.removeprefix("ggml-") for b in source.get("kept_backends") or [])
    return (f"{source.get('name', 'llama.cpp')} `{str(source.get('upstream', '?'))[:12]}` (the tree vendored in "
            f"{source.get('via', '?')}; trimmed: no models/docs/tests/examples; ggml backends {backends})")


def smoke_section(smoke: Sequence[Mapping[str, Any]]) -> str:
    out: list[str] = ["\n## Services, pinning and smoke tests\n"]
    out.append("Each service's unit was rendered with `render_unit`; its `ExecStart` and `Environment=` lines "
               "were parsed back (and checked equal to `server_argv`/`server_environment`) and started "
               "as is (no systemd there; as root, so `User=` and the sandboxing lines are not applied).\n\n")
    out.append("| service | GPU | CUDA_VISIBLE_DEVICES | drafter | passed | tok/s (median) | acceptance | "
               "/metrics acceptance | residency | compute apps (pid: GPU MiB) |\n"
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    for row in smoke:
        result = row["result"]
        m_draft, m_acc = result["metrics_draft_tokens"], result["metrics_accepted_tokens"]
        m = f"{m_acc / m_draft:.1%}" if m_draft else "-"
        apps = ", ".join(
            f"{a['pid']}: {a['gpu_uuid'][-8:]} {a['used_memory_mib']}" for a in row["compute_apps"] or []
        )
        out.append(
            f"| {row['service']} | {row['gpu']} | {row['environment'].get('CUDA_VISIBLE_DEVICES')} | "
            f"{'draft-simple (SmolLM2 for itself)' if row['draft'] else 'none'} | {result['passed']} | "
            f"{tokens_per_second(result['tokens_per_second'])} | {percent(result['acceptance'])} | {m} | "
            f"{'ok' if result['gpu_checked'] and not result['gpu_failures'] else result['gpu_failures']} | "
            f"{apps or '(none listed)'} |\n"
        )
    out.append("\n")
    for row in smoke:
        out.append(f"\n### {row['service']} (pid {row['pid']}, GPU {row['gpu']} = `{row['uuid']}`)\n")
        out.append(fence(row["table"]))
        if row["result"]["failures"]:
            out.append("Failures:\n" + "".join(f"- {f}\n" for f in row["result"]["failures"]) + "\n")
        if row["result"]["notes"]:
            out.append("Notes:\n" + "".join(f"- {f}\n" for f in row["result"]["notes"]) + "\n")
    first_draft = next((row for row in smoke if row["draft"]), None)
    if first_draft:
        out.append("The rendered unit of the drafting service on GPU " + str(first_draft["gpu"]) + ":\n")
        out.append(fence(first_draft["unit"]))
    return "".join(out)


def mtp_section(mtp: Mapping[str, Any]) -> str:  # noqa: C901
    out: list[str] = ["\n## draft-mtp: tiny Gemma 4 target + gemma4-assistant drafter\n"]
    out.append(
        "The seed's serving path on the GPU: `tests.testbed.tiny_gemma4.write_tiny_gemma4` wrote a random-weight "
        "`gemma4` target and its `gemma4-assistant` MTP drafter on the machine (tokenizer copied from llama.cpp's "
        "`models/ggml-vocab-gemma-4.gguf`), and a `LlamaServer` with the seed's recipe shape "
        "(`spec_type=\"draft-mtp\"`, `spec_draft_n_max=3`, `spec_draft_ngl=99`, `n_gpu_layers=99`, q8_0 K/V, "
        "`flash_attn=\"on\"`, `fit=\"off\"`, `parallel=1`, metrics on, pinned to GPU 0) was started from its "
        "rendered unit's `ExecStart`/`Environment=`, like the smoke services. Acceptance means nothing with random "
        "weights; the check is that the drafter loads, drafts and serves on the GPU.\n\n"
    )
    if mtp.get("files"):
        out.append(f"Written in {mtp.get('write_seconds')} s from `{mtp['vocab']}` ({mtp['vocab_size']} bytes):\n\n"
                   "| file | architecture | layers | n_embd | bytes |\n| --- | --- | --- | --- | --- |\n")
        for f in mtp["files"]:
            out.append(f"| `{f['path']}` | {f['architecture']} | {f['block_count']} | {f['embedding_length']} | "
                       f"{f['size']} |\n")
        out.append("\n")
    t = mtp.get("timings") or {}

    def used(by_gpu: Mapping[Any, Any] | None) -> Any:  # JSON turned the GPU index keys into strings
        by_gpu = by_gpu or {}
        return by_gpu.get(str(mtp["gpu"]), by_gpu.get(mtp["gpu"]))

    if t:
        draft_n, accepted = t.get("draft_n"), t.get("draft_n_accepted")
        acc = f"{accepted / draft_n:.1%}" if draft_n else "-"
        delta = mtp.get("metrics_delta") or {}
        apps = ", ".join(f"{a['pid']}: {a['gpu_uuid'][-8:]} {a['used_memory_mib']}"
                         for a in mtp.get("compute_apps") or [] if a["pid"] == mtp.get("pid"))
        residency = ("ok" if mtp.get("residency_checked") and not mtp.get("residency_failures")
                     else (mtp.get("residency_failures") or "not listed"))
        moved = f"{delta['draft_tokens']:g} / {delta['accepted_tokens']:g}" if delta else "-"
        out.append("| service | GPU | CUDA_VISIBLE_DEVICES | passed | load s | predicted_n | tok/s | draft_n | "
                   "draft_n_accepted | acceptance | /metrics delta (drafted/accepted) | residency | "
                   "compute apps of the server (pid: GPU MiB) |\n"
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
        out.append(
            f"| {mtp['service']} | {mtp['gpu']} | {mtp['environment'].get('CUDA_VISIBLE_DEVICES')} | "
            f"{mtp.get('passed')} | {mtp.get('load_seconds')} | {t.get('predicted_n')} | "
            f"{t.get('predicted_per_second', 0):.1f} | {draft_n} | {accepted} | {acc} | {moved} | {residency} | "
            f"{apps or '(none listed)'} |\n\n"
        )
        out.append(f"Prompt `{MTP_PROMPT}`, n_predict {MTP_N_PREDICT}, temperature 0, ignore_eos, after an "
                   f"{MTP_WARMUP_N_PREDICT}-token warm-up; wall time {mtp.get('wall_seconds')} s. GPU {mtp['gpu']} "
                   f"memory used (NVML) idle {used(mtp.get('gpu_used_mib_idle'))} MiB, serving "
                   f"{used(mtp.get('gpu_used_mib_serving'))} MiB.\n\n")
        out.append("`timings` of the answer:\n" + fence(json.dumps(t, indent=1)))
    if mtp.get("metrics_lines"):
        out.append("`/metrics` speculative-decoding samples after the run:\n" + fence("\n".join(mtp["metrics_lines"])))
    for name, lines in (mtp.get("log_found") or {}).items():
        out.append(f"Server log, {name}:\n" + fence("\n".join(lines) or "(no such line)"))
    if mtp.get("log_context"):
        out.append("Server log, the loading lines (model, drafter, KV, offload):\n"
                   + fence("\n".join(mtp["log_context"])))
    out += failures_and_unit(mtp)
    return "".join(out)


def failures_and_unit(step: Mapping[str, Any]) -> list[str]:
    """A step section's last paragraphs: its failures, then the unit its server was started from."""
    out: list[str] = []
    if step.get("failures"):
        out.append("Failures:\n" + "".join(f"- {failure}\n" for failure in step["failures"]) + "\n")
    if step.get("unit"):
        out.append("The rendered unit:\n" + fence(step["unit"]))
    return out


def bench_section(bench_state: Mapping[str, Any]) -> str:
    out: list[str] = ["\n## Bench sweep (`gpubox.bench.bench_local`)\n"]
    if bench_state.get("table"):
        out.append(f"{bench_state['seconds']} s for the sweep; one temporary server per (parallel, drafter, "
                   f"n-max); n_predict 128; roofline = NVML peak bandwidth / model file size.\n\n")
        out.append(fence(bench_state["table"]))
        if bench_state.get("advice"):
            out.append(f"Advice: {bench_state['advice']}\n\n")
    out.append("| configuration | tok/s single | tok/s aggregate | acceptance | p50 s | p95 s |\n"
               "| --- | --- | --- | --- | --- | --- |\n")
    for r in bench_results(bench_state):
        out.append(f"| {bench_label(r['config'])} | {r['single_tokens_per_second']:.1f} | "
                   f"{r['aggregate_tokens_per_second']:.1f} | "
                   f"{percent(r['acceptance'])} | {r['latency_p50_s']:.2f} | "
                   f"{r['latency_p95_s']:.2f} |\n")
    out.append("\n")
    return "".join(out)


def vram_section(vram: Sequence[Mapping[str, Any]]) -> str:
    out: list[str] = ["\n## VRAM planner vs measurement\n"]
    out.append("Estimate: `gpubox.vram.plan_service(...).gpu_total` from the GGUF header. Measured: "
               "nvidia-smi's per-process used memory of the server (compute apps), or, when nvidia-smi "
               "lists no process, the GPU's used-memory delta over idle. Logged: the sum of the server's "
               "own `CUDA* model/KV/compute buffer size` lines.\n\n")
    out.append("| ctx | drafter | estimate MiB | measured MiB (process / GPU delta) | gap MiB | gap % | "
               "logged CUDA MiB (model/KV/compute) | measured - logged MiB | estimated terms MiB |\n"
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    for row in vram:
        # Recomputed from the logged lines (the state's totals came from the same lines when it was recorded).
        lg = gpu_logged(row["breakdown_lines"])
        logged_total = round(sum(lg.values()), 1)
        measured_minus_logged = round(row["measured_mib"] - logged_total, 1)
        terms = ", ".join(f"{k} {v:g}" for k, v in row["estimate_terms_mib"].items() if v)
        out.append(
            f"| {row['ctx']} | {'self draft' if row['draft'] else 'none'} | {row['estimate_mib']} | "
            f"{row['process_mib']} / {row['gpu_used_delta_mib']} | {row['gap_mib']} | {row['gap_pct']} | "
            f"{logged_total} ({lg['model']:g}/{lg['KV']:g}/{lg['compute']:g}) | "
            f"{measured_minus_logged} | {terms} |\n"
        )
    out.append("\n`measured - logged` is what `CUDA_CONTEXT_MIB` (the planner's per-process headroom, "
               f"{CUDA_CONTEXT_MIB} MiB) stands for: the CUDA context, cuBLAS workspace and memory pools.\n\n")
    return "".join(out)


def rpc_section(r: Mapping[str, Any]) -> str:
    """llama.cpp's RPC server on the GPU: the build, then per context the plan against nvidia-smi."""
    out: list[str] = ["\n## llama.cpp RPC: all layers on a ggml-rpc-server on the GPU\n\n"]
    build = r.get("build_run") or {}
    out.append(f"Build `{r.get('build_name')}` (gpubox.build's scripts, the lender box's LlamaCppBuild: "
               f"targets {', '.join((r.get('spec') or {}).get('targets') or [])}, rpc "
               f"{(r.get('spec') or {}).get('rpc')}): exit {build.get('exit')} in {build.get('seconds')} s.\n\n")
    out.append("| ctx | planned MiB (weights + KV + compute + context) | ggml-rpc-server MiB (nvidia-smi) | gap % | "
               "logged RPC0 MiB (model/KV/compute) | process - logged MiB | llama-server on the GPU |\n"
               "| --- | --- | --- | --- | --- | --- | --- |\n")
    for c in r.get("contexts") or []:
        if c.get("error"):
            out.append(f"| {c['ctx']} | failed | | | | | |\n")
            continue
        t = c["planned_terms_mib"]
        lg = c["logged_rpc_mib"]
        out.append(
            f"| {c['ctx']} | {c['planned_mib']} ({t.get('weights')} + {t.get('KV cache')} + {t.get('compute')} + "
            f"{t.get('headroom')}) | {c['rpc_server_mib']} | {c['gap_pct']} | {c['logged_rpc_total_mib']} "
            f"({lg['model']:g}/{lg['KV']:g}/{lg['compute']:g}) | {c['measured_minus_logged_mib']} | "
            f"{c['client_on_gpu_mib'] or 'none'} |\n"
        )
    for c in r.get("contexts") or []:
        if c.get("error"):
            out.append(f"\nctx {c['ctx']} failed:\n" + fence(c["error"][-2500:]))
        elif c.get("client_log_lines"):
            out.append(f"\nctx {c['ctx']}: `{shlex.join(c['client_argv'])}`, its buffer and device lines:\n"
                       + fence("\n".join(c["client_log_lines"])))
    return "".join(out)


def held_text(held: Mapping[str, Any] | None, uuids: Mapping[Any, str]) -> str:
    """`GPU 1 (…01f6): 792 MiB` for each GPU the server held memory on; `none` when it held none."""
    if not held:
        return "none"
    by_uuid = {uuid: index for index, uuid in uuids.items()}
    return ", ".join(f"GPU {by_uuid.get(uuid, '?')} (…{uuid[-8:]}): {'?' if mib is None else mib} MiB"
                     for uuid, mib in sorted(held.items()))


def isolation_case_row(c: Mapping[str, Any]) -> str:
    if c.get("skipped") or c.get("error"):
        reason = c.get("skipped") or (c.get("error") or "").strip().splitlines()[-1]
        return f"| {c['case']} | {c.get('what', '')} | - | - | - | - | {reason[:160]} | - | - | - |\n"
    smoke = c.get("smoke") or {}
    no_gpu = any(NO_USABLE_GPU in line for line in c.get("log_lines") or [])
    cvd = (c.get("environment") or {}).get("CUDA_VISIBLE_DEVICES", "")
    hidden = ", ".join(node.removeprefix("/dev/") for node in c.get("hidden") or []) or "-"
    verdict = "-" if not smoke else ("pass" if smoke.get("passed") else "FAIL")
    return (f"| {c['case']} | {c.get('what', '')} | `{cvd}` | {hidden} | {'yes' if c.get('mdwe') else 'no'} | "
            f"{c.get('flavor')} | **{c.get('outcome')}** | {held_text(c.get('held_mib'), c.get('uuids') or {})} | "
            f"{tokens_per_second(smoke.get('tokens_per_second'))} | {verdict}"
            f"{' (no usable GPU logged)' if no_gpu else ''} |\n")


def isolation_section(iso: Mapping[str, Any], isobuild: Mapping[str, Any] | None) -> str:  # noqa: C901
    out: list[str] = ["\n## GPU isolation (two GPUs)\n"]
    out.append("Each case starts SmolLM2's llama-server from the unit `render_unit(service, binary, gpus)` renders "
               "for a one-GPU service (its ExecStart on the case's build, its Environment= re-pinned as the case "
               "says) inside `unshare --mount`, with every NVIDIA node the unit's `DeviceAllow=` leaves out "
               "covered (`null`: bind-mounted /dev/null; `nodev`: a copy of the node on a nodev tmpfs, so open "
               "fails with EACCES); MDWE cases exec it under `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`. "
               "The GPU check is `gpubox.smoke.run_smoke` with a probe of nvidia-smi's compute apps, expecting "
               "the service's GPU uuid.\n\n")
    out.append(f"The fact's probe (`gpu_probe_command()`) printed:\n{fence(iso.get('probe_output') or '')}")
    out.append("| index | uuid | PCI bus id | minor number |\n| --- | --- | --- | --- |\n")
    for gpu in iso.get("gpus") or []:
        out.append(f"| {gpu['index']} | `{gpu['uuid']}` | {gpu['pci_bus_id']} | {gpu.get('minor_number')} |\n")
    out.append("\nNVIDIA device nodes (major:minor): "
               + ", ".join(f"`{node}` {major}:{minor}" for node, (major, minor) in (iso.get("nodes") or {}).items())
               + "\n\n")
    cases = iso.get("cases") or []
    if cases:
        first = next((c for c in cases if c.get("unit_device_allow")), None)
        if first:
            visible = (first.get("unit_environment") or {}).get("CUDA_VISIBLE_DEVICES")
            out.append(f"Walls from {first.get('wall_from')}; GPU {first['gpu']}'s unit allows "
                       f"{', '.join(f'`{n}`' for n in first['unit_device_allow'])} and sets "
                       f"`CUDA_VISIBLE_DEVICES={visible}`.\n\n")
        out.append("| case | what | CUDA_VISIBLE_DEVICES | hidden nodes | MDWE | build | ran on "
                   "| GPU memory of its pid | tok/s | smoke |\n"
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
        out.extend(isolation_case_row(c) for c in cases)
        for c in cases:
            if c.get("skipped"):
                continue
            out.append(f"\n### case {c['case']}: {c.get('what', '')}\n\n")
            if c.get("error"):
                out.append(fence(c["error"]))
                continue
            if c.get("nodes_seen"):
                out.append("Inside the wall, `os.open(node, O_RDWR)`: "
                           + ", ".join(f"`{k}` {v}" for k, v in c["nodes_seen"].items()) + "\n\n")
            if c.get("exited"):
                out.append("The server exited before it was healthy:\n" + fence(c["exited"]))
            if c.get("smoke_table"):
                out.append(fence(c["smoke_table"]))
            if (c.get("smoke") or {}).get("failures"):
                out.append("Smoke failures:\n\n" + "".join(f"- {f}\n" for f in c["smoke"]["failures"]) + "\n")
            if c.get("log_lines"):
                out.append("Server log (device and offload lines):\n" + fence("\n".join(c["log_lines"])))
    checks = iso.get("checks") or {}
    if checks:
        out.append("\n### MDWE and the driver's JIT, without llama.cpp\n\n"
                   "| check | exit | output |\n| --- | --- | --- |\n")
        for name, check in checks.items():
            text = " ".join((check.get("output") or "").strip().splitlines()[-2:])[:200].replace("|", "/")
            out.append(f"| {name} | {check.get('exit')} | {text} |\n")
        out.append("\n")
    if isobuild:
        out.append("\n### Builds (plain cmake, `llama-server` only)\n\n| flavor | CUDA architectures | exit | seconds "
                   "| SASS | PTX |\n| --- | --- | --- | --- | --- | --- |\n")
        for flavor, build in (isobuild.get("builds") or {}).items():
            fatbin = build.get("fatbin") or {}
            sass = ", ".join(fatbin.get("sass") or []) or "-"
            ptx = ", ".join(fatbin.get("ptx") or []) or "-"
            out.append(f"| {flavor} | `{build.get('architectures')}` | {build.get('exit')} | {build.get('seconds')} | "
                       f"{sass} | {ptx} |\n")
        out.append("\n")
    return "".join(out)


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def health_text(transitions: Sequence[Sequence[Any]] | None) -> str:
    """`refused (0.01 s) → 200 (0.84 s)`: what /health answered from the start, and when each answer began."""
    return " → ".join(f"{answer} ({seconds:g} s)" for seconds, answer in transitions or []) or "-"


def whisper_section(w: Mapping[str, Any]) -> str:  # noqa: C901
    out: list[str] = ["\n## whisper-server (whisper.cpp, built by gpubox)\n"]
    spec = w.get("spec") or {}
    prepared = w.get("prepared") or {}
    if prepared:
        out.append(f"whisper.cpp f24588a's tree (trimmed), committed on the machine at `{prepared['commit']}` in "
                   f"`{prepared['src']}`; `gpubox.build.fetch_script` cloned it into `{spec.get('prefix')}/src`, "
                   f"then `gpubox.build.build_script(WhisperCppBuild(...), \"cuda\", "
                   f"{w.get('architectures')}, {w.get('nvcc')!r}, ccache=False)` built, installed and switched "
                   f"`current`.\n\n")
        out.append("| script | exit | wall time |\n| --- | --- | --- |\n")
        for name in ("fetch", "build"):
            run = w.get(f"{name}_run")
            if run:
                out.append(f"| `{name}_script` | {run['exit']} | {run['seconds']} s |\n")
        out.append("\n")
    if w.get("configure"):
        out.append("CMake configure (the product's `cmake_configure_args`):\n" + fence(shlex.join(w["configure"])))
    check = w.get("stamp_check")
    if check:
        out.append(f"The deploy's no-op check afterwards (`installed_command` + `parse_installed` + `is_installed`): "
                   f"stamp matches **{check['stamp_matches']}**, `current` points here "
                   f"**{check['current_points_here']}** (`current` → `{check['current']}`); the stamp:\n"
                   + fence(check["stamp"] or "(none)"))
    if w.get("installed"):
        fatbin = w.get("fatbin") or {}
        out.append(f"Installed build (files, the binary's NEEDED libraries, its size in bytes); its fatbin: SASS "
                   f"{', '.join(fatbin.get('sass') or []) or '-'}, PTX {', '.join(fatbin.get('ptx') or []) or '-'}; "
                   f"its saved `--help` lists {w.get('help_option_lines')} option lines.\n" + fence(w["installed"]))
    for name in ("fetch", "build"):
        run = w.get(f"{name}_run") or {}
        if run.get("exit"):
            out.append(f"The {name} script failed:\n" + fence(run["output_tail"]) + fence(run.get("log_tail", "")))
    if w.get("service"):
        out.append(f"\n### {w['service']} on GPU {w['gpu']} (`{w['uuid']}`), pid {w.get('pid')}\n\n")
        out.append(f"Started from the rendered unit's `ExecStart`/`Environment=` "
                   f"(`CUDA_VISIBLE_DEVICES={(w.get('environment') or {}).get('CUDA_VISIBLE_DEVICES')}`). "
                   f"`/health` from the start, polled every 50 ms ({w.get('health_polls')} polls): "
                   f"{health_text(w.get('health'))}.\n\n")
    audio = w.get("audio") or {}
    transcripts = w.get("transcripts") or []
    if transcripts:
        out.append(f"Transcriptions (`gpubox.speech.transcribe_command`, {w.get('client', 'curl')}; judged by "
                   f"`TranscriptCheck`: WER ≤ {WHISPER_MAX_WER:g}, RTF ≤ {WHISPER_MAX_RTF:g}):\n\n"
                   "| audio | run | audio s | request s | RTF | WER | passed | transcript |\n"
                   "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
        for r in transcripts:
            if "error" in r:
                out.append(f"| {r['audio']} | {r['run']} | - | - | - | - | error | {r['error'][:200]} |\n")
                continue
            out.append(f"| {r['audio']} | {r['run']} | {r['audio_s']:g} | {r['seconds']:.3f} | {r['rtf']:.4f} | "
                       f"{r['wer']:.3f} | {r['passed']} | {r['heard'].replace('|', '/')} |\n")
        out.append("\n")
        for name, info in audio.items():
            out.append(f"- {name}: `{info['path']}`, {info['seconds']} s; expected: \"{info['expected']}\"\n")
        out.append("\n")
    v = w.get("vram")
    if v:
        planned, logged = v["planned_terms_mib"], v["logged_mib"]
        out.append(
            "VRAM: the planner's whisper term (`gpubox.vram.speech_terms(server)`: weights + state + "
            f"`WHISPER_CUDA_CONTEXT_MIB`, {WHISPER_CUDA_CONTEXT_MIB} MiB) against nvidia-smi's memory of the pid "
            "(compute apps) and whisper.cpp's own "
            f"logged buffers (MB = 10^6 bytes, shown in MiB):\n\n"
            "| term | planned MiB (table) | planned MiB (file size) | measured MiB |\n| --- | --- | --- | --- |\n"
            f"| weights | {mib(planned.get('weights'))} | {mib(v['planned_file_terms_mib'].get('weights'))} | "
            f"{mib(v['logged_weights_mib'])} (logged `model size`) |\n"
            f"| state (KV self/cross/pad, compute buffers) | {mib(planned.get('compute'))} | "
            f"{mib(v['planned_file_terms_mib'].get('compute'))} | {mib(v['logged_state_mib'])} (logged) |\n"
            f"| CUDA context and the rest | {mib(planned.get('headroom'))} | "
            f"{mib(v['planned_file_terms_mib'].get('headroom'))} | {mib(v['measured_minus_logged_mib'])} "
            "(process − logged) |\n"
            f"| **total** | **{mib(v['planned_total_mib'])}** | **{mib(v['planned_file_total_mib'])}** | "
            f"**{mib(v['process_mib'])}** (nvidia-smi, the pid) |\n\n"
            f"Planned − measured: {mib(v['gap_mib'])} MiB (table weights), {mib(v['gap_file_mib'])} MiB (file "
            f"size, {v['model_bytes']} bytes).\n\n"
            "| logged buffer | MB | MiB |\n| --- | --- | --- |\n"
            + "".join(f"| {name} | {mb:g} | {logged.get(name, 0):g} |\n" for name, mb in v["logged_mb"].items())
            + "\n"
        )
    if w.get("compute_apps") is not None:
        out.append("nvidia-smi compute apps while it served: "
                   + (", ".join(f"pid {a['pid']} on …{a['gpu_uuid'][-8:]} {a['used_memory_mib']} MiB"
                                for a in w["compute_apps"]) or "none")
                   + f"; residency: {w.get('residency_failures') or 'on its GPU only'}.\n\n")
    if w.get("log_lines"):
        out.append("whisper-server's log (device, buffers):\n" + fence("\n".join(w["log_lines"])))
    out += failures_and_unit(w)
    return "".join(out)


def seedlayout_section(s: Mapping[str, Any]) -> str:
    out: list[str] = ["\n## The seed's layout: llama-server on GPU 0, whisper-server on GPU 1\n"]
    build = s.get("build") or {}
    if build.get("exit") is not None:
        out.append(f"llama-server: isobuild's plain cmake sm90 build (seedbuild, in the background beside the "
                   f"whisper build): exit {build['exit']}, {build['seconds']} s.\n\n")
    services = s.get("services") or []
    if services:
        out.append("| service | program | GPU | uuid | CUDA_VISIBLE_DEVICES | pid | healthy after s |\n"
                   "| --- | --- | --- | --- | --- | --- | --- |\n")
        for r in services:
            out.append(f"| {r['service']} | {r['program']} | {r['gpu']} | `{r['uuid']}` | "
                       f"`{r['environment'].get('CUDA_VISIBLE_DEVICES')}` | {r['pid']} | "
                       f"{r.get('healthy_after_s')} |\n")
        out.append("\n")
    answers = s.get("requests") or {}
    if answers:
        llama, whisper = answers.get("llama") or {}, answers.get("whisper") or {}
        out.append(f"Both at once (started together, after one warm-up request each): llama-server "
                   f"`/completion` {llama.get('predicted_n')} tokens at "
                   f"{tokens_per_second(llama.get('tokens_per_second'))} tok/s over {llama.get('interval')} s; "
                   f"whisper-server `/inference` of jfk.wav over "
                   f"{whisper.get('interval')} s (RTF {whisper.get('rtf')}, WER {whisper.get('wer')}: "
                   f"\"{whisper.get('text', whisper.get('error'))}\"); overlap {s.get('overlap_s')} s.\n\n")
    for key, when in (("compute_apps_during", "during the requests"), ("compute_apps_after", "after both answered")):
        rows = s.get(key)
        if rows is None:
            continue
        out.append(f"nvidia-smi `--query-compute-apps=pid,gpu_uuid,used_memory`, {when}:\n\n"
                   "| pid | service | GPU | gpu_uuid | used MiB |\n| --- | --- | --- | --- | --- |\n")
        out.extend(f"| {r['pid']} | {r['service']} | {r['gpu']} | `{r['gpu_uuid']}` | {r['used_memory_mib']} |\n"
                   for r in rows)
        out.append("\n")
    if "failures" in s:
        out.append(f"Each pid on its own GPU's uuid and nowhere else: **{'yes' if not s['failures'] else 'NO'}**"
                   + "".join(f"\n- {f}" for f in s["failures"]) + "\n\n")
    for name, lines in (s.get("log_lines") or {}).items():
        out.append(f"{name}'s log (device lines):\n"
                   + fence("\n".join(lines) or "(none: llama-server logs its devices at -lv 4 only)"))
    return "".join(out)


# ---- the reproduction check: this run against docs/gpu-validation.md's numbers

REFERENCE_CARD = "NVIDIA H200"
REFERENCE_PROCESS_MIB = {
    "smoke smollm2-gpu0": 792, "smoke smollm2-gpu0-draft": 1000, "mtp tiny-gemma4-mtp-gpu0": 1462,
    "vram ctx 4096, no drafter": 788, "vram ctx 4096, self draft": 992, "vram ctx 65536, no drafter": 2198,
    "vram ctx 65536, self draft": 3812, "whisper tiny.en": 874,
}  # fmt: skip
"""docs/gpu-validation.md's per-process GPU memory (nvidia-smi's compute apps), measured on an H200."""
MEMORY_TOLERANCE = 0.01
PLANNER_TOLERANCE = 0.05


def card_name(state: Mapping[str, Any]) -> str | None:
    """The GPU this run measured on, as NVML (else the NvidiaGpus fact, else the GPU probe) names it."""
    facts = state.get("facts") or {}
    if facts.get("nvml"):
        return str(facts["nvml"][0]["name"])
    gpus = (facts.get("facts.gpu.NvidiaGpus") or {}).get("value") or (state.get("whisper") or {}).get("gpus") or []
    return str(gpus[0]["name"]) if gpus else None


def app_mib(apps: Sequence[Mapping[str, Any]] | None, pid: Any) -> int | None:
    held = [a["used_memory_mib"] for a in apps or [] if a["pid"] == pid and a["used_memory_mib"] is not None]
    return sum(held) if held else None


def measured_processes(state: Mapping[str, Any]) -> dict[str, int | None]:
    """Each server's GPU memory in this run (nvidia-smi), by the reference's labels."""
    out: dict[str, int | None] = {}
    for row in state.get("smoke") or []:
        out[f"smoke {row['service']}"] = app_mib(row.get("compute_apps"), row["pid"])
    mtp = state.get("mtp") or {}
    if mtp.get("service"):
        out[f"mtp {mtp['service']}"] = app_mib(mtp.get("compute_apps"), mtp.get("pid"))
    for row in state.get("vram") or []:
        out[f"vram ctx {row['ctx']}, {'self draft' if row['draft'] else 'no drafter'}"] = row.get("process_mib")
    w = state.get("whisper") or {}
    if w.get("held_mib") is not None:
        out[f"whisper {WHISPER_MODEL_ARCHITECTURE}"] = (w.get("held_mib") or {}).get(w.get("uuid"))
    return out


def within(measured: float | None, reference: float, tolerance: float) -> bool:
    return measured is not None and abs(measured - reference) <= tolerance * reference


def whisper_planned_mib(size: str) -> float:
    """The planner's whisper-server total for a size now (gpubox.vram's table, not the file's size)."""
    model = ModelFile(path="/m.bin", sha256="0" * 64, format="ggml-whisper", architecture=size)
    return sum(speech_terms(whisper_service(model, 0)).values()) / MIB


def piper_planned_mib(voice_bytes: int) -> float:
    voice = ModelFile(path="/v.onnx", sha256="0" * 64, format="onnx")
    config = ModelFile(path="/v.onnx.json", sha256="0" * 64, format="json")
    return sum(speech_terms(piper_service(voice, config, 0), voice_bytes).values()) / MIB


def max_held(values: Iterable[Any]) -> int | None:
    held = [v for v in values if isinstance(v, int)]
    return max(held) if held else None


def planner_rows(state: Mapping[str, Any]) -> list[tuple[str, float, int | None]]:
    """(what, planned MiB, measured MiB): the llama services as the run planned them, the speech services
    with the planner's constants as they are now (the report may be rendered after they changed)."""
    rows: list[tuple[str, float, int | None]] = [
        (f"llama-server ctx {r['ctx']}, {'self draft' if r['draft'] else 'no drafter'}", r["estimate_mib"],
         r["measured_mib"]) for r in state.get("vram") or []
    ]  # fmt: skip
    w = state.get("whisper") or {}
    if w.get("held_mib") is not None:
        rows.append((f"whisper-server {WHISPER_MODEL_ARCHITECTURE}", whisper_planned_mib("tiny"),
                     (w.get("held_mib") or {}).get(w.get("uuid"))))  # fmt: skip
    for r in (state.get("whispersizes") or {}).get("rows") or []:  # sized as the planner sizes them now
        rows.append((f"whisper-server {r['name']} (random weights)", whisper_planned_mib(planner_size(r["name"])),
                     max_held((r.get("held_mib") or {}).values())))  # fmt: skip
    piper = state.get("piper") or {}
    hooked = next((c for c in piper.get("cases") or [] if c["case"] == "hook"), None)
    if hooked:
        held = max_held(run["held_mib"].get(piper["uuid"]) for run in hooked["runs"])
        rows.append(("piper --cuda (joe medium)", piper_planned_mib(piper["voice_bytes"]), held))
    return rows


def verdicts(state: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(what, passed) of each smoke-style check this run made; the reference passed all of its own."""
    out = [(f"smoke {row['service']}", str(row["result"]["passed"])) for row in state.get("smoke") or []]
    if state.get("mtp"):
        out.append(("draft-mtp", str(state["mtp"].get("passed"))))
    if (state.get("whisper") or {}).get("passed") is not None:
        out.append(("whisper-server tiny.en transcripts", str(state["whisper"]["passed"])))
    for case in (state.get("piper") or {}).get("cases") or []:
        out.append((f"piper smoke, {case['case']}", str(all(run["passed"] for run in case["runs"]))))
    return out


EXPECTED_VERDICTS = {"piper smoke, no-hook": "False"}
"""The one smoke that must fail: piper without the preload hook, the CUDA toolkit hidden (the CPU fallback)."""


def ninja_rebuilt(output: str) -> list[str]:
    """The compile and link steps of `cmake --build` output (a no-op build has none)."""
    return [line for line in output.splitlines() if re.match(r"\[\d+/\d+\] (Building|Linking)", line)]


def build_noop(build: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether the second pyinfra run changed nothing (every operation it started says `No changes`) and ninja
    rebuilt nothing; what it saw."""
    if not build or len(build.get("runs") or []) < 2:
        return False, "no second run"
    second = build["runs"][1]
    started = second["output_tail"].count("--> Starting operation:")
    unchanged = second["output_tail"].count("] No changes")
    rebuilt = ninja_rebuilt((build.get("ninja_again") or {}).get("output", ""))
    ok = second["exit"] == 0 and started > 0 and unchanged == started and not rebuilt
    return ok, (f"second pyinfra run exit {second['exit']}: {unchanged} of {started} operations `No changes`; "
                f"ninja rebuilt {len(rebuilt)}")


def reproduction_section(state: Mapping[str, Any]) -> str:
    """This run against the reference (docs/gpu-validation.md, H200): process memory within 1 %, the
    planner within 5 %, every smoke's verdict, the build a no-op on rerun. tok/s is this card's only."""
    card = card_name(state) or "this machine"
    rows: list[tuple[str, str, str, bool]] = []
    measured = measured_processes(state)
    for label, reference in REFERENCE_PROCESS_MIB.items():
        if label in measured:
            got = measured[label]
            rows.append((f"GPU memory, {label}", f"{reference} MiB", f"{mib(got)} MiB",
                         within(got, reference, MEMORY_TOLERANCE)))  # fmt: skip
    for label, planned, got in planner_rows(state):
        error = None if not got else (planned - got) / got
        rows.append((f"planner, {label}", f"within {PLANNER_TOLERANCE:.0%}",
                     f"{planned:.0f} planned / {mib(got)} MiB ({'-' if error is None else f'{error:+.1%}'})",
                     error is not None and abs(error) <= PLANNER_TOLERANCE))  # fmt: skip
    for label, passed in verdicts(state):
        expected = EXPECTED_VERDICTS.get(label, "True")
        rows.append((f"verdict, {label}", f"passed={expected}", f"passed={passed}", passed == expected))
    if state.get("build"):
        ok, seen = build_noop(state["build"])
        rows.append(("CUDA build a no-op on rerun", "no change, nothing rebuilt", seen, ok))
    if not rows:
        return ""
    out = [f"\n## Reproduction check ({card} against docs/gpu-validation.md's {REFERENCE_CARD})\n\n"
           f"GPU memory within {MEMORY_TOLERANCE:.0%} of the reference, the planner within "
           f"{PLANNER_TOLERANCE:.0%} of this run's measurement, each smoke's verdict, the build a no-op on rerun. "
           f"tok/s is recorded per card, never compared across cards.\n\n"
           f"**{sum(ok for *_, ok in rows)} of {len(rows)} hold.**\n\n"
           f"| check | reference ({REFERENCE_CARD}) | this run ({card}) | holds |\n| --- | --- | --- | --- |\n"]
    out += [f"| {what} | {ref} | {got} | {'yes' if ok else '**NO**'} |\n" for what, ref, got, ok in rows]
    return "".join(out) + "\n"


# ---- piper and the whisper sizes


def piper_section(piper: Mapping[str, Any]) -> str:  # noqa: C901
    out = ["\n## piper on CUDA (onnxruntime-gpu)\n\n"]
    if piper.get("venv"):
        out.append(f"Venv `{piper['venv']}` ({piper.get('install_seconds')} s): " + ", ".join(piper.get("wheels") or [])
                   + ". The CUDA/cuDNN libraries: the machine's nvidia-* wheels, linked in as `site-packages/nvidia`: "
                   + ", ".join(f"{k} {v}" for k, v in ((piper.get("nvidia") or {}).get("versions") or {}).items())
                   + "; installed sizes: "
                   + ", ".join(f"`{Path(k).name}` {v / MIB:.0f} MiB"
                               for k, v in (piper.get("nvidia_bytes") or {}).items())
                   + ".\n\n")  # fmt: skip
    if piper.get("hook"):
        out.append(f"The preload hook (`gpubox.piper_install.gpu_preload_lines`): exit {piper['hook']['exit']}, "
                   f"files {piper['hook']['files']}.\n\n")
    uuid = piper.get("uuid")
    out.append("| case | CUDA toolkit | text | words | request s | audio s | RTF | GPU MiB | smoke passed | "
               "failures |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    for case in piper.get("cases") or []:
        for run in case["runs"]:
            out.append(f"| {case['case']} | {'hidden' if case['hide_toolkit'] else 'visible'} | {run['label']} | "
                       f"{run['words']} | {run['seconds']} | {run['audio_s']} | {run['rtf']} | "
                       f"{mib((run.get('held_mib') or {}).get(uuid))} | {run['passed']} | "
                       f"{'; '.join(run['failures'])[:300] or '-'} |\n")
    out.append("\n")
    for case in piper.get("cases") or []:
        out.append(f"{case['case']}: ready (`/info` 200) after {case.get('ready_s')} s; CUDA libraries mapped: "
                   + (", ".join(f"`{p}`" for p in case.get("cuda_libraries") or []) or "none") + "\n")
        if case.get("log_lines"):
            out.append(fence("\n".join(case["log_lines"])))
        if case["runs"] and case["runs"][0].get("table"):
            out.append(fence(case["runs"][0]["table"]))
    baseline = piper.get("baseline") or {}
    if baseline:
        out.append(f"onnxruntime's CUDA provider on a one-Conv model in the same venv (its context): "
                   f"{mib(baseline.get('held_mib'))} MiB; {baseline.get('providers') or baseline.get('error')}\n\n")
    if piper.get("voice_bytes"):
        out.append(f"The planner now: `speech_terms` plans {piper_planned_mib(piper['voice_bytes']):.0f} MiB for the "
                   f"{piper['voice_bytes']}-byte voice.\n\n")
    out += failures_and_unit(piper)
    return "".join(out)


def whispersizes_section(sizes: Mapping[str, Any]) -> str:
    out = ["\n## whisper-server at every size (random-weight models)\n\n"
           "Each model written on the machine with the real hyperparameters (`tests.testbed.random_whisper`), "
           "served from its rendered unit, sent jfk.wav greedy (temperature 0, no fallback) then sampled "
           "(temperature 0.2: 2 decoders, whisper.cpp's KV cache re-created for them). Logged: whisper.cpp's "
           "own buffer lines (MB shown in MiB). GPU MiB: nvidia-smi's memory of the pid after load and after "
           "each request.\n\n"
           "| model | file MiB | logged weights | logged state (KV self) | after load | greedy | sampled | "
           "greedy − logged | sampled − greedy | planned now | request s (greedy/sampled) |\n"
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"]
    for r in sizes.get("rows") or []:
        held = r.get("held_mib") or {}
        logged = r["logged_weights_mib"] + r["logged_state_mib"]
        greedy, sampled = held.get("greedy"), held.get("sampled")
        extra = "-" if greedy is None or sampled is None else f"{sampled - greedy:g}"
        over = "-" if greedy is None else f"{greedy - logged:.1f}"
        times = "/".join(str((r.get("requests") or {}).get(k, {}).get("seconds")) for k in ("greedy", "sampled"))
        planned = whisper_planned_mib(planner_size(r["name"]))  # sized as the planner sizes it now
        out.append(f"| {r['name']} | {r['file_bytes'] / MIB:.1f} | {r['logged_weights_mib']:g} | "
                   f"{r['logged_state_mib']:g} ({r['logged_kv_self_mib']:g}) | {mib(held.get('load'))} | "
                   f"{mib(greedy)} | {mib(sampled)} | {over} | {extra} | {planned:.0f} | "
                   f"{times} |\n")
    out.append("\n")
    out += failures_and_unit(sizes)
    return "".join(out)


def failures_section(errors: Mapping[str, str]) -> str:
    out: list[str] = ["\n## Steps that failed\n"]
    for step, error in errors.items():
        out.append(f"\n### {step}\n" + fence(error[-3000:]))
    return "".join(out)


def render_report(state: dict[str, Any]) -> str:
    """The markdown report of a run from its state.json (as loaded); does not change `state`."""
    card = card_name(state)
    out: list[str] = [f"# GPU validation of gpubox ({card or 'GPU unknown'})\n"]
    out.append(
        "Written by `scripts/gpu-validate` on the machine it validates (see the script's docstring for "
        f"the steps). Every number below was measured there in this run, on {card or 'this machine'}.\n"
    )
    errors = state.get("errors") or {}
    out.append(summary(state))
    out.append(reproduction_section(state))
    out.append(machine_section(state.get("facts") or {}))
    out.append(build_section(state.get("prepare"), state.get("build")))
    if state.get("smoke"):
        out.append(smoke_section(state["smoke"]))
    if state.get("mtp"):
        out.append(mtp_section(state["mtp"]))
    if state.get("bench"):
        out.append(bench_section(state["bench"]))
    if state.get("vram"):
        out.append(vram_section(state["vram"]))
    if state.get("isolation"):
        out.append(isolation_section(state["isolation"], state.get("isobuild")))
    if state.get("whisper"):
        out.append(whisper_section(state["whisper"]))
    if state.get("seedlayout"):
        out.append(seedlayout_section(state["seedlayout"]))
    if state.get("piper"):
        out.append(piper_section(state["piper"]))
    if state.get("whispersizes"):
        out.append(whispersizes_section(state["whispersizes"]))
    if state.get("rpc"):
        out.append(rpc_section(state["rpc"]))
    if errors:
        out.append(failures_section(errors))
    return "".join(out)


def report_or_error(state: dict[str, Any]) -> str:
    """render_report, or the traceback of its failure (the state file still holds every number)."""
    try:
        return render_report(state)
    except Exception:  # noqa: BLE001
        return "# GPU validation of gpubox\n\nThe report failed to render:\n" + fence(traceback.format_exc())


# --------------------------------------------------------------------------- main

STEPS: dict[str, Callable[[argparse.Namespace, State], None]] = {
    "prepare": step_prepare, "facts": step_facts, "build": step_build,
    "smoke": step_smoke, "mtp": step_mtp, "bench": step_bench, "vram": step_vram,
    "isobuild": step_isobuild, "isolation": step_isolation,
    "seedbuild": step_seedbuild, "whisper": step_whisper, "seedlayout": step_seedlayout,
    "whisperbuild": step_whisperbuild, "piper": step_piper, "whispersizes": step_whispersizes,
    "rpc": step_rpc,
}


def wait_for_model(path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not Path(path).is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout_s:g} s")
        time.sleep(2)


def run_steps(args: argparse.Namespace, state: State) -> dict[str, str]:
    """Run the selected steps, recording each failure (and timing) in the state; the errors."""
    errors: dict[str, str] = state["errors"] or {}
    for step in selected_steps(args.steps):
        if step == "report":
            continue
        if step in MODEL_STEPS:
            wait_for_model(args.model, args.wait_model)
        reason = skip_reason(step, errors)
        if reason:
            errors[step] = reason
            state["errors"] = errors
            continue
        log(f"step {step}")
        started = time.monotonic()
        try:
            STEPS[step](args, state)
            errors.pop(step, None)
        except Exception:  # noqa: BLE001 - recorded in the report; later steps still run
            errors[step] = traceback.format_exc()
            log(f"step {step} FAILED:\n{errors[step]}")
        state["errors"] = errors
        timings = state["step_seconds"] or {}
        timings[step] = round(time.monotonic() - started, 1)
        state["step_seconds"] = timings
        if step == "prepare" and "prepare" in errors:
            break
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    state = State(Path(args.workdir))
    errors = run_steps(args, state)
    out = report_path(args)
    out.write_text(report_or_error(state.data))
    log(f"report written to {out}")
    return 1 if errors else 0
