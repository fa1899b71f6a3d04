"""What every server type shares: the service spec base and the flag table behind its command line.

A server type declares one table, ``FLAGS``: which typed field becomes which flag, how its value
is rendered, and the other spellings the binary accepts for it. Everything that needs to know a
flag reads that table, nothing else names one:

- :meth:`Service.argv` renders the command line, in table order, then ``extra_args``;
- :func:`extra_args_rule` refuses a typed flag smuggled through ``extra_args``;
- :meth:`Service.command_flags` lists the flags the ``--help`` check of the installed binary
  looks up;
- the bench builds a variant with ``model_copy(update=...)`` and renders it with ``argv``.

A server type also lists its cross-field ``RULES``: small functions, each named after the rule
it enforces, that return the field to change and how.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from gpubox.binaries import HELP_CACHE_SUFFIX
from gpubox.spec import ModelFile, SmokeThresholds, Spec, Violation, is_loopback, refuse

if TYPE_CHECKING:
    from gpubox.box import Box
    from gpubox.gguf_header import GgufFile
    from gpubox.vram import ServiceVram, VramInputs

UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
FlagStyle = Literal["value", "switch", "toggle"]


@dataclass(frozen=True)
class Flag:
    """One typed field rendered as one flag of the command line.

    + field: the spec field that holds the value
    + flag: the long flag rendered (``--ctx-size``)
    + aliases: other spellings the binary accepts (``-c``): refused in ``extra_args`` too
    + style: ``value`` renders ``flag value``; ``switch`` renders ``flag`` when true, nothing when
      false; ``toggle`` renders ``flag`` when true and ``negative`` when false
    + negative: the flag a ``toggle`` renders when false (``--no-jinja``)
    + omit: a value that renders nothing (``spec_type="none"``); ``None`` never renders
    + render: how the value becomes the flag's argument (``str``; a model file renders its path)
    + default: what the binary runs with when the flag is not rendered, as its pinned ``--help`` says
      (checked against it in tests/test_flag_table.py); None where the default is not a fixed value
    """

    field: str
    flag: str
    aliases: tuple[str, ...] = ()
    style: FlagStyle = "value"
    negative: str | None = None
    omit: object = None
    render: Callable[[Any], str] = str
    default: object = None

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every spelling of this flag: the long one, the negative one, the aliases."""
        negative = (self.negative,) if self.negative else ()
        return (self.flag, *negative, *self.aliases)

    def words(self, value: object) -> list[str]:
        """The words this flag adds to the command line for ``value`` (none when it is unset)."""
        if value is None or (self.omit is not None and value == self.omit):
            return []
        if self.style == "switch":
            return [self.flag] if value else []
        if self.style == "toggle":
            assert self.negative is not None, f"toggle flag {self.flag} needs a negative spelling"
            return [self.flag if value else self.negative]
        return [self.flag, self.render(value)]


def model_path(model: ModelFile) -> str:
    """How a model file renders as a flag's value: its path on the host."""
    return model.path


def binary_path(prefix: str, program: str = "llama-server") -> str:
    """The program in the active install: `{prefix}/current` is switched atomically per build."""
    return f"{prefix}/current/{program}"


def flag_of(word: str) -> str | None:
    """The flag an ``extra_args`` word sets (``--port=9`` -> ``--port``); None for a value."""
    if not word.startswith("-") or word == "-":
        return None
    try:
        float(word)
    except ValueError:
        return word.split("=", 1)[0]
    return None  # a negative number, e.g. `--seed -1`


def network_entry(value: str) -> str:
    """One ``allow_from`` entry: ``any``, or an IP network (a bare address is its /32 or /128), canonical."""
    if value == "any":
        return value
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as error:
        hint = ""
        with contextlib.suppress(ValueError):
            hint = f" (did you mean {ipaddress.ip_network(value, strict=False)}?)"
        raise ValueError(
            f"{value!r} is not an IP network such as '192.168.1.0/24', 'fd00::/8' or '10.0.0.5', nor 'any': "
            f"{error}{hint}"
        ) from None


