r"""One quoting path for every user value that reaches a shell or a systemd unit.

Model paths, build prefixes, API key files and URLs come from the spec and end up in shell
scripts run on the host and in the llama-server unit. Each parser that reads them has its own
rules, so each gets one escaper here, and nothing else in gpubox quotes by hand. All are pure
functions (no pyinfra import), checked against the real parsers: tests/test_quoting.py runs
/bin/sh and systemd 252's own unit-file parser (`systemd --test`), and
tests/e2e/test_quoting_systemd.py starts a unit on a booted systemd and reads back what arrived.

| context                   | function                 | escaped                           | refused                   |
|---------------------------|--------------------------|-----------------------------------|---------------------------|
| POSIX sh word             | `shell_word`,            | everything: `shlex.quote`         | NUL                       |
|                           | `shell_join`             | ('...'; a `'` becomes '"'"')      |                           |
| `ExecStart=` word         | `exec_word`              | `%` -> `%%`, `$` -> `$$`;         | NL, CR, NUL               |
|                           |                          | "..." (1) when it has whitespace, |                           |
|                           |                          | `'`, `"`, `\`, `;`, or is empty   |                           |
| `ReadOnlyPaths=`,         | `path_list_entry`        | `%` -> `%%` (`$` as is);          | NL, CR, NUL; a relative   |
| `ReadWritePaths=`,        |                          | "..." (1) when it has whitespace, | path; a `..` part         |
| `InaccessiblePaths=` entry|                          | `'`, `"` or `\`                   |                           |
| `Environment=` KEY=value  | `environment_assignment` | `%` -> `%%` (`$` as is);          | NL, CR, NUL in the value; |
|                           |                          | "KEY=value" (1) when it has       | a key that is no variable |
|                           |                          | whitespace, `'`, `"` or `\`       | name                      |
| `Description=` text       | `unit_text`              | `%` -> `%%` (the rest as is: the  | NL, CR, NUL               |
|                           |                          | whole line is the value)          |                           |
| HAProxy config word       | `haproxy_word`           | nothing: plain characters only    | anything but letters,     |
|                           |                          |                                   | digits and `._-/:@[]+`    |

(1) inside the double quotes `\` is written `\\` and `"` is written `\"`.

Why, directive by directive (systemd 252, Debian 12's; the tests run this very parser):

- A unit-file line ends at `\n`, `\r` or NUL and no escape carries them through the unit-file
  reader, so `unit_safe` refuses them, naming the field, in every unit context: a path with a
  line break in its name is refused rather than half-written. A word with a backslash is always
  quoted, so no line ends in `\` (which would continue it).
- `ExecStart=`: each word is unquoted and C-unescaped (`\x41` is `A`; a lone unquoted `;`
  separates two commands, a quoted one is a word), then `%` specifiers are expanded; when the
  command is spawned, `$NAME` and `${NAME}` are replaced from the environment (a bare `$NAME` word
  is even split on whitespace) and `$$` becomes `$`. So `%` and `$` are doubled and whatever the
  word splitter acts on is quoted. (The first word is the program: a leading `-`, `@`, `:`, `+` or
  `!` there is read as a prefix even inside quotes, so it must be an absolute path, as gpubox's is.)
- `ReadOnlyPaths=` & co.: the list is split into words that are unquoted but NOT C-unescaped (a
  backslash takes the next character literally: `\x41` is `x41`, `\;` is `;`), then `%` specifiers
  are expanded and the path simplified (`//` and `/./` collapse). `$` means nothing there: doubling
  it would name another path. A leading `-` or `+` of the unquoted word is a prefix, which an
  absolute path never has; a relative path or a `..` part is ignored by systemd with a warning
  (the service starts without the protection), so both are refused here.
- `Environment=`: the assignments are split into words that are unquoted and C-unescaped (an
  unknown escape such as `\;` makes systemd drop the whole line), then `%` specifiers are
  expanded. `$` is NOT expanded: `Environment="A=$B"` sets A to the three characters `$B`, so
  doubling it (as an `ExecStart=` escaper would) is a bug. Quoting the whole `KEY=value` or only
  the value is the same to systemd; the whole is quoted here.
- A shell word is `shlex.quote`: in POSIX sh single quotes keep every byte literal, and a `'` is
  closed, escaped and reopened. Only NUL can't be in a shell word (nor in any argv); a newline can.

In a script a user value is only ever a word of its own: a message that names one is built with
`printf 'fixed text %s\n' <shell_word(value)>`, never by pasting the value into a quoted string.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

# What ends a line in systemd's unit-file reader (read_line): no escape can carry these.
UNIT_UNSAFE = ("\n", "\r", "\x00")
# What no argv and no shell word can hold.
SHELL_UNSAFE = ("\x00",)

_NAMES = {"\n": "a newline", "\r": "a carriage return", "\x00": "a NUL character"}

# What makes systemd's word splitter act on a word: whitespace, quotes, backslash. ExecStart also
# reads a lone `;` as a command separator.
_UNIT_NEEDS_QUOTES = re.compile(r"[\s\"'\\]")
_EXEC_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]")
# systemd (like bash) accepts these names in Environment=; anything else is dropped with a warning.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _refuse(value: str, field: str, unsafe: Iterable[str], where: str) -> str:
    for char in unsafe:
        if char in value:
            raise ValueError(f"{field} contains {_NAMES[char]} ({value!r}): {where}; rename it")
    return value


def unit_safe(value: str, field: str) -> str:
    """`value` unchanged, or ValueError naming `field` when a unit file can't carry it (NL, CR, NUL)."""
    return _refuse(value, field, UNIT_UNSAFE, "a systemd unit-file line ends there, so it can't be written into a unit")


