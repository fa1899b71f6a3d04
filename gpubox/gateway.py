"""One endpoint for a fleet: HAProxy in front of llama-servers that serve the same model, grouped by name.

A host's data carries ``gateway=Gateway(...)`` beside (or instead of) its ``box``. Each ``ModelGroup`` names
the llama-servers that serve one model (``BackendRef``: host + service). ``gateway_problems`` checks the
references across the inventory (they exist, are chat servers, run one model file by sha256, and the gateway
host reaches them); ``haproxy_config`` renders Debian's HAProxy 2.6 config for it (``gpubox.haproxy``).

Routing: ``/<group>/v1/...`` (the prefix stripped) for any body size; plain ``/v1/...`` by the JSON body's
``model`` when the body fits ``buffer_bytes`` (HAProxy's ``tune.bufsize``); a body HAProxy could not read
whole gets a 413 naming the prefix route, an unknown model an OpenAI-style 404 listing the groups, and
``GET /v1/models`` lists them. Admin paths (``/metrics``, ``/slots``, writes to ``/props``) are not routed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from gpubox.servers.base import any_alone, listener_allow_from, network_entry
from gpubox.spec import HostMonitoring, Problem, Spec, Violation, absolute_path, host_address, is_loopback, refuse

if TYPE_CHECKING:
    from gpubox.box import Box
    from gpubox.servers.base import Service

GATEWAY_KEY = "gateway"
"""The host data key of a host's ``Gateway``."""
GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
GATEWAY_DIR = "/etc/gpubox/gateway"
GENERATE = "generate"


class BackendRef(Spec):
    """A llama-server a model group sends requests to: its host in the inventory and its service name."""

    host: str = Field(description="The inventory name of the host that runs the llama-server.")
    service: str = Field(description="The llama-server's service name on that host.")

    def __str__(self) -> str:
        return f"{self.service}@{self.host}"


