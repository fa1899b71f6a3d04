"""The gateway's HAProxy 2.6 config (Debian 12's package: Prometheus exporter, ``json_query``, runtime API).

``haproxy_config`` renders one deterministic file from a ``Gateway`` and its resolved backends. Every value
goes through ``gpubox.quoting.haproxy_word`` or is a number; keys are never in it: the clients' keys are a
pattern file HAProxy reads (``-f``), each group's backend key an environment variable the unit's
``EnvironmentFile=`` sets (``${GPUBOX_GROUP_KEY_0}``), so the config can be shown in a diff.

The request rules, in order (HAProxy runs ``http-request`` rules top to bottom):

1. admin paths (``/metrics``, ``/slots``, a write to ``/props``) are refused (403);
2. with client keys, a request without one of them gets a 401;
3. ``GET /v1/models`` lists the groups (OpenAI's shape);
4. ``/<group>/...``: the group is the prefix, which is stripped (any body size);
5. otherwise the body is awaited (up to the buffer) and its JSON ``model`` names the group; a body larger
   than the buffer could hold gets a 413 naming the prefix route; a model that is no group a 404 listing them;
6. only the completion paths of OpenAI's and llama.cpp's APIs pass (404 otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from gpubox.gateway import GATEWAY_DIR, Backend, Gateway
from gpubox.quoting import haproxy_word

ADMIN_SOCKET = "/run/haproxy/gpubox-admin.sock"
"""The runtime API (``level admin``): drain and ready a backend, read its sessions (root only, mode 600)."""
STATE_FILE = "/var/lib/haproxy/gpubox-server-state"
"""In the unit's ``StateDirectory=``: HAProxy runs as ``haproxy`` and writes it itself on reload."""
"""Where a reload keeps each backend's state (a drained backend stays drained)."""
CLIENT_KEYS_FILE = f"{GATEWAY_DIR}/client-keys.acl"
"""The clients' keys as HAProxy matches them: ``Bearer <key>`` a line (made from ``api_key_file``)."""
BACKEND_KEYS_ENV = f"{GATEWAY_DIR}/backend-keys.env"
"""``GPUBOX_GROUP_KEY_<n>=<key>`` a line: the unit's ``EnvironmentFile=``."""
FRONTEND = "gpubox"
REWRITE_RESERVE = 1024
"""HAProxy's ``tune.maxrewrite`` default: the part of a buffer kept for header rewrites."""

PASSED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/tokenize",
    "/v1/detokenize",
    "/chat/completions",
    "/completions",
    "/completion",
    "/embedding",
    "/embeddings",
    "/tokenize",
    "/detokenize",
    "/infill",
    "/health",
    "/v1/health",
)
"""What a request may reach on a backend: OpenAI's and llama.cpp's completion paths, and its health."""
ADMIN_PATHS = ("/metrics", "/slots")


def backend_name(group: str) -> str:
    return f"group_{haproxy_word(group, 'a group name')}"


def key_variable(index: int) -> str:
    """The environment variable that holds group ``index``'s backend key."""
    return f"GPUBOX_GROUP_KEY_{index}"


def _error_json(status: int, message: str, kind: str = "invalid_request_error") -> str:
    """An OpenAI-style error body, as one HAProxy single-quoted string (its content has no `'`)."""
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}, separators=(",", ":"))
    assert "'" not in body, body
    return f"'{body}'"


def _models_json(gateway: Gateway) -> str:
    data = [{"id": group.name, "object": "model", "owned_by": "gpubox"} for group in gateway.groups]
    return "'" + json.dumps({"object": "list", "data": data}, separators=(",", ":")) + "'"


def _seconds(value: float) -> str:
    return f"{int(value * 1000)}ms" if value != int(value) else f"{int(value)}s"


