"""The specs every part of a box shares: the base, the refusal machinery, builds, model files.

Every rule reports the field that must change, and says how, through a pydantic
`ValidationError` located at that field. Server types live in `gpubox.servers`, the whole host
in `gpubox.box`.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass
from typing import ClassVar, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from gpubox.ggml_whisper import WHISPER_SHAPES
from gpubox.hf import DEFAULT_ENDPOINT, HF_SCHEME, HfReference, parse_reference

SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CUDA_ARCH = re.compile(r"^[0-9]{2,3}[a-z]?(-real|-virtual)?$")
# A build prefix is handed to cmake, ninja, the compilers and ccache: plain path characters only.
BUILD_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")
# The ggml whisper model sizes gpubox knows, by their shape (gpubox.ggml_whisper.WHISPER_SHAPES).
WHISPER_SIZES = tuple(WHISPER_SHAPES.values())
ENGLISH_ONLY = ".en"


@dataclass(frozen=True)
class WhisperSize:
    """A ggml whisper model's size, parsed once from ``ModelFile.architecture``: ``tiny.en`` is tiny and
    English-only, ``large`` is large and multilingual, ``large-v3-turbo`` is large-v3 with 4 decoder layers."""

    size: str
    english_only: bool = False

    @classmethod
    def parse(cls, architecture: str) -> WhisperSize:
        size = architecture.removesuffix(ENGLISH_ONLY)
        if size not in WHISPER_SIZES:
            raise ValueError(
                f"a ggml whisper model's architecture is its size: one of {', '.join(WHISPER_SIZES)} "
                f"(with '{ENGLISH_ONLY}' for English-only), got {architecture!r}"
            )
        return cls(size, architecture.endswith(ENGLISH_ONLY))

    def __str__(self) -> str:
        return self.size + (ENGLISH_ONLY if self.english_only else "")


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


SERVICE_TYPES: set[str] = set()
"""The ``type`` of each registered server type (``gpubox.servers.registry`` adds them): a Box's services
are told apart by it."""


def _field_path(loc: tuple[str | int, ...]) -> str:
    """``services.0.port``: pydantic puts the union member's tag after the index
    (``services.0.llama-server.port``), which names no field a person can set: it is left out."""
    parts = [
        str(part)
        for position, part in enumerate(loc)
        if not (part in SERVICE_TYPES and position > 0 and isinstance(loc[position - 1], int))
    ]
    return ".".join(parts) or "(spec)"


def problems_from(error: ValidationError) -> list[Problem]:
    """Flatten a pydantic error into (dotted field, message) pairs for people."""
    return [Problem(field=_field_path(item["loc"]), message=item["msg"]) for item in error.errors()]


def absolute_path(value: str, what: str) -> str:
    """An absolute host path, refused here (by the field) rather than where it is used: a newline or NUL
    breaks every file it is written into, and a `..` part makes systemd ignore the path (a unit's
    `ReadOnlyPaths=` holds the directory of every model and key file: `gpubox.quoting.path_list_entry`)."""
    if not value.startswith("/"):
        raise ValueError(f"{what} must be an absolute path on the host, got {value!r}")
    if "\n" in value or "\x00" in value:
        raise ValueError(f"{what} must not contain newlines or NUL bytes")
    if ".." in value.split("/"):
        raise ValueError(
            f"{what} must not have a '..' part (systemd ignores such a path), got {value!r}: "
            f"write it as {posixpath.normpath(value)!r}"
        )
    return value


def plain_path(value: str, what: str, why: str) -> str:
    """An absolute path of plain characters (what build tools and pip are given), without a trailing '/'."""
    absolute_path(value, what)
    if not BUILD_PATH.match(value):
        raise ValueError(
            f"{what} {why}: use letters, digits and '.', '_', '+', '-', '/' only (no spaces, quotes, '$', '%' "
            f"or '`'), got {value!r}"
        )
    return value.rstrip("/") or "/"


class Project(BaseModel):
    """What differs between the projects gpubox builds from source: names and CMake options.

    + name: how the project is called in logs and operation names (``llama.cpp``)
    + server: the program the services run; its ``--help`` is saved beside the build
    + required_targets: targets every build must include
    + cmake_options: project-specific CMake options (tests off, examples as the server needs)
    + version_flag: the server prints its version with it (llama-server); None when it has none
      (whisper-server prints usage and exits 0): the build stamp is what identifies a build
    """

    model_config = ConfigDict(frozen=True)

    name: str
    server: str
    required_targets: tuple[str, ...]
    cmake_options: tuple[str, ...]
    version_flag: str | None = None


RPC_SERVER_TARGET = "ggml-rpc-server"
"""llama.cpp's RPC server program (target and binary), built with GGML_RPC."""