class ModelGroup(Spec):
    """The llama-servers that serve one model under one name (what clients send as ``model``)."""

    name: str = Field(
        description="What clients send as `model` and the route prefix (`/<name>/v1/...`): lowercase letters, "
        "digits, `.`, `_`, `-`, at most 63, unique per gateway."
    )
    backends: tuple[BackendRef, ...] = Field(
        min_length=1,
        description="The llama-servers that serve it (host + service), each once; they must run one model file "
        "(one sha256) and be reachable from the gateway host.",
    )
    min_healthy: int = Field(
        default=1,
        ge=1,
        description="The fewest healthy backends the group keeps: an alert fires below it, and a rollout "
        "drains a backend only while the others keep it. At most the number of backends.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not GROUP_NAME.match(value):
            raise ValueError(
                f"a group's name is what clients send as `model` and its route prefix: lowercase letters, digits, "
                f"'.', '_', '-', at most 63, starting with a letter or digit; got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems: list[Violation] = []
        if self.min_healthy > len(self.backends):
            problems.append((
                ("min_healthy",),
                f"min_healthy={self.min_healthy} is more than the group's {len(self.backends)} backend(s): no state "
                f"of the group could keep it; lower it or add backends",
                self.min_healthy,
            ))  # fmt: skip
        seen = [(ref.host, ref.service) for ref in self.backends]
        problems += [
            (("backends", index), f"{self.backends[index]} is listed twice: list each backend once", str(ref))
            for index, ref in enumerate(self.backends)
            if (ref.host, ref.service) in seen[:index]
        ]
        refuse(type(self).__name__, problems)
        return self


class GatewayTimeouts(Spec):
    """How long the gateway waits, in seconds (HAProxy's ``timeout`` settings)."""

    connect_s: float = Field(default=5, gt=0, description="To open a connection to a backend (`timeout connect`).")
    server_s: float = Field(
        default=600,
        gt=0,
        description="For a backend's next bytes (`timeout server`): a long prompt is processed before the first "
        "byte, and a streamed (SSE) answer may pause between tokens. The longest silence a request may have.",
    )
    client_s: float = Field(
        default=600, gt=0, description="For a client's next bytes (`timeout client`), as long as the server's."
    )
    queue_s: float = Field(
        default=120,
        gt=0,
        description="In the gateway's queue while every backend of the group serves its `parallel` slots "
        "(`timeout queue`); then 503.",
    )
    check_interval_s: float = Field(
        default=2, gt=0, description="Between health checks of each backend's `/health` (`inter`)."
    )


class Gateway(Spec):
    """HAProxy on this host in front of the fleet's llama-servers, by model group."""

    groups: tuple[ModelGroup, ...] = Field(min_length=1, description="The model groups it routes, names unique.")
    address: str | None = Field(
        default=None,
        description="This host's IP address on the network it shares with its backends: what their `allow_from` "
        "must admit. Required when a backend runs on another host; on a host with a `box`, its `box.address`.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="The address it listens on. Beyond loopback it needs `api_key_file` and `allow_from`.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="The port clients connect to.")
    allow_from: tuple[Annotated[str, AfterValidator(network_entry)], ...] = Field(
        default=(),
        description="Who may connect beyond loopback: IP networks (or `('any',)` alone); the unit allows them and "
        "localhost and denies the rest. Required beyond loopback, refused on loopback.",
    )
    api_key_file: str | None = Field(
        default=None,
        description=f'The clients\' keys, one a line, on this host; `"generate"`: one key at '
        f"`{GATEWAY_DIR}/client.key` made on the first deploy. Required beyond loopback. Never in argv, a diff "
        "or a log: HAProxy reads it as a pattern file.",
    )
    tls_cert: str | None = Field(
        default=None,
        description="A PEM file on this host with the certificate chain and its private key (HAProxy's "
        "`crt`): the gateway speaks HTTPS. None: plain HTTP (`gpubox check` warns beyond loopback).",
    )
    buffer_bytes: int = Field(
        default=65536,
        ge=16384,
        le=1048576,
        description="HAProxy's `tune.bufsize`: a plain `/v1/...` request is routed by the `model` of a JSON body "
        "that fits it (less HAProxy's 1024-byte rewrite reserve); a larger body gets a 413 naming the "
        "`/<group>/v1/...` route, which takes any size. Each connection holds up to two such buffers.",
    )
    timeouts: GatewayTimeouts = Field(default=GatewayTimeouts(), description="How long it waits for what.")
    stats_port: int = Field(
        default=8404,
        ge=1,
        le=65535,
        description="HAProxy's Prometheus exporter on 127.0.0.1 (`/metrics`), scraped by the host's Prometheus.",
    )
    monitoring: HostMonitoring = Field(
        default=HostMonitoring(),
        description="On a host with no `box`: the ports of its node-exporter and Prometheus agent "
        "(`deploys/observability.py`), which scrapes HAProxy's exporter. On a host with a box, `box.monitoring` "
        "is what runs: leave this as it is or equal to it.",
    )
    generate_api_key: bool = Field(default=False, description='Set by `api_key_file="generate"`.')

    @model_validator(mode="before")
    @classmethod
    def _generated_key_file(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("api_key_file") == GENERATE:
            return {**data, "api_key_file": f"{GATEWAY_DIR}/client.key", "generate_api_key": True}
        return data

    @field_validator("api_key_file", "tls_cert")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else absolute_path(value, "a gateway file")

    @field_validator("allow_from")
    @classmethod
    def _any_alone(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return any_alone(value)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return host_address(value)

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems: list[Violation] = []
        names: dict[str, int] = {}
        for index, group in enumerate(self.groups):
            if group.name in names:
                problems.append((("groups", index, "name"), f"group {group.name!r} is groups[{names[group.name]}] "
                                 "already: give each group its own name", group.name))  # fmt: skip
            names.setdefault(group.name, index)
        loopback = is_loopback(self.host)
        if not loopback and self.api_key_file is None:
            problems.append((("api_key_file",), f"host={self.host!r} listens beyond this machine: set "
                             'api_key_file="generate" (clients present the gateway\'s own key)', None))
        problems += listener_allow_from(self.host, self.allow_from, required=True)
        if self.stats_port == self.port:
            problems.append((("stats_port",), f"port {self.port} is the gateway's own: give the exporter another",
                             self.stats_port))
        watched = {self.monitoring.node_exporter_port: "node_exporter_port", self.monitoring.agent_port: "agent_port"}
        problems += [
            ((field,), f"port {port} is monitoring.{watched[port]} already: give each its own", port)
            for field, port in (("port", self.port), ("stats_port", self.stats_port))
            if port in watched
        ]
        refuse(type(self).__name__, problems)
        return self

    def group(self, name: str) -> ModelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no model group {name!r}: {[group.name for group in self.groups]}")

    def warnings(self) -> list[tuple[str, str]]:
        """What the rules accept but a reviewer would question: keys crossing a network in the clear."""
        if not is_loopback(self.host) and self.tls_cert is None:
            return [("tls_cert", f"{self.host}:{self.port} listens beyond this machine over plain HTTP: clients' "
                     "keys cross the network in the clear; set tls_cert to a PEM with the chain and key")]
        return []


@dataclass(frozen=True)
class Backend:
    """A group's backend resolved: where the gateway reaches it, how many requests it serves at once."""

    ref: BackendRef
    address: str
    port: int
    parallel: int
    model_sha256: str
    key_file: str | None

    @property
    def server_name(self) -> str:
        """HAProxy's name for it, ``<host>:<service>`` (a name there takes letters, digits, `-`, `_`, `.`, `:`)."""
        return f"{self.ref.host}:{self.ref.service}"


def _served(boxes: Mapping[str, Box], ref: BackendRef) -> Service | None:
    box = boxes.get(ref.host)
    found = [service for service in box.services if service.name == ref.service] if box is not None else []
    return found[0] if found else None


def resolve_backends(
    gateway_host: str, gateway: Gateway, boxes: Mapping[str, Box]
) -> tuple[dict[str, tuple[Backend, ...]], list[Problem]]:
    """Each group's backends resolved against the inventory's ``boxes``, and what refuses them, each at its field
    (``gateway.groups.0.backends.1``): the backend exists and is a chat server (llama-server); the group runs one
    model file; the gateway reaches it (same host, or beyond loopback with ``allow_from`` admitting the gateway's
    address; hosts that share one network namespace, as the test hosts do, share one address and loopback);
    its port is not the gateway's on the gateway's own host."""
    resolved: dict[str, tuple[Backend, ...]] = {}
    problems: list[Problem] = []
    own_box = boxes.get(gateway_host)
    gateway_address = gateway.address or (own_box.address if own_box is not None else None)
    if own_box is not None:
        taken = {service.port: service.name for service in own_box.services}
        for field, port in (("port", gateway.port), ("stats_port", gateway.stats_port)):
            if port in taken:
                problems.append(Problem(field=f"gateway.{field}", message=f"port {port} is service {taken[port]!r}'s "
                                        f"on {gateway_host}: choose another"))  # fmt: skip
    for group_index, group in enumerate(gateway.groups):
        backends: list[Backend] = []
        for index, ref in enumerate(group.backends):
            where = f"gateway.groups.{group_index}.backends.{index}"
            service = _served(boxes, ref)
            if service is None:
                names = [s.name for s in boxes[ref.host].services] if ref.host in boxes else []
                field = f"{where}.service" if ref.host in boxes else f"{where}.host"
                known = f"its services: {names}" if ref.host in boxes else f"the inventory's hosts: {sorted(boxes)}"
                problems.append(Problem(field=field, message=f"{ref} is no service of the inventory ({known})"))
                continue
            if not service.CHAT:
                problems.append(Problem(field=f"{where}.service", message=f"{ref} is a {service.type_tag()}: a "
                                        "model group routes to llama-servers"))  # fmt: skip
                continue
            box = boxes[ref.host]
            address = service.endpoint_address(box.address)
            same_host = ref.host == gateway_host
            shares_loopback = is_loopback(service.host) and box.address is not None and box.address == gateway_address
            if not same_host and not shares_loopback and (address is None or is_loopback(service.host)):
                problems.append(Problem(field=where, message=f"{ref} listens on {service.host}, which the gateway on "
                                        f"{gateway_host} cannot reach: listen beyond loopback (host='0.0.0.0' with "
                                        f"box.address set on {ref.host}, api_key_file and allow_from admitting "
                                        f"{gateway_address or 'the gateway'})"))  # fmt: skip
                continue
            if not same_host and not shares_loopback and not service.admits(gateway_address):
                shown = gateway_address or "(unset: set gateway.address)"
                problems.append(Problem(field=where, message=f"{ref}'s allow_from {list(service.allow_from)} does not "
                                        f"admit the gateway's address {shown}: add {gateway_address or 'it'} to it"))
                continue
            model = service.models()[0]
            backends.append(Backend(
                ref=ref, address="127.0.0.1" if same_host and address is None else str(address),
                port=service.port, parallel=service.slots, model_sha256=model.sha256, key_file=service.key_file,
            ))  # fmt: skip
        models = {backend.model_sha256 for backend in backends}
        if len(models) > 1:
            problems.append(Problem(field=f"gateway.groups.{group_index}.backends", message=f"group {group.name!r} "
                                    "mixes models (different sha256): a group's backends serve one model file"))
        resolved[group.name] = tuple(backends)
    return resolved, problems
