"""A host's whole spec: what it builds and installs, and the services it runs."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import Discriminator, Tag, model_validator

from gpubox.servers.base import Service
from gpubox.servers.llama import LlamaServer
from gpubox.servers.piper import PiperServer
from gpubox.servers.whisper import WhisperServer
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
    refuse,
)


def _service_type(value: Any) -> str:
    """A service's type: its ``type`` field; a service written without one is a llama-server."""
    if isinstance(value, dict):
        return str(value.get("type", "llama-server"))
    return str(getattr(value, "type", "llama-server"))


AnyService = Annotated[
    Annotated[LlamaServer, Tag("llama-server")]
    | Annotated[WhisperServer, Tag("whisper-server")]
    | Annotated[PiperServer, Tag("piper")],
    Discriminator(_service_type),
]
"""Any service a box runs, told apart by its ``type``."""

# Which install each service type runs from: the Box field, and what to add when it is missing.
INSTALL_FIELDS: dict[type[Service], tuple[str, str]] = {
    LlamaServer: ("llama_cpp", "llama_cpp=LlamaCppBuild(commit=...)"),
    WhisperServer: ("whisper_cpp", "whisper_cpp=WhisperCppBuild(commit=...)"),
    PiperServer: ("piper", "piper=PiperInstall(version='1.8.0')"),
}


class Box(Spec):
    """A host: the builds and installs its services run from, and the services.

    + llama_cpp: the llama.cpp build llama-server services run
    + whisper_cpp: the whisper.cpp build whisper-server services run
    + piper: the piper install piper services run
    + services: every service, each pinned to its GPUs
    + expected_gpus: the GPUs the box should have; the planner budgets against them
    + monitoring: the ports of the host's node-exporter and Prometheus agent (deploys/observability.py)
    + huggingface: the hub ``hf://`` model sources come from and the token file for gated ones
    """

    llama_cpp: LlamaCppBuild | None = None
    whisper_cpp: WhisperCppBuild | None = None
    piper: PiperInstall | None = None
    services: tuple[AnyService, ...]
    expected_gpus: tuple[ExpectedGpu, ...] | None = None
    monitoring: HostMonitoring = HostMonitoring()
    huggingface: HuggingFace | None = None

    @model_validator(mode="after")
    def _box_rules(self) -> Self:
        refuse(
            type(self).__name__,
            [
                *self._unique_names_and_ports(),
                *self._installs(),
                *self._own_prefixes(),
                *self._known_gpus(),
                *self._one_checksum(),
            ],
        )
        return self

    def _installs(self) -> list[Violation]:
        """Every service type needs the build (or install) it runs from."""
        return [
            (
                (INSTALL_FIELDS[type(service)][0],),
                f"services[{position}] ({service.name!r}) is a {service.server_name} service and "
                f"runs from {INSTALL_FIELDS[type(service)][0]}: set {INSTALL_FIELDS[type(service)][1]}",
                None,
            )
            for position, service in enumerate(self.services)
            if getattr(self, INSTALL_FIELDS[type(service)][0]) is None
        ]

    def _own_prefixes(self) -> list[Violation]:
        """Each install switches `{prefix}/current` and prunes under it: two at one prefix would clobber each other."""
        owners: dict[str, str] = {}
        problems: list[Violation] = []
        for field in ("llama_cpp", "whisper_cpp", "piper"):
            install: SourceBuild | PiperInstall | None = getattr(self, field)
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

    def install_of(self, service: Service) -> SourceBuild | PiperInstall:
        """The build or install ``service`` runs from (the rules made sure there is one)."""
        install: SourceBuild | PiperInstall | None = getattr(self, INSTALL_FIELDS[type(service)][0])
        assert install is not None, f"{service.name}: no {INSTALL_FIELDS[type(service)][0]}"
        return install

    def builds(self) -> list[SourceBuild]:
        """The source builds the services need, llama.cpp first."""
        return [build for build in (self.llama_cpp, self.whisper_cpp) if build is not None]

    def services_of(self, service_type: type[Service]) -> list[Any]:
        """The services of one type, in box order."""
        return [service for service in self.services if isinstance(service, service_type)]

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

    def service(self, name: str) -> LlamaServer | WhisperServer | PiperServer:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service named {name!r}; services: {[s.name for s in self.services]}")

    def llama_server(self, name: str) -> LlamaServer:
        """The llama-server service called ``name``; KeyError when there is none of that type."""
        service = self.service(name)
        if not isinstance(service, LlamaServer):
            raise KeyError(f"service {name!r} is a {service.type}, not a llama-server")
        return service
