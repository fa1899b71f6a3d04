"""CLI for the test bed.

``python -m gpubox.testbed up [--bind-llama] [--bind SRC:DST] [--bind-ro SRC:DST]``
    boot a host, print its SSH port / key / pid / inventory, and record it in a state file;
``python -m gpubox.testbed down``
    stop the host recorded in the state file;
``python -m gpubox.testbed assets``
    prepare the llama.cpp repo and the SmolLM2 model and print their paths and the commit sha;
``python -m gpubox.testbed rootfs``
    build (once) the cached rootfs tarball and print its path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from gpubox.testbed.assets import cache_dir, ccache_dir, llama_cpp_repo, sha256_file, smollm2_gguf
from gpubox.testbed.host import build_rootfs, create_host, remove_host_dir

LLAMA_REPO_MOUNT = "/srv/llama.cpp.git"
CCACHE_MOUNT = "/var/cache/ccache-shared"


def state_file() -> Path:
    return cache_dir() / "testbed-state.json"


def _split_bind(spec: str) -> tuple[str, str]:
    src, _, dst = spec.partition(":")
    return src, dst or src


def cmd_up(args: argparse.Namespace) -> int:
    if state_file().exists():
        print(f"a test host is already recorded in {state_file()}; run `down` first", file=sys.stderr)
        return 1
    binds = [_split_bind(b) for b in args.bind]
    binds_ro = [_split_bind(b) for b in args.bind_ro]
    if args.bind_llama:
        repo, _ = llama_cpp_repo()
        binds_ro.append((str(repo), LLAMA_REPO_MOUNT))
        binds.append((str(ccache_dir()), CCACHE_MOUNT))
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
    }
    state_file().write_text(json.dumps(state, indent=2))
    for key, value in state.items():
        print(f"{key}: {value}")
    print(f"ssh: ssh -p {host.ssh_port} -i {host.ssh_key} -o StrictHostKeyChecking=no "
          f"-o UserKnownHostsFile=/dev/null root@127.0.0.1")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cmd_down(args: argparse.Namespace) -> int:
    path = state_file()
    if not path.exists():
        print("no test host recorded", file=sys.stderr)
        return 1
    state = json.loads(path.read_text())
    pid, leader = int(state["pid"]), int(state["leader_pid"])
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _i in range(300):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    if _alive(leader):
        try:
            status = Path(f"/proc/{leader}/status").read_text()
        except OSError:
            status = ""
        if any(line.startswith("NSpid:") and line.split()[-1] == "1" for line in status.splitlines()):
            os.kill(leader, signal.SIGKILL)
    remove_host_dir(Path(state["root"]).parent)
    path.unlink()
    print(f"stopped test host (nspawn pid {pid})")
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
    parser = argparse.ArgumentParser(prog="python -m gpubox.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="boot a test host")
    up.add_argument("--bind", action="append", default=[], metavar="SRC:DST")
    up.add_argument("--bind-ro", action="append", default=[], metavar="SRC:DST")
    up.add_argument("--bind-llama", action="store_true",
                    help=f"bind the llama.cpp repo at {LLAMA_REPO_MOUNT} and ccache at {CCACHE_MOUNT}")
    up.add_argument("--port", type=int, default=None, help="sshd port (default: a free one)")
    up.add_argument("--user", default="root", help="ssh user for the generated inventory")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the recorded test host").set_defaults(func=cmd_down)
    sub.add_parser("assets", help="prepare llama.cpp repo and model").set_defaults(func=cmd_assets)
    sub.add_parser("rootfs", help="build the cached rootfs").set_defaults(func=cmd_rootfs)
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
