"""Typed box specs: what a host should run, refused before any host is touched when wrong.

Field names of `LlamaServer` are llama-server's long flag names in snake_case, so a user who
knows the flags knows the fields. Every cross-field rule reports the field that must change,
and says how, through a pydantic `ValidationError` located at that field.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

# Values the pinned llama.cpp (0c1e57098) accepts, read from its `llama-server --help`.
SpecType = Literal[
    "none",
    "draft-simple",
    "draft-eagle3",
    "draft-mtp",
    "draft-dflash",
    "draft-dspark",
    "ngram-simple",
    "ngram-map-k",
    "ngram-map-k4v",
    "ngram-mod",
    "ngram-cache",
]
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
OnOffAuto = Literal["on", "off", "auto"]
OnOff = Literal["on", "off"]
GpuLayers = Annotated[int, Field(ge=0)] | Literal["auto", "all"]

UNQUANTIZED_CACHE_TYPES: frozenset[str] = frozenset({"f32", "f16", "bf16"})
SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
CUDA_ARCH = re.compile(r"^[0-9]{2,3}[a-z]?(-real|-virtual)?$")


class Spec(BaseModel):
    """Base of every spec: immutable, and an unknown field is an error, not a silent no-op."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Problem(BaseModel):
    """One rule a spec breaks: where (a dotted field path) and what to change."""

    model_config = ConfigDict(frozen=True)

    field: str
    message: str


def refuse(model_name: str, problems: list[tuple[tuple[str | int, ...], str, object]]) -> None:
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


def _absolute_path(value: str, what: str) -> str:
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
        return _absolute_path(value.rstrip("/") or "/", "prefix")

    @field_validator("ccache_dir")
    @classmethod
    def _ccache_dir_absolute(cls, value: str | None) -> str | None:
        return None if value is None else _absolute_path(value, "ccache_dir")

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
        _absolute_path(value, "path")
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


