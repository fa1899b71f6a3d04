"""The test bed itself: a real systemd host over SSH, with the llama.cpp repo bound inside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.testbed import TestHost

pytestmark = pytest.mark.e2e

REPO_URL = "file:///srv/llama.cpp.git"


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_ssh_as_root(test_host: TestHost) -> None:
    assert _ok(test_host.run("id -u")).strip() == "0"
    assert _ok(test_host.run("cat /etc/debian_version")).startswith("12.")


def test_ssh_as_deployer_with_passwordless_sudo(test_host: TestHost) -> None:
    assert _ok(test_host.run("id -un", user="deployer")).strip() == "deployer"
    assert _ok(test_host.run("sudo -n id -u", user="deployer")).strip() == "0"


def test_systemd_is_up(test_host: TestHost) -> None:
    state = test_host.run("systemctl is-system-running").stdout.strip()
    assert state in ("running", "degraded")
    assert _ok(test_host.run("systemctl is-active ssh.service")).strip() == "active"
    assert _ok(test_host.run("ps -o comm= -p 1")).strip() == "systemd"


def test_real_systemd_unit(test_host: TestHost) -> None:
    unit = """[Unit]
Description=gpubox testbed probe

[Service]
ExecStart=/bin/sleep infinity
"""
    _ok(test_host.run(f"cat > /etc/systemd/system/tb-probe.service <<'EOF'\n{unit}EOF"))
    _ok(test_host.run("systemctl daemon-reload && systemctl start tb-probe.service"))
    assert _ok(test_host.run("systemctl is-active tb-probe.service")).strip() == "active"
    pid = int(_ok(test_host.run("systemctl show -p MainPID --value tb-probe.service")))
    assert pid > 1
    _ok(test_host.run("systemctl stop tb-probe.service"))
    assert test_host.run("systemctl is-active tb-probe.service").stdout.strip() == "inactive"


def test_nsenter(test_host: TestHost) -> None:
    assert test_host.leader_pid() > 1
    assert _ok(test_host.nsenter("cat /etc/hostname")).strip() == "gpubox-testbed"


def test_llama_repo_bound(test_host: TestHost, llama_repo: tuple[Path, str]) -> None:
    _, sha = llama_repo
    assert _ok(test_host.run("test -f /srv/llama.cpp.git/CMakeLists.txt && echo yes")).strip() == "yes"
    assert _ok(test_host.run("git -C /srv/llama.cpp.git rev-parse HEAD")).strip() == sha
    # read-only bind
    assert test_host.run("touch /srv/llama.cpp.git/x").returncode != 0
    # shared ccache is writable
    _ok(test_host.run("touch /var/cache/ccache-shared/.tb && rm /var/cache/ccache-shared/.tb"))


def test_git_shallow_clone_and_fetch_by_sha(test_host: TestHost, llama_repo: tuple[Path, str]) -> None:
    _, sha = llama_repo
    _ok(test_host.run(f"rm -rf /tmp/c1 && git clone -q --depth 1 {REPO_URL} /tmp/c1"))
    assert _ok(test_host.run("git -C /tmp/c1 rev-parse HEAD")).strip() == sha
    fetch = (
        "rm -rf /tmp/c2 && git init -q /tmp/c2 && cd /tmp/c2 && "
        f"git remote add origin {REPO_URL} && git fetch -q --depth 1 origin {{}} && "
        "git checkout -q FETCH_HEAD && git rev-parse HEAD"
    )
    assert _ok(test_host.run(fetch.format(sha))).strip() == sha
    short = test_host.run(fetch.format(sha[:12]))
    assert short.returncode != 0, "fetching an abbreviated sha must fail"


def test_pyinfra_connects(test_host: TestHost, tmp_path: Path) -> None:
    pyinfra = Path(sys.executable).with_name("pyinfra")
    for user in ("root", "deployer"):
        inventory = test_host.write_pyinfra_inventory(tmp_path / f"inventory_{user}.py", user=user)
        proc = subprocess.run(
            [str(pyinfra), "-y", str(inventory), "exec", "--", "uname", "-a"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "Linux" in out, out


def test_free_port_is_free() -> None:
    import socket

    from gpubox import bench
    from tests.testbed import free_port

    assert free_port is bench.free_port, "the testbed uses the product's free_port"
    ports = {free_port() for _ in range(5)}
    assert all(1024 <= port < 65536 for port in ports), ports  # a real port, not 0
    port = ports.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free: it binds
        assert s.getsockname() == ("127.0.0.1", port)
        s.listen()
        # taken now: a free_port that ignored it would hand it out again
        assert all(free_port() != port for _ in range(20))


def test_reboot_brings_enabled_services_back(test_host: TestHost) -> None:
    unit = """[Unit]
Description=gpubox testbed reboot probe

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""
    _ok(test_host.run(f"cat > /etc/systemd/system/tb-boot.service <<'EOF'\n{unit}EOF"))
    _ok(test_host.run("systemctl daemon-reload && systemctl enable --now tb-boot.service"))
    _ok(test_host.run("echo kept > /root/marker"))
    old_boot = _ok(test_host.run("cat /proc/sys/kernel/random/boot_id")).strip()
    old_leader = test_host.leader_pid()
    test_host.reboot()
    assert test_host.leader_pid() != old_leader
    assert _ok(test_host.run("systemctl is-active tb-boot.service")).strip() == "active"
    assert _ok(test_host.run("cat /root/marker")).strip() == "kept"
    # nspawn gives each container boot its own boot_id.
    assert _ok(test_host.run("cat /proc/sys/kernel/random/boot_id")).strip() != old_boot
    assert int(_ok(test_host.run("ps -o etimes= -p 1")).strip()) < 120