def haproxy_config(gateway: Gateway, backends: Mapping[str, tuple[Backend, ...]], *, keyed_groups: set[str]) -> str:
    """The whole config file for ``gateway``; ``backends`` each group's resolved backends, ``keyed_groups`` the
    groups whose backends check a key (the gateway sends theirs, from the environment)."""
    timeouts = gateway.timeouts
    names = [group.name for group in gateway.groups]
    listen = haproxy_word(gateway.host, "gateway.host")
    bind = f"[{listen}]:{gateway.port}" if ":" in listen else f"{listen}:{gateway.port}"
    if gateway.tls_cert is not None:
        bind += f" ssl crt {haproxy_word(gateway.tls_cert, 'gateway.tls_cert')}"
    lines = [
        "# Managed by gpubox: edits are overwritten on the next deploy.",
        "global",
        "    log /dev/log local0",
        f"    stats socket {ADMIN_SOCKET} mode 600 level admin",
        "    stats timeout 30s",
        f"    server-state-file {STATE_FILE}",
        f"    tune.bufsize {gateway.buffer_bytes}",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlognull",
        "    # retry only a connection that failed: a request that reached a backend is never sent twice",
        "    retry-on conn-failure",
        "    retries 2",
        "    option redispatch",
        f"    timeout connect {_seconds(timeouts.connect_s)}",
        f"    timeout client {_seconds(timeouts.client_s)}",
        f"    timeout server {_seconds(timeouts.server_s)}",
        f"    timeout queue {_seconds(timeouts.queue_s)}",
        "    timeout http-request 30s",
        "    load-server-state-from-file global",
        "",
        f"frontend {FRONTEND}",
        f"    bind {bind}",
        "    option httplog",
        f"    acl admin_path path {' '.join(ADMIN_PATHS)}",
        "    acl admin_path path_beg /slots/",
        "    acl props_write path /props",
        "    http-request deny deny_status 403 if admin_path || props_write !METH_GET",
    ]
    if gateway.api_key_file is not None:
        lines += [
            f"    acl client_key req.hdr(authorization) -m str -f {CLIENT_KEYS_FILE}",
            f"    http-request return status 401 content-type application/json string "
            f"{_error_json(401, 'a valid API key is required: send Authorization: Bearer <key>')} if !client_key",
        ]
    lines += [
        f"    http-request return status 200 content-type application/json string {_models_json(gateway)} "
        "if { path /v1/models } METH_GET",
    ]
    for name in names:
        word = haproxy_word(name, "a group name")
        lines += [
            f"    http-request set-var(txn.group) str({word}) if {{ path_beg /{word}/ }}",
            # no regex (PCRE's JIT needs writable code, which the unit's MemoryDenyWriteExecute refuses)
            f"    http-request set-path /%[path,field(3,/,0)] if {{ var(txn.group) -m str {word} }}",
        ]
    lines.append("    http-request deny deny_status 403 if admin_path || props_write !METH_GET")  # behind a prefix too
    limit = gateway.buffer_bytes - REWRITE_RESERVE
    routes = ", ".join(f"/{name}/v1/..." for name in names)
    lines += [
        "    acl has_group var(txn.group) -m found",
        "    http-request wait-for-body time 2s at-least 1 if !has_group METH_POST",
        "    http-request set-var(txn.body_len) req.body_len if !has_group",
        "    acl body_cut req.body_size,sub(txn.body_len) gt 0",
        "    http-request set-var(txn.model) req.body,json_query('$.model') if !has_group !body_cut",
        "    http-request set-var(txn.group) var(txn.model) "
        f"if !has_group {{ var(txn.model) -m str {' '.join(names)} }}",
        f"    http-request return status 413 content-type application/json string "
        f"{_error_json(413, f'the body is larger than the gateway reads to route by model ({limit} bytes): send it to the group route ({routes})')} "  # noqa: E501
        "if !has_group body_cut",
        "    http-request return status 404 content-type application/json lf-string "
        "'{\"error\":{\"message\":\"unknown model %[var(txn.model),json(utf8s)]: the models are "
        f"{', '.join(names)}\",\"type\":\"invalid_request_error\",\"code\":404}}}}' if !has_group",
        f"    acl passed path {' '.join(PASSED_PATHS)}",
        f"    http-request return status 404 content-type application/json string "
        f"{_error_json(404, 'not a completion path of this gateway')} if !passed",
    ]
    lines += [f"    use_backend {backend_name(name)} if {{ var(txn.group) -m str {name} }}" for name in names]
    for index, group in enumerate(gateway.groups):
        lines += [
            "",
            f"backend {backend_name(group.name)}",
            "    balance leastconn",
            "    option httpchk GET /health",
            "    http-check expect status 200",
        ]
        if group.name in keyed_groups:  # the gateway's key for this group, never the client's
            lines.append(f'    http-request set-header Authorization "Bearer ${{{key_variable(index)}}}"')
        else:  # a client's key is the gateway's: it does not travel on
            lines.append("    http-request del-header Authorization")
        lines += [
            f"    server {haproxy_word(backend.server_name, 'a backend')} "
            f"{_address(backend)}:{backend.port} check inter {_seconds(timeouts.check_interval_s)} fall 2 rise 2 "
            f"maxconn {backend.parallel}"
            for backend in backends.get(group.name, ())
        ]
    lines += [
        "",
        "frontend stats",
        f"    bind 127.0.0.1:{gateway.stats_port}",
        "    no log",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    http-request return status 404",
        "",
    ]
    return "\n".join(lines)


def _address(backend: Backend) -> str:
    address = haproxy_word(backend.address, f"{backend.ref}'s address")
    return f"[{address}]" if ":" in address else address


def client_keys_text(keys: list[str]) -> str:
    """The clients' keys as HAProxy's pattern file matches the whole ``Authorization`` header."""
    return "".join(f"Bearer {key}\n" for key in keys)
