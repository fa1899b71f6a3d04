"""Pack what the GPU machine lacks for the speech validation into .gpu-pack/, and print the device calls.

    scripts/gpu-pack                 (here, in a checkout: build .gpu-pack/ and print the `run` calls)
    scripts/gpu-pack assemble --from .gpu-pack/cN    (there: this call's pieces -> the files they make)
    scripts/gpu-pack wait --workdir /root/gv --out $OUT --deadline 540    (there: wait for the run, collect)

The run is `scripts/gpu-validate prepare seedbuild whisper seedlayout report` (tests/testbed/gpu_validate.py).
The GPU machine (nvidia-h200-x2) has nvcc, cmake, ninja, git and a Python 3.12 with rich, requests, numpy and
nvidia-ml-py, and no network. It lacks, and this packs:

  llama.tgz      llama.cpp of llama-cpp-python 0.3.36 (tests.testbed.assets.llama_cpp_repo), trimmed (LLAMA_TRIM)
  whisper.tgz    whisper.cpp f24588a of pywhispercpp 1.5.1 (whisper_cpp_repo), trimmed (WHISPER_TRIM): its build
                 files, src, include, ggml's CPU and CUDA backends, examples (server among them) and samples/jfk.wav
  wheels         pydantic and what it needs, gguf (WHEELS), installed with `pip --require-hashes -r wheels.txt`
  models         SmolLM2-135M-Instruct Q4_1 (smollm2_gguf) and Whisper tiny.en as ggml (whisper_tiny_en_ggml),
                 xz-compressed; the piper round-trip WAV of gpu_validate.ROUNDTRIP_TEXT, made here by piper (it
                 cannot run there)

One call carries at most 64 MiB: the working tree that travels (tracked and untracked-not-ignored files) and
its carried paths. So the pieces are laid out over as many calls as that takes (`plan_calls`), one carried
folder each (.gpu-pack/c1, c2, ...), the models split where a call is full. The first call starts the run in
the background (setsid); each later call adds its pieces, and the files they complete appear atomically
(gpu-validate waits for the models); the last call waits for the run and brings back the report. The calls
follow each other within the machine's 30 s warm window: a machine given back loses the run.

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
KIND = "nvidia-h200-x2"
MACHINE_PACK = "/root/pack"
WORKDIR = "/root/gv"
SITE = "/root/site"
JOBS = 16  # two builds side by side (whisper.cpp, llama-server) on the machine's 32 cores
LAST_CALL_TIMEOUT_S = 600
WAIT_DEADLINE_S = 560

WHEELS = (
    ("pydantic", "2.14.4"),
    ("pydantic_core", "2.50.5"),
    ("annotated_types", "0.8.0"),
    ("typing_inspection", "0.4.5"),
    ("typing_extensions", "4.16.0"),
    ("gguf", "0.19.0"),
)
"""What gpubox and tests.testbed.gpu_validate import that the machine's python3 lacks (rich, requests, numpy,
pyyaml, tqdm and nvidia-ml-py are there); gguf: tests.testbed.tiny_gemma4, imported by gpu_validate."""
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Leave out of the trimmed trees (paths relative to the tree; a folder leaves out all below it).
GGML_BACKENDS_KEPT = ("ggml-cpu", "ggml-cuda")
LLAMA_TRIM = (
    ".git", "models", "docs", "tests", "media", "examples", "pocs", "benches", "gguf-py",
    "tools/ui/src", "tools/ui/tests", "tools/ui/static", "tools/ui/package-lock.json",
)  # fmt: skip
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


def validate_command(jobs: int = JOBS) -> str:
    return shlex.join([
        "python3", "scripts/gpu-validate", "prepare", "seedbuild", "whisper", "seedlayout", "report",
        "--workdir", WORKDIR, "--tarball", f"{MACHINE_PACK}/llama.tgz",
        "--whisper-tarball", f"{MACHINE_PACK}/whisper.tgz", "--jobs", str(jobs), "--out", f"{WORKDIR}/report.md",
    ])  # fmt: skip


def assemble_command(call: int) -> str:
    return f"python3 scripts/gpu-pack assemble --from {PACK}/c{call} --pack {MACHINE_PACK}"


def wait_command(deadline_s: int = WAIT_DEADLINE_S) -> str:
    return f"python3 scripts/gpu-pack wait --workdir {WORKDIR} --out $OUT --deadline {deadline_s}"


def first_call_command(jobs: int = JOBS) -> str:
    """Unpack the first pieces, install the wheels, copy the repo to WORKDIR/repo and start the run there
    in its own session (it outlives the call; WORKDIR/done gets its exit status)."""
    run = f"{validate_command(jobs)}; echo $? > {WORKDIR}/done"
    return "; ".join([
        "set -e",
        assemble_command(1),
        f"mkdir -p {WORKDIR}/repo",
        f"tar --exclude=./{PACK} -cf - . | tar -xf - -C {WORKDIR}/repo",
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --require-hashes "
        f"-r {MACHINE_PACK}/wheels.txt --find-links {MACHINE_PACK}/wheels --target {SITE}",
        f"cd {WORKDIR}/repo",
        f"(PYTHONPATH={SITE} PYTHONUNBUFFERED=1 setsid nohup sh -c {shlex.quote(run)} > {WORKDIR}/run.log 2>&1 "
        "< /dev/null &)",
        "sleep 8",
        "nvidia-smi -L; nproc; command -v curl xz || true",
        f"tail -n 20 {WORKDIR}/run.log",
    ])  # fmt: skip


def run_calls(n_calls: int, jobs: int = JOBS) -> list[dict[str, object]]:
    """The `run` calls, in order: kind, carry, timeout and command of each."""
    calls: list[dict[str, object]] = []
    for call in range(1, n_calls + 1):
        if call == 1:
            command = first_call_command(jobs)
        else:
            command = f"set -e; {assemble_command(call)}"
            command += f"; {wait_command()}" if call == n_calls else f"; tail -n 5 {WORKDIR}/run.log"
        if n_calls == 1:
            command += f"; {wait_command()}"
        last = call == n_calls
        calls.append({"kind": KIND, "carry": [f"{PACK}/c{call}"], "timeout_s": LAST_CALL_TIMEOUT_S if last else 120,
                      "command": command})
    return calls


def collect_call() -> dict[str, object]:
    """Bring back the run once more (when the last call's wait ran out before the run ended)."""
    return {"kind": KIND, "carry": [], "timeout_s": LAST_CALL_TIMEOUT_S, "command": wait_command()}


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks([path]):
        digest.update(chunk)
    return digest.hexdigest()


def make_tarball(tree: Path, out: Path, rules: Sequence[str], keep: Sequence[str] = ()) -> int:
    """A deterministic .tgz of the repo's tracked files at `tree`, less the trimmed ones; how many files."""
    listed = subprocess.run(["git", "-C", str(tree), "ls-files", "-z"], check=True, capture_output=True).stdout
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
    partial.replace(out)
    return len(names)


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


def roundtrip_wav(out: Path, text: str) -> Path:
    """piper's WAV of `text` with the joe voice (piper from GPUBOX_PIPER, /tmp/piper-venv, or PATH)."""
    from tests.testbed.piper_assets import piper_voice

    piper = os.environ.get("GPUBOX_PIPER") or next(
        (p for p in ("/tmp/piper-venv/bin/piper", shutil.which("piper")) if p and Path(p).is_file()), None
    )
    if piper is None:
        raise RuntimeError("no piper: make a venv from tests.testbed.piper_assets.piper_wheelhouse() "
                           "(/tmp/piper-venv) or set GPUBOX_PIPER")
    voice, _ = piper_voice()
    subprocess.run([piper, "-m", str(voice), "-f", str(out)], input=text.encode(), check=True,
                   capture_output=True)  # fmt: skip
    return out


def wheel_files(dest: Path) -> list[Path]:
    """The pinned wheels, from .whl/ (the earlier runs' folder) or downloaded for CPython 3.12 x86-64."""
    dest.mkdir(parents=True, exist_ok=True)
    found = []
    for name, version in WHEELS:
        pattern = f"{name}-{version}-*.whl"
        have = sorted(dest.glob(pattern)) or sorted((REPO / ".whl").glob(pattern))
        if not have:
            platforms = [word for platform in WHEEL_PLATFORMS for word in ("--platform", platform)]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
                            f"{name}=={version}"], check=True)  # fmt: skip
            have = sorted(dest.glob(pattern))
        wheel = have[0]
        if wheel.parent != dest:
            shutil.copyfile(wheel, dest / wheel.name)
        found.append(dest / wheel.name)
    return found


