"""llama.cpp's ``llama-server``: its spec, its flag table and its rules, in one place.

Field names are llama-server's long flags in snake_case, so whoever knows the flags knows the
fields. ``LLAMA_SERVER_FLAGS`` is the only list of them: argv, the ``extra_args`` refusal, the
``--help`` check of the installed binary and the bench's variants all read it. The rules follow
the README's rule table, one function each, named after the rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from gpubox.servers.base import Flag, Service, model_path
from gpubox.spec import ModelFile, SmokeThresholds, Violation, absolute_path, is_loopback

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
PROGRAM = "llama-server"
KEY_DIR = "/etc/gpubox/keys"
GENERATE = "generate"


# `--parallel` has no omit value: its default is auto (4 slots), the parallel trap, so it is always rendered.
LLAMA_SERVER_FLAGS: tuple[Flag, ...] = (
    Flag("model", "--model", ("-m",), render=model_path),
    Flag("model_draft", "--model-draft", ("-md", "--spec-draft-model"), render=model_path),
    Flag("spec_type", "--spec-type", omit="none"),
    Flag("spec_draft_n_max", "--spec-draft-n-max", default=3),
    Flag("spec_draft_ngl", "--spec-draft-ngl", ("-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft")),
    Flag("spec_draft_type_k", "--spec-draft-type-k", ("-ctkd", "--cache-type-k-draft"), default="f16"),
    Flag("spec_draft_type_v", "--spec-draft-type-v", ("-ctvd", "--cache-type-v-draft"), default="f16"),
    Flag("ctx_size", "--ctx-size", ("-c",)),
    Flag("batch_size", "--batch-size", ("-b",), default=2048),
    Flag("ubatch_size", "--ubatch-size", ("-ub",), default=512),
    Flag("n_gpu_layers", "--n-gpu-layers", ("-ngl", "--gpu-layers")),
    Flag("cache_type_k", "--cache-type-k", ("-ctk",), default="f16"),
    Flag("cache_type_v", "--cache-type-v", ("-ctv",), default="f16"),
    Flag("parallel", "--parallel", ("-np",)),
    Flag("flash_attn", "--flash-attn", ("-fa",)),
    Flag("cont_batching", "--cont-batching", ("-cb", "-nocb"), style="toggle", negative="--no-cont-batching"),
    Flag("jinja", "--jinja", style="toggle", negative="--no-jinja"),
    Flag("fit", "--fit", ("-fit",)),
    Flag("host", "--host"),
    Flag("port", "--port"),
    Flag("metrics", "--metrics", style="switch"),
    Flag("api_key_file", "--api-key-file", ("--api-key",)),
)


class LlamaServer(Service):
    """One llama-server systemd service."""

    PROGRAM: ClassVar[str] = PROGRAM
    AUTHENTICATES: ClassVar[bool] = True
    FLAGS: ClassVar[tuple[Flag, ...]] = LLAMA_SERVER_FLAGS

    type: Literal["llama-server"] = "llama-server"
    user: str = "llama"
    port: int = Field(default=8080, ge=1, le=65535)
    model: ModelFile
    model_draft: ModelFile | None = None
    spec_type: SpecType = "none"
    spec_draft_n_max: int | None = Field(default=None, ge=1, le=64)
    spec_draft_ngl: GpuLayers | None = None
    # the drafter's own KV cache; llama-server's default is f16 whatever cache_type_k/v say
    spec_draft_type_k: CacheType | None = None
    spec_draft_type_v: CacheType | None = None
    ctx_size: int = Field(default=4096, ge=1)
    # llama-server's defaults (2048 / 512) when unset; n_ubatch sizes the compute buffers (a VRAM term)
    batch_size: int | None = Field(default=None, ge=1)
    ubatch_size: int | None = Field(default=None, ge=1)
    n_gpu_layers: GpuLayers = "auto"
    cache_type_k: CacheType = "f16"
    cache_type_v: CacheType = "f16"
    parallel: int = Field(default=1, ge=1, le=256)
    flash_attn: OnOffAuto = "auto"
    cont_batching: bool = True
    jinja: bool = True
    fit: OnOff | None = None
    metrics: bool = True
    api_key_file: str | None = Field(
        default=None,
        description='a file of API keys on the host (one a line); "generate": gpubox creates one key at '
        f"{KEY_DIR}/<name>.key on the first deploy (generate_api_key=True with a path of your own does the same)",
    )
    generate_api_key: bool = False
    allow_parallel_speculation: bool = False
    smoke: SmokeThresholds | None = None

    @model_validator(mode="before")
    @classmethod
    def _generated_key_file(cls, data: Any) -> Any:
        """`api_key_file="generate"`: a key gpubox creates, at the service's own path under KEY_DIR."""
        if isinstance(data, dict) and data.get("api_key_file") == GENERATE:
            return {**data, "api_key_file": f"{KEY_DIR}/{data.get('name')}.key", "generate_api_key": True}
        return data

    @field_validator("api_key_file")
    @classmethod
    def _api_key_file(cls, value: str | None) -> str | None:
        return None if value is None else absolute_path(value, "api_key_file")

    def warnings(self) -> list[tuple[str, str]]:
        """What the rules accept but a reviewer would question: (field, why)."""
        if self.api_key_file is None:
            return [*super().warnings(), (
                "api_key_file",
                f"{self.host}:{self.port} takes requests without a key: any web page open in a browser on "
                f"this machine can POST to it (llama-server allows every CORS origin). Set "
                f'api_key_file="generate" (the deploy creates a key readable by root and {self.user} only)',
            )]
        return super().warnings()

    @property
    def drafts(self) -> bool:
        """A drafting ``spec_type`` (with a drafter, or from n-grams): the one test of "is drafting"."""
        return self.spec_type != "none"

    # What turning drafting off resets: every field that only means something while drafting.
    DRAFTING_OFF: ClassVar[dict[str, object]] = {
        "spec_type": "none",
        "model_draft": None,
        "spec_draft_n_max": None,
        "spec_draft_ngl": None,
        "spec_draft_type_k": None,
        "spec_draft_type_v": None,
    }

    def read_only_files(self) -> list[str]:
        return super().read_only_files() + ([self.api_key_file] if self.api_key_file is not None else [])


