"""A host's whole spec: one llama.cpp build and the services it runs."""

from __future__ import annotations

from typing import Self

from pydantic import model_validator

from gpubox.servers.llama import LlamaServer
from gpubox.spec import ExpectedGpu, LlamaCppBuild, ModelFile, Spec, Violation, refuse


class Box(Spec):
    """A host: one llama.cpp build and the llama-server services it runs."""

    llama_cpp: LlamaCppBuild
    services: tuple[LlamaServer, ...]
    expected_gpus: tuple[ExpectedGpu, ...] | None = None

    @model_validator(mode="after")
    def _box_rules(self) -> Self:
        refuse(type(self).__name__, [*self._unique_names_and_ports(), *self._known_gpus(), *self._one_checksum()])
        return self

    def _unique_names_and_ports(self) -> list[Violation]:
        problems: list[Violation] = []
        if not self.services:
            problems.append((("services",), "a box serves at least one llama-server: add a service", []))
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
            for field in ("model", "model_draft"):
                model: ModelFile | None = getattr(service, field)
                if model is None:
                    continue
                sha256, owner = owners.setdefault(model.path, (model.sha256, service.name))
                if sha256 != model.sha256:
                    problems.append((
                        ("services", position, field, "sha256"),
                        f"{model.path} is declared by service {owner!r} with another sha256: "
                        f"one file can't have two checksums; use one path per file",
                        model.sha256,
                    ))
        return problems

    def models(self) -> list[tuple[LlamaServer, ModelFile]]:
        """Every model file of the box once (by host path), with the first service that uses it."""
        seen: dict[str, tuple[LlamaServer, ModelFile]] = {}
        for service in self.services:
            for model in service.models():
                seen.setdefault(model.path, (service, model))
        return list(seen.values())

    def service(self, name: str) -> LlamaServer:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service named {name!r}; services: {[s.name for s in self.services]}")