@dataclass(frozen=True)
class Scrape:
    """What monitoring scrapes of a service: a Prometheus endpoint on its port, and its series' labels.

    + path: the endpoint (``/metrics``)
    + labels: the labels beside ``host``, ``kind`` (the type) and ``service`` that every series gets
    + key_file: the service's API key file on the host, sent as a bearer token (a root-owned copy)
    """

    path: str = "/metrics"
    labels: dict[str, str] = field(default_factory=dict)
    key_file: str | None = None


class Service(Spec):
    """What every service gpubox runs as a systemd unit has: a name, GPUs, a user, a listener.

    Subclasses set ``type`` (a ``Literal`` tag, its default the tag: the registry tells services apart
    by it), ``PROGRAM`` (the binary in the build), ``FLAGS`` (the flag table) and ``RULES``
    (cross-field rules run at validation, then ``extra_args_rule``), and override the behaviour below
    where theirs differs: the rest of gpubox calls these, and never asks which type a service is.

    - ``INSTALL``/``INSTALL_EXAMPLE``: which install of the ``Box`` it runs from, or none;
    - ``binary``: its program; ``host_programs``: what else it runs on the host;
    - ``gpu_work``/``CPU_SETTING``: whether it asks for a GPU, and the setting that runs it on the CPU;
      ``placement``: the GPUs it runs on (the unit, the planner, the smoke test, monitoring);
      ``vram_gpus``: which of them hold its memory;
    - ``vram``/``vram_changes``: its VRAM terms, and what would shrink them;
    - ``summary``: its one line in ``gpubox check``;
    - ``READY_PATH``/``ready``: when it has loaded; ``SMOKE_KIND``: which smoke test checks it;
      ``smoke_tested``: whether one does; ``smoke_audio``: what a ``transcribe`` one sends;
    - ``RUNS_HELP``: how the deploy's flag check reads its ``--help``; ``generated_key_file``: the API key the
      deploy makes; ``model_role``: what each model is to it (``Drafter``);
    - ``scrape``: what monitoring scrapes (a ``/metrics`` target), None for its unit state only;
      ``decode_thresholds``: the decode speed its alerts watch; ``CHAT``: whether ``gpubox smoke`` and
      ``gpubox bench`` (the OpenAI chat API) reach it.
    """

    INSTALL: ClassVar[str | None] = None
    """The ``Box`` field of the install it runs from (``llama_cpp``); None: none (``PROGRAM`` is absolute)."""
    INSTALL_EXAMPLE: ClassVar[str] = ""
    """What to add to the ``Box`` when the install is missing (``llama_cpp=LlamaCppBuild(commit=...)``)."""
    CPU_SETTING: ClassVar[str] = ""
    """The setting that runs it on the CPU (``n_gpu_layers=0``); empty: it never asks for a GPU."""
    READY_PATH: ClassVar[str] = "/health"
    """What answers 200 once the server has loaded (the smoke tests wait for it)."""
    SMOKE_KIND: ClassVar[str] = "ready"
    """Which smoke test checks it after a restart: ``ready`` (``READY_PATH`` answers) unless its type has its own."""
    CHAT: ClassVar[bool] = False
    """Whether it speaks the OpenAI chat API that ``gpubox smoke`` and ``gpubox bench`` use."""
    PINNED: ClassVar[str] = "version"
    """What the box pins that decides the flags its program takes (an unsupported flag's fix names it)."""
    RUNS_HELP: ClassVar[bool] = False
    """Whether the flag check may run the program's ``--help`` and ``--version`` (llama-server); else it reads
    the ``--help`` its install saved (``help_file``: whisper-server exits 0 on any flag, only its help tells)."""
    MODEL_ROLES: ClassVar[dict[str, str]] = {}
    """What its model fields are called in the deploy's steps (``model_draft``: ``Drafter``); else ``Model``."""

    PROGRAM: ClassVar[str]
    """The program in its install's ``current`` directory (``llama-server``; piper's ``bin/python3``)."""
    PROGRAM_ARGS: ClassVar[tuple[str, ...]] = ()
    """Words between the program and the flags (piper: ``-m piper.http_server``)."""
    AUTHENTICATES: ClassVar[bool] = False
    """Whether the server checks an API key; a server that does not may listen on loopback only."""
    ADMITS_BY_ADDRESS: ClassVar[bool] = False
    """The one exception to "no authentication stays on loopback": a server (ggml-rpc-server) that may listen
    beyond it with ``allow_from`` naming exactly its clients' networks (``'any'`` refused by its type)."""
    SERVES_PEERS: ClassVar[bool] = False
    """Whether services on other hosts use it (an RPC server): the deploy converges and checks it before any
    service that does, and a restart of it restarts them."""
    PEER_CLIENTS_MAX: ClassVar[int | None] = None
    """How many services of the inventory may use it at once (an RPC server serves one client); None: any."""
    BUILD_OPTIONS: ClassVar[tuple[str, ...]] = ()
    """Options its install must be built with (``rpc``: llama.cpp's GGML_RPC), turned on by the box."""
    FLAGS: ClassVar[tuple[Flag, ...]] = ()
    RULES: ClassVar[tuple[Callable[[Any], Iterable[Violation]], ...]] = ()

    name: str = Field(
        description="The unit is `<name>.service`, and messages, plans and metrics name the service so: letters, "
        "digits, `-`, `_` or `.`, at most 64, starting with a letter or digit, without `.service`; unique per box."
    )
    gpus: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        default=(),
        description="The GPUs it runs on, by nvidia-smi index: the unit opens only their device nodes and pins "
        "them by UUID (inside, they are numbered from 0). Empty: the CPU, and GPU work left unpinned is refused "
        "on a box with `expected_gpus`; the deploy refuses a GPU the host lacks.",
    )
    user: str = Field(description="The dedicated system account the unit runs as (not root); the deploy creates it.")
    host: str = Field(
        default="127.0.0.1",
        description="The one address it listens on. Beyond loopback, `allow_from` is required, a server with API "
        "keys needs `api_key_file`, and one without authentication is refused.",
    )
    port: int = Field(ge=1, le=65535, description="The port it listens on; unique per box.")
    allow_from: tuple[Annotated[str, AfterValidator(network_entry)], ...] = Field(
        default=(),
        description="Who may connect to a listener beyond loopback: IP networks (a bare address is its /32 or "
        "/128), or `('any',)` alone; the unit allows them and localhost (`IPAddressAllow=`) and denies the rest. "
        "Required beyond loopback, so that everyone is a decision, not a default; refused on loopback, and so is "
        "an entry that is no network (`192.168.1.5/24` asks for `192.168.1.0/24`).",
    )
    extra_args: tuple[str, ...] = Field(
        default=(),
        description="More words for the command line, after the typed flags, for flags no field renders; a "
        "typed flag here is refused (set its field, so the rules see it). The deploy checks every flag against "
        "the installed binary's `--help`.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not UNIT_NAME.match(value) or value.endswith(".service"):
            raise ValueError(
                f"name becomes the systemd unit `<name>.service`: use letters, digits, '-', '_' or '.', at most 64, "
                f"starting with a letter or digit, without '.service'; got {value!r}"
            )
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not USER_NAME.match(value) or value == "root":
            raise ValueError(f"user must be a dedicated system account name (lowercase, not root), got {value!r}")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or any(char.isspace() for char in value) or "," in value:
            raise ValueError(f"host must be one address to listen on, got {value!r}")
        return value

    @field_validator("allow_from")
    @classmethod
    def _allow_from(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return any_alone(value)

    @model_validator(mode="after")
    def _rules(self) -> Self:
        refuse(type(self).__name__, self.rule_problems())
        return self

    def rule_problems(self) -> list[Violation]:
        """Every rule this spec breaks, each naming the field to change and how."""
        rules = (unauthenticated_stays_on_loopback, *self.RULES, extra_args_rule, allow_from_rule)
        return [problem for rule in rules for problem in rule(self)]

    @property
    def unit_name(self) -> str:
        return f"{self.name}.service"

    @classmethod
    def type_tag(cls) -> str:
        """Its ``type``: the tag a Box's services are told apart by (the ``type`` field's default)."""
        return str(cls.model_fields["type"].default)

    @property
    def gpu_work(self) -> bool:
        """Whether the spec asks for a GPU (a box that declares GPUs refuses it unpinned)."""
        return False

    @property
    def placement(self) -> tuple[int, ...]:
        """The GPUs (nvidia-smi indices) it runs on; none: the CPU. The one answer the unit's
        ``CUDA_VISIBLE_DEVICES``/``DeviceAllow``, the planner, the smoke test's residency check, `check` and
        monitoring read: its pinned ``gpus``. Unpinned GPU work is refused on a box that declares GPUs,
        and runs on the CPU on one that does not (the unit hides every GPU)."""
        return self.gpus

    def vram_gpus(self) -> tuple[int, ...]:
        """The GPUs its memory lands on: all of ``placement`` (a server that splits over them)."""
        return self.placement

    def vram(self, inputs: VramInputs, where: str) -> ServiceVram | None:
        """What it puts on each of ``vram_gpus``, from the planner's inputs; None: nothing on a GPU.

        ``where``: its place in the box (``services.0``), where a refused field is named."""
        return None

    def vram_changes(self, headers: dict[str, GgufFile], over_bytes: int) -> list[str]:
        """Changes to its own fields that would save ``over_bytes`` of VRAM (none it knows of)."""
        return []

    def build_options(self) -> tuple[str, ...]:
        """Options of its install's build this service needs (``BUILD_OPTIONS``; a llama-server with ``rpc``)."""
        return self.BUILD_OPTIONS

    @property
    def cache_directory(self) -> str | None:
        """Its unit's ``CacheDirectory=`` (under /var/cache, owned by its user); None: none."""
        return None

    def environment(self) -> dict[str, str]:
        """What its unit's environment holds besides the GPUs it sees."""
        return {}

    def peer_refs(self) -> tuple[tuple[str, str], ...]:
        """The services on other hosts it uses, as (host, service) (a llama-server's ``rpc``)."""
        return ()

    def with_peers(self, host: str, boxes: Mapping[str, Box]) -> tuple[Self, list[Violation]]:
        """This service with what it uses on other hosts resolved from the inventory's ``boxes`` (``host`` is its
        own host's name), and what refuses those references, each at its field."""
        return self, []

    def endpoint_address(self, own_address: str | None) -> str | None:
        """The address a client on another host dials: the one it listens on, or (listening on every interface)
        its host's ``own_address``; None when that is needed and unknown."""
        return own_address if self.host in ("0.0.0.0", "::") else self.host

    def admits(self, client_address: str | None) -> bool:
        """Whether ``allow_from`` lets a client at ``client_address`` in (``'any'`` lets everyone in)."""
        if "any" in self.allow_from:
            return True
        if client_address is None:
            return False
        address = ipaddress.ip_address(client_address)
        return any(address in ipaddress.ip_network(network) for network in self.allow_from)

    @property
    def key_file(self) -> str | None:
        """The API key file its clients present (a llama-server's ``api_key_file``); None: no key."""
        return None

    @property
    def slots(self) -> int:
        """How many requests it serves at once (a llama-server's ``parallel``)."""
        return 1

    def peer_addresses(self) -> list[str]:
        """Addresses beyond loopback its unit must reach (``IPAddressDeny=any`` holds outgoing traffic too)."""
        return []

    def summary(self) -> str:
        """The settings that tell services of one type apart, in a few words (`gpubox check`)."""
        return "CPU" if not self.placement else "GPU"

    def ready(self, status: int, body: str) -> bool:
        """Whether an answer of ``READY_PATH`` says the server has loaded."""
        return status == 200

    def scrape(self) -> Scrape | None:
        """What monitoring scrapes of it; None: its unit's state only (the GPU metrics timer's)."""
        return None

    def monitoring_problems(self) -> list[tuple[str, str]]:
        """What refuses a fleet's monitoring of it: (its field, what to change)."""
        return []

    @property
    def smoke_tested(self) -> bool:
        """Whether the deploy smoke-tests it after a restart (and marks it unverified until then): the
        ``ready`` kind always (``READY_PATH`` answers); a type with thresholds when they are set."""
        return True

    def smoke_audio(self, prefix: str | None) -> str | None:
        """The WAV on the host a ``transcribe`` smoke test sends, given its install's prefix (none else)."""
        return None

    @property
    def generated_key_file(self) -> str | None:
        """Where the deploy makes its API key (``api_key_file="generate"``); None: it makes none."""
        return None

    def model_role(self, model: ModelFile) -> str:
        """What ``model`` (one of its models) is to it, as the deploy's steps name it: ``MODEL_ROLES``' word for
        the field that holds it, else ``Model``."""
        fields = [field for field, mine in self.model_files() if mine.path == model.path]
        return self.MODEL_ROLES.get(fields[0], "Model") if fields else "Model"

    def decode_thresholds(self) -> SmokeThresholds | None:
        """The decode speed (and draft acceptance) its smoke test demands, which alerts and panels watch."""
        return None

    def argv(self, binary: str) -> list[str]:
        """The command line: the binary, every typed flag in table order, then ``extra_args``."""
        words = [binary, *self.PROGRAM_ARGS]
        for flag in self.FLAGS:
            words += flag.words(getattr(self, flag.field))
        return [*words, *self.extra_args]

    def command_flags(self) -> list[str]:
        """Every flag the command line uses: the table's rendered flags, then ``extra_args``'."""
        rendered = [flag.words(getattr(self, flag.field))[:1] for flag in self.FLAGS]
        extra = [flag_of(word) for word in self.extra_args]
        return [word for words in rendered for word in words] + [flag for flag in extra if flag is not None]

    def model_files(self) -> list[tuple[str, ModelFile]]:
        """Every model file the service loads, with its field name, in field order."""
        found = [(name, getattr(self, name)) for name in type(self).model_fields]
        return [(name, value) for name, value in found if isinstance(value, ModelFile)]

    def models(self) -> list[ModelFile]:
        """The model files this service loads (a llama-server's model, then its drafter)."""
        return [model for _, model in self.model_files()]

    def read_only_files(self) -> list[str]:
        """Files the service reads and must not write (its models, its key file)."""
        return [model.path for model in self.models()]

    def binary(self, prefix: str | None) -> str:
        """The program the unit runs, in the install at ``prefix``; without an install, ``PROGRAM`` itself."""
        return self.PROGRAM if prefix is None else binary_path(prefix, self.PROGRAM)

    def help_file(self, prefix: str) -> str:
        """Where the install saved the server's ``--help`` (the flag check reads it, runs nothing)."""
        return f"{self.binary(prefix)}{HELP_CACHE_SUFFIX}"

    def host_programs(self) -> list[str]:
        """Programs the server runs on the host besides its own (whisper's ``--convert``: ffmpeg)."""
        return []

    @classmethod
    def flag_default(cls, field: str) -> Any:
        """The binary's own default for ``field`` (its flag table's ``default``)."""
        (flag,) = [flag for flag in cls.FLAGS if flag.field == field]
        if flag.default is None:
            raise KeyError(f"{cls.__name__}.FLAGS records no default for {field}")
        return flag.default

    def setting(self, field: str) -> Any:
        """What the server runs with for ``field``: the spec's value, else the binary's default."""
        value = getattr(self, field)
        return self.flag_default(field) if value is None else value

    @property
    def drafts(self) -> bool:
        """Whether the server drafts tokens (speculative decoding); only a llama-server can."""
        return False

    @property
    def server_name(self) -> str:
        """The server as people name it in messages and the unit's description: its program's name."""
        return self.PROGRAM.rsplit("/", 1)[-1]

    def description_details(self) -> list[str]:
        """What the unit's ``Description=`` says of this service beside its server, name and GPUs."""
        return []

    def warnings(self) -> list[tuple[str, str]]:
        """What the rules accept but a reviewer would question: (field, why); `gpubox check` shows them.

        Every server type: a model whose sha256 is one digit repeated (a placeholder the deploy would
        refuse on the host, where the file's real checksum is printed).
        """
        warnings = [
            (
                f"{field}.sha256",
                f"{model.sha256[:8]}... is a placeholder: fill in the real sha256 (`sha256sum {model.path}`); "
                f"the deploy refuses the file until it matches",
            )
            for field, model in self.model_files()
            if _is_placeholder(model.sha256)
        ]
        return warnings + [
            (
                f"{field}.source",
                f"revision {reference.revision[:8]}... is a placeholder: fill in the commit of {reference.file} "
                f"on {reference.page} (its history)",
            )
            for field, model in self.model_files()
            if (reference := model.hf_reference) is not None and _is_placeholder(reference.revision)
        ]


def _is_placeholder(hex_digits: str) -> bool:
    """A checksum or commit that is one digit repeated: written to be filled in."""
    return len(set(hex_digits)) == 1 and hex_digits[0].isdigit()


def typed_flags(service_type: type[Service]) -> dict[str, str]:
    """Every spelling of every typed flag -> the field that sets it."""
    return {spelling: flag.field for flag in service_type.FLAGS for spelling in flag.spellings}


def unauthenticated_stays_on_loopback(service: Service) -> Iterable[Violation]:
    """A server without authentication (no API key) must not listen beyond this machine."""
    if not service.AUTHENTICATES and not service.ADMITS_BY_ADDRESS and not is_loopback(service.host):
        yield (
            ("host",),
            f"{service.server_name} has no authentication, so anyone who reaches host={service.host!r} can use it: "
            f"keep it on host='127.0.0.1' (put an authenticating proxy in front to share it)",
            service.host,
        )


def allow_from_rule(service: Service) -> Iterable[Violation]:
    """A listener beyond loopback says who may connect; on loopback nobody else can, so it says nothing."""
    # without authentication, beyond loopback `host` is refused already (or its type names its clients)
    return listener_allow_from(service.host, service.allow_from, required=service.AUTHENTICATES)


def any_alone(allow_from: tuple[str, ...]) -> tuple[str, ...]:
    """``allow_from`` is ``'any'`` alone or a list of networks (a field validator's check)."""
    if "any" in allow_from and len(allow_from) > 1:
        raise ValueError(f"allow_from is 'any' alone or a list of networks, got {list(allow_from)}")
    return allow_from


def listener_allow_from(host: str, allow_from: tuple[str, ...], *, required: bool) -> list[Violation]:
    """The ``allow_from`` rules of any listener (a service, the gateway): beyond loopback it says who may connect
    (when ``required``); on loopback, which only this machine reaches, it says nothing."""
    loopback = is_loopback(host)
    problems: list[Violation] = []
    if not loopback and not allow_from and required:
        problems.append((
            ("allow_from",),
            f"host={host!r} listens beyond this machine: say who may connect, e.g. "
            f"allow_from=('192.168.1.0/24',), or allow_from=('any',) for every address (the unit denies the rest)",
            (),
        ))  # fmt: skip
    if loopback and allow_from:
        problems.append((
            ("allow_from",),
            f"host={host!r} is loopback, which only this machine reaches: remove allow_from, or listen "
            f"beyond it (e.g. host='0.0.0.0' with api_key_file)",
            list(allow_from),
        ))  # fmt: skip
    return problems


def extra_args_rule(service: Service) -> Iterable[Violation]:
    """A typed flag may not appear in ``extra_args``: the rules would not see its value."""
    owners = typed_flags(type(service))
    for position, word in enumerate(service.extra_args):
        flag = flag_of(word)
        if flag is not None and flag in owners:
            yield (
                ("extra_args", position),
                f"{flag} is a typed field: set {owners[flag]} instead of passing it in extra_args "
                f"(so the rules see it)",
                word,
            )
