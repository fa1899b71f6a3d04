"""llama.cpp's ``ggml-rpc-server``: one device (a GPU, or the CPU) that a llama-server on another host puts
layers on (``llama-server --rpc host:port``), and the references a llama-server makes to it.

Facts of the pinned tree (llama-cpp-python 0.3.36's llama.cpp, tools/rpc/rpc-server.cpp):

- ``-DGGML_RPC=ON`` builds the target and binary ``ggml-rpc-server``; ``GGML_RPC_RDMA`` turns itself on
  when libibverbs is found, so the build pins it off (``gpubox.build``).
- Flags: ``-t/--threads``, ``-d/--device``, ``-H/--host`` (127.0.0.1), ``-p/--port`` (50052), ``-c/--cache``
  (``$LLAMA_CACHE/rpc``, else ``~/.cache/llama.cpp/rpc``). An unknown argument prints the usage and exits 0,
  and there is no ``--version``: the deploy checks every flag against the ``--help`` the build saved.
- No authentication: whoever reaches the port runs tensor operations on the device. It serves one client at
  a time (a second one waits in the listen queue).
- Client and server must come from the same llama.cpp commit (a HELLO version check aborts the connection).
- llama-server aborts (exit 134) when an ``--rpc`` endpoint is not listening at start, and on its next
  request when the RPC server died under it; nothing falls back to the CPU. Its unit restarts it.
- llama-server puts the RPC devices *first* in its device list (``llama.cpp: add RPC servers at the front``):
  ``--tensor-split`` gives the RPC endpoints' shares first, in ``--rpc`` order, then the local GPUs'.

One RPC server is one device: its one pinned GPU, or the CPU (no ``gpus``). A host with two GPUs to lend
runs two RPC servers, each on its own port, so every device is one reference and one ``tensor_split`` share.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from gpubox.servers.base import Flag, Service
from gpubox.servers.registry import register_server_type
from gpubox.spec import Spec, Violation, is_loopback

if TYPE_CHECKING:
    from gpubox.box import Box

PROGRAM = "ggml-rpc-server"
DEFAULT_PORT = 50052
CACHE_ROOT = "/var/cache"
"""systemd's ``CacheDirectory=`` root for a system unit: the unit's cache lives under it, owned by its user."""

RPC_SERVER_FLAGS: tuple[Flag, ...] = (
    Flag("host", "--host", ("-H",), default="127.0.0.1"),
    Flag("port", "--port", ("-p",), default=DEFAULT_PORT),
    Flag("threads", "--threads", ("-t",)),
    Flag("cache", "--cache", ("-c",), style="switch"),
)


class RpcServer(Service):
    """One ``ggml-rpc-server`` systemd service: a device llama-servers on other hosts put layers on."""

    PROGRAM: ClassVar[str] = PROGRAM
    FLAGS: ClassVar[tuple[Flag, ...]] = RPC_SERVER_FLAGS
    INSTALL: ClassVar[str | None] = "llama_cpp"
    INSTALL_EXAMPLE: ClassVar[str] = "llama_cpp=LlamaCppBuild(commit=...)"
    PINNED: ClassVar[str] = "llama.cpp commit"
    CPU_SETTING: ClassVar[str] = "gpus=() (the CPU device)"
    SMOKE_KIND: ClassVar[str] = "listening"
    ADMITS_BY_ADDRESS: ClassVar[bool] = True
    SERVES_PEERS: ClassVar[bool] = True
    PEER_CLIENTS_MAX: ClassVar[int | None] = 1
    BUILD_OPTIONS: ClassVar[tuple[str, ...]] = ("rpc",)

    type: Literal["rpc-server"] = Field(
        default="rpc-server", description="The server type, which tells a box's services apart."
    )
    user: str = Field(
        default="llamarpc",
        description="The dedicated system account the unit runs as (not root); the deploy creates it.",
    )
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535, description="The port it listens on; unique per box.")
    gpus: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        default=(),
        description="The one GPU it lends, by nvidia-smi index (pinned by UUID like every service's); empty: it "
        "lends the CPU. One RPC server is one device: lend a second GPU with a second RPC server on its own port.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads of the CPU device (`--threads`); None: ggml-rpc-server's own (half the cores).",
    )
    cache: bool = Field(
        default=True,
        description="`--cache`: keep the tensors clients send in the unit's cache directory "
        f"(`{CACHE_ROOT}/gpubox-rpc/<name>`, `CacheDirectory=`), so a client's restart sends a hash, not the "
        "weights again.",
    )

    @field_validator("gpus")
    @classmethod
    def _one_device(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) > 1:
            raise ValueError(
                f"one RPC server lends one device, and gpus={list(value)} names {len(value)}: keep gpus=({value[0]},) "
                f"and lend GPU {value[1]} with a second RpcServer on its own port"
            )
        return value

    @field_validator("allow_from")
    @classmethod
    def _no_any(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "any" in value:
            raise ValueError(
                "ggml-rpc-server has no authentication: whoever reaches it runs tensor operations on its device. "
                "Name the networks of its client hosts (e.g. ('192.168.1.10/32',)), never 'any'"
            )
        return value

    @property
    def gpu_work(self) -> bool:
        return bool(self.gpus)

    @property
    def cache_directory(self) -> str | None:
        """The unit's ``CacheDirectory=`` (relative to /var/cache); None: no cache."""
        return f"gpubox-rpc/{self.name}" if self.cache else None

    def environment(self) -> dict[str, str]:
        """``LLAMA_CACHE``: where ``--cache`` writes (``$LLAMA_CACHE/rpc``), the unit's own cache directory."""
        return {"LLAMA_CACHE": f"{CACHE_ROOT}/{self.cache_directory}"} if self.cache_directory else {}

    def summary(self) -> str:
        where = f"GPU {self.gpus[0]}" if self.gpus else "CPU"
        admits = ", ".join(self.allow_from) if self.allow_from else "its own host"
        return f"lends {where}; admits {admits}"

    def description_details(self) -> list[str]:
        return ["RPC device"]


