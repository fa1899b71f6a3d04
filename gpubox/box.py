"""A host's whole spec: what it builds and installs, and the services it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Self

from pydantic import Field, SerializeAsAny, WrapValidator, field_validator, model_validator

import gpubox.servers  # noqa: F401 (the product's server types register themselves)
from gpubox.servers.base import Service
from gpubox.servers.registry import validate_service
from gpubox.spec import (
    ExpectedGpu,
    HostMonitoring,
    HuggingFace,
    LlamaCppBuild,
    ModelFile,
    PiperInstall,
    SourceBuild,
    Spec,
    Violation,
    WhisperCppBuild,
    host_address,
    refuse,
)

if TYPE_CHECKING:
    from gpubox.servers.llama import LlamaServer

AnyService = Annotated[SerializeAsAny[Service], WrapValidator(validate_service)]
"""Any service a box runs: a registered server type (``gpubox.servers.registry``), told apart by its ``type``."""

Install = SourceBuild | PiperInstall
INSTALL_FIELDS = ("llama_cpp", "whisper_cpp", "piper")
"""The Box's installs: a server type's ``INSTALL`` names one of them (or none)."""


class Box(Spec):
    """A host: the builds and installs its services run from, and the services (a host's ``box`` in the
    inventory)."""

    llama_cpp: LlamaCppBuild | None = Field(
        default=None, description="The llama.cpp build llama-server services run from; required by one."
    )
    whisper_cpp: WhisperCppBuild | None = Field(
        default=None, description="The whisper.cpp build whisper-server services run from; required by one."
    )
    piper: PiperInstall | None = Field(
        default=None, description="The piper install piper services run from; required by one."
    )
    services: tuple[AnyService, ...] = Field(
        description="Every service the box runs, at least one, each a systemd unit told apart by its `type` (one "
        "without is a llama-server). Unit names and ports are unique per box, one path has one sha256, and the "
        "services pinned to one GPU must fit in it (`gpubox plan` and the deploy refuse `services.N.gpus`)."
    )
    expected_gpus: tuple[ExpectedGpu, ...] | None = Field(
        default=None,
        description="The GPUs the box should have: `gpubox plan` and the monitoring budget VRAM against them, a "
        "service pinned to another GPU is refused, and so is GPU work pinned to none. None: nothing to budget "
        "against.",
    )
    address: str | None = Field(
        default=None,
        description="The host's IP address on the network it shares with its peers: what a llama-server's `--rpc` "
        "dials for an RPC server here that listens on every interface, and what an RPC server's `allow_from` is "
        "matched against for a client here. Required on both ends of an `rpc` reference (hosts that share one "
        "network namespace, as the test hosts do, share one address).",
    )
    monitoring: HostMonitoring = Field(
        default=HostMonitoring(),
        description="What the host runs to be watched: the ports of its node-exporter and Prometheus agent "
        "(`deploys/observability.py` deploys them).",
    )
    huggingface: HuggingFace | None = Field(
        default=None,
        description="The hub `hf://` model sources come from and the token for gated ones; None: huggingface.co, "
        "with `$HF_TOKEN_FILE`'s token if it is set.",
    )

    @field_validator("address")
    @classmethod
    def _ip_address(cls, value: str | None) -> str | None:
        return host_address(value)

    @model_validator(mode="after")
    def _box_rules(self) -> Self:
        refuse(
            type(self).__name__,
            [
                *self._unique_names_and_ports(),
                *self._installs(),
                *self._own_prefixes(),
                *self._known_gpus(),
                *self._gpu_work_pinned(),
                *self._one_checksum(),
            ],
        )
        return self

    def _installs(self) -> list[Violation]:
        """Every service type needs the build (or install) it runs from, if any."""
        return [
            (
                (service.INSTALL,),
                f"services[{position}] ({service.name!r}) is a {service.server_name} service and "
                f"runs from {service.INSTALL}: set {service.INSTALL_EXAMPLE}",
                None,
            )
            for position, service in enumerate(self.services)
            if service.INSTALL is not None and getattr(self, service.INSTALL) is None
        ]

    def _own_prefixes(self) -> list[Violation]:
        """Each install switches `{prefix}/current` and prunes under it: two at one prefix would clobber each other."""
        owners: dict[str, str] = {}
        problems: list[Violation] = []
        for field in INSTALL_FIELDS:
            install: Install | None = getattr(self, field)
            if install is None:
                continue
            owner = owners.setdefault(install.prefix, field)
            if owner != field:
                problems.append((
                    (field, "prefix"),
                    f"{install.prefix} is {owner}'s prefix already: give each install its own prefix",
                    install.prefix,
                ))
        return problems

    def _install(self, field: str) -> Install | None:
        """The install at ``field`` as the box builds it: with the options its services need (``rpc``)."""
        install: Install | None = getattr(self, field)
        if not isinstance(install, SourceBuild):
            return install
        users = [service for service in self.services if field == service.INSTALL]
        options = {option for service in users for option in service.build_options()}
        return install.with_options(tuple(sorted(options)))

    def install_of(self, service: Service) -> Install | None:
        """The build or install ``service`` runs from (the rules made sure there is one), with the options the
        box's services need; None: none."""
        if service.INSTALL is None:
            return None
        install = self._install(service.INSTALL)
        assert install is not None, f"{service.name}: no {service.INSTALL}"
        return install

    def prefix_of(self, service: Service) -> str | None:
        """Where ``service``'s install lives (``/opt/llama.cpp``); None: it runs from no install."""
        install = self.install_of(service)
        return install.prefix if install is not None else None

    def install_users(self, install: Install) -> list[Service]:
        """The services that run from ``install`` (its prefix: one install per prefix), in box order."""
        return [service for service in self.services if self.prefix_of(service) == install.prefix]

    def builds(self) -> list[SourceBuild]:
        """The source builds the services need, llama.cpp first, each with the options its services need."""
        builds = [self._install("llama_cpp"), self._install("whisper_cpp")]
        return [build for build in builds if isinstance(build, SourceBuild)]

    def chat_servers(self) -> list[LlamaServer]:
        """The services ``gpubox smoke`` and ``gpubox bench`` reach (the OpenAI chat API), in box order."""
        return [service for service in self.services if service.CHAT]  # type: ignore[misc]

    def _unique_names_and_ports(self) -> list[Violation]:
        problems: list[Violation] = []
        if not self.services:
            problems.append((("services",), "a box serves at least one service: add one", []))
        names: dict[str, int] = {}
        ports: dict[int, str] = {}
        for position, service in enumerate(self.services):
            if service.name in names:
                problems.append((
                    ("services", position, "name"),
                    f"unit name {service.name!r} is already used by services[{names[service.name]}]: "
                    f"give each service its own name",
                    service.name,
                ))
            if service.port in ports:
                problems.append((
                    ("services", position, "port"),
                    f"port {service.port} is already used by service {ports[service.port]!r}: "
                    f"give each service its own port",
                    service.port,
                ))
            names.setdefault(service.name, position)
            ports.setdefault(service.port, service.name)
        for field in ("node_exporter_port", "agent_port"):
            port = getattr(self.monitoring, field)
            if port in ports:
                problems.append((
                    ("monitoring", field),
                    f"port {port} is already used by service {ports[port]!r}: give it its own port",
                    port,
                ))
        return problems

    def _known_gpus(self) -> list[Violation]:
        if self.expected_gpus is None:
            return []
        indices = sorted(gpu.index for gpu in self.expected_gpus)
        return [
            (
                ("services", position, "gpus"),
                f"GPU {gpu} is not among expected_gpus {indices}: pin the service to one of those, "
                f"or add the GPU to expected_gpus",
                list(service.gpus),
            )
            for position, service in enumerate(self.services)
            for gpu in service.gpus
            if gpu not in indices
        ]

    def _gpu_work_pinned(self) -> list[Violation]:
        """On a box that declares its GPUs, GPU work says which: an unpinned service would see none (the
        unit hides them) while it asks for one."""
        if self.expected_gpus is None:
            return []
        indices = sorted(gpu.index for gpu in self.expected_gpus)
        return [
            (
                ("services", position, "gpus"),
                f"{service.name} asks for a GPU but pins none, so its unit would hide every GPU and it would run "
                f"on the CPU: pin it with gpus=({indices[0]},) (one of expected_gpus {indices}), or run it on the "
                f"CPU with {service.CPU_SETTING}",
                [],
            )
            for position, service in enumerate(self.services)
            if service.gpu_work and not service.gpus
        ]

    def _one_checksum(self) -> list[Violation]:
        problems: list[Violation] = []
        owners: dict[str, tuple[str, str]] = {}
        for position, service in enumerate(self.services):
            for field, model in service.model_files():
                sha256, owner = owners.setdefault(model.path, (model.sha256, service.name))
                if sha256 != model.sha256:
                    problems.append((
                        ("services", position, field, "sha256"),
                        f"{model.path} is declared by service {owner!r} with another sha256: "
                        f"one file can't have two checksums; use one path per file",
                        model.sha256,
                    ))
        return problems

    def model_files(self) -> list[tuple[str, ModelFile]]:
        """Every model file of the box once (by host path), with the field that declares it first
        (``services.0.model_draft``): where a refusal about the file points."""
        seen: dict[str, tuple[str, ModelFile]] = {}
        for position, service in enumerate(self.services):
            for field, model in service.model_files():
                seen.setdefault(model.path, (f"services.{position}.{field}", model))
        return list(seen.values())

    def models(self) -> list[tuple[Service, ModelFile]]:
        """Every model file of the box once (by host path), with the first service that uses it."""
        seen: dict[str, tuple[Service, ModelFile]] = {}
        for service in self.services:
            for model in service.models():
                seen.setdefault(model.path, (service, model))
        return list(seen.values())

    def service(self, name: str) -> Service:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service named {name!r}; services: {[s.name for s in self.services]}")

    def llama_server(self, name: str) -> LlamaServer:
        """The chat server (llama-server) called ``name``; KeyError when that service is another type."""
        service = self.service(name)
        if not service.CHAT:
            raise KeyError(f"service {name!r} is a {service.type_tag()}, not a llama-server")
        return service  # type: ignore[return-value]
