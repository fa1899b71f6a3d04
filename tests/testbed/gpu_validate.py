"""Validate gpubox on a real NVIDIA GPU machine and write docs/gpu-validation.md.

Steps (each records into WORKDIR/state.json; a failed step is recorded and the next ones run):

  prepare  unpack a trimmed llama.cpp tarball, `git init` + commit it; its sha is the pinned commit
  facts    pyinfra @local fact facts.gpu.NvidiaGpus / facts.cuda.CudaToolkit, NVML with bandwidth
  build    the real operations.llamacpp.build on @local (pyinfra -y @local build_deploy.py), timed,
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
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import requests
from rich.console import Console, RenderableType

from gpubox import bench
from gpubox import build as plan
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
from gpubox.servers.llama import LlamaServer, binary_path
from gpubox.smoke import (
    GpuProcesses,
    check_gpu_residency,
    read_spec_counters,
    requests_transport,
    run_smoke,
    smoke_table,
    wait_until_healthy,
)
from gpubox.spec import LlamaCppBuild, ModelFile, SmokeThresholds
from gpubox.unit import render_unit, server_environment
from gpubox.vram import CUDA_CONTEXT_MIB, MIB, ServicePlan, load_model_header, parse_memory_breakdown, plan_service
from tests.testbed.tiny_gemma4 import write_tiny_gemma4

if TYPE_CHECKING:
    from gpubox.nvml import NvmlGpu

Json = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
BUILD_DEPLOY = REPO / "scripts" / "gpu_validate" / "build_deploy.py"

PREFIX = "/opt/llama.cpp"
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
MODEL_STEPS = ("smoke", "bench", "vram", "isolation")  # they wait for --model (it may still be arriving)
BUILD_STEPS = ("bench", "vram", "smoke", "mtp")  # skipped when the build failed
# Not part of `all` (two GPUs, their own plain-cmake builds): `isobuild` then `isolation`.


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="+", choices=[*STEP_NAMES, "isobuild", "isolation", "report", "all"])
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


def git_commands(src: Path) -> list[str]:
    """Make the unpacked tree a git repository with one commit (served to the build by file://)."""
    git = f"git -C {shlex.quote(str(src))}"
    return [
        f"{git} init -q",
        f"{git} config uploadpack.allowReachableSHA1InWant true",
        f"{git} config uploadpack.allowAnySHA1InWant true",
        f"{git} config core.autocrlf false",
        f"{git} add -A -f",
        f"{git} -c user.name=gpubox -c user.email=gpubox@localhost commit -q -m 'llama.cpp 0c1e57098 (trimmed)'",
    ]


def git_env(base: Mapping[str, str]) -> dict[str, str]:
    """Fixed author and committer dates: the same tarball gives the same sha."""
    return {**base, "GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE}


def prepared_record(src: Path, sha: str) -> Json:
    return {"src": str(src), "commit": sha.strip(), "repo": f"file://{src}"}


def step_prepare(args: argparse.Namespace, state: State) -> None:
    src = Path(args.src)
    if not (src / ".git").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        code, out = sh(["tar", "xzf", args.tarball, "-C", str(src)])
        if code:
            raise RuntimeError(out)
        env = git_env(os.environ)
        for command in git_commands(src):
            code, out = sh(command, env=env)
            if code:
                raise RuntimeError(f"{command}: {out}")
    code, sha = sh(["git", "-C", str(src), "rev-parse", "HEAD"])
    if code:
        raise RuntimeError(sha)
    state["prepare"] = prepared_record(src, sha)
    log(f"llama.cpp source {src} at {sha.strip()}")


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


def unit_command(server: LlamaServer, gpus: Sequence[Gpu] = ()) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, unit text): what the rendered unit starts, checked against argv/server_environment.

    `gpus`: the host's GPU records (the NvidiaGpus fact's: UUID and minor number), as the unit operation
    renders with; the unit pins its GPUs by UUID.
    """
    text = render_unit(server, binary_path(PREFIX), gpus)
    argv, env = parse_unit(text)
    if argv != server.argv(binary_path(PREFIX)) or env != server_environment(server, gpus):
        raise RuntimeError(f"unit text does not parse back to the server's argv/server_environment:\n{text}")
    return argv, env, text


def process_env(base: Mapping[str, str], unit_env: Mapping[str, str]) -> dict[str, str]:
    """The server process's environment: `base` overlaid with the unit's Environment= (the GPU pinning)."""
    return {**base, **unit_env}


class Server:
    """A llama-server started from its rendered unit's ExecStart and Environment=, logging to WORKDIR."""

    def __init__(
        self,
        server: LlamaServer,
        workdir: Path,
        tag: str,
        *,
        launch: tuple[list[str], dict[str, str], str] | None = None,
        gpus: Sequence[Gpu] = (),
    ) -> None:
        """`launch`: (argv, environment, unit text) to start instead of the unit's (the isolation step's).

        `gpus`: the host's GPU records the unit is rendered with (`fact_gpu_records`).
        """
        self.server = server
        self.argv, self.env, self.unit = launch or unit_command(server, gpus)
        self.log_path = workdir / f"server-{tag}.log"
        self.log: IO[bytes] = open(self.log_path, "w+b")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.argv, env=process_env(os.environ, self.env), stdout=self.log, stderr=subprocess.STDOUT,
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
            raise RuntimeError(f"llama-server exited {server.process.returncode}:\n{server.log_text()[-2500:]}")
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
    for step, error in errors.items():
        rows.append((f"FAILED {step}", error.strip().splitlines()[-1][:200] if error.strip() else "?"))
    if timings:
        rows.append(("step seconds", ", ".join(f"{k} {v:g}" for k, v in timings.items())))
    return ("\n## Summary\n\n| what | result |\n| --- | --- |\n"
            + "".join(f"| {k} | {v.replace('|', '/')} |\n" for k, v in rows) + "\n")


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
        out.append(f"llama.cpp 0c1e57098's tree (trimmed: no models/docs/tests, CUDA and CPU backends only), "
                   f"committed on the machine at `{prepared['commit']}` in `{prepared['src']}`; the "
                   f"`LlamaCppBuild` pins that full sha with `repo={prepared['repo']}`.\n\n")
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
    if mtp.get("failures"):
        out.append("Failures:\n" + "".join(f"- {f}\n" for f in mtp["failures"]) + "\n")
    if mtp.get("unit"):
        out.append("The rendered unit:\n" + fence(mtp["unit"]))
    return "".join(out)


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


def failures_section(errors: Mapping[str, str]) -> str:
    out: list[str] = ["\n## Steps that failed\n"]
    for step, error in errors.items():
        out.append(f"\n### {step}\n" + fence(error[-3000:]))
    return "".join(out)


def render_report(state: dict[str, Any]) -> str:
    """The markdown report of a run from its state.json (as loaded); does not change `state`."""
    out: list[str] = ["# GPU validation of gpubox\n"]
    out.append(
        "Written by `scripts/gpu-validate` on the machine it validates (see the script's docstring for "
        "the steps). Every number below was measured there in this run.\n"
    )
    errors = state.get("errors") or {}
    out.append(summary(state))
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
