"""Render a deterministic, hardened systemd unit for any gpubox service.

The command line comes from the service's flag table (`Service.argv`); every value written into
the unit goes through `gpubox.quoting`, one escaper per directive: an ExecStart word, an
Environment assignment, a path-list entry, and `unit_safe` for the rest (device nodes, networks).

Every unit is born hardened (`systemd-analyze security --offline=yes` exposure <= 2.0, asserted
by tests/test_hardening.py for each unit type); `hardening` says what each service gets and why.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpubox.gpu import Gpu, gpu_list
from gpubox.quoting import environment_assignment, exec_word, path_list_entry, unit_safe, unit_text
from gpubox.servers.base import Service, flag_of
from gpubox.spec import is_loopback

HOME_PREFIXES = ("/home/", "/root/", "/run/user/")

# Device nodes every CUDA process opens besides its GPUs' own /dev/nvidia<minor>. Measured on an
# H200: hiding either (or the GPU's node) makes CUDA find no device. /dev/nvidia-uvm-tools and
# /dev/nvidia-caps/* are not needed. systemd resolves a DeviceAllow= path when it starts the unit, so
# /dev/nvidia-uvm must exist by then (a udev rule running `nvidia-modprobe -u -c=0`, or any earlier CUDA
# process run as root, makes it): the service can't, as NoNewPrivileges voids the setuid nvidia-modprobe.
NVIDIA_SHARED_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm")

# What llama.cpp must still do after `~@resources` is denied: pin its threads (ggml's
# pthread_setaffinity_np, --cpu-mask/--numa), raise their priority (pthread_setschedparam,
# --prio) and the process's (setpriority, --prio). In systemd 252 @resources also holds
# setrlimit, nice, ioprio_set, sched_setattr/_setparam, mbind, set_mempolicy, migrate_pages and
# move_pages: those stay denied.
SCHEDULING_SYSCALLS = ("sched_setaffinity", "sched_setscheduler", "setpriority")

# The walls every unit gpubox writes or hardens has (its services', the gateway's HAProxy drop-in).
KERNEL_WALLS = (
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
)
RESTRICTIONS = (
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
)
SYSCALL_WALLS = (
    "RemoveIPC=yes",
    "KeyringMode=private",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
)

# One restart policy for every server, written into the unit with its reason (RESTART_POLICY): a
# long-running server has no exit that means "done", so every exit systemd did not ask for is an outage.
# `on-failure` counts an exit 0 and a death by SIGHUP, SIGINT, SIGTERM or SIGPIPE as clean: a plain
# `kill -TERM` (a person, a script, an OOM helper) left llama-server down, and whisper-server exits 0 on a
# bad flag. An explicit `systemctl stop` (the smoke test's stop on a first deploy) is still obeyed. No
# start limit: a crash loop keeps retrying every RESTART_SEC seconds (a GPU that comes back is served
# again without a person) and shows as `gpubox_unit_restarts_total` (GpuboxUnitRestarting) rather than
# as a unit systemd gave up on. systemd 252 (Debian 12) has no RestartSteps=/RestartMaxDelaySec= to
# back off with.
RESTART = "always"
RESTART_SEC = 3
RESTART_POLICY = (
    "# Restart=always: a server has no exit that means done, and on-failure takes an exit 0 or a SIGTERM\n"
    "# for one (a `kill -TERM` left llama-server down). Any exit systemd did not ask for restarts it, every\n"
    "# RestartSec, with no start limit: a crash loop shows as gpubox_unit_restarts_total. `systemctl stop` holds."
)


def service_gpus(service: Service, gpus: Sequence[Gpu], field: str = "gpus") -> list[Gpu]:
    """The host's records of the service's GPUs, in the service's order.

    `gpus` are the host's records (the NvidiaGpus fact), found by nvidia-smi index. The unit pins
    each GPU by its UUID and allows its device node `/dev/nvidia<minor_number>` (the driver's minor
    number, not the index), so a GPU the host lacks, or a record without either, is refused: a
    ValueError naming `field` and listing the host's GPUs.
    """
    by_index = {gpu.index: gpu for gpu in gpus}
    problems = []
    for index in service.placement:
        gpu = by_index.get(index)
        if gpu is None:
            problems.append(f"GPU {index} is not on the host")
        elif not gpu.uuid:
            problems.append(f"GPU {index} has no UUID in the host's GPU facts")
        elif gpu.minor_number is None:
            problems.append(f"GPU {index}'s minor number (its /dev/nvidiaN) is unknown")
    if problems:
        host_gpus = ", ".join(
            f"{gpu.index} ({gpu.uuid or 'no UUID'}, "
            f"{'no minor number' if gpu.minor_number is None else f'/dev/nvidia{gpu.minor_number}'})"
            for gpu in sorted(gpus, key=lambda gpu: gpu.index)
        )
        raise ValueError(
            f"{field}={list(service.placement)}: {'; '.join(problems)}. The unit allows only its GPUs' device nodes "
            f"and pins them by UUID. The host's GPUs: {host_gpus or 'none (no nvidia-smi)'}"
        )
    return [by_index[index] for index in service.placement]


def server_environment(service: Service, gpus: Sequence[Gpu] = ()) -> dict[str, str]:
    """The service's environment: which GPUs it sees (none when it has no GPUs), then what its type adds
    (``Service.environment``: an RPC server's cache directory).

    With the host's GPU records (what the unit gets) each GPU is named by its UUID: inside the unit
    only its GPUs' device nodes exist, so CUDA numbers what it sees from 0 and an nvidia-smi index
    would name the wrong GPU or none; a UUID names the same GPU with or without that wall. Without
    records (a process started outside a unit, such as the bench's temporary servers) the nvidia-smi
    indices: PCI bus order makes CUDA's numbering the same as nvidia-smi's.
    """
    if service.placement and gpus:
        visible = ",".join(gpu.uuid for gpu in service_gpus(service, gpus))
    else:
        visible = ",".join(str(gpu) for gpu in service.placement)
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": visible, **service.environment()}


def read_only_paths(service: Service) -> list[str]:
    """Directories of the files the service reads (models, key file), mounted read-only for it."""
    return sorted({path.rsplit("/", 1)[0] or "/" for path in service.read_only_files()})


def _protect_home(paths: list[str]) -> str:
    """`yes` hides /home; a model kept under a home directory (the seed's) needs `read-only`."""
    under_home = any(f"{path}/".startswith(HOME_PREFIXES) for path in paths)
    return "read-only" if under_home else "yes"


def flag_groups(argv: list[str]) -> list[list[str]]:
    """Split a command line into the program and one group per flag with its values (one per line)."""
    groups: list[list[str]] = [[argv[0]]]
    for word in argv[1:]:
        if flag_of(word) is not None:
            groups.append([word])
        else:
            groups[-1].append(word)
    return groups


def ip_address_allow(service: Service) -> list[str]:
    """Who may talk to the service (`IPAddressAllow=`; everything else is `IPAddressDeny=any`).

    Always this machine (`localhost`: 127.0.0.0/8 and ::1, where the smoke test and a local proxy
    connect from); beyond loopback, the service's `allow_from` networks (required there by its rule); and
    the addresses it dials itself (a llama-server's RPC servers: the deny holds outgoing traffic too, so
    those hosts may also reach it).
    """
    allowed = ["localhost"]
    if not is_loopback(service.host):
        allowed += [unit_safe(network, "allow_from") for network in service.allow_from]
    peers = [address for address in service.peer_addresses() if address not in allowed]
    allowed += [unit_safe(address, "a peer's address") for address in peers]
    return allowed


def hardening(service: Service, gpus: Sequence[Gpu]) -> list[str]:
    """The sandbox directives of the service's unit; `gpus` are the service's own GPU records.

    Every service: no capabilities, no new privileges, umask 0077, read-only OS and homes, its own
    mounts, the kernel's tunables/modules/logs/clock/hostname out of reach, other processes
    invisible, only IP and local sockets, no namespaces, no realtime, no SUID, the native syscall
    ABI, and the syscalls of a system service minus @privileged and @resources (but for
    SCHEDULING_SYSCALLS), denied with EPERM rather than SIGSYS: a library probing a denied call
    (e.g. a NUMA call of CUDA's: Docker's default seccomp profile denies mbind/set_mempolicy with
    EPERM too) gets an error it can handle instead of killing the server. Network: deny all but
    `ip_address_allow`. Devices: `DevicePolicy=closed` (null, zero, random, tty, ...) plus, for a
    GPU service, exactly its GPUs' nodes and the two every CUDA process needs.

    Left out of GPU services, kept for CPU-only ones (all said to break CUDA):
    - `PrivateDevices=yes`: a private /dev without /dev/nvidia*; `DeviceAllow=` is the wall there.
    - `MemoryDenyWriteExecute=yes`: said to break CUDA's PTX JIT. Measured on 2xH200 (docs/gpu-validation.md,
      "GPU isolation"): under the kernel's own MDWE (prctl PR_SET_MDWE) both an sm_90 build and a PTX-only
      build served on the GPU. But systemd 252 (Debian 12) enforces MemoryDenyWriteExecute with a seccomp
      filter that is stricter (it refuses any mprotect adding PROT_EXEC, which the prctl allows for a
      mapping that was executable before), and that form is untried with libcuda: left out until it is.
    - `ProcSubset=pid`: NVML (and CUDA) read /proc/driver/nvidia.
    Left out of every service:
    - `PrivateNetwork=yes`: the service is a network listener.
    - `PrivateUsers=yes`: a user namespace around the NVIDIA driver is untried, and the exposure target
      holds without it (worth 0.2).
    - `AF_NETLINK` in RestrictAddressFamilies: llama.cpp opens no netlink socket (its HTTP server binds
      through getaddrinfo, whose AI_ADDRCONFIG probe falls back when netlink is refused), and NVML/CUDA
      are not known to need one; only on GPU services could it be needed, so if the GPU machine
      experiment shows CUDA failing without it, it is added for GPU services only.
    - `IPAddressAllow=any`-style openness: `allow_from=('any',)` is an explicit decision of the spec.
    Not enforced by every host: a systemd-nspawn test host applies the seccomp filter, MDWE, the umask
    and the capability sets, but neither `IPAddressAllow/Deny` nor `DevicePolicy` (tests/test_unit.py
    and tests/test_hardening.py prove those by rendering).
    """
    cpu_only = not gpus
    model_dirs = read_only_paths(service)
    lines = [
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "UMask=0077",
        "ProtectSystem=strict",
        f"ProtectHome={_protect_home(model_dirs)}",
        "PrivateTmp=yes",
        "PrivateMounts=yes",
    ]
    if model_dirs:
        lines.append(f"ReadOnlyPaths={' '.join(path_list_entry(path) for path in model_dirs)}")
    lines += KERNEL_WALLS
    if cpu_only:
        lines += ["ProcSubset=pid", "PrivateDevices=yes"]
    lines.append("DevicePolicy=closed")
    nodes = [*NVIDIA_SHARED_NODES, *(f"/dev/nvidia{gpu.minor_number}" for gpu in gpus)]
    lines += [f"DeviceAllow={unit_safe(node, 'a device node')} rw" for node in nodes] if gpus else []
    lines += RESTRICTIONS
    if cpu_only:
        lines.append("MemoryDenyWriteExecute=yes")
    lines += [
        *SYSCALL_WALLS,
        f"SystemCallFilter={' '.join(SCHEDULING_SYSCALLS)}",
        "SystemCallErrorNumber=EPERM",
        "IPAddressDeny=any",
        f"IPAddressAllow={' '.join(ip_address_allow(service))}",
    ]
    if service.cache_directory is not None:  # writable under ProtectSystem=strict, owned by the unit's user
        lines.append(f"CacheDirectory={unit_safe(service.cache_directory, 'a cache directory')}")
    return lines


def unit_description(service: Service) -> str:
    """The unit's ``Description=``: the server, the service, what its type adds (a piper voice), the GPUs.

    systemd expands ``%`` specifiers in ``Description=``, so a ``%`` from a file name is doubled.
    """
    details = [
        "gpubox",
        *(unit_text(detail, f"{service.name}'s description") for detail in service.description_details()),
        f"GPUs: {gpu_list(service.placement)}",
    ]
    return f"{service.server_name} {service.name} ({'; '.join(details)})"


def render_unit(service: Service, binary: str, gpus: Sequence[Gpu] = ()) -> str:
    """The unit file's whole text; the same spec and GPU records always render the same bytes.

    `gpus` are the host's GPU records (the NvidiaGpus fact; only the service's own GPUs are used):
    a service with GPUs needs each one's record with its UUID and minor number (`service_gpus`
    raises ValueError otherwise).
    """
    own_gpus = service_gpus(service, gpus)
    groups = flag_groups(service.argv(binary))
    exec_start = " \\\n    ".join(" ".join(exec_word(word) for word in group) for group in groups)
    environment = "\n".join(
        f"Environment={environment_assignment(key, value)}"
        for key, value in sorted(server_environment(service, own_gpus).items())
    )
    sandbox = "\n".join(hardening(service, own_gpus))
    return f"""\
# Managed by gpubox: edits are overwritten on the next deploy.
[Unit]
Description={unit_description(service)}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
User={service.user}
Group={service.user}
{environment}
ExecStart={exec_start}
{RESTART_POLICY}
Restart={RESTART}
RestartSec={RESTART_SEC}
TimeoutStopSec=30
{sandbox}

[Install]
WantedBy=multi-user.target
"""