def shell_word(value: str, field: str = "a shell word") -> str:
    """One word for POSIX sh, read back byte for byte (`shlex.quote`); ValueError on NUL."""
    _refuse(value, field, SHELL_UNSAFE, "no shell word or argv can hold it")
    return shlex.quote(value)


def shell_join(words: Iterable[str]) -> str:
    """A shell command of these words, each one `shell_word`."""
    return " ".join(shell_word(word) for word in words)


def _unit_quote(escaped: str, needs_quotes: re.Pattern[str]) -> str:
    """`escaped` as one word of systemd's splitter: bare when it can be, else in double quotes."""
    if escaped and not needs_quotes.search(escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_word(value: str, field: str = "an ExecStart= word") -> str:
    """One word of an `ExecStart=` line that reaches the program unchanged (`%` and `$` doubled)."""
    unit_safe(value, field)
    return _unit_quote(value.replace("%", "%%").replace("$", "$$"), _EXEC_NEEDS_QUOTES)


def path_list_entry(path: str, field: str = "a path") -> str:
    """One entry of a space-separated path list (`ReadOnlyPaths=` & co.): `%` doubled, `$` as is.

    ValueError for what systemd would ignore: a relative path, or one with a `..` part.
    """
    unit_safe(path, field)
    if not path.startswith("/"):
        raise ValueError(f"{field} must be an absolute path, got {path!r}: systemd ignores a relative one")
    if ".." in path.split("/"):
        raise ValueError(f"{field} must not have a '..' part, got {path!r}: systemd ignores such a path")
    return _unit_quote(path.replace("%", "%%"), _UNIT_NEEDS_QUOTES)


def unit_text(value: str, field: str) -> str:
    """Free text for a directive that takes the rest of its line (``Description=``): `%` doubled."""
    return unit_safe(value, field).replace("%", "%%")


def environment_assignment(key: str, value: str) -> str:
    """What follows `Environment=` to set `key` to `value` exactly: `%` doubled, `$` as is."""
    if not _ENV_NAME.match(key):
        raise ValueError(
            f"environment variable name {key!r} is not a valid name (letters, digits, '_', not starting "
            f"with a digit): systemd ignores the assignment"
        )
    unit_safe(value, f"environment variable {key}")
    return _unit_quote(f"{key}={value}".replace("%", "%%"), _UNIT_NEEDS_QUOTES)


HAPROXY_SAFE = re.compile(r"^[A-Za-z0-9._/:@\[\]+-]+$")


def haproxy_word(value: str, field: str) -> str:
    """A word of an HAProxy config line (an address, a path, a name): plain characters only, refused otherwise.

    HAProxy's config parser splits on spaces, reads ``#`` as a comment, expands ``$VAR``/``${VAR}`` inside
    double quotes and unescapes ``\\``; a value with none of them needs no quoting, and every value gpubox
    writes there (addresses, absolute paths, group and service names) can do without."""
    if not HAPROXY_SAFE.match(value):
        raise ValueError(
            f"{field} goes into HAProxy's config: use letters, digits and '.', '_', '/', ':', '@', '[', ']', '+', '-' "
            f"only (no spaces, quotes, '#', '$' or '%'), got {value!r}"
        )
    return value