LLAMA_CPP = Project(
    name="llama.cpp",
    server="llama-server",
    required_targets=("llama-server",),
    cmake_options=("-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"),
    version_flag="--version",
)
# whisper-server is an example of whisper.cpp (examples/server): examples on, tests off. Static
# libraries: whisper.cpp's build tree keeps libwhisper/libggml beside their sources, not in bin/, and
# the install copies bin/ alone (llama.cpp puts its libraries in bin/).
WHISPER_CPP = Project(
    name="whisper.cpp",
    server="whisper-server",
    required_targets=("whisper-server",),
    cmake_options=(
        "-DWHISPER_BUILD_TESTS=OFF",
        "-DWHISPER_BUILD_EXAMPLES=ON",
        "-DWHISPER_SDL2=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
    ),
)


class SourceBuild(Spec):
    """A ggml project (llama.cpp, whisper.cpp) built on the host at one pinned commit.

    One code path builds both: the project (``PROJECT``) gives the server program, the targets
    it needs and its own CMake options; everything else (CUDA, CPU features, ccache, the atomic
    switch of ``{prefix}/current``, pruning) is shared.
    """

    PROJECT: ClassVar[Project]

    repo: str = Field(description="The git repository the build fetches `commit` from.")
    commit: str = Field(
        description="The commit to build, a full 40-hex sha; a short one is refused (it can't be fetched "
        "shallowly and is ambiguous)."
    )
    cuda: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="`on`: a CUDA build (refused on a host without nvcc: gpubox does not install CUDA); `off`: a "
        "CPU build; `auto`: CUDA when the host has both NVIDIA GPUs and nvcc.",
    )
    cuda_architectures: tuple[str, ...] | Literal["auto"] = Field(
        default="auto",
        description="The CMake CUDA architectures to compile for (`'89'` for an RTX 4090, `'90a'`); anything "
        "else is refused. `auto`: the compute capabilities of the host's GPUs (refused when "
        "nvidia-smi lists none).",
    )
    targets: tuple[str, ...] = Field(description="The CMake targets built; they must include the server.")
    prefix: str = Field(
        description="Where the builds live, `{prefix}/current` the active one (switched atomically). An "
        "absolute path of plain characters (a space, quote, `$`, `%` or backtick is refused: cmake, ninja and "
        "the compilers get it), no other install's prefix."
    )
    native: bool = Field(
        default=False,
        description="GGML_NATIVE: build for the host's own CPU. Off by default: a native build died with "
        "SIGILL on a VM that advertises AMX it cannot run.",
    )
    cpu_features: tuple[str, ...] = Field(
        default=("AVX", "AVX2", "FMA", "F16C"),
        description="The `GGML_<FEATURE>=ON` options of a build without `native` (x86-64); each a GGML "
        "option suffix such as `AVX2`.",
    )
    jobs: int | None = Field(default=None, ge=1, description="Parallel build jobs (`-j`); None: the build tool's.")
    ccache_dir: str | None = Field(
        default=None,
        description="`CCACHE_DIR` for the build, an absolute path without a `..` part; None: ccache's default.",
    )
    extra_cmake_args: tuple[str, ...] = Field(default=(), description="More CMake options, after gpubox's own.")
    keep_builds: int = Field(
        default=2,
        ge=2,
        description="Installed builds kept under `builds/` (with their work trees): current, previous (the "
        "rollback target) and the newest others; older ones are pruned after each switch.",
    )

    @field_validator("commit")
    @classmethod
    def _full_sha(cls, value: str) -> str:
        if not SHA1_HEX.match(value.lower()):
            raise ValueError(
                f"commit must be a full 40-hex sha (a short sha can't be fetched shallowly and is "
                f"ambiguous), got {value!r}: run `git rev-parse {value}` in a {cls.PROJECT.name} clone"
            )
        return value.lower()

    @field_validator("prefix")
    @classmethod
    def _prefix_absolute(cls, value: str) -> str:
        return plain_path(value, "prefix", "holds the build trees cmake, ninja, the compilers and ccache are given")

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
        for target in cls.PROJECT.required_targets:
            if target not in value:
                raise ValueError(f"targets must include {target!r}: the services run it")
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

    @property
    def variant(self) -> tuple[str, ...]:
        """The project options that make another build of the same commit and flavor (llama.cpp's ``rpc``)."""
        return ()

    @property
    def programs(self) -> tuple[str, ...]:
        """The programs the services run from it, whose ``--help`` the build saves."""
        return (self.PROJECT.server,)

    def with_options(self, options: tuple[str, ...]) -> SourceBuild:
        """This build with the options its box's services need; a project without any is itself."""
        return self

    def project_cmake_options(self) -> list[str]:
        """The project's own CMake options (tests, examples, the web UI)."""
        return list(self.PROJECT.cmake_options)


