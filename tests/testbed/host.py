"""A booted systemd-nspawn Debian bookworm host reachable over real SSH, for end-to-end tests.

Design:

* The root filesystem is built once with ``debootstrap`` plus a small bake script (sshd config,
  host keys, a ``deployer`` user with passwordless sudo, ``ssh`` enabled) and cached as a zstd
  tarball under ``<cache>/rootfs/`` keyed by a hash of the recipe.  Unpacking takes 1-2 s.
* Each host gets a fresh unpacked copy, a per-run ed25519 key in ``authorized_keys`` for root and
  ``deployer``, and an sshd port (a free port on 127.0.0.1) written into its sshd config.
* The container shares the host's network namespace (no ``--network-*`` flags), so sshd -- and any
  service a test deploys into it -- listens on the controller's loopback: give services ports
  from :func:`gpubox.bench.free_port`.
* It boots with ``systemd-nspawn --boot --register=no --keep-unit``; readiness is
  ``systemctl is-system-running --wait`` answering ``running`` or ``degraded`` over SSH.
* Every host is recorded (:mod:`tests.testbed.registry`) before its overlay is mounted, so the
  hosts of a killed run are reaped by the next boot or by ``python -m tests.testbed down``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpubox.bench import free_port
from tests.testbed.assets import cache_dir
from tests.testbed.registry import HostRecord, children, ns_pid_is_one, proc_id, reap, umount_below

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-venv",
    "sudo",
    "iproute2",
    "git",
    "cmake",
    "ninja-build",
    "build-essential",
    "ccache",
    "libssl-dev",
    "curl",
    "ca-certificates",
)
DEPLOY_USER = "deployer"

# Runs inside the freshly debootstrapped tree (chroot), once, at cache-build time.
BAKE_SCRIPT = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
# sshd: key-only auth, root allowed with keys, loopback only; the port is written per boot.
mkdir -p /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/00-gpubox-testbed.conf <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
ListenAddress 127.0.0.1
Include /etc/ssh/sshd_config.d/zz-port.conf.inc
EOF
echo 'Port 22' > /etc/ssh/sshd_config.d/zz-port.conf.inc
rm -f /etc/ssh/ssh_host_*
ssh-keygen -A
systemctl enable ssh.service
# Units that only make noise in a container sharing the host's network.
systemctl mask systemd-networkd-wait-online.service getty@tty1.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true
# The non-root deploy user, with passwordless sudo.
useradd --create-home --shell /bin/bash --user-group deployer
echo 'deployer ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/deployer
chmod 0440 /etc/sudoers.d/deployer
install -d -m 0700 /root/.ssh
install -d -m 0700 -o deployer -g deployer /home/deployer/.ssh
# Identity.
echo gpubox-testbed > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 gpubox-testbed\n' > /etc/hosts
printf '::1 localhost ip6-localhost ip6-loopback\n' >> /etc/hosts
rm -f /etc/machine-id
systemd-machine-id-setup
# Resolver: a plain file, which systemd-nspawn (--resolv-conf=auto) replaces with the host's.
rm -f /etc/resolv.conf
touch /etc/resolv.conf
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log
"""


def recipe_hash() -> str:
    """Hash of everything that determines the cached rootfs (suite, mirror, packages, bake script)."""
    text = "\n".join([SUITE, MIRROR, ",".join(INCLUDE), BAKE_SCRIPT])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rootfs_tarball() -> Path:
    """Path of the cached rootfs tarball for the current recipe (may not exist yet)."""
    return cache_dir() / "rootfs" / f"{SUITE}-{recipe_hash()}.tar.zst"


def _log(msg: str) -> None:
    print(f"[tests.testbed] {msg}", file=sys.stderr, flush=True)