def rpc_server_rules(server: RpcServer) -> Iterator[Violation]:
    """Beyond loopback, ``allow_from`` names its clients (the one exception to "no authentication, loopback")."""
    if not is_loopback(server.host) and not server.allow_from:
        yield (
            ("allow_from",),
            f"host={server.host!r} listens beyond this machine and ggml-rpc-server has no authentication: set "
            f"allow_from to the networks of its client hosts only (e.g. ('192.168.1.10/32',)); the unit denies "
            f"the rest",
            (),
        )


RpcServer.RULES = (rpc_server_rules,)
register_server_type(RpcServer)


class RpcRef(Spec):
    """A llama-server's reference to an RPC server on another host of the inventory."""

    host: str = Field(description="The inventory name of the host that runs the RPC server.")
    service: str = Field(description="The RPC server's service name on that host.")
    endpoint: str | None = Field(
        default=None,
        description="Filled in by gpubox from the inventory (the RPC host's `address`, or the server's own "
        "`host`, and its port): what `--rpc` renders. Not written by hand.",
    )

    @field_validator("endpoint")
    @classmethod
    def _filled_in(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "endpoint is filled in from the inventory (the RPC host's box.address and the service's port): "
                "remove it and name the host and service"
            )
        return value

    def __str__(self) -> str:
        return f"{self.service}@{self.host}"


def rpc_endpoint(server_host_address: str | None, server: RpcServer) -> str | None:
    """``address:port`` a client dials (``Service.endpoint_address``); IPv6 in brackets. None: the host's
    address is needed and not set."""
    address = server.endpoint_address(server_host_address)
    if address is None:
        return None
    return f"[{address}]:{server.port}" if ":" in address else f"{address}:{server.port}"


def endpoint_address(endpoint: str) -> str:
    """The address of an ``address:port`` endpoint (brackets of IPv6 removed)."""
    return endpoint.rsplit(":", 1)[0].strip("[]")


def admits(server: RpcServer, server_host_address: str | None, client_address: str | None) -> bool:
    """Whether the RPC server lets the client host in: on loopback, a client on its own machine (the same
    address: hosts that share one network namespace, as the test hosts do); beyond it, ``allow_from``."""
    if is_loopback(server.host):
        return client_address is not None and client_address == server_host_address
    return server.admits(client_address)


def resolve_refs(
    refs: tuple[RpcRef, ...],
    client_host: str,
    boxes: Mapping[str, Box],
    commit: str | None,
) -> tuple[tuple[RpcRef, ...], list[Violation]]:
    """Each reference with its endpoint filled in, and what refuses them (by the reference's index): the host
    and the service exist, it is an RPC server, it admits this host, it runs this llama.cpp commit, no
    endpoint twice."""
    client_box = boxes.get(client_host)
    client_address = client_box.address if client_box is not None else None
    resolved: list[RpcRef] = []
    problems: list[Violation] = []
    seen: dict[str, int] = {}
    for index, ref in enumerate(refs):
        where: tuple[str | int, ...] = ("rpc", index)
        box = boxes.get(ref.host)
        if box is None:
            problems.append(
                (
                    (*where, "host"),
                    f"{ref.host!r} is no gpubox host of this inventory: name one of {sorted(boxes)}",
                    ref.host,
                )
            )
            continue
        found = [service for service in box.services if service.name == ref.service]
        if not found or not isinstance(found[0], RpcServer):
            rpc_names = [service.name for service in box.services if isinstance(service, RpcServer)]
            what = f"a {found[0].type_tag()}" if found else "not a service there"
            problems.append(
                (
                    (*where, "service"),
                    f"{ref.service!r} on {ref.host} is {what}: name one of its RPC servers {rpc_names}",
                    ref.service,
                )
            )
            continue
        server = found[0]
        endpoint = rpc_endpoint(box.address, server)
        if endpoint is None:
            problems.append(
                (
                    (*where, "host"),
                    f"{server.name} on {ref.host} listens on {server.host}: set "
                    f"box.address on {ref.host} (its address on the network its clients share)",
                    ref.host,
                )
            )
            continue
        if not admits(server, box.address, client_address):
            if is_loopback(server.host):
                fix = (
                    f"it listens on {server.host}, which only its own machine reaches: listen on {ref.host}'s "
                    f"address with allow_from admitting {client_address or 'this host'}"
                )
            elif client_address is None:
                fix = f"set box.address on {client_host}, in {server.name}'s allow_from {list(server.allow_from)}"
            else:
                fix = f"add {client_address}/32 to {server.name}'s allow_from on {ref.host}"
            problems.append(
                (
                    (*where,),
                    f"{ref} does not admit {client_host} ({client_address or 'no box.address'}): {fix}",
                    str(ref),
                )
            )
            continue
        server_commit = box.llama_cpp.commit if box.llama_cpp is not None else None
        if commit != server_commit:
            problems.append(
                (
                    (*where,),
                    f"{ref} runs llama.cpp {str(server_commit)[:12]} and this host "
                    f"{str(commit)[:12]}: client and server must be one commit (a HELLO version check "
                    f"aborts the connection); pin the same llama_cpp.commit on both",
                    str(ref),
                )
            )
            continue
        if endpoint in seen:
            problems.append(
                ((*where,), f"{endpoint} is rpc[{seen[endpoint]}] already: list each RPC server once", str(ref))
            )
            continue
        seen[endpoint] = index
        resolved.append(ref.model_copy(update={"endpoint": endpoint}))
    return tuple(resolved), problems
