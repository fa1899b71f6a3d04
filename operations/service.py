"""One gpubox systemd service of any type: its user, its flag check, its unit (previous kept as
`.prev`), its restart; a smoke-tested service (`smoke_tested`) is marked unverified on the host before it is
restarted or started (`gpubox.unverified`), until its smoke test passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pyinfra import host, state
from pyinfra.api import OperationError, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Command, Which
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed

from facts.gpu import NvidiaGpus
from facts.llamacpp import LlamaServerFlags, LlamaServerVersion, ServerOptions
from facts.systemd import ExistingUsers, UnitStates
from facts.unverified import UnverifiedServices
from gpubox import binaries as records
from gpubox.binaries import UnsupportedServerArgumentError, check_flags_supported, unsupported_flags
from gpubox.box import AnyService
from gpubox.gateway_keys import digest
from gpubox.gpu import gpus_from_fact
from gpubox.inventory import InventoryError, box_from_host_data
from gpubox.keys import chmod_mode, fact_mode
from gpubox.quoting import shell_word
from gpubox.running import StaleProbe, UnitState
from gpubox.servers.base import Service
from gpubox.unit import render_unit, service_gpus
from gpubox.unverified import Mark, mark_command

from . import deploy_lock
from .failures import python_step, refusals_fail_cleanly
from .host_commands import put_secret
from .host_facts import FactRead, forget, read
from .text_files import is_current, log_diff, write_commands

UNIT_DIR = "/etc/systemd/system"


def unit_path(server: Service) -> str:
    return f"{UNIT_DIR}/{server.unit_name}"


def previous_unit_path(server: Service) -> str:
    """Where the unit that ran before the last change is kept for rollback (not a unit name systemd loads)."""
    return f"{unit_path(server)}.prev"


@operation()
@refusals_fail_cleanly
def flags_supported(server: AnyService, prefix: str | None):  # type: ignore[no-untyped-def]
    """
    Refuse, before the unit is written, a flag the installed server's ``--help`` lacks, and a
    program the server needs that the host lacks (whisper's ``--convert``: ffmpeg).

    + server: the service whose flags (its flag table's rendered flags and ``extra_args``) are checked
    + prefix: the install's prefix; a server that ``RUNS_HELP`` is asked (or its saved ``--help`` read),
      others' saved ``--help`` is read (whisper-server exits 0 on any flag: only its help tells).
      None: it runs from no install (its ``PROGRAM`` is the host's), so there is no pinned ``--help``

    **Example:**

    .. code:: python

        service.flags_supported(
            name="Flags of gemma4.service exist in the installed llama-server",
            server=box.service("gemma4"),
            prefix="/opt/llama.cpp",
        )
    """
    for program in server.host_programs():
        if host.get_fact(Which, command=program) is None:
            raise OperationError(f"{server.unit_name} needs {program} on the host: install it, or turn off the field")
    binary = server.binary(prefix)
    if prefix is None:
        host.noop(f"{server.unit_name} runs {binary}, from no install: no pinned --help to check its flags in")
        return
    flags = read(_flags_read(server, prefix))
    if flags is None:
        if state.is_executing:
            raise OperationError(f"no {server.PROGRAM} at {binary}: its install must run first")
        host.noop(f"{binary} is not installed yet: its flags are checked once it is")
        return
    # The records, or their JSON form (a pyinfra-testing fixture): both are validated into records.
    flags = records.ServerFlags.model_validate(flags)
    if unsupported_flags(server.command_flags(), flags):
        # Only a refusal names the binary's version: a passing check costs no second round trip.
        version = host.get_fact(LlamaServerVersion, path=binary) if server.RUNS_HELP else None
        if version is not None:
            version = records.ServerVersion.model_validate(version)
        try:
            check_flags_supported(server.command_flags(), flags, str(version or "as installed"), server.server_name)
        except UnsupportedServerArgumentError as error:
            raise OperationError(f"{server.unit_name}: {error}") from error
    host.noop(f"every flag of {server.unit_name} is in {_flags_source(server, prefix)}")
    yield from ()


def _flags_source(server: Service, prefix: str) -> str:
    """Where the flags were read, for people: the program's --help, else the one saved at its install."""
    if server.RUNS_HELP:
        return f"{server.binary(prefix)} --help"
    return f"{server.server_name}'s --help (saved at {server.help_file(prefix)})"


def _flags_read(server: Service, prefix: str) -> FactRead:
    """The flags of a server that ``RUNS_HELP`` (its --help, saved or run); another server's saved --help."""
    if server.RUNS_HELP:
        return LlamaServerFlags, {"path": server.binary(prefix)}
    return ServerOptions, {"path": server.help_file(prefix)}


def _stale_read(server: Service, prefix: str | None) -> FactRead:
    probe = StaleProbe(server.unit_name, unit_path(server), tuple(server.read_only_files()), server.binary(prefix))
    return UnitStates, {"units": (server.unit_name,), "probes": (probe,)}


def _state_read(unit_name: str) -> FactRead:
    return UnitStates, {"units": (unit_name,)}


def _unit_state(unit_name: str) -> UnitState | None:
    """The unit as systemd reports it (None: systemd knows nothing of it)."""
    states: dict[str, UnitState] = read(_state_read(unit_name))
    return states.get(unit_name)


def _user_read(server: Service) -> FactRead:
    return ExistingUsers, {"names": (server.user,)}


def _unit_file_read(server: Service) -> FactRead:
    return FileContents, {"path": unit_path(server)}


def _key_file_read(key_file: str) -> FactRead:
    return File, {"path": key_file}


def _gpus_read() -> FactRead:
    return NvidiaGpus, {}


def _unverified_read() -> FactRead:
    return UnverifiedServices, {}


def unit_state_reads(unit_name: str) -> list[FactRead]:
    """The facts `running_and_enabled` reads for a unit (prefetched with the run's others: every unit's
    reads of `UnitStates` are one ``systemctl show``)."""
    return [_state_read(unit_name)]


def facts_read(server: Service, prefix: str | None) -> list[FactRead]:
    """The facts `server(...)` reads on a host where the service exists (`host_facts.prefetch` loads
    them): each built by the function its operation reads it with (`host_facts.read`)."""
    flag_reads = [_flags_read(server, prefix)] if prefix is not None else []
    key_file = server.generated_key_file
    key_reads = [_key_file_read(key_file)] if key_file else []
    return [
        _user_read(server),
        *flag_reads,
        *([_gpus_read()] if server.gpus else []),
        _unit_file_read(server),
        *key_reads,
        _stale_read(server, prefix),
        *unit_state_reads(server.unit_name),
        _unverified_read(),
    ]


def unverified(server: Service) -> Mark | None:
    """The service's mark: an earlier run put it live and never saw its smoke test pass (it was cut)."""
    return next((mark for mark in read(_unverified_read()) if mark.unit == server.unit_name), None)


def _mark(unit_name: str, install: Sequence[OperationMeta] = ()) -> str:
    """The command marking the unit unverified: by this run, and whether it switched the install."""
    holder = deploy_lock.holding()
    switched = state.is_executing and any(meta.is_complete() and meta.did_change() for meta in install)
    return mark_command(unit_name, by=holder.who() if holder else "", install_switched=switched)


def _gpus_field(server: Service) -> str:
    """`services.N.gpus`: where the host's Box (its data's `box`) declares the service's GPUs."""
    try:
        box = box_from_host_data(host.data.get("box"), host.name)
    except InventoryError:
        return "gpus"
    names = [service.name for service in box.services]
    return f"services.{names.index(server.name)}.gpus" if server.name in names else "gpus"


@operation()
@refusals_fail_cleanly
def unit(server: AnyService, prefix: str | None):  # type: ignore[no-untyped-def]
    """
    Write the service's unit atomically (upload beside it, rename over), keeping the old one as ``.prev``.

    + server: the service whose unit is rendered
    + prefix: the install's prefix the unit's ``ExecStart`` runs from (``{prefix}/current``); None: no
      install (its ``PROGRAM``)

    With ``--diff`` the change is shown as a text diff of the unit. A service pinned to a GPU the host's
    ``NvidiaGpus`` fact lacks, or lists without its UUID or minor number, is refused (``services.N.gpus``).

    **Example:**

    .. code:: python

        service.unit(
            name="Unit /etc/systemd/system/gemma4.service", server=box.service("gemma4"), prefix="/opt/llama.cpp"
        )
    """
    path = unit_path(server)
    # The unit allows exactly the service's GPUs' device nodes and pins them by UUID: from the host's records.
    host_gpus = gpus_from_fact(read(_gpus_read())) if server.gpus else []
    try:
        service_gpus(server, host_gpus)
    except ValueError:
        try:  # again, naming the field as the host's Box has it (only a refusal reads the Box)
            service_gpus(server, host_gpus, field=_gpus_field(server))
        except ValueError as error:
            raise OperationError(f"{server.unit_name}: {error}") from error
    text = render_unit(server, server.binary(prefix), host_gpus)
    old_lines = read(_unit_file_read(server))
    if is_current(old_lines, text):
        host.noop(f"{path} is up to date")
        return
    log_diff(path, old_lines, text)
    yield from write_commands(path, text, exists=old_lines is not None, keep_previous=previous_unit_path(server))


def api_key_script(key_file: str, group: str) -> str:
    """Create a random key in `key_file` unless it has one, owned root:`group`, mode 0640.

    The key is made and written inside the script (`printf` is a shell builtin): it is never in an
    argv, the script's text or its output, so neither `ps`, `--diff` nor pyinfra's -vvv can show it.
    """
    path, directory = shell_word(key_file), shell_word(key_file.rsplit("/", 1)[0] or "/")
    staged = shell_word(f"{key_file}.new")
    return "\n".join([
        "set -eu",
        "umask 022",  # new parents 0755: the service must traverse them
        f"mkdir -p {directory} && chmod 0711 {directory}",
        "umask 077",
        f"if [ ! -s {path} ]; then",
        "  key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')",
        f'  printf \'%s\\n\' "$key" > {staged} && mv -f {staged} {path}',
        "fi",
        f"chown root:{shell_word(group)} {path} && chmod {chmod_mode()} {path}",
    ])  # fmt: skip


@operation()
def api_key(server: AnyService):  # type: ignore[no-untyped-def]
    """
    Create the service's API key once: random, in a bare file readable by root and the service's group.

    + server: a service whose key the deploy makes (its ``generated_key_file``, e.g. a llama-server's
      ``api_key_file="generate"``). An existing key is kept; only its owner and mode are put right.

    **Example:**

    .. code:: python

        service.api_key(name="API key of gemma4.service", server=server)
    """
    key_file = server.generated_key_file
    assert key_file is not None, f"{server.unit_name}: the deploy makes no key for it"
    info = read(_key_file_read(key_file))
    owned = info and (info["user"], info["group"], info["mode"]) == ("root", server.user, fact_mode())
    if owned and info["size"] > 0:
        host.noop(f"{key_file} holds a key, readable by root and {server.user} only")
        return
    yield api_key_script(key_file, server.user)


def _line_digests_read(key_file: str) -> FactRead:
    """The sha256 of every line of a key file (the keys themselves never leave the host)."""
    command = (
        f"while IFS= read -r line; do printf '%s' \"$line\" | sha256sum | cut -c1-64; done < {shell_word(key_file)} "
        "2>/dev/null | tr '\\n' ' '"
    )
    return Command, {"command": command}


def _append_secret(key: str, key_file: str) -> None:
    """Append ``key`` as a line of ``key_file`` (its owner and mode kept): uploaded, then appended on the host."""
    staged = f"{key_file}.gateway"
    quoted, quoted_staged = shell_word(key_file), shell_word(staged)
    then = f"sed -i -e '$a\\' {quoted} && cat {quoted_staged} >> {quoted}; rm -f {quoted_staged}"
    put_secret(f"{key}\n", staged, then, f"could not add the gateway's key to {key_file}")


@operation()
def backend_key(server: Service, key: str):  # type: ignore[no-untyped-def]
    """
    The gateway's key for a backend llama-server: another line of its key file (llama-server reads every line
    as a key; gpubox's own readers keep using the first), added by a step that prints nothing of it.

    + server: the backend (its ``key_file``, which the box deploy made)
    + key: the gateway's key for its group

    **Example:**

    .. code:: python

        gateway.backend_key(name="Gateway key of gemma4.service", server=server, key=key)
    """
    key_file = server.key_file
    assert key_file is not None, f"{server.name} checks no key"
    lines = str(read(_line_digests_read(key_file)) or "").split()
    if digest(key) in lines:
        host.noop(f"{key_file} holds the gateway's key")
        return
    forget(_line_digests_read(key_file))
    yield python_step(_append_secret, key, key_file)


@operation()
def running_current(server: AnyService, prefix: str | None):  # type: ignore[no-untyped-def]
    """
    Count as a change when the running process predates its unit, models, key or build: a deploy cut
    between writing one of them and the restart. The next run then restarts (and smokes) it.

    + server: the service
    + prefix: the install's prefix (the process must run ``{prefix}/current``'s program); None: no install

    **Example:**

    .. code:: python

        service.running_current(name="gemma4.service runs what is on disk", server=server, prefix="/opt/llama.cpp")
    """
    state = read(_stale_read(server, prefix)).get(server.unit_name)
    reasons = state.stale if state else ()
    if not reasons:
        host.noop(f"{server.unit_name} runs what is on disk (or is not running)")
        return
    host.log(f"{server.unit_name} must restart: " + "; ".join(reasons))
    yield "true"


@operation()
def restart(server: Service, install: Sequence[OperationMeta] = ()):  # type: ignore[no-untyped-def]
    """
    Restart the service (``systemctl restart``): run only when something it depends on changed. A
    smoke-tested service (``smoke_tested``) is marked unverified first (``/var/lib/gpubox/unverified/<unit>``,
    written whole): its smoke test clears the mark, and a run cut before that finds it and smoke-tests.

    + server: the service
    + install: the op metas of the install it runs from: the mark says whether this run switched it
      (a miss found by a later run switches it back too)

    **Example:**

    .. code:: python

        service.restart(name="Restart gemma4.service", server=server, _if=any_changed(unit_meta))
    """
    if server.smoke_tested:
        yield _mark(server.unit_name, install)
    yield f"systemctl restart {shell_word(server.unit_name)}"


@operation()
def running_and_enabled(unit_name: str, mark: bool = False):  # type: ignore[no-untyped-def]
    """
    Start a unit if it is not running and enable it at boot if it is not enabled; one
    ``systemctl show`` for both (read with the run's other facts).

    + unit_name: the unit (``gemma4.service``, ``prometheus.service``)
    + mark: mark the unit unverified before starting it (a smoke-tested service: a start
      puts a process live as a restart does, and is smoke-tested as one)

    **Example:**

    .. code:: python

        service.running_and_enabled(name="gemma4.service running and enabled at boot", unit_name="gemma4.service")
    """
    state = _unit_state(unit_name)
    running, enabled = (state.active, state.enabled) if state else (False, False)
    if running and enabled:
        host.noop(f"{unit_name} is running and enabled")
        return
    if not enabled:
        yield f"systemctl enable {shell_word(unit_name)}"
    if not running:
        if mark:
            yield _mark(unit_name)
        yield f"systemctl start {shell_word(unit_name)}"


@dataclass(frozen=True)
class Restarted:
    """What can put a new process of the service live in this run, or left one unverified before it:
    its smoke test (and a miss's rollback) follows any of them."""

    restart: OperationMeta | None = None  # the restart, when one is planned
    start: OperationMeta | None = None  # `running_and_enabled`, when it will start a stopped service
    unverified: Mark | None = None  # an earlier run put it live and never saw its smoke test pass

    @property
    def planned(self) -> bool:
        """Whether this run may have a new process to verify (decided before it runs: a dry run says so)."""
        return self.restart is not None or self.start is not None or self.unverified is not None

    def happened(self) -> bool:
        """Whether it has one, once the restart and the start ran (an ``_if`` of the smoke test)."""
        metas = [meta for meta in (self.restart, self.start) if meta is not None]
        return self.unverified is not None or any(meta.did_change() for meta in metas)


@deploy("Service")
def server(  # type: ignore[no-untyped-def]
    server: Service,
    prefix: str | None,
    changed: list | None = None,  # type: ignore[type-arg]
    ensure_user: bool = True,
    install: Sequence[OperationMeta] = (),
    gateway_keys: Sequence[str] = (),
):
    """
    The service user, the flag check, the unit, and a restart only when the unit, a model or the
    build it uses changed; enabled at boot, started when it is stopped.

    + server: the service (any registered server type)
    + prefix: the prefix of the install it runs from (``Box.prefix_of(server)``); None: it runs from none
    + changed: op metas (build, models) whose change restarts the service too
    + ensure_user: create the service's system user (the surgical deploy skips it)
    + install: the install's op metas (also in ``changed``): the unverified mark says whether this
      run switched it
    + gateway_keys: the keys gateways send this backend (``gpubox.gateway_keys``): added to its key file,
      a change restarts it

    Returns what can put a new process live (``Restarted``): the restart, the start of a stopped
    service, or a mark an earlier run left (it restarted the service and was cut before its smoke
    test passed). The smoke test follows any of them; none is planned on a converged host.

    **Example:**

    .. code:: python

        restarted = service.server(box.service("gemma4"), "/opt/llama.cpp", changed=[*build_metas, placed])
        smoke.smoke_test(box.service("gemma4"), restarted)
    """
    # pyinfra's user operation reads three facts (users, groups, OS); a user that exists needs none of it.
    if ensure_user and server.user not in read(_user_read(server)):
        from pyinfra.operations import server as server_ops  # here: only a missing user pays its import

        server_ops.user(
            name=f"Service user {server.user}",
            user=server.user,
            system=True,
            shell="/usr/sbin/nologin",
            home="/nonexistent",
            ensure_home=False,
        )
    flags_supported(
        name=f"Flags of {server.unit_name} exist in the installed {server.type}",
        server=server,
        prefix=prefix,
    )
    key_metas = [api_key(name=f"API key of {server.unit_name}", server=server)] if server.generated_key_file else []
    # a gateway's key for this backend: another line of its key file (operations.gateway)
    key_metas += [
        backend_key(name=f"Gateway key of {server.unit_name}", server=server, key=key) for key in gateway_keys
    ]
    unit_meta = unit(name=f"Unit {unit_path(server)}", server=server, prefix=prefix)
    stale_meta = running_current(name=f"{server.unit_name} runs what is on disk", server=server, prefix=prefix)
    restart_on = [unit_meta, stale_meta, *key_metas, *(changed or [])]
    # Every check above decides from facts read once for the run (prefetched), so asking whether any of
    # them will change costs no round trip: on a converged host the reload, the restart and the smoke
    # test are not planned at all, and a dry run reads "nothing to do", not "conditional change".
    restart_meta = None
    if any(meta.will_change for meta in restart_on):
        systemd.daemon_reload(name="systemd daemon-reload", _if=any_changed(*restart_on))
        restart_meta = restart(
            name=f"Restart {server.unit_name}", server=server, install=install, _if=any_changed(*restart_on)
        )
    smoked = server.smoke_tested
    state = _unit_state(server.unit_name)
    running = state is not None and state.active
    start_meta = running_and_enabled(
        name=f"{server.unit_name} running and enabled at boot", unit_name=server.unit_name, mark=smoked
    )
    mark = unverified(server) if smoked else None
    if mark is not None:
        host.log(
            f"{mark.describe()} and its smoke test never passed (that run was cut): it is smoke-tested now, "
            f"and rolled back on a miss"
        )
    return Restarted(restart=restart_meta, start=None if running else start_meta, unverified=mark)
