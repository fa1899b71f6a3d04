"""Render a deterministic systemd unit for one llama-server service.

The command line is built once (`server_argv`) and used by the unit, by the flag check against
the installed binary's `--help`, and by the bench and GPU validation that start the same command
without systemd.
"""

from __future__ import annotations

import re

from gpubox.spec import LlamaServer

# Characters that make systemd split or reinterpret an ExecStart word.
_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]")
_NUMBER = re.compile(r"^-[0-9.]+$")
HOME_PREFIXES = ("/home/", "/root/", "/run/user/")


def binary_path(prefix: str, program: str = "llama-server") -> str:
    """The program in the active build: `{prefix}/current` is switched atomically per build."""
    return f"{prefix}/current/{program}"


def _gpu_layers(value: int | str) -> str:
    return str(value)


def server_argv(server: LlamaServer, prefix: str) -> list[str]:
    """llama-server's command line, every flag spelled the way the pinned llama.cpp parses it.

    `--parallel` is always rendered: its default is auto (4 slots), which is the parallel trap.
    """
    argv = [binary_path(prefix), "--model", server.model.path]
    if server.model_draft is not None:
        argv += ["--model-draft", server.model_draft.path]
    if server.spec_type != "none":
        argv += ["--spec-type", server.spec_type]
    if server.spec_draft_n_max is not None:
        argv += ["--spec-draft-n-max", str(server.spec_draft_n_max)]
    if server.spec_draft_ngl is not None:
        argv += ["--spec-draft-ngl", _gpu_layers(server.spec_draft_ngl)]
    argv += [
        "--ctx-size", str(server.ctx_size),
        "--n-gpu-layers", _gpu_layers(server.n_gpu_layers),
        "--cache-type-k", server.cache_type_k,
        "--cache-type-v", server.cache_type_v,
        "--parallel", str(server.parallel),
        "--flash-attn", server.flash_attn,
        "--cont-batching" if server.cont_batching else "--no-cont-batching",
        "--jinja" if server.jinja else "--no-jinja",
    ]  # fmt: skip
    if server.fit is not None:
        argv += ["--fit", server.fit]
    argv += ["--host", server.host, "--port", str(server.port)]
    if server.metrics:
        argv.append("--metrics")
    if server.api_key_file is not None:
        argv += ["--api-key-file", server.api_key_file]
    argv += list(server.extra_args)
    return argv


def server_environment(server: LlamaServer) -> dict[str, str]:
    """The service's environment: which GPUs it sees (none when it has no GPUs).

    CUDA numbers devices fastest-first unless told otherwise; PCI bus order makes the indices
    the same as nvidia-smi's, which the spec's `gpus` and the GPU facts use.
    """
    return {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in server.gpus),
    }


def systemd_quote(word: str) -> str:
    """Quote one ExecStart word so systemd passes it through unchanged.

    systemd expands `%` specifiers and `$` variables in ExecStart, so both are doubled.
    """
    escaped = word.replace("%", "%%").replace("$", "$$")
    if escaped and not _NEEDS_QUOTES.search(escaped):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def read_only_paths(server: LlamaServer) -> list[str]:
    """Directories of the model files (and API key file), mounted read-only for the service."""
    files = [server.model.path]
    if server.model_draft is not None:
        files.append(server.model_draft.path)
    if server.api_key_file is not None:
        files.append(server.api_key_file)
    directories = {path.rsplit("/", 1)[0] or "/" for path in files}
    return sorted(directories)


def _protect_home(paths: list[str]) -> str:
    """`yes` hides /home; a model kept under a home directory (the seed's) needs `read-only`."""
    under_home = any(f"{path}/".startswith(HOME_PREFIXES) for path in paths)
    return "read-only" if under_home else "yes"


def flag_groups(argv: list[str]) -> list[list[str]]:
    """Split a command line into the program and one group per flag with its values (one per line)."""
    groups: list[list[str]] = [[argv[0]]]
    for word in argv[1:]:
        if word.startswith("-") and not _NUMBER.match(word):
            groups.append([word])
        else:
            groups[-1].append(word)
    return groups


def render_unit(server: LlamaServer, prefix: str) -> str:
    """The unit file's whole text; the same spec always renders the same bytes."""
    argv = server_argv(server, prefix)
    exec_start = " \\\n    ".join(" ".join(systemd_quote(word) for word in group) for group in flag_groups(argv))
    environment = "\n".join(
        f"Environment={systemd_quote(f'{key}={value}')}"
        for key, value in sorted(server_environment(server).items())
    )
    model_dirs = read_only_paths(server)
    gpus = ",".join(str(gpu) for gpu in server.gpus) or "none"
    return f"""\
# Managed by gpubox: edits are overwritten on the next deploy.
[Unit]
Description=llama-server {server.name} (gpubox; GPUs: {gpus})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={server.user}
Group={server.user}
{environment}
ExecStart={exec_start}
Restart=on-failure
RestartSec=3
TimeoutStopSec=30
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={_protect_home(model_dirs)}
PrivateTmp=yes
ReadOnlyPaths={" ".join(model_dirs)}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""
