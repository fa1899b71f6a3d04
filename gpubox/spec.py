"""The specs every part of a box shares: the base, the refusal machinery, builds, model files.

Every rule reports the field that must change, and says how, through a pydantic
`ValidationError` located at that field. Server types live in `gpubox.servers`, the whole host
in `gpubox.box`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CUDA_ARCH = re.compile(r"^[0-9]{2,3}[a-z]?(-real|-virtual)?$")
# A build prefix is handed to cmake, ninja, the compilers and ccache: plain path characters only.
BUILD_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")


class Spec(BaseModel):
    """Base of every spec: immutable, and an unknown field is an error, not a silent no-op."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Problem(BaseModel):
    """One rule a spec breaks: where (a dotted field path) and what to change."""

    model_config = ConfigDict(frozen=True)

    field: str
    message: str


Violation = tuple[tuple[str | int, ...], str, object]
"""A broken rule: where (the field's location), what to change, and the value found."""


def refuse(model_name: str, problems: list[Violation]) -> None:
    """Raise one ValidationError carrying every broken rule, each located at its field."""
    if not problems:
        return
    raise ValidationError.from_exception_data(
        model_name,
        [
            InitErrorDetails(type=PydanticCustomError("gpubox_rule", message), loc=loc, input=value)
            for loc, message, value in problems
        ],
    )


def problems_from(error: ValidationError) -> list[Problem]:
    """Flatten a pydantic error into (dotted field, message) pairs for people."""
    return [
        Problem(field=".".join(str(part) for part in item["loc"]) or "(spec)", message=item["msg"])
        for item in error.errors()
    ]


def absolute_path(value: str, what: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{what} must be an absolute path on the host, got {value!r}")
    if "\n" in value or "\x00" in value:
        raise ValueError(f"{what} must not contain newlines or NUL bytes")
    return value


class LlamaCppBuild(Spec):
    """A llama.cpp build pinned to one commit, built on the host."""

    repo: str = "https://github.com/ggml-org/llama.cpp"
    commit: str = Field(description="full 40-hex commit sha")
    cuda: Literal["auto", "on", "off"] = "auto"
    cuda_architectures: tuple[str, ...] | Literal["auto"] = "auto"
    targets: tuple[str, ...] = ("llama-server", "llama-bench")
    prefix: str = "/opt/llama.cpp"
    native: bool = Field(
        default=False,
        description="GGML_NATIVE: off by default; a native build died with SIGILL on a VM that "
        "advertises AMX it cannot run",
    )
    cpu_features: tuple[str, ...] = Field(
        default=("AVX", "AVX2", "FMA", "F16C"),
        description="explicit GGML_<FEATURE>=ON flags used when native is off (x86-64)",
    )
    prebuilt_ui: bool = Field(default=False, description="LLAMA_USE_PREBUILT_UI: downloads the web UI")
    jobs: int | None = Field(default=None, ge=1)
    ccache_dir: str | None = Field(default=None, description="CCACHE_DIR for the build; None: ccache's default")
    extra_cmake_args: tuple[str, ...] = ()
    keep_builds: int = Field(
        default=2,
        ge=2,
        description="installed builds kept under builds/ (with their work trees): current, previous (the "
        "rollback target) and the newest others; older ones are pruned after each switch",
    )

    @field_validator("commit")
    @classmethod
    def _full_sha(cls, value: str) -> str:
        if not SHA1_HEX.match(value.lower()):
            raise ValueError(
                f"commit must be a full 40-hex sha (a short sha can't be fetched shallowly and is "
                f"ambiguous), got {value!r}: run `git rev-parse {value}` in a llama.cpp clone"
            )
        return value.lower()

    @field_validator("prefix")
    @classmethod
    def _prefix_absolute(cls, value: str) -> str:
        absolute_path(value, "prefix")
        if not BUILD_PATH.match(value):
            raise ValueError(
                f"prefix holds the build trees that cmake, ninja, the compilers and ccache are given: use "
                f"letters, digits and '.', '_', '+', '-', '/' only (no spaces, quotes, '$', '%' or '`'), "
                f"got {value!r}"
            )
        return value.rstrip("/") or "/"

    @field_validator("ccache_dir")
    @classmethod
    def _ccache_dir_absolute(cls, value: str | None) -> str | None:
        return None if value is None else absolute_path(value, "ccache_dir")

    @field_validator("cuda_architectures")
    @classmethod
    def _cuda_archs(cls, value: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if value == "auto":
            return value
        for arch in value:
            if not CUDA_ARCH.match(arch):
                raise ValueError(
                    f"cuda_architectures entries are CMake CUDA architectures like '89' or '90a' "
                    f"(compute capability 8.9 -> '89'), got {arch!r}"
                )
        return value

    @field_validator("targets")
    @classmethod
    def _server_target(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "llama-server" not in value:
            raise ValueError("targets must include 'llama-server': the services run it")
        return value

    @field_validator("cpu_features")
    @classmethod
    def _cpu_features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for feature in value:
            if not re.match(r"^[A-Z0-9_]+$", feature):
                raise ValueError(f"cpu_features are GGML option suffixes like 'AVX2', got {feature!r}")
        return value

    @property
    def flavor(self) -> str:
        """Half of the build directory's name; `cuda` is resolved against facts by the operation."""
        return "cuda" if self.cuda == "on" else "cpu"


class ModelFile(Spec):
    """A GGUF on the host, checksummed, with where it comes from."""

    path: str
    sha256: str
    source: str | None = Field(
        default=None,
        description="a file on the controller or an https URL; None: the file must already be on the "
        "host with this sha256",
    )
    architecture: str = Field(description="expected GGUF general.architecture, e.g. gemma4, llama")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        absolute_path(value, "path")
        if value.endswith("/"):
            raise ValueError(f"path must name a file, not a directory: {value!r}")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not SHA256_HEX.match(value.lower()):
            raise ValueError(f"sha256 must be 64 hex digits (`sha256sum FILE`), got {value!r}")
        return value.lower()

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("http://"):
            raise ValueError(f"source must be https (or a file on the controller), got {value!r}")
        if "://" in value and not value.startswith("https://"):
            raise ValueError(f"source must be an https URL or a controller path, got {value!r}")
        return value

    @property
    def source_is_url(self) -> bool:
        return self.source is not None and self.source.startswith("https://")


class SmokeThresholds(Spec):
    """What a freshly restarted service must reach, or the deploy rolls back and fails."""

    min_tokens_per_second: float = Field(gt=0)
    min_acceptance: float | None = Field(default=None, ge=0, le=1)
    prompts: tuple[str, ...] = Field(
        default=("Write a short story about a lighthouse keeper who finds a map.",), min_length=1
    )
    n_predict: int = Field(default=128, ge=1, le=8192)
    runs: int = Field(default=3, ge=1, le=100)
    timeout_s: float = Field(default=300, gt=0)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExpectedGpu(Spec):
    """A GPU the box should have; the planner budgets against memory_total_mib."""

    index: int = Field(ge=0)
    name: str
    memory_total_mib: int = Field(gt=0)
