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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AfterValidator, Field, field_validator, model_validator

from gpubox.llamacpp import HELP_CACHE_SUFFIX
from gpubox.spec import ModelFile, Spec, Violation, is_loopback, refuse

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


def _network(value: str) -> str:
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


class Service(Spec):
    """What every service gpubox runs as a systemd unit has: a name, GPUs, a user, a listener.

    Subclasses set ``PROGRAM`` (the binary in the build), ``FLAGS`` (the flag table) and
    ``RULES`` (cross-field rules run at validation, then ``extra_args_rule``).
    """

    PROGRAM: ClassVar[str]
    """The program in its install's ``current`` directory (``llama-server``; piper's ``bin/python3``)."""
    PROGRAM_ARGS: ClassVar[tuple[str, ...]] = ()
    """Words between the program and the flags (piper: ``-m piper.http_server``)."""
    AUTHENTICATES: ClassVar[bool] = False
    """Whether the server checks an API key; a server that does not may listen on loopback only."""
    FLAGS: ClassVar[tuple[Flag, ...]] = ()
    RULES: ClassVar[tuple[Callable[[Any], Iterable[Violation]], ...]] = ()

    name: str
    gpus: tuple[Annotated[int, Field(ge=0)], ...] = ()
    user: str
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    # Who may connect to a listener beyond loopback: the unit's IPAddressAllow= (with localhost), all
    # else denied (IPAddressDeny=any). Required then, so that "everyone" is a decision ('any'), not a default.
    allow_from: tuple[Annotated[str, AfterValidator(_network)], ...] = ()
    extra_args: tuple[str, ...] = ()

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
        if "any" in value and len(value) > 1:
            raise ValueError(f"allow_from is 'any' alone or a list of networks, got {list(value)}")
        return value

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

    def binary(self, prefix: str) -> str:
        """The program the unit runs, in the install at ``prefix``."""
        return binary_path(prefix, self.PROGRAM)

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
    if not service.AUTHENTICATES and not is_loopback(service.host):
        yield (
            ("host",),
            f"{service.server_name} has no authentication, so anyone who reaches host={service.host!r} can use it: "
            f"keep it on host='127.0.0.1' (put an authenticating proxy in front to share it)",
            service.host,
        )


def allow_from_rule(service: Service) -> Iterable[Violation]:
    """A listener beyond loopback says who may connect; on loopback nobody else can, so it says nothing."""
    loopback = is_loopback(service.host)
    if not loopback and not service.allow_from and service.AUTHENTICATES:  # else `host` is refused already
        yield (
            ("allow_from",),
            f"host={service.host!r} listens beyond this machine: say who may connect, e.g. "
            f"allow_from=('192.168.1.0/24',), or allow_from=('any',) for every address (the unit denies the rest)",
            (),
        )
    if loopback and service.allow_from:
        yield (
            ("allow_from",),
            f"host={service.host!r} is loopback, which only this machine reaches: remove allow_from, or listen "
            f"beyond it (e.g. host='0.0.0.0' with api_key_file)",
            list(service.allow_from),
        )


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
