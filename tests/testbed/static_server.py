"""A fifth, throwaway server type, defined outside the product: Python's own ``http.server`` serving a
directory (its ``health`` and ``metrics`` files), with no install. It proves a type registers from an
inventory and deploys, smokes and is scraped with no product edit (tests/e2e/test_fifth_type.py,
docs/adding-a-server-type.md).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from gpubox import Flag, Scrape, Service, register_server_type
from gpubox.spec import absolute_path


class StaticServer(Service):
    """``python3 -m http.server --bind HOST --directory DIR PORT``: ``/health`` and ``/metrics`` are files of
    ``directory``."""

    PROGRAM: ClassVar[str] = "/usr/bin/python3"
    PROGRAM_ARGS: ClassVar[tuple[str, ...]] = ("-m", "http.server")
    FLAGS: ClassVar[tuple[Flag, ...]] = (Flag("host", "--bind", ("-b",)), Flag("directory", "--directory", ("-d",)))
    READY_PATH: ClassVar[str] = "/health"

    type: Literal["static-http"] = "static-http"
    user: str = "statichttp"
    port: int = Field(default=8099, ge=1, le=65535)
    directory: str = Field(description="the directory served: its health and metrics files")

    @field_validator("directory")
    @classmethod
    def _directory(cls, value: str) -> str:
        return absolute_path(value, "directory")

    def argv(self, binary: str) -> list[str]:
        """http.server takes its port as its last positional argument."""
        words = super().argv(binary)
        return [*words[: len(words) - len(self.extra_args)], str(self.port), *self.extra_args]

    def read_only_files(self) -> list[str]:
        return [f"{self.directory}/health", f"{self.directory}/metrics"]

    def summary(self) -> str:
        return f"serves {self.directory}"

    def scrape(self) -> Scrape:
        return Scrape(labels={"directory": self.directory})


register_server_type(StaticServer)