def build_rootfs(force: bool = False) -> Path:
    """Build (once) and return the cached rootfs tarball.  Takes minutes the first time."""
    out = rootfs_tarball()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file() and not force:
            return out
        for tool in ("debootstrap", "zstd", "systemd-nspawn", "ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found: apt-get install $(cat .ci/apt-packages.txt)")
        work = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
        try:
            tree = work / "root"
            t0 = time.monotonic()
            _log(f"debootstrap {SUITE} into {tree} (minutes)...")
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                 SUITE, str(tree), MIRROR],
                check=True, stdout=subprocess.DEVNULL,
            )
            _log(f"debootstrap done in {time.monotonic() - t0:.0f}s; baking")
            subprocess.run(["chroot", str(tree), "/bin/sh", "-c", BAKE_SCRIPT], check=True,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})
            tmp = out.with_suffix(".part")
            subprocess.run(
                ["tar", "-I", "zstd -T0 -3", "--numeric-owner", "--xattrs", "--acls",
                 "-C", str(tree), "-cpf", str(tmp), "."],
                check=True,
            )
            tmp.replace(out)
            _log(f"rootfs cached at {out} ({out.stat().st_size >> 20} MiB, "
                 f"{time.monotonic() - t0:.0f}s total)")
        finally:
            umount_below(work)
            shutil.rmtree(work, ignore_errors=True)
    return out


def unpack_rootfs(dest: Path, tarball: Path | None = None) -> None:
    """Unpack the cached rootfs (building it first if needed) into the empty directory ``dest``."""
    tarball = tarball or build_rootfs()
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["tar", "-I", "zstd -T0", "--numeric-owner", "--xattrs", "--acls",
         "-C", str(dest), "-xpf", str(tarball)],
        check=True,
    )


def golden_tree() -> Path:
    """The cached rootfs unpacked once (read-only lower layer for per-host overlays)."""
    tarball = build_rootfs()
    tree = tarball.with_name(tarball.name.removesuffix(".tar.zst") + ".tree")
    if (tree / "etc" / "os-release").exists():
        return tree
    with open(tarball.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (tree / "etc" / "os-release").exists():
            tmp = Path(tempfile.mkdtemp(prefix="tree-", dir=tarball.parent))
            try:
                unpack_rootfs(tmp, tarball)  # not build_rootfs(): it takes this same lock
                tmp.rename(tree)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return tree


def prepare_root(base: Path) -> Path:
    """Make ``base/root`` a fresh, writable copy of the rootfs and return it.

    Uses an overlayfs over :func:`golden_tree` (instant; per-host writes land in ``base/upper``);
    falls back to unpacking the tarball when overlayfs can't be mounted.  ``GPUBOX_TESTBED_OVERLAY=0``
    forces the tarball.
    """
    root = base / "root"
    if os.environ.get("GPUBOX_TESTBED_OVERLAY", "1") != "0":
        lower = golden_tree()
        upper, work = base / "upper", base / "work"
        for d in (root, upper, work):
            d.mkdir()
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(root)],
                                 capture_output=True, text=True)
        if mounted.returncode == 0:
            return root
        _log(f"overlayfs unavailable ({mounted.stderr.strip()}); unpacking the tarball instead")
        for d in (root, upper, work):
            shutil.rmtree(d, ignore_errors=True)
    unpack_rootfs(root)
    return root


def remove_host_dir(base: Path) -> None:
    """Unmount anything below ``base`` (the overlay root) and delete it.  The host must be stopped."""
    umount_below(base)
    shutil.rmtree(base, ignore_errors=True)


def _passwd_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == user:
            return int(parts[2]), int(parts[3])
    raise KeyError(f"user {user} not in {root}/etc/passwd")


def _ssh_keypair(directory: Path) -> Path:
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpubox-testbed", "-f", str(key)],
        check=True,
    )
    return key


def _install_key(root: Path, pubkey: str, port: int) -> None:
    for home, user in ((root / "root", "root"), (root / "home" / DEPLOY_USER, DEPLOY_USER)):
        uid, gid = _passwd_ids(root, user)
        sshdir = home / ".ssh"
        sshdir.mkdir(mode=0o700, exist_ok=True)
        auth = sshdir / "authorized_keys"
        auth.write_text(pubkey)
        auth.chmod(0o600)
        os.chown(sshdir, uid, gid)
        os.chown(auth, uid, gid)
    (root / "etc" / "ssh" / "sshd_config.d" / "zz-port.conf.inc").write_text(f"Port {port}\n")