def requirements_text(wheels: Sequence[Path]) -> str:
    """`name==version --hash=sha256:...` a wheel a line, for `pip install --require-hashes -r`."""
    lines = []
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        lines.append(f"{name}=={version} --hash=sha256:{sha256_of(wheel)}")
    return "\n".join(lines) + "\n"


def pack(repo: Path = REPO, jobs: int = JOBS) -> list[dict[str, object]]:  # noqa: C901
    """Build .gpu-pack/ (the call folders c1..cN, each with the manifest) and return the `run` calls."""
    from tests.testbed.assets import llama_cpp_repo, smollm2_gguf
    from tests.testbed.gpu_validate import ROUNDTRIP_TEXT
    from tests.testbed.whisper_assets import whisper_cpp_repo, whisper_tiny_en_ggml

    root = repo / PACK
    staging = root / "staging"
    for old in [*root.glob("c[0-9]*"), staging]:
        shutil.rmtree(old, ignore_errors=True)
    staging.mkdir(parents=True)
    files: list[tuple[Path, str, str, bool, Path]] = []  # (sent file, name, target there, xz, plain file)

    def add(path: Path, target: str, *, xz_of: Path | None = None) -> None:
        files.append((path, path.name, target, xz_of is not None, xz_of or path))

    for wheel in wheel_files(root / "wheels"):
        add(wheel, f"{MACHINE_PACK}/wheels/{wheel.name}")
    requirements = staging / "wheels.txt"
    requirements.write_text(requirements_text([root / "wheels" / p.name for p, *_ in files]))
    add(requirements, f"{MACHINE_PACK}/wheels.txt")
    llama_repo, _ = llama_cpp_repo()
    whisper_repo, _ = whisper_cpp_repo()
    print(f"llama.tgz: {make_tarball(llama_repo, staging / 'llama.tgz', LLAMA_TRIM)} files", file=sys.stderr)
    add(staging / "llama.tgz", f"{MACHINE_PACK}/llama.tgz")
    count = make_tarball(whisper_repo, staging / "whisper.tgz", WHISPER_TRIM, WHISPER_SAMPLES_KEPT)
    print(f"whisper.tgz: {count} files", file=sys.stderr)
    add(staging / "whisper.tgz", f"{MACHINE_PACK}/whisper.tgz")
    add(roundtrip_wav(staging / "roundtrip-fox.wav", ROUNDTRIP_TEXT), "/root/models/roundtrip-fox.wav")
    for model in (whisper_tiny_en_ggml(), smollm2_gguf()):
        add(xz_cached(model, root / "cache"), f"/root/models/{model.name}", xz_of=model)

    budget = call_budget(working_tree_bytes(repo))
    items = [Item(name, path.stat().st_size, xz) for path, name, _, xz, _ in files]
    calls = plan_calls(items, budget)
    pieces_of: dict[str, list[str]] = {}
    for call in calls:
        for piece in call:
            pieces_of.setdefault(piece.name, []).append(piece.file_name)
    manifest = {"files": [
        {"name": name, "target": target, "xz": xz, "parts": pieces_of[name], "sha256": sha256_of(plain),
         "size": plain.stat().st_size}
        for _, name, target, xz, plain in files
    ]}  # fmt: skip
    sources = {name: path for path, name, *_ in files}
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
    runs = run_calls(len(calls), jobs)
    (root / "calls.json").write_text(json.dumps({"calls": runs, "collect": collect_call(), "budget": budget,
                                                 "manifest": manifest}, indent=1))
    return runs


def describe(runs: Sequence[dict[str, object]], root: Path) -> str:
    sizes = [sum(p.stat().st_size for p in (root / f"c{i}").iterdir()) for i in range(1, len(runs) + 1)]
    lines = [f"{len(runs)} device calls, one after the other within the machine's 30 s warm window:"]
    for number, (run, size) in enumerate(zip(runs, sizes, strict=True), start=1):
        lines.append(f"\n# call {number}: carries {size / MIB:.1f} MiB")
        lines.append(json.dumps(run, indent=1))
    lines.append("\n# if the last call's wait ends before the run (it prints 'still running'):")
    lines.append(json.dumps(collect_call(), indent=1))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    runs = pack()
    print(describe(runs, REPO / PACK))
    return 0