# --- the rules, in the order of the README's rule table --------------------------------------------


def parallel_trap(server: LlamaServer) -> Iterator[Violation]:
    """Drafting with more than one slot, unless measured and allowed."""
    if server.drafts and server.parallel > 1 and not server.allow_parallel_speculation:
        yield (
            ("parallel",),
            f"spec_type {server.spec_type!r} with parallel={server.parallel} is the parallel trap: drafting at "
            f"more than one slot made the seed box slower than no drafter at all (np=4: 64 tok/s "
            f"with MTP vs 90 without). Set parallel=1, or spec_type='none', or measure it with "
            f"`gpubox bench` and set allow_parallel_speculation=True",
            server.parallel,
        )


def draft_type_needs_drafter(server: LlamaServer) -> Iterator[Violation]:
    """A `draft-*` spec type drafts with a separate model."""
    if server.spec_type.startswith("draft-") and server.model_draft is None:
        yield (
            ("model_draft",),
            f"spec_type {server.spec_type!r} drafts with a separate model: set model_draft to its GGUF",
            None,
        )


def ngram_type_has_no_drafter(server: LlamaServer) -> Iterator[Violation]:
    """An `ngram-*` spec type never uses a draft model."""
    if server.spec_type.startswith("ngram-") and server.model_draft is not None:
        yield (
            ("model_draft",),
            f"spec_type {server.spec_type!r} drafts from n-grams and never uses a draft model: remove "
            f"model_draft, or use a draft-* spec_type",
            server.model_draft.path,
        )


def drafter_needs_spec_type(server: LlamaServer) -> Iterator[Violation]:
    """A drafter with `spec_type="none"` is loaded and never drafts."""
    if server.model_draft is not None and not server.drafts:
        yield (
            ("spec_type",),
            "model_draft is set but spec_type is 'none': llama-server loads the drafter and "
            "never drafts with it; set spec_type (e.g. 'draft-simple', or 'draft-mtp' for a "
            "Gemma 4 assistant drafter) or remove model_draft",
            server.spec_type,
        )


def quantized_v_needs_flash_attn(server: LlamaServer) -> Iterator[Violation]:
    """A quantized V cache without flash attention: llama-server exits.

    The drafter's context is created by the same ``llama_init_from_model`` check, with its own
    V type (``spec_draft_type_v``) and the target's ``flash_attn``.
    """
    if server.cache_type_v not in UNQUANTIZED_CACHE_TYPES and server.flash_attn != "on":
        yield (
            ("flash_attn",),
            f"a quantized V cache (cache_type_v={server.cache_type_v!r}) needs flash attention, "
            f"and llama-server exits without it: set flash_attn='on' (or cache_type_v='f16')",
            server.flash_attn,
        )
    draft_v = server.spec_draft_type_v
    if (
        server.model_draft is not None
        and draft_v is not None
        and draft_v not in UNQUANTIZED_CACHE_TYPES
        and server.flash_attn != "on"
    ):
        yield (
            ("flash_attn",),
            f"a quantized draft V cache (spec_draft_type_v={draft_v!r}) needs flash attention, "
            f"and llama-server exits without it: set flash_attn='on' (or spec_draft_type_v='f16')",
            server.flash_attn,
        )