# Flags a typed field renders; extra_args must not smuggle them past the rules.
TYPED_FLAGS: dict[str, str] = {
    "-m": "model",
    "--model": "model",
    "-md": "model_draft",
    "--model-draft": "model_draft",
    "--spec-draft-model": "model_draft",
    "--spec-type": "spec_type",
    "--spec-draft-n-max": "spec_draft_n_max",
    "-ngld": "spec_draft_ngl",
    "--spec-draft-ngl": "spec_draft_ngl",
    "--gpu-layers-draft": "spec_draft_ngl",
    "--n-gpu-layers-draft": "spec_draft_ngl",
    "-c": "ctx_size",
    "--ctx-size": "ctx_size",
    "-ngl": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers",
    "--n-gpu-layers": "n_gpu_layers",
    "-ctk": "cache_type_k",
    "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v",
    "-np": "parallel",
    "--parallel": "parallel",
    "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
    "-cb": "cont_batching",
    "--cont-batching": "cont_batching",
    "-nocb": "cont_batching",
    "--no-cont-batching": "cont_batching",
    "--jinja": "jinja",
    "--no-jinja": "jinja",
    "--host": "host",
    "--port": "port",
    "-fit": "fit",
    "--fit": "fit",
    "--metrics": "metrics",
    "--api-key-file": "api_key_file",
    "--api-key": "api_key_file",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LlamaServer(Spec):
    """One llama-server systemd service."""

    name: str
    gpus: tuple[Annotated[int, Field(ge=0)], ...] = ()
    user: str = "llama"
    model: ModelFile
    model_draft: ModelFile | None = None
    spec_type: SpecType = "none"
    spec_draft_n_max: int | None = Field(default=None, ge=1, le=64)
    spec_draft_ngl: GpuLayers | None = None
    ctx_size: int = Field(default=4096, ge=1)
    n_gpu_layers: GpuLayers = "auto"
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    parallel: int = Field(default=1, ge=1, le=256)
    flash_attn: OnOffAuto = "auto"
    cont_batching: bool = True
    jinja: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    fit: OnOff | None = None
    metrics: bool = True
    api_key_file: str | None = None
    extra_args: tuple[str, ...] = ()
    allow_parallel_speculation: bool = False
    smoke: SmokeThresholds | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not UNIT_NAME.match(value) or value.endswith(".service"):
            raise ValueError(
                f"name becomes the systemd unit `<name>.service`: use letters, digits, '-', '_' or "
                f"'.', at most 64, starting with a letter or digit, without '.service'; got {value!r}"
            )
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not USER_NAME.match(value) or value == "root":
            raise ValueError(
                f"user must be a dedicated system account name (lowercase, not root), got {value!r}"
            )
        return value

    @field_validator("api_key_file")
    @classmethod
    def _api_key_file(cls, value: str | None) -> str | None:
        return None if value is None else _absolute_path(value, "api_key_file")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or any(char.isspace() for char in value) or "," in value:
            raise ValueError(f"host must be one address to listen on, got {value!r}")
        return value

    @model_validator(mode="after")
    def _rules(self) -> Self:
        refuse(type(self).__name__, self.rule_problems())
        return self

    @property
    def unit_name(self) -> str:
        return f"{self.name}.service"

    @property
    def drafts(self) -> bool:
        return self.spec_type != "none"

    def rule_problems(self) -> list[tuple[tuple[str | int, ...], str, object]]:
        """Cross-field rules; each names the field to change and how."""
        problems: list[tuple[tuple[str | int, ...], str, object]] = []
        spec = self.spec_type
        if self.drafts and self.parallel > 1 and not self.allow_parallel_speculation:
            problems.append((
                ("parallel",),
                f"spec_type {spec!r} with parallel={self.parallel} is the parallel trap: drafting at "
                f"more than one slot made the seed box slower than no drafter at all (np=4: 64 tok/s "
                f"with MTP vs 90 without). Set parallel=1, or spec_type='none', or measure it with "
                f"`gpubox bench` and set allow_parallel_speculation=True",
                self.parallel,
            ))
        if spec.startswith("draft-") and self.model_draft is None:
            problems.append((
                ("model_draft",),
                f"spec_type {spec!r} drafts with a separate model: set model_draft to its GGUF",
                None,
            ))
        if spec.startswith("ngram-") and self.model_draft is not None:
            problems.append((
                ("model_draft",),
                f"spec_type {spec!r} drafts from n-grams and never uses a draft model: remove "
                f"model_draft, or use a draft-* spec_type",
                self.model_draft.path,
            ))
        if self.model_draft is not None and not self.drafts:
            problems.append((
                ("spec_type",),
                "model_draft is set but spec_type is 'none': llama-server loads the drafter and "
                "never drafts with it; set spec_type (e.g. 'draft-simple', or 'draft-mtp' for a "
                "Gemma 4 assistant drafter) or remove model_draft",
                spec,
            ))
        if (
            spec == "draft-mtp"
            and self.model.architecture == "gemma4"
            and self.model_draft is not None
            and self.model_draft.architecture != "gemma4-assistant"
        ):
            problems.append((
                ("model_draft", "architecture"),
                f"draft-mtp on a gemma4 target drafts with Gemma 4's separate MTP assistant GGUF: "
                f"model_draft must be a 'gemma4-assistant' GGUF, not {self.model_draft.architecture!r}",
                self.model_draft.architecture,
            ))
        if self.spec_draft_n_max is not None and not self.drafts:
            problems.append((
                ("spec_draft_n_max",),
                "spec_draft_n_max does nothing without a spec_type: remove it or set spec_type",
                self.spec_draft_n_max,
            ))
        if self.spec_draft_ngl is not None and self.model_draft is None:
            problems.append((
                ("spec_draft_ngl",),
                "spec_draft_ngl places draft-model layers, but there is no model_draft: remove it",
                self.spec_draft_ngl,
            ))
        if self.cache_type_v not in UNQUANTIZED_CACHE_TYPES and self.flash_attn != "on":
            problems.append((
                ("flash_attn",),
                f"a quantized V cache (cache_type_v={self.cache_type_v!r}) needs flash attention, "
                f"and llama-server exits without it: set flash_attn='on' (or cache_type_v='f16')",
                self.flash_attn,
            ))
        if self.ctx_size % self.parallel:
            problems.append((
                ("ctx_size",),
                f"ctx_size={self.ctx_size} is split evenly over parallel={self.parallel} slots: use "
                f"a multiple of {self.parallel}, e.g. {self.ctx_size - self.ctx_size % self.parallel}",
                self.ctx_size,
            ))
        if not is_loopback(self.host) and self.api_key_file is None:
            problems.append((
                ("api_key_file",),
                f"host={self.host!r} listens beyond this machine: set api_key_file to a file of API "
                f"keys on the host (the key never goes on the command line), or host='127.0.0.1'",
                None,
            ))
        if self.smoke is not None and self.smoke.min_acceptance is not None and not self.drafts:
            problems.append((
                ("smoke", "min_acceptance"),
                "min_acceptance is only measurable with a drafter: remove it or set spec_type",
                self.smoke.min_acceptance,
            ))
        if self.model_draft is not None and self.model_draft.path == self.model.path and (
            self.model_draft.sha256 != self.model.sha256
        ):
            problems.append((
                ("model_draft", "sha256"),
                "model and model_draft name the same path with different sha256: one file can't "
                "have two checksums",
                self.model_draft.sha256,
            ))
        for position, arg in enumerate(self.extra_args):
            flag = arg.split("=", 1)[0]
            if flag in TYPED_FLAGS:
                field = TYPED_FLAGS[flag]
                problems.append((
                    ("extra_args", position),
                    f"{flag} is a typed field: set {field} instead of passing it in extra_args "
                    f"(so the rules above see it)",
                    arg,
                ))
        return problems


class ExpectedGpu(Spec):
    """A GPU the box should have; the planner budgets against memory_total_mib."""

    index: int = Field(ge=0)
    name: str
    memory_total_mib: int = Field(gt=0)


class Box(Spec):
    """A host: one llama.cpp build and the llama-server services it runs."""

    llama_cpp: LlamaCppBuild
    services: tuple[LlamaServer, ...]
    expected_gpus: tuple[ExpectedGpu, ...] | None = None

    @model_validator(mode="after")
    def _box_rules(self) -> Self:
        problems: list[tuple[tuple[str | int, ...], str, object]] = []
        if not self.services:
            problems.append((("services",), "a box serves at least one llama-server: add a service", []))
        seen_ports: dict[int, str] = {}
        seen_names: dict[str, int] = {}
        model_sha_by_path: dict[str, tuple[str, str]] = {}
        gpu_indices = None if self.expected_gpus is None else {gpu.index for gpu in self.expected_gpus}
        for position, service in enumerate(self.services):
            if service.name in seen_names:
                problems.append((
                    ("services", position, "name"),
                    f"unit name {service.name!r} is already used by services[{seen_names[service.name]}]: "
                    f"give each service its own name",
                    service.name,
                ))
            seen_names.setdefault(service.name, position)
            if service.port in seen_ports:
                problems.append((
                    ("services", position, "port"),
                    f"port {service.port} is already used by service {seen_ports[service.port]!r}: "
                    f"give each service its own port",
                    service.port,
                ))
            seen_ports.setdefault(service.port, service.name)
            for gpu in service.gpus:
                if gpu_indices is not None and gpu not in gpu_indices:
                    problems.append((
                        ("services", position, "gpus"),
                        f"GPU {gpu} is not among expected_gpus {sorted(gpu_indices)}: pin the "
                        f"service to one of those, or add the GPU to expected_gpus",
                        list(service.gpus),
                    ))
            for field in ("model", "model_draft"):
                model: ModelFile | None = getattr(service, field)
                if model is None:
                    continue
                owner = model_sha_by_path.setdefault(model.path, (model.sha256, service.name))
                if owner[0] != model.sha256:
                    problems.append((
                        ("services", position, field, "sha256"),
                        f"{model.path} is declared by service {owner[1]!r} with another sha256: "
                        f"one file can't have two checksums; use one path per file",
                        model.sha256,
                    ))
        refuse(type(self).__name__, problems)
        return self

    def models(self) -> list[tuple[LlamaServer, ModelFile]]:
        """Every model file of the box once (by host path), with the first service that uses it."""
        seen: dict[str, tuple[LlamaServer, ModelFile]] = {}
        for service in self.services:
            for model in (service.model, service.model_draft):
                if model is not None:
                    seen.setdefault(model.path, (service, model))
        return list(seen.values())

    def service(self, name: str) -> LlamaServer:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(f"no service named {name!r}; services: {[s.name for s in self.services]}")