class LlamaCppBuild(SourceBuild):
    """llama.cpp pinned to one commit, built on the host: llama-server (and llama-bench)."""

    PROJECT: ClassVar[Project] = LLAMA_CPP

    repo: str = Field(
        default="https://github.com/ggml-org/llama.cpp",
        description="The git repository the build fetches `commit` from.",
    )
    targets: tuple[str, ...] = Field(
        default=("llama-server", "llama-bench"),
        description="The CMake targets built; they must include `llama-server` (the services run it).",
    )
    prefix: str = Field(
        default="/opt/llama.cpp",
        description="Where the builds live, `{prefix}/current` the active one (switched atomically). An "
        "absolute path of plain characters (a space, quote, `$`, `%` or backtick is refused: cmake, ninja and "
        "the compilers get it), no other install's prefix.",
    )
    prebuilt_ui: bool = Field(
        default=False,
        description="LLAMA_USE_PREBUILT_UI: the build downloads llama-server's prebuilt web UI; off, it "
        "downloads nothing.",
    )
    rpc: bool = Field(
        default=False,
        description="GGML_RPC (RDMA pinned off): llama-server's `--rpc` and the `ggml-rpc-server` program. The box "
        "turns it on when it runs an RPC server or a llama-server with `rpc`; True builds them anyway. A build with "
        "it is another build (its own directory, `-rpc`), switched and rolled back as any other.",
    )

    def project_cmake_options(self) -> list[str]:
        options = [*self.PROJECT.cmake_options, f"-DLLAMA_USE_PREBUILT_UI={'ON' if self.prebuilt_ui else 'OFF'}"]
        return options + (["-DGGML_RPC=ON", "-DGGML_RPC_RDMA=OFF"] if self.rpc else [])

    @property
    def variant(self) -> tuple[str, ...]:
        return ("rpc",) if self.rpc else ()

    @property
    def programs(self) -> tuple[str, ...]:
        return (self.PROJECT.server, RPC_SERVER_TARGET) if self.rpc else (self.PROJECT.server,)

    def with_options(self, options: tuple[str, ...]) -> LlamaCppBuild:
        """This build with the options its box's services need (``rpc``: GGML_RPC and ``ggml-rpc-server``)."""
        if "rpc" not in options or (self.rpc and RPC_SERVER_TARGET in self.targets):
            return self
        targets = self.targets if RPC_SERVER_TARGET in self.targets else (*self.targets, RPC_SERVER_TARGET)
        return self.model_copy(update={"rpc": True, "targets": targets})


class WhisperCppBuild(SourceBuild):
    """whisper.cpp pinned to one commit, built on the host: whisper-server."""

    PROJECT: ClassVar[Project] = WHISPER_CPP

    repo: str = Field(
        default="https://github.com/ggml-org/whisper.cpp",
        description="The git repository the build fetches `commit` from.",
    )
    targets: tuple[str, ...] = Field(
        default=("whisper-server",),
        description="The CMake targets built; they must include `whisper-server` (the services run it).",
    )
    prefix: str = Field(
        default="/opt/whisper.cpp",
        description="Where the builds live, `{prefix}/current` the active one (switched atomically). An "
        "absolute path of plain characters (a space, quote, `$`, `%` or backtick is refused: cmake, ninja and "
        "the compilers get it), no other install's prefix.",
    )


AnySourceBuild = LlamaCppBuild | WhisperCppBuild
"""A source build of either project (a dict without a project's fields is llama.cpp's)."""

PIPER_PACKAGE = "piper-tts[http]"


