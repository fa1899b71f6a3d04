"""CLI for the test bed.

``python -m tests.testbed up [--bind-llama] [--bind-whisper] [--bind SRC:DST] [--bind-ro SRC:DST]``
    boot a host, print its SSH port / key / pid / inventory, and record it in a state file;
``python -m tests.testbed down [--all]``
    stop and delete the test hosts recorded in the registry (tests.testbed.registry) that no running
    process owns: the one ``up`` booted, and any left behind by a killed pytest or CLI run; a running
    pytest's or bench's hosts are left to it (``--all``: those too);
``python -m tests.testbed assets``
    prepare the llama.cpp repo and the SmolLM2 model and print their paths and the commit sha;
``python -m tests.testbed rootfs``
    build (once) the cached rootfs tarball and print its path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.testbed.assets import cache_dir, ccache_dir, llama_cpp_repo, sha256_file, smollm2_gguf
from tests.testbed.host import build_rootfs, create_host
from tests.testbed.registry import owned_hosts, reap
from tests.testbed.speech import WHISPER_REPO_MOUNT
from tests.testbed.whisper_assets import whisper_cpp_repo

LLAMA_REPO_MOUNT = "/srv/llama.cpp.git"
CCACHE_MOUNT = "/var/cache/ccache-shared"


def state_file() -> Path:
    return cache_dir() / "testbed-state.json"


def _split_bind(spec: str) -> tuple[str, str]:
    src, _, dst = spec.partition(":")
    return src, dst or src


def _drop_stale_state() -> None:
    """Delete the state file if the host it names is gone (reaped, or its directory deleted)."""
    path = state_file()
    if path.exists() and not Path(json.loads(path.read_text())["root"]).exists():
        path.unlink()


def cmd_up(args: argparse.Namespace) -> int:
    _drop_stale_state()
    if state_file().exists():
        print(f"a test host is already recorded in {state_file()}; run `down` first", file=sys.stderr)
        return 1
    binds = [_split_bind(b) for b in args.bind]
    binds_ro = [_split_bind(b) for b in args.bind_ro]
    if args.bind_llama:
        repo, _ = llama_cpp_repo()
        binds_ro.append((str(repo), LLAMA_REPO_MOUNT))
        binds.append((str(ccache_dir()), CCACHE_MOUNT))
    if args.bind_whisper:
        whisper_repo, _ = whisper_cpp_repo()
        binds_ro.append((str(whisper_repo), WHISPER_REPO_MOUNT))
    host = create_host(binds=binds, binds_ro=binds_ro, ssh_port=args.port)
    host.detach()  # the nspawn process outlives this CLI; `down` stops it
    inventory = host.write_pyinfra_inventory(host.root.parent / "inventory.py", user=args.user)
    state = {
        "pid": host.pid,
        "leader_pid": host.leader_pid(),
        "ssh_port": host.ssh_port,
        "ssh_key": str(host.ssh_key),
        "root": str(host.root),
        "inventory": str(inventory),
        "console_log": str(host.console_log),
        "speech": bool(args.bind_whisper),
    }
    state_file().write_text(json.dumps(state, indent=2))
    for key, value in state.items():
        print(f"{key}: {value}")
    print(f"ssh: ssh -p {host.ssh_port} -i {host.ssh_key} -o StrictHostKeyChecking=no "
          f"-o UserKnownHostsFile=/dev/null root@127.0.0.1")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    reaped = reap(orphans_only=False, spare_owned=not args.all)
    for line in reaped:
        print(line)
    _drop_stale_state()
    spared = owned_hosts()
    if spared:
        owners = ", ".join(f"pid {record.owner[0]}" for record in spared if record.owner)
        print(f"left {len(spared)} test host(s) a running process owns ({owners}); "
              "`down --all` stops them too", file=sys.stderr)  # fmt: skip
    elif not reaped:
        print("no test host recorded", file=sys.stderr)
    return 0


def cmd_assets(_: argparse.Namespace) -> int:
    repo, sha = llama_cpp_repo()
    model = smollm2_gguf()
    print(f"llama_cpp_repo: {repo}")
    print(f"llama_cpp_sha: {sha}")
    print(f"smollm2_gguf: {model}")
    print(f"smollm2_sha256: {sha256_file(model)}")
    print(f"ccache_dir: {ccache_dir()}")
    return 0


def cmd_rootfs(_: argparse.Namespace) -> int:
    print(build_rootfs())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="boot a test host")
    up.add_argument("--bind", action="append", default=[], metavar="SRC:DST")
    up.add_argument("--bind-ro", action="append", default=[], metavar="SRC:DST")
    up.add_argument("--bind-llama", action="store_true",
                    help=f"bind the llama.cpp repo at {LLAMA_REPO_MOUNT} and ccache at {CCACHE_MOUNT}")
    up.add_argument("--bind-whisper", action="store_true",
                    help=f"bind the whisper.cpp repo at {WHISPER_REPO_MOUNT}: the box gets whisper-server and piper")
    up.add_argument("--port", type=int, default=None, help="sshd port (default: a free one)")
    up.add_argument("--user", default="root", help="ssh user for the generated inventory")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop and delete the recorded test hosts no running process owns")
    down.add_argument("--all", action="store_true", help="also those a running pytest or bench owns")
    down.set_defaults(func=cmd_down)
    sub.add_parser("assets", help="prepare llama.cpp repo and model").set_defaults(func=cmd_assets)
    sub.add_parser("rootfs", help="build the cached rootfs").set_defaults(func=cmd_rootfs)
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