def ctx_splits_evenly(server: LlamaServer) -> Iterator[Violation]:
    """The context is split evenly over the slots."""
    if server.ctx_size % server.parallel:
        yield (
            ("ctx_size",),
            f"ctx_size={server.ctx_size} is split evenly over parallel={server.parallel} slots: use "
            f"a multiple of {server.parallel}, e.g. {server.ctx_size - server.ctx_size % server.parallel}",
            server.ctx_size,
        )


def generated_key_needs_a_file(server: LlamaServer) -> Iterator[Violation]:
    """generate_api_key creates the key file: it needs a path (or api_key_file="generate")."""
    if server.generate_api_key and server.api_key_file is None:
        yield (
            ("generate_api_key",),
            'generate_api_key creates the file api_key_file names: set api_key_file to a path, or to "generate" '
            f"for {KEY_DIR}/{server.name}.key",
            True,
        )


def listener_beyond_loopback_needs_key(server: LlamaServer) -> Iterator[Violation]:
    """A listener other machines reach needs an API key file (never a key on the command line)."""
    if not is_loopback(server.host) and server.api_key_file is None:
        yield (
            ("api_key_file",),
            f"host={server.host!r} listens beyond this machine: set api_key_file to a file of API "
            f"keys on the host (the key never goes on the command line), or host='127.0.0.1'",
            None,
        )


def mtp_on_gemma4_needs_assistant(server: LlamaServer) -> Iterator[Violation]:
    """draft-mtp on a Gemma 4 target drafts with Gemma 4's MTP assistant GGUF."""
    draft = server.model_draft
    if (
        server.spec_type == "draft-mtp"
        and server.model.architecture == "gemma4"
        and draft is not None
        and draft.architecture != "gemma4-assistant"
    ):
        yield (
            ("model_draft", "architecture"),
            f"draft-mtp on a gemma4 target drafts with Gemma 4's separate MTP assistant GGUF: "
            f"model_draft must be a 'gemma4-assistant' GGUF, not {draft.architecture!r}",
            draft.architecture,
        )


def draft_settings_need_drafting(server: LlamaServer) -> Iterator[Violation]:
    """Draft tuning and acceptance thresholds do nothing without drafting."""
    if server.spec_draft_n_max is not None and not server.drafts:
        yield (
            ("spec_draft_n_max",),
            "spec_draft_n_max does nothing without a spec_type: remove it or set spec_type",
            server.spec_draft_n_max,
        )
    if server.spec_draft_ngl is not None and server.model_draft is None:
        yield (
            ("spec_draft_ngl",),
            "spec_draft_ngl places draft-model layers, but there is no model_draft: remove it",
            server.spec_draft_ngl,
        )
    for name in ("spec_draft_type_k", "spec_draft_type_v"):
        value = getattr(server, name)
        if value is not None and server.model_draft is None:
            yield (
                (name,),
                f"{name} sets the draft model's KV cache type, but there is no model_draft: remove it",
                value,
            )
    if server.smoke is not None and server.smoke.min_acceptance is not None and not server.drafts:
        yield (
            ("smoke", "min_acceptance"),
            "min_acceptance is only measurable with a drafter: remove it or set spec_type",
            server.smoke.min_acceptance,
        )


def one_checksum_per_file(server: LlamaServer) -> Iterator[Violation]:
    """The model and the drafter naming one path must agree on its sha256."""
    draft = server.model_draft
    if draft is not None and draft.path == server.model.path and draft.sha256 != server.model.sha256:
        yield (
            ("model_draft", "sha256"),
            "model and model_draft name the same path with different sha256: one file can't have two checksums",
            draft.sha256,
        )


LlamaServer.RULES = (
    parallel_trap,
    draft_type_needs_drafter,
    ngram_type_has_no_drafter,
    drafter_needs_spec_type,
    quantized_v_needs_flash_attn,
    ctx_splits_evenly,
    listener_beyond_loopback_needs_key,
    generated_key_needs_a_file,
    mtp_on_gemma4_needs_assistant,
    draft_settings_need_drafting,
    one_checksum_per_file,
)