class PiperInstall(Spec):
    """piper TTS (``piper-tts[http]``) at a pinned version, in a virtualenv on the host: a CUDA one
    (``onnxruntime-gpu`` in place of ``onnxruntime``) when a piper service of the box has ``cuda``."""

    version: str = Field(pattern=r"^[0-9]+(\.[0-9]+)*$", description="The exact piper-tts version (`1.8.0`).")
    prefix: str = Field(
        default="/opt/piper",
        description="`{prefix}/venvs/{version}-{flavor}` holds each install, `{prefix}/current` the active one "
        "(switched atomically). An absolute path of plain characters (`python -m venv` and pip get it), no "
        "other install's prefix.",
    )
    wheelhouse: str | None = Field(
        default=None,
        description="A directory of wheels on the controller, uploaded and installed with `--no-index` (for a "
        "host whose pip can't reach or trust an index); with a `cuda` service it must hold onnxruntime-gpu's. "
        "None: pip installs from the host's index.",
    )
    python: str = Field(
        default="/usr/bin/python3",
        description="The host's Python that makes the virtualenvs; an absolute path of plain characters.",
    )
    keep_installs: int = Field(
        default=2,
        ge=2,
        description="Virtualenvs kept under `venvs/`: current, previous (the rollback target) and the newest "
        "others; older ones are pruned after each switch.",
    )

    @field_validator("prefix", "python")
    @classmethod
    def _plain_path(cls, value: str, info: ValidationInfo) -> str:
        return plain_path(value, str(info.field_name), "is handed to python -m venv and pip")

    @property
    def requirement(self) -> str:
        return f"{PIPER_PACKAGE}=={self.version}"


ModelFormat = Literal["gguf", "ggml-whisper", "onnx", "json"]


class ModelFile(Spec):
    """A model file on the host, checksummed, with where it comes from and what it must be."""

    path: str = Field(
        description="Where the file lives on the host: an absolute path to a file, without a `..` part (systemd "
        "ignores such a path); what a service's model flag renders."
    )
    sha256: str = Field(
        description="The file's sha256, 64 hex digits (`sha256sum FILE`): the deploy refuses a file that does not "
        "match (the old one stays). One path has one sha256 in a box; a placeholder (one digit repeated) is "
        "flagged by `gpubox check`."
    )
    source: str | None = Field(
        default=None,
        description="Where the file comes from: a file on the controller (refused by `gpubox check` and "
        "`gpubox plan` when it is not there), an https URL, or a Hugging Face reference pinned to a commit "
        "(`hf://org/repo/file@<40-hex>`, downloaded with the box's `huggingface` settings). None: the file must "
        "already be on the host with this sha256.",
    )
    format: ModelFormat = Field(
        default="gguf",
        description="What the file must be, checked when it is placed: `gguf` (by its `general.architecture`), "
        "`ggml-whisper` (its magic and hyperparameters), `onnx` (a piper voice, by its protobuf head) or `json` "
        "(a voice's config).",
    )
    architecture: str | None = Field(
        default=None,
        description="A GGUF's `general.architecture` (`gemma4`, `llama`), required for a GGUF; a ggml whisper "
        "model's size (`tiny`, `base`, `small`, `medium`, `large`, `large-v3-turbo`, with `.en` for an "
        "English-only model), checked against the file's header where gpubox reads it; refused for ONNX and JSON.",
    )

    @model_validator(mode="after")
    def _architecture_for_format(self) -> Self:
        if self.format == "gguf" and self.architecture is None:
            raise ValueError("a GGUF model needs architecture: its general.architecture, e.g. 'gemma4' or 'llama'")
        if self.format in ("onnx", "json") and self.architecture is not None:
            raise ValueError(f"a {self.format} file has no architecture to check: remove architecture")
        if self.format == "ggml-whisper" and self.architecture is not None:
            WhisperSize.parse(self.architecture)
        return self

    @property
    def whisper_size(self) -> WhisperSize | None:
        """A ggml whisper model's declared size; None for another format or an undeclared size."""
        if self.format != "ggml-whisper" or self.architecture is None:
            return None
        return WhisperSize.parse(self.architecture)

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
        if value.startswith(HF_SCHEME):
            parse_reference(value)
            return value
        if "://" in value and not value.startswith("https://"):
            raise ValueError(
                f"source must be an https URL, an hf://org/repo/file@<commit> reference or a controller path, "
                f"got {value!r}"
            )
        return value

    @property
    def source_is_url(self) -> bool:
        """Downloaded on the host (an https URL or a hub reference), not uploaded from the controller."""
        return self.source is not None and (self.source.startswith("https://") or self.hf_reference is not None)

    @property
    def hf_reference(self) -> HfReference | None:
        return parse_reference(self.source) if self.source is not None and self.source.startswith(HF_SCHEME) else None

    def download_url(self, hub: HuggingFace | None = None) -> str:
        """Where the host downloads the file from: the URL, or the hub's resolve URL of the reference."""
        assert self.source is not None and self.source_is_url, f"{self.path}: no URL to download from"
        reference = self.hf_reference
        if reference is None:
            return self.source
        return reference.url(hub.endpoint if hub is not None else DEFAULT_ENDPOINT)