@dataclass
class TestHost:
    """A booted container.  Use :func:`booted_host` rather than constructing this directly."""

    __test__ = False  # not a pytest test class

    root: Path
    ssh_port: int
    ssh_key: Path
    binds: tuple[tuple[str, str], ...] = ()
    binds_ro: tuple[tuple[str, str], ...] = ()
    console_log: Path = field(default_factory=lambda: Path(os.devnull))
    pid: int = 0
    boot_seconds: float = 0.0
    record: HostRecord | None = field(default=None, repr=False)  # its entry in the registry
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _leader: int = field(default=0, repr=False)

    # -- lifecycle -------------------------------------------------------------------------
    def boot(self, timeout: float = 90.0) -> None:
        """Start systemd-nspawn on ``root`` and wait until systemd is up and SSH answers."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("host already running")
        cmd = [
            "systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=read-only",
            "--quiet", f"--machine=gpubox-tb-{self.ssh_port}", "-D", str(self.root),
        ]
        cmd += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro]
        cmd += [f"--bind={src}:{dst}" for src, dst in self.binds]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        t0 = time.monotonic()
        with open(self.console_log, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        self._leader = 0
        self._record(machine=f"gpubox-tb-{self.ssh_port}", nspawn=proc_id(self.pid), leader=None)
        try:
            self._wait_ready(t0 + timeout)
            self._record(leader=proc_id(self.leader_pid()))
        except BaseException:
            self._kill()
            raise
        self.boot_seconds = time.monotonic() - t0

    def _record(self, **changes: object) -> None:
        """Update this host's registry entry (tuples are stored as JSON lists)."""
        if self.record is not None:
            for key, value in changes.items():
                setattr(self.record, key, list(value) if isinstance(value, tuple) else value)
            self.record.save()

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"systemd-nspawn exited with {self._proc.returncode}:\n{self._console_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"test host did not answer SSH in time:\n{self._console_tail()}")
            probe = self.run("true", timeout=5, connect_timeout=1)
            if probe.returncode == 0:
                break
            time.sleep(0.1)
        left = max(5, int(deadline - time.monotonic()))
        state = self.run("systemctl is-system-running --wait", timeout=left).stdout.strip()
        if state not in ("running", "degraded"):
            raise RuntimeError(f"systemd state {state!r}:\n{self._console_tail()}")
        if state == "degraded":
            failed = self.run("systemctl --failed --no-legend --plain").stdout.strip()
            _log(f"test host is degraded; failed units:\n{failed}")

    def _console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def leader_pid(self) -> int:
        """The container's PID 1, as seen on the controller (for ``nsenter -t PID``)."""
        if self._leader and ns_pid_is_one(self._leader):
            return self._leader
        if not self.pid:
            raise RuntimeError("host not booted")
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            if pid != self.pid and ns_pid_is_one(pid):
                self._leader = pid
                return pid
            todo.extend(children(pid))
        raise RuntimeError("could not find the container's PID 1")

    def _kill(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is None:
            return
        leader = 0
        with contextlib.suppress(RuntimeError):
            leader = self.leader_pid()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if leader and ns_pid_is_one(leader):
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)  # takes the whole PID namespace with it
            for _ in range(100):
                if not ns_pid_is_one(leader):
                    break
                time.sleep(0.05)
        self._proc = None
        self._leader = 0

    def shutdown(self) -> None:
        """Power the container off (gracefully), keeping its root filesystem."""
        self._kill()

    def reboot(self, timeout: float = 90.0) -> None:
        """Power off and boot again on the same root filesystem; returns when SSH answers again.

        (A ``reboot`` inside the container would make a plain ``systemd-nspawn --boot`` exit, so
        this restarts nspawn from the outside; enabled services come back as on a real reboot.)
        """
        self._kill()
        self.boot(timeout)

    def detach(self) -> None:
        """Forget the nspawn process without stopping it (it keeps running after this process)."""
        if self.pid:
            with contextlib.suppress(RuntimeError):
                self.leader_pid()
        self._proc = None
        self._record(owner=None)  # no owner to outlive: only `down` reaps it

    def stop(self) -> None:
        """Power off, then delete the root filesystem and the per-run key."""
        self._kill()
        remove_host_dir(self.root.parent)
        if self.record is not None:
            self.record.forget()

    # -- access ----------------------------------------------------------------------------
    def ssh_argv(self, user: str = "root", connect_timeout: int = 5) -> list[str]:
        """``ssh`` argv (without the remote command) that logs into this host as ``user``."""
        return [
            "ssh", "-p", str(self.ssh_port), "-i", str(self.ssh_key),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={connect_timeout}",
            f"{user}@127.0.0.1",
        ]

    def run(
        self, cmd: str, user: str = "root", timeout: float | None = 600, connect_timeout: int = 5,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command over SSH; returns the completed process (text stdout/stderr)."""
        try:
            return subprocess.run(
                [*self.ssh_argv(user, connect_timeout), cmd], stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=timeout, check=check,
            )
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, _text(exc.stdout), _text(exc.stderr))

    def nsenter(self, cmd: str, timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the container's namespaces via ``nsenter`` (no SSH)."""
        return subprocess.run(
            ["nsenter", "-t", str(self.leader_pid()), "-m", "-u", "-i", "-n", "-p", "--",
             "/bin/sh", "-c", cmd],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )

    def pyinfra_host_data(self, user: str = "root") -> dict[str, object]:
        """pyinfra 3.10 SSH connector data for this host."""
        return {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": self.ssh_port,
            "ssh_user": user,
            "ssh_key": str(self.ssh_key),
            "ssh_known_hosts_file": "/dev/null",
            "ssh_strict_host_key_checking": "no",
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
        }

    def pyinfra_host_name(self) -> str:
        return f"testbed-{self.ssh_port}"

    def write_pyinfra_inventory(self, path: Path | str, user: str = "root",
                                extra_data: dict[str, object] | None = None,
                                group: str = "testbed") -> Path:
        """Write a pyinfra inventory module with this host in group ``group``; returns its path."""
        data = {**self.pyinfra_host_data(user), **(extra_data or {})}
        path = Path(path)
        path.write_text(
            "# Generated by tests.testbed: a systemd-nspawn test host.\n"
            f"{group} = [\n    ({self.pyinfra_host_name()!r}, {data!r}),\n]\n"
        )
        return path


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def create_host(
    binds: Sequence[tuple[str | Path, str]] = (),
    binds_ro: Sequence[tuple[str | Path, str]] = (),
    ssh_port: int | None = None,
    workdir: Path | str | None = None,
) -> TestHost:
    """Unpack a fresh rootfs, install a per-run SSH key and port, and boot it.  Call ``stop()``.

    Reaps first the recorded hosts whose owning process is gone, then records this one.
    """
    for line in reap(orphans_only=True):
        _log(line)
    base = Path(tempfile.mkdtemp(prefix="gpubox-testbed-", dir=str(workdir) if workdir else "/var/tmp"))
    record = HostRecord.new(base)
    record.save()
    try:
        t0 = time.monotonic()
        root = prepare_root(base)
        _log(f"rootfs ready in {time.monotonic() - t0:.1f}s at {root}")
        key = _ssh_keypair(base)
        port = ssh_port or free_port()
        _install_key(root, (base / "id_ed25519.pub").read_text(), port)
        host = TestHost(
            root=root, ssh_port=port, ssh_key=key, console_log=base / "console.log",
            binds=tuple((str(s), d) for s, d in binds),
            binds_ro=tuple((str(s), d) for s, d in binds_ro), record=record,
        )
        host.boot()
        _log(f"host booted in {host.boot_seconds:.1f}s: ssh -p {port} -i {key} root@127.0.0.1")
        return host
    except BaseException:
        remove_host_dir(base)
        record.forget()
        raise


@contextlib.contextmanager
def booted_host(
    binds: Sequence[tuple[str | Path, str]] = (),
    binds_ro: Sequence[tuple[str | Path, str]] = (),
    ssh_port: int | None = None,
) -> Iterator[TestHost]:
    """Context manager: a booted :class:`TestHost`, stopped and deleted on exit."""
    host = create_host(binds=binds, binds_ro=binds_ro, ssh_port=ssh_port)
    try:
        yield host
    finally:
        host.stop()
