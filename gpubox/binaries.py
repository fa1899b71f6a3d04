"""A server binary on a host: the git checkout it is built from, and what it says of itself.

``--help`` and ``--version`` of llama-server, whisper-server's and piper's help (``parse_usage_options``),
a git checkout (llama.cpp's, whisper.cpp's): the records behind ``facts.llamacpp``. The checks here refuse
a server command line that the installed binary would reject, before a deploy writes a unit that
crash-loops on start.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from gpubox.quoting import shell_word
from gpubox.records import Record

# --- llama-server --version ----------------------------------------------------------------------

# `version: 0.5.0-dev (build 1, commit a9a16a5)`, or before the semver scheme `version: 4200 (abc1234)`.
_VERSION_RE = re.compile(
    r"^version: (?P<version>\S+) \((?:build (?P<build>\d+), commit (?P<commit>[^)\s]+)|(?P<old_commit>[^)\s]+))\)"
)
_BUILT_WITH_RE = re.compile(r"^built with (?P<built_with>.+)$")


class ServerVersion(Record):
    version: str
    """``0.5.0-dev``, or the build number (``4200``) for builds made before llama.cpp had versions."""
    build: int | None
    commit: str | None
    """The short commit; None when the build was made without git (``commit unknown``)."""
    built_with: str | None
    """The ``built with ...`` line, e.g. ``GNU 13.3.0 for Linux x86_64``."""

    def __str__(self) -> str:
        parts = [self.version]
        if self.build is not None and str(self.build) != self.version:
            parts.append(f"build {self.build}")
        parts.append(f"commit {self.commit or 'unknown'}")
        return " ".join(parts)


VERSION_CACHE_SUFFIX = ".version"
HELP_CACHE_SUFFIX = ".help"


def server_version_command(binary: str) -> str:
    """``--version`` (it prints to stderr), or what the build saved of it beside the binary (its directory
    is named after the commit, so the saved text is the binary's); nothing at all when the binary is missing."""
    quoted, cached = shell_word(binary), shell_word(binary + VERSION_CACHE_SUFFIX)
    return f"! test -e {quoted} || cat {cached} 2>/dev/null || {quoted} --version 2>&1 || true"


def parse_server_version(lines: Sequence[str]) -> ServerVersion:
    """Parse ``llama-server --version`` (with stderr), skipping backend lines printed before it.

    Raises ValueError, with the output, when no version line is in it (e.g. a shared library is
    missing and the binary did not start).
    """
    version_match = None
    built_with = None
    for line in lines:
        line = line.strip()
        version_match = version_match or _VERSION_RE.match(line)
        built_with_match = _BUILT_WITH_RE.match(line)
        if built_with_match is not None:
            built_with = built_with_match.group("built_with")
    if version_match is None:
        output = "\n".join(lines).strip() or "(no output)"
        raise ValueError(f"llama-server --version printed no version line: {output}")
    build = version_match.group("build")
    commit = version_match.group("commit") or version_match.group("old_commit")
    version = version_match.group("version")
    if build is None and version.isdigit():
        build = version
    return ServerVersion(
        version=version,
        build=None if build is None else int(build),
        commit=None if commit == "unknown" else commit,
        built_with=built_with,
    )


# --- llama-server --help -------------------------------------------------------------------------

# A flag at the start of an option line, then `, ` before an alias or spaces before its argument.
_FLAG_RE = re.compile(r"(-{1,2}[A-Za-z0-9][\w.+-]*)(,\s*|\s+|$)")
# Columns of an option line: names and argument, then (after 2+ spaces not following a comma) the
# description. `-hf,   -hfr, --hf-repo ...` pads after commas, hence the look-behind.
_DESCRIPTION_GAP_RE = re.compile(r"(?<![,\s])\s{2,}")
_ALLOWED_VALUES_RE = re.compile(r"allowed values: (.+)$")
_BRACE_CHOICES_RE = re.compile(r"^\{([\w,.-]+)\}$")
REMOVED_MARKER = "the argument has been removed"
SPEC_TYPE_FLAG = "--spec-type"


class ServerFlags(Record):
    flags: tuple[str, ...]
    """Every option name, all aliases: ``-fit`` and ``--fit``, ``-cb`` ... ``--no-cont-batching``."""
    removed: dict[str, str]
    """Names the binary still lists but rejects, with its hint (``use --spec-draft-n-max ...``)."""
    spec_types: tuple[str, ...]
    """The values ``--spec-type`` allows; empty when the binary has no ``--spec-type``."""
    choices: dict[str, tuple[str, ...]]
    """Allowed values of options that list them (``--cache-type-k``, ``--rope-scaling``, ...)."""

    def supports(self, flag: str) -> bool:
        return flag in self.flags and flag not in self.removed


def server_help_command(binary: str) -> str:
    """``--help``, or what the build saved of it beside the binary: a no-op deploy runs no binary (on a
    GPU host each start loads the CUDA libraries)."""
    quoted, cached = shell_word(binary), shell_word(binary + HELP_CACHE_SUFFIX)
    return f"! test -e {quoted} || cat {cached} 2>/dev/null || {quoted} --help 2>&1 || true"


def _option_names_and_argument(spec: str) -> tuple[list[str], str]:
    names: list[str] = []
    position = 0
    while position < len(spec):
        match = _FLAG_RE.match(spec, position)
        if match is None:
            break
        names.append(match.group(1))
        position = match.end()
        if not match.group(2).startswith(","):
            break
    return names, spec[position:].strip()


def _argument_choices(argument: str) -> tuple[str, ...]:
    braces = _BRACE_CHOICES_RE.match(argument)
    return tuple(braces.group(1).split(",")) if braces else ()


def parse_server_help(lines: Iterable[str]) -> ServerFlags:
    """Parse ``llama-server --help``: option lines start in column 0 with ``-``, descriptions and
    their continuation lines sit in column 40 (long option lines put the description below).
    A fleet's hosts print the same help: it is parsed once per process (~3 ms a host saved).
    """
    return _parse_server_help(tuple(lines))


@functools.lru_cache(maxsize=16)
def _parse_server_help(lines: tuple[str, ...]) -> ServerFlags:
    flags: set[str] = set()
    removed: dict[str, str] = {}
    spec_types: tuple[str, ...] = ()
    choices: dict[str, tuple[str, ...]] = {}
    current: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line.startswith("-----"):  # ----- common params -----
            current = []
            continue
        if line.startswith("-"):
            spec, description = (_DESCRIPTION_GAP_RE.split(line, maxsplit=1) + [""])[:2]
            current, argument = _option_names_and_argument(spec)
            flags.update(current)
            if SPEC_TYPE_FLAG in current:
                spec_types = tuple(value.strip() for value in argument.split(",") if value.strip())
            if _argument_choices(argument):
                choices.update(dict.fromkeys(current, _argument_choices(argument)))
        else:
            description = line.strip()
        if not current:
            continue
        if description.startswith(REMOVED_MARKER):
            removed.update(dict.fromkeys(current, description))
        elif current[0] in removed and description and not description.startswith("(env:"):
            removed.update(dict.fromkeys(current, f"{removed[current[0]]} {description}"))
        allowed = _ALLOWED_VALUES_RE.search(description)
        if allowed is not None:
            values = tuple(value.strip() for value in allowed.group(1).split(","))
            choices.update(dict.fromkeys(current, values))
    return ServerFlags(
        flags=tuple(sorted(flags)),
        removed=dict(sorted(removed.items())),
        spec_types=spec_types,
        choices=dict(sorted(choices.items())),
    )


_USAGE_FLAG_RE = re.compile(r"(?:^|[\s,])(--?[A-Za-z][\w-]*)")
_OPTION_INDENT_MAX = 16  # whisper-server aligns long-only options at 13; argparse wraps descriptions at 24


def parse_usage_options(lines: Iterable[str]) -> ServerFlags:
    """The options of a usage text in whisper-server's (``  -t N,      --threads N  [4] ...``) or
    argparse's (``  -m MODEL, --model MODEL``) layout: every flag named on an option line (one that
    starts with ``-`` within the first columns), up to a ``[default]`` column. No removed flags or
    choices: those are llama-server's (:func:`parse_server_help`)."""
    flags: set[str] = set()
    for line in lines:
        stripped = line.lstrip()
        if not stripped.startswith("-") or len(line) - len(stripped) >= _OPTION_INDENT_MAX:
            continue
        names = stripped.split("[", 1)[0]
        names = _DESCRIPTION_GAP_RE.split(names.rstrip(), maxsplit=1)[0] if "," not in names else names
        flags.update(_USAGE_FLAG_RE.findall(names))
    return ServerFlags(flags=tuple(sorted(flags)), removed={}, spec_types=(), choices={})


def _normalised(flag: str) -> str:
    # llama.cpp's parser turns `_` into `-` in long options (common/arg.cpp).
    return flag.replace("_", "-") if flag.startswith("--") else flag


def unsupported_flags(used: Sequence[str], flags: ServerFlags) -> list[str]:
    """The flags of a command line (``Service.command_flags()``) the binary would reject."""
    return [flag for flag in used if not flags.supports(_normalised(flag))]


class UnsupportedServerArgumentError(ValueError):
    """The llama-server binary on the host cannot run the command line the deploy asks for."""


def check_flags_supported(
    used: Sequence[str],
    flags: ServerFlags,
    version: str,
    program: str = "llama-server",
    pinned: str = "llama.cpp commit",
) -> None:
    """Raise UnsupportedServerArgumentError naming each flag ``program`` (``version``) rejects.

    ``used``: the flags a service's command line uses, from its flag table and ``extra_args``; ``pinned``:
    what the box pins that decides them (``Service.PINNED``).
    """
    upgrade = pinned
    problems = []
    for flag in unsupported_flags(used, flags):
        hint = flags.removed.get(_normalised(flag))
        problems.append(f"{flag} ({hint})" if hint else flag)
    if problems:
        raise UnsupportedServerArgumentError(
            f"{program} {version} does not support {', '.join(problems)}: pin a {pinned} that has it "
            f"(upgrade the pinned {upgrade}) or remove the field that sets it"
        )


def check_spec_type_supported(spec_type: str, flags: ServerFlags, version: str) -> None:
    """``spec_type`` is ``--spec-type``'s value, a comma-separated list such as ``draft-mtp``."""
    if not flags.supports(SPEC_TYPE_FLAG):
        raise UnsupportedServerArgumentError(
            f"llama-server {version} has no {SPEC_TYPE_FLAG}: upgrade the pinned llama.cpp commit "
            "or remove the speculative decoding setting"
        )
    wanted = [value.strip() for value in spec_type.split(",") if value.strip()]
    unknown = [value for value in wanted if value not in flags.spec_types]
    if unknown:
        raise UnsupportedServerArgumentError(
            f"llama-server {version} does not know {SPEC_TYPE_FLAG} {', '.join(unknown)} "
            f"(it allows {', '.join(flags.spec_types)}): upgrade the pinned llama.cpp commit "
            "or choose a listed type"
        )


# --- the source checkout -------------------------------------------------------------------------

_SECTION_RE = re.compile(r"^@@(path|head|status|origin)$")
_RC_RE = re.compile(r"^@@rc=(\d+)$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


class SourceCheckout(Record):
    path: str
    """The checkout's directory as the host's ``pwd`` prints it."""
    commit: str
    """The full sha of HEAD."""
    dirty: bool
    changes: tuple[str, ...]
    """``git status --porcelain`` lines, untracked files included."""
    origin_url: str | None


class GitCheckoutError(RuntimeError):
    """git ran in the checkout but failed (no commit yet, dubious ownership, ...)."""


def checkout_command(path: str) -> str:
    """One command, four outputs (pwd, HEAD, status, origin): each after an ``@@name`` line and
    followed by ``@@rc=N``.

    Prints nothing when ``path`` has no ``.git``. Does not set ``safe.directory``: a checkout that
    git refuses to trust fails loudly rather than being read past that protection.
    """
    quoted = shell_word(path)
    sections = (
        ("path", "pwd"),
        ("head", "git rev-parse HEAD"),
        # No optional locks: a plain `git status` rewrites .git/index, which llama.cpp's CMake
        # watches, so probing the checkout would make the next build reconfigure and relink.
        ("status", "git --no-optional-locks status --porcelain"),
        ("origin", "git remote get-url origin"),
    )
    body = "; ".join(f'echo @@{name}; {command} 2>&1; echo "@@rc=$?"' for name, command in sections)
    return f"! test -e {quoted}/.git || (cd {quoted} && {{ {body}; }})"


def _sections(lines: Iterable[str]) -> dict[str, tuple[list[str], int]]:
    sections: dict[str, tuple[list[str], int]] = {}
    name: str | None = None
    body: list[str] = []
    for line in lines:
        line = line.rstrip("\n")
        section = _SECTION_RE.match(line)
        rc = _RC_RE.match(line)
        if section is not None:
            name, body = section.group(1), []
        elif rc is not None and name is not None:
            sections[name] = (body, int(rc.group(1)))
            name = None
        elif name is not None:
            body.append(line)
    return sections


def parse_checkout(lines: Sequence[str]) -> SourceCheckout | None:
    """Output of :func:`checkout_command`; None when empty (not a checkout)."""
    if not any(line.strip() for line in lines):
        return None
    sections = _sections(lines)
    missing = {"path", "head", "status", "origin"} - sections.keys()
    if missing:
        raise GitCheckoutError(f"incomplete git output (no {', '.join(sorted(missing))}): {list(lines)}")
    path = " ".join(sections["path"][0]).strip()
    head, head_rc = sections["head"]
    commit = head[0].strip() if head_rc == 0 and len(head) == 1 else ""
    if not _SHA_RE.match(commit):
        raise GitCheckoutError(f"git rev-parse HEAD failed in {path}: {' '.join(head).strip()}")
    status, status_rc = sections["status"]
    if status_rc != 0:
        raise GitCheckoutError(f"git status failed in {path}: {' '.join(status).strip()}")
    origin, origin_rc = sections["origin"]
    changes = tuple(line for line in status if line.strip())
    return SourceCheckout(
        path=path,
        commit=commit,
        dirty=bool(changes),
        changes=changes,
        origin_url=origin[0].strip() if origin_rc == 0 and origin else None,
    )