class HuggingFace(Spec):
    """Where ``hf://`` model sources come from, and the token for gated ones."""

    endpoint: str = Field(
        default=DEFAULT_ENDPOINT, description="The hub's base URL, https only (tests point it at a local server)."
    )
    token_file: str | None = Field(
        default=None,
        description="A file on the controller holding the token, readable by its owner only (0600: refused "
        "otherwise); None: `$HF_TOKEN_FILE`, else no token (public files). The token stays off every command line.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"endpoint must be an https URL such as {DEFAULT_ENDPOINT}, got {value!r}")
        return value.rstrip("/")


class SmokeThresholds(Spec):
    """What a freshly restarted llama-server must reach, or the deploy rolls back and fails."""

    min_tokens_per_second: float = Field(
        gt=0,
        description="The generation speed (tok/s, the median of the runs) the server must reach; the monitoring "
        "alerts when it decodes slower.",
    )
    min_acceptance: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="The share of drafted tokens accepted the server must reach (the monitoring alerts below it "
        "too); refused without a drafting `spec_type`. None: not checked.",
    )
    prompts: tuple[str, ...] = Field(
        default=("Write a short story about a lighthouse keeper who finds a map.",),
        min_length=1,
        description="The prompts each run sends (temperature 0, exactly `n_predict` tokens each).",
    )
    n_predict: int = Field(
        default=128,
        ge=1,
        le=8192,
        description="Tokens generated per prompt; runs that stop before a quarter of them fail the test.",
    )
    runs: int = Field(default=3, ge=1, le=100, description="How many times every prompt is sent.")
    timeout_s: float = Field(
        default=300, gt=0, description="Seconds to wait for the server to be healthy, and for each request."
    )


def host_address(value: str | None) -> str | None:
    """A host's IP address on the network it shares with its peers (``Box.address``, ``Gateway.address``),
    canonical; refused when it is no IP address."""
    if value is None:
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f"address is the host's IP address on the network it shares with its peers (e.g. '192.168.1.20'), "
            f"got {value!r}"
        ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExpectedGpu(Spec):
    """A GPU the box should have; the planner budgets against memory_total_mib, less reserve_mib."""

    index: int = Field(ge=0, description="The GPU's nvidia-smi index, as services' `gpus` name it.")
    name: str = Field(description="What the GPU is, for people (`NVIDIA GeForce RTX 4090`); not checked.")
    memory_total_mib: int = Field(
        gt=0,
        description="Its memory in MiB (nvidia-smi's `memory.total`): what `gpubox plan` and the monitoring "
        "budget the services pinned to it against.",
    )
    reserve_mib: int = Field(
        default=0,
        ge=0,
        description="Memory the plan must leave free on this GPU: what a service grows into at run time beyond "
        "what the planner counts at load (the seed measured gemma4 at ~12 GB at load and ~22 GB after a full "
        "256k session).",
    )


class HostMonitoring(Spec):
    """What a host runs to be watched: node-exporter (with gpubox's GPU textfile) and, when the
    monitor is another host, a Prometheus agent that scrapes it and remote-writes to the monitor."""

    node_exporter_port: int = Field(
        default=9100,
        ge=1,
        le=65535,
        description="The port node-exporter listens on (127.0.0.1); a service's port is refused here.",
    )
    agent_port: int = Field(
        default=9095,
        ge=1,
        le=65535,
        description="The Prometheus agent's own web port (127.0.0.1), unused on the monitor host; "
        "`node_exporter_port` or a service's port is refused here.",
    )
    gpu_metrics_interval_s: int = Field(
        default=15, ge=1, le=3600, description="How often (seconds) the timer writes the GPU and unit metrics file."
    )
    blackbox_port: int = Field(
        default=9115,
        ge=1,
        le=65535,
        description="The port the blackbox exporter listens on (127.0.0.1), on a host whose llama-servers use RPC "
        "servers on other hosts (it probes them from here); elsewhere unused. `node_exporter_port`, `agent_port` "
        "or, on a host that runs it, a service's port is refused here.",
    )

    @model_validator(mode="after")
    def _own_ports(self) -> Self:
        taken: dict[int, str] = {}
        problems: list[Violation] = []
        for field in ("node_exporter_port", "agent_port", "blackbox_port"):
            port = getattr(self, field)
            if port in taken:
                problems.append(((field,), f"port {port} is {taken[port]} already: give each its own", port))
            taken.setdefault(port, field)
        if problems:
            refuse(type(self).__name__, problems)
        return self
