"""llama.cpp's ``llama-server``: its spec, its flag table and its rules, in one place.

Field names are llama-server's long flags in snake_case, so whoever knows the flags knows the
fields. ``LLAMA_SERVER_FLAGS`` is the only list of them: argv, the ``extra_args`` refusal, the
``--help`` check of the installed binary and the bench's variants all read it. The rules follow
the README's rule table, one function each, named after the rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from gpubox import vram as planner
from gpubox.gguf_header import GgufFile
from gpubox.gpu import gpu_list
from gpubox.servers.base import Flag, Scrape, Service, model_path
from gpubox.servers.registry import register_server_type
from gpubox.servers.rpc import RpcRef, endpoint_address, resolve_refs
from gpubox.spec import ModelFile, SmokeThresholds, Violation, absolute_path, is_loopback

if TYPE_CHECKING:
    from gpubox.box import Box

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
    Flag("ubatch_size", "--ubatch-size", ("-ub",), default=planner.DEFAULT_N_UBATCH),
    Flag("n_gpu_layers", "--n-gpu-layers", ("-ngl", "--gpu-layers")),
    Flag("cache_type_k", "--cache-type-k", ("-ctk",), default="f16"),
    Flag("cache_type_v", "--cache-type-v", ("-ctv",), default="f16"),
    Flag("parallel", "--parallel", ("-np",)),
    Flag("flash_attn", "--flash-attn", ("-fa",)),
    Flag("cont_batching", "--cont-batching", ("-cb", "-nocb"), style="toggle", negative="--no-cont-batching"),
    Flag("jinja", "--jinja", style="toggle", negative="--no-jinja"),
    Flag("fit", "--fit", ("-fit",)),
    Flag("tensor_split", "--tensor-split", ("-ts",), render=lambda shares: ",".join(f"{share:g}" for share in shares)),
    Flag("rpc", "--rpc", render=lambda refs: ",".join(rpc_endpoints(refs)), omit=()),
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
    INSTALL: ClassVar[str | None] = "llama_cpp"
    INSTALL_EXAMPLE: ClassVar[str] = "llama_cpp=LlamaCppBuild(commit=...)"
    PINNED: ClassVar[str] = "llama.cpp commit"
    CPU_SETTING: ClassVar[str] = "n_gpu_layers=0"
    SMOKE_KIND: ClassVar[str] = "chat"
    CHAT: ClassVar[bool] = True
    RUNS_HELP: ClassVar[bool] = True
    MODEL_ROLES: ClassVar[dict[str, str]] = {"model_draft": "Drafter"}

    type: Literal["llama-server"] = Field(
        default="llama-server",
        description="The server type, which tells a box's services apart; a service written without one is a "
        "llama-server.",
    )
    user: str = Field(
        default="llama", description="The dedicated system account the unit runs as (not root); the deploy creates it."
    )
    port: int = Field(default=8080, ge=1, le=65535, description="The port it listens on; unique per box.")
    model: ModelFile = Field(description="The GGUF it serves.")
    model_draft: ModelFile | None = Field(
        default=None,
        description="The drafter GGUF, which a `draft-*` `spec_type` needs and any other refuses (`ngram-*` drafts "
        "from n-grams, `none` never drafts). `draft-mtp` on a `gemma4` target needs a `gemma4-assistant` drafter; "
        "at the model's path, it must have the model's sha256.",
    )
    spec_type: SpecType = Field(
        default="none",
        description="How it drafts tokens (speculative decoding): `none`, `draft-*` with `model_draft`, or "
        "`ngram-*` from the context's n-grams. Drafting with `parallel` above 1 is refused (the parallel trap) "
        "unless `allow_parallel_speculation`.",
    )
    spec_draft_n_max: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="The most tokens a draft proposes; refused without a drafting `spec_type`.",
    )
    spec_draft_ngl: GpuLayers | None = Field(
        default=None,
        description="How many of the drafter's layers go to the GPU: a number, `auto` or `all`; refused without "
        "`model_draft`.",
    )
    spec_draft_type_k: CacheType | None = Field(
        default=None,
        description="The drafter's own K cache type (`cache_type_k` is not applied to the drafter); refused "
        "without `model_draft`.",
    )
    spec_draft_type_v: CacheType | None = Field(
        default=None,
        description="The drafter's own V cache type (`cache_type_v` is not applied to the drafter): a quantized "
        "one is refused without `flash_attn='on'` (llama-server exits); refused without `model_draft`.",
    )
    ctx_size: int = Field(
        default=4096,
        ge=1,
        description="The context in tokens, split evenly over the `parallel` slots (refused when it does not "
        "divide). A slot's share above the model's trained context is refused by `gpubox plan` and the deploy: "
        "llama-server caps the slot but allocates the KV cache for all of it.",
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="The logical batch: the most prompt tokens one decode step takes."
    )
    ubatch_size: int | None = Field(
        default=None,
        ge=1,
        description="The physical batch: it sizes the compute buffers, a term of the VRAM plan.",
    )
    n_gpu_layers: GpuLayers = Field(
        default="auto",
        description="How many of the model's layers go to the GPU: a number, `auto` or `all`; `0` runs it on the "
        "CPU.",
    )
    cache_type_k: CacheType = Field(
        default="f16", description="The KV cache's type for K; a quantized type takes less VRAM."
    )
    cache_type_v: CacheType = Field(
        default="f16",
        description="The KV cache's type for V; a quantized one (not `f32`, `f16` or `bf16`) is refused without "
        "`flash_attn='on'` (llama-server exits).",
    )
    parallel: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Server slots, the requests it serves at once; always rendered, since llama-server's own "
        "(auto: 4) is the parallel trap. Above 1 with a drafting `spec_type` it is refused unless "
        "`allow_parallel_speculation`.",
    )
    flash_attn: OnOffAuto = Field(
        default="auto",
        description="Flash attention: `on`, `off` or `auto`; a quantized V cache (main or draft) is refused "
        "unless `on`.",
    )
    cont_batching: bool = Field(
        default=True, description="Continuous batching: a new request joins the running batch."
    )
    jinja: bool = Field(default=True, description="Chat templates through llama-server's jinja engine.")
    fit: OnOff | None = Field(
        default=None,
        description="Whether llama-server adjusts the arguments left unset to fit in device memory; None leaves "
        "it to llama-server.",
    )
    tensor_split: tuple[Annotated[float, Field(ge=0)], ...] | None = Field(
        default=None,
        description="The share of the model's layers on each device (`--tensor-split`): the `rpc` endpoints "
        "first, in their order, then the local `gpus` (llama-server puts RPC devices first). Required with `rpc` "
        "(else llama.cpp splits by each device's free memory at load); one share per device.",
    )
    rpc: tuple[RpcRef, ...] = Field(
        default=(),
        description="RPC servers on other hosts of the inventory whose devices hold layers (`--rpc`), each "
        "`RpcRef(host=..., service=...)`: it must exist, admit this host, serve no other llama-server and run "
        "this host's llama.cpp commit. Needs `tensor_split` and `fit`; llama-server aborts when one is down "
        "(its unit restarts it).",
    )
    metrics: bool = Field(
        default=True,
        description="The Prometheus `/metrics` endpoint: the monitoring scrapes it (without it nothing watches "
        "the server's speed), and the smoke test reads draft acceptance from it.",
    )
    api_key_file: str | None = Field(
        default=None,
        description="A file of API keys on the host (one a line), so no key is on a command line; "
        f'`"generate"`: gpubox creates one key at `{KEY_DIR}/<name>.key` on the first deploy. Required to '
        "listen beyond loopback; without it `gpubox check` warns (any web page open on the box can POST to "
        "it). An absolute path without a `..` part.",
    )
    generate_api_key: bool = Field(
        default=False,
        description="The deploy creates the key in `api_key_file` (readable by root and `user` only); "
        '`api_key_file="generate"` sets it. Refused without an `api_key_file`.',
    )
    allow_parallel_speculation: bool = Field(
        default=False,
        description="Allow drafting with `parallel` above 1, the parallel trap (np=4 with MTP ran at 64 tok/s "
        "vs 90 without): measure it with `gpubox bench` first.",
    )
    smoke: SmokeThresholds | None = Field(
        default=None,
        description="What the server must reach after a restart, or the deploy rolls back; the monitoring's "
        "alerts use it too. None: no smoke test.",
    )

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

    @property
    def key_file(self) -> str | None:
        return self.api_key_file

    @property
    def slots(self) -> int:
        return self.parallel

    def build_options(self) -> tuple[str, ...]:
        """``rpc``: llama.cpp built with GGML_RPC (``--rpc`` fails at parse without it)."""
        return ("rpc",) if self.rpc else ()

    def peer_refs(self) -> tuple[tuple[str, str], ...]:
        return tuple((ref.host, ref.service) for ref in self.rpc)

    def with_peers(self, host: str, boxes: Mapping[str, Box]) -> tuple[Self, list[Violation]]:
        """Its ``rpc`` references with their endpoints, from the RPC servers' hosts in ``boxes``."""
        if not self.rpc:
            return self, []
        own = boxes.get(host)
        commit = own.llama_cpp.commit if own is not None and own.llama_cpp is not None else None
        resolved, problems = resolve_refs(self.rpc, host, boxes, commit)
        if problems:
            return self, problems
        return self.model_copy(update={"rpc": resolved}), []

    def peer_addresses(self) -> list[str]:
        """Its RPC servers' addresses beyond loopback: its unit must let it reach them."""
        addresses = [endpoint_address(endpoint) for endpoint in rpc_endpoints(self.rpc)]
        return [address for address in addresses if not is_loopback(address)]

    @property
    def devices(self) -> int:
        """The devices its layers are split over: its RPC endpoints, then its GPUs."""
        return len(self.rpc) + len(self.placement)

    @property
    def gpu_work(self) -> bool:
        """Layers offloaded (``n_gpu_layers`` other than 0), or a drafter's."""
        drafter_layers = self.model_draft is not None and self.spec_draft_ngl not in (None, 0)
        return self.n_gpu_layers != 0 or drafter_layers

    def vram(self, inputs: planner.VramInputs, where: str) -> planner.ServiceVram:
        """Its GGUFs' terms from their headers, split evenly over its GPUs (``--split-mode layer``)."""
        headers = inputs.headers
        target = headers.get(self.model.path)
        refused = planner.trained_context_problems(self, target, where) if target is not None else []
        draft = headers.get(self.model_draft.path) if self.model_draft is not None else None
        if target is None or (self.model_draft is not None and draft is None):
            missing = [m.path for m in (self.model, self.model_draft) if m is not None and m.path not in headers]
            return planner.ServiceVram(
                problems=(f"{self.name}: no GGUF header for {', '.join(missing)}",), refused=tuple(refused)
            )
        plan = planner.plan_service(self, target, draft, calibration=inputs.calibration)
        if self.tensor_split is not None:  # its split, device by device: the rpc endpoints, then its GPUs
            per_device = planner.device_terms(self, target, calibration=inputs.calibration)
            remote = tuple(
                planner.RemoteShare(host=ref.host, service=ref.service, terms=per_device[position])
                for position, ref in enumerate(self.rpc)
            )
            by_gpu = {gpu: per_device[len(self.rpc) + position] for position, gpu in enumerate(self.placement)}
            return planner.ServiceVram(plan=plan, refused=tuple(refused), by_gpu=by_gpu, remote=remote)
        share = max(1, len(self.vram_gpus()))
        terms = {name: value // share for name, value in plan.terms().items()}
        terms["headroom"] = planner.CUDA_CONTEXT_MIB * planner.MIB if plan.headroom else 0
        return planner.ServiceVram(per_gpu=terms, plan=plan, refused=tuple(refused))

    def vram_changes(self, headers: dict[str, GgufFile], over_bytes: int) -> list[str]:
        target = headers.get(self.model.path)
        if target is None:
            return []
        draft = headers.get(self.model_draft.path) if self.model_draft is not None else None
        return planner.what_to_change(self, target, draft, over_bytes)

    def summary(self) -> str:
        return (
            f"spec {self.spec_type}, ctx {self.ctx_size}, parallel {self.parallel}, "
            f"KV {self.cache_type_k}/{self.cache_type_v}, FA {self.flash_attn}"
        )

    def scrape(self) -> Scrape | None:
        """Its ``/metrics`` (with ``metrics``), labelled with its GPUs, its model and how it drafts."""
        if not self.metrics:
            return None
        labels = {
            "gpu": gpu_list(self.placement),
            "model": PurePosixPath(self.model.path).name.removesuffix(".gguf"),
            "spec_type": self.spec_type,
        }
        return Scrape(labels=labels, key_file=self.api_key_file)

    def monitoring_problems(self) -> list[tuple[str, str]]:
        if not self.metrics:
            return [("metrics", f"{self.name} has /metrics off, so nothing watches its speed: set metrics=True")]
        return []

    def decode_thresholds(self) -> SmokeThresholds | None:
        return self.smoke

    @property
    def smoke_tested(self) -> bool:
        return self.smoke is not None

    @property
    def generated_key_file(self) -> str | None:
        return self.api_key_file if self.generate_api_key else None


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


def rpc_needs_an_explicit_split(server: LlamaServer) -> Iterator[Violation]:
    """With RPC devices the split and the fit are the spec's: llama.cpp would split by free memory at load and
    ``--fit`` could move layers, so the planner's figures would not be what runs."""
    if not server.rpc:
        if server.tensor_split is not None and len(server.tensor_split) != len(server.placement):
            yield (
                ("tensor_split",),
                f"tensor_split has {len(server.tensor_split)} shares for {len(server.placement)} GPUs "
                f"{list(server.placement)}: give one share per GPU",
                list(server.tensor_split),
            )
        return
    if server.tensor_split is None:
        yield (
            ("tensor_split",),
            f"rpc lends {len(server.rpc)} remote device(s): set tensor_split, one share per device, the rpc "
            f"endpoints first then the gpus {list(server.placement)} (e.g. {tuple([1.0] * server.devices)!r}); "
            f"without it llama.cpp splits by free memory at load and the plan is not what runs",
            None,
        )
    elif len(server.tensor_split) != server.devices:
        yield (
            ("tensor_split",),
            f"tensor_split has {len(server.tensor_split)} shares for {server.devices} devices ({len(server.rpc)} "
            f"rpc, then gpus {list(server.placement)}): give one share per device",
            list(server.tensor_split),
        )
    elif not any(server.tensor_split[: len(server.rpc)]):
        yield (
            ("tensor_split",),
            "every rpc device's share is 0, so no layer goes there: give them a share, or remove rpc",
            list(server.tensor_split),
        )
    if server.fit is None:
        yield (
            ("fit",),
            "with rpc, set fit='off' (or 'on' knowingly): --fit is on by default and moves layers off the split "
            "the plan prices",
            None,
        )
    if server.n_gpu_layers == 0:
        yield (
            ("n_gpu_layers",),
            "n_gpu_layers=0 keeps every layer on this host's CPU, so the rpc devices hold nothing: set "
            "n_gpu_layers='all' (or a number), or remove rpc",
            0,
        )
    if server.model_draft is not None:
        yield (
            ("model_draft",),
            "a drafter beside rpc devices is not planned by gpubox (where llama.cpp puts its layers is not "
            "priced): remove model_draft, or draft from n-grams (spec_type='ngram-mod')",
            server.model_draft.path,
        )
    hosts = [(ref.host, ref.service) for ref in server.rpc]
    for index, key in enumerate(hosts):
        if key in hosts[:index]:
            ref = server.rpc[index]
            yield (("rpc", index), f"{ref} is listed twice: list each RPC server once", str(ref))


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
    rpc_needs_an_explicit_split,
)

def rpc_endpoints(refs: tuple[RpcRef, ...]) -> list[str]:
    """What ``--rpc`` renders: each reference's endpoint, filled in from the inventory."""
    missing = [str(ref) for ref in refs if ref.endpoint is None]
    if missing:
        raise ValueError(
            f"rpc {', '.join(missing)}: the endpoint is filled in from the whole inventory (gpubox.peers), and "
            f"this spec was read without it"
        )
    return [str(ref.endpoint) for ref in refs]


register_server_type(LlamaServer)
