"""One llama-server systemd service: its user, its unit (previous kept as `.prev`), its restart."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host, state
from pyinfra.api import FileUploadCommand, OperationError, deploy, operation
from pyinfra.facts.files import FileContents
from pyinfra.operations import server as server_ops
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed
from pyinfra.operations.util.files import generate_color_diff

from facts.llamacpp import LlamaServerFlags, LlamaServerVersion
from gpubox import llamacpp as records
from gpubox.llamacpp import UnsupportedServerArgumentError, check_argv_supported
from gpubox.spec import LlamaServer
from gpubox.unit import binary_path, render_unit, server_argv

UNIT_DIR = "/etc/systemd/system"


def unit_path(server: LlamaServer) -> str:
    return f"{UNIT_DIR}/{server.unit_name}"


def previous_unit_path(server: LlamaServer) -> str:
    """Where the unit that ran before the last change is kept for rollback (not a unit name systemd loads)."""
    return f"{unit_path(server)}.prev"


@operation()
def flags_supported(server: LlamaServer, prefix: str):  # type: ignore[no-untyped-def]
    """Refuse, before the unit is written, a flag the installed llama-server's `--help` lacks."""
    binary = binary_path(prefix)
    flags = host.get_fact(LlamaServerFlags, path=binary)
    if flags is None:
        if state.is_executing:
            raise OperationError(f"no llama-server at {binary}: the llama.cpp build must run first")
        host.noop(f"{binary} is not installed yet: its flags are checked once it is")
        return
    # The records, or their JSON form (a pyinfra-testing fixture): both are validated into records.
    flags = records.ServerFlags.model_validate(flags)
    version = host.get_fact(LlamaServerVersion, path=binary)
    if version is not None:
        version = records.LlamaServerVersion.model_validate(version)
    try:
        check_argv_supported(server_argv(server, prefix), flags, str(version))
    except UnsupportedServerArgumentError as error:
        raise OperationError(f"{server.unit_name}: {error}") from error
    host.noop(f"every flag of {server.unit_name} is in {binary} --help")
    yield from ()


@operation()
def unit(server: LlamaServer, prefix: str):  # type: ignore[no-untyped-def]
    """Write the unit atomically (upload beside it, rename over), keeping the old one as `.prev`.

    With `--diff` the change is shown as a text diff of the unit.
    """
    path = unit_path(server)
    text = render_unit(server, prefix)
    old_lines = host.get_fact(FileContents, path=path)
    new_lines = text.splitlines()
    if old_lines is not None and [line.rstrip("\n") for line in old_lines] == new_lines:
        host.noop(f"{path} is up to date")
        return
    if state.config.DIFF:
        host.log(f"{'Will create' if old_lines is None else 'Will modify'} {path}")
        for line in generate_color_diff([f"{line}\n" for line in old_lines or []], text.splitlines(True)):
            host.log(f"  {line}")
    staged = f"{path}.gpubox-new"
    quoted = shlex.quote(path)
    yield FileUploadCommand(StringIO(text), staged)
    keep_previous = f"cp -p {quoted} {shlex.quote(previous_unit_path(server))}; " if old_lines is not None else ""
    yield f"chmod 0644 {shlex.quote(staged)} && {keep_previous}mv -f {shlex.quote(staged)} {quoted}"


@deploy("llama-server service")
def llama_server(  # type: ignore[no-untyped-def]
    server: LlamaServer, prefix: str, changed: list | None = None, ensure_user: bool = True  # type: ignore[type-arg]
):
    """The service user, the flag check, the unit, and a restart only when the unit, a model or the
    build it uses changed (`changed`: their op metas); enabled at boot. Returns
    [unit meta, restart meta] so a smoke test can run only after a restart."""
    if ensure_user:
        server_ops.user(
            name=f"Service user {server.user}",
            user=server.user,
            system=True,
            shell="/usr/sbin/nologin",
            home="/nonexistent",
            ensure_home=False,
        )
    flags_supported(
        name=f"Flags of {server.unit_name} exist in the installed llama-server", server=server, prefix=prefix
    )
    unit_meta = unit(name=f"Unit {unit_path(server)}", server=server, prefix=prefix)
    restart_needed = any_changed(unit_meta, *(changed or []))
    systemd.daemon_reload(name="systemd daemon-reload", _if=restart_needed)
    restart_meta = systemd.service(
        name=f"Restart {server.unit_name}",
        service=server.unit_name,
        running=True,
        restarted=True,
        _if=restart_needed,
    )
    systemd.service(
        name=f"{server.unit_name} running and enabled at boot", service=server.unit_name, running=True, enabled=True
    )
    return [unit_meta, restart_meta]
