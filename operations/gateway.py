"""The gateway on its host: Debian's HAProxy with gpubox's config, keys placed without showing them, hardened.

HAProxy comes from the distro (with ``socat`` for its runtime socket, which ``gpubox rollout`` drives). Its
config lives at gpubox's own path (``/etc/gpubox/gateway/haproxy.cfg``; Debian's unit reads ``CONFIG`` from
``/etc/default/haproxy``), checked with ``haproxy -c`` before it replaces the live one, and reloaded without
dropping connections (Debian's ``ExecReload``: a check, then ``USR2`` to the master). A drop-in hardens the
distro's unit (its sandboxing ships commented out), points it at the backend keys' ``EnvironmentFile=`` and
saves the servers' state (a drained backend stays drained) before each reload.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.server import Command
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed

from gpubox.gateway import GATEWAY_DIR, Gateway
from gpubox.gateway_keys import digest, environment_text
from gpubox.haproxy import ADMIN_SOCKET, BACKEND_KEYS_ENV, CLIENT_KEYS_FILE, STATE_FILE
from gpubox.quoting import exec_word, shell_word
from gpubox.unit import KERNEL_WALLS, RESTRICTIONS, SYSCALL_WALLS

from .failures import python_step
from .host_commands import put_secret
from .host_facts import FactRead, forget, read
from .monitoring import packages
from .service import api_key_script, running_and_enabled
from .text_files import text_file

CONFIG_PATH = f"{GATEWAY_DIR}/haproxy.cfg"
DEFAULTS_PATH = "/etc/default/haproxy"
DROP_IN_PATH = "/etc/systemd/system/haproxy.service.d/gpubox.conf"
UNIT = "haproxy.service"
PACKAGES = ["haproxy", "socat"]

# HAProxy runs as its own user from the start (no `user`/`group` in the config, no setuid): it binds with
# CAP_NET_BIND_SERVICE only, its socket, pid file and saved state live in directories systemd makes for it.
HARDENING = (
    "User=haproxy",
    "Group=haproxy",
    "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    "NoNewPrivileges=yes",
    "UMask=0077",
    "LimitNOFILE=65536",
    "ProtectSystem=strict",
    "RuntimeDirectory=haproxy",
    "StateDirectory=haproxy",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateMounts=yes",
    "DevicePolicy=closed",
    *KERNEL_WALLS,
    "ProcSubset=pid",
    *RESTRICTIONS,
    "MemoryDenyWriteExecute=yes",
    *SYSCALL_WALLS,
    "SystemCallFilter=setrlimit",
    "SystemCallErrorNumber=EPERM",
)
"""Left out: ``PrivateNetwork`` (it is a listener), ``PrivateUsers`` (untried with HAProxy's master/worker),
``IPAddressDeny`` (its clients are ``allow_from``'s and its backends are on other hosts: HAProxy's own ACLs
and the backends' units hold that wall)."""


def drop_in_text() -> str:
    """The drop-in for the distro's ``haproxy.service``: the backend keys, the state saved on reload, the
    sandbox (left out: ``PrivateNetwork``, it is a listener; ``PrivateUsers``, it changes user itself)."""
    save_state = f"echo 'show servers state' | socat stdio {ADMIN_SOCKET} > {STATE_FILE} || true"
    return "\n".join([
        "# Managed by gpubox: the gateway's keys, its saved server state, its sandbox.",
        "[Service]",
        f"EnvironmentFile={BACKEND_KEYS_ENV}",
        "ExecReload=",
        "ExecReload=/usr/sbin/haproxy -Ws -f $CONFIG -c -q $EXTRAOPTS",
        f"ExecReload=/bin/sh -c {exec_word(save_state)}",
        "ExecReload=/bin/kill -USR2 $MAINPID",
        *HARDENING,
        "",
    ])  # fmt: skip


def defaults_text() -> str:
    """``/etc/default/haproxy`` (it overrides the unit's ``Environment=``): the config Debian's unit starts with,
    and the pid file and master socket in the unit's own runtime directory (HAProxy runs as ``haproxy``)."""
    return (
        "# Managed by gpubox: the gateway's config; HAProxy runs as haproxy, its files under /run/haproxy.\n"
        f'CONFIG="{CONFIG_PATH}"\nPIDFILE="/run/haproxy/haproxy.pid"\nEXTRAOPTS="-S /run/haproxy/master.sock"\n'
    )


def _digest_read(command: str) -> FactRead:
    return Command, {"command": command}


def _acl_digests(gateway: Gateway) -> FactRead:
    """The sha256 of the ACL the key file makes, and of the ACL on the host (``-`` when missing)."""
    assert gateway.api_key_file is not None
    key_file, acl = shell_word(gateway.api_key_file), shell_word(CLIENT_KEYS_FILE)
    return _digest_read(
        f"{{ sed -n 's/^\\(..*\\)$/Bearer \\1/p' {key_file} 2>/dev/null | sha256sum | cut -c1-64; "
        f"if [ -f {acl} ]; then sha256sum < {acl} | cut -c1-64; else echo -; fi; }} | tr '\\n' ' '"
    )


@operation()
def client_keys(gateway: Gateway):  # type: ignore[no-untyped-def]
    """
    The clients' key file (made once with ``api_key_file="generate"``) and the pattern file HAProxy matches
    whole ``Authorization`` headers against (``Bearer <key>`` a line, root:haproxy 0640), made from it on the
    host.

    + gateway: the host's gateway (with an ``api_key_file``)

    **Example:**

    .. code:: python

        gateway.client_keys(name="Gateway client keys", gateway=gateway_spec)
    """
    assert gateway.api_key_file is not None
    digests = str(read(_acl_digests(gateway)) or "").split()
    if len(digests) == 2 and digests[0] == digests[1]:
        host.noop(f"{CLIENT_KEYS_FILE} holds the keys of {gateway.api_key_file}")
        return
    forget(_acl_digests(gateway))
    if gateway.generate_api_key:
        yield api_key_script(gateway.api_key_file, "root")
    key_file, acl = shell_word(gateway.api_key_file), shell_word(CLIENT_KEYS_FILE)
    staged = shell_word(f"{CLIENT_KEYS_FILE}.new")
    yield (
        f"umask 077 && mkdir -p {shell_word(GATEWAY_DIR)} && sed -n 's/^\\(..*\\)$/Bearer \\1/p' {key_file} > {staged} "
        f"&& test -s {staged} && chgrp haproxy {staged} && chmod 0640 {staged} && mv -f {staged} {acl}"
    )


def _put_secret(text: str, path: str) -> None:
    """Upload ``text`` to ``path`` (root only, 0600) through a staged file: nothing of it is printed."""
    staged = f"{path}.new"
    then = f"chmod 0600 {shell_word(staged)} && mv -f {shell_word(staged)} {shell_word(path)}"
    put_secret(text, staged, then, f"could not write {path}")


@operation()
def backend_keys(keys: list[str]):  # type: ignore[no-untyped-def]
    """
    HAProxy's ``EnvironmentFile=``: the gateway's key for each model group (``GPUBOX_GROUP_KEY_<n>``), uploaded
    by a step that prints nothing of them; written only when its sha256 differs.

    + keys: each group's key, in the gateway's group order (``gpubox.gateway_keys.group_key``)

    **Example:**

    .. code:: python

        gateway.backend_keys(name="Gateway backend keys", keys=[group_key("gw", "smol")])
    """
    text = environment_text(keys)
    found = str(read(_digest_read(f"sha256sum < {shell_word(BACKEND_KEYS_ENV)} 2>/dev/null | cut -c1-64")) or "")
    if found.strip() == digest(text):
        host.noop(f"{BACKEND_KEYS_ENV} holds each group's key")
        return
    yield f"umask 077 && mkdir -p {shell_word(GATEWAY_DIR)}"
    yield python_step(_put_secret, text, BACKEND_KEYS_ENV)


@deploy("Gateway")
def gateway(gateway: Gateway, config: str, keys: list[str]) -> None:
    """
    Converge the host's gateway: HAProxy and socat, the clients' keys, the backend keys, the config (checked
    with ``haproxy -c``), Debian's defaults and the drop-in; then restart (new unit settings or keys) or reload
    (a new config or client keys: no connection dropped), and keep it running.

    + gateway: the host's gateway
    + config: its HAProxy config (``gpubox.haproxy.haproxy_config``)
    + keys: each group's backend key, in group order

    **Example:**

    .. code:: python

        gateway.gateway(spec, haproxy_config(spec, backends, keyed_groups=keyed), keys)
    """
    packages(name="Gateway packages", names=PACKAGES, manager="apt")
    reload_on: list[OperationMeta] = []
    if gateway.api_key_file is not None:
        reload_on.append(client_keys(name="Gateway client keys", gateway=gateway))
    restart_on = [
        backend_keys(name="Gateway backend keys", keys=keys),
        text_file(name="HAProxy defaults", path=DEFAULTS_PATH, text=defaults_text()),
    ]
    drop_in = text_file(name="HAProxy drop-in", path=DROP_IN_PATH, text=drop_in_text())
    restart_on.append(drop_in)
    reload_on.append(
        text_file(name="HAProxy config", path=CONFIG_PATH, text=config, mode="0640", group="haproxy",
                  check=["haproxy", "-c", "-q", "-f", "{}"])  # fmt: skip
    )
    if drop_in.will_change:
        systemd.daemon_reload(name="systemd daemon-reload", _if=any_changed(drop_in))
    running_and_enabled(name=f"{UNIT} running and enabled", unit_name=UNIT)
    if any(meta.will_change for meta in restart_on):
        systemd.service(name=f"Restart {UNIT} (keys or unit)", service=UNIT, restarted=True,
                        _if=any_changed(*restart_on))  # fmt: skip
    elif any(meta.will_change for meta in reload_on):
        systemd.service(name=f"Reload {UNIT} (new config)", service=UNIT, reloaded=True, _if=any_changed(*reload_on))
