"""gpubox.quoting against the real parsers: /bin/sh, and systemd 252's own unit-file parser.

systemd's parser runs offline: `systemd --test --system --unit=X` loads the unit files of
$SYSTEMD_UNIT_PATH with the manager's own code, dumps every loaded unit (the parsed `Environment:`,
`ReadOnlyPaths:`, `Command Line:` ...) and exits, without a running manager. It refuses to run as
root, so as root it runs as nobody. `$` expansion in ExecStart happens only when a command is
spawned: that (and the unit as a whole) is checked on a booted systemd by
tests/e2e/test_quoting_systemd.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpubox.build import build_script, rollback_script
from gpubox.quoting import (
    UNIT_UNSAFE,
    environment_assignment,
    exec_word,
    path_list_entry,
    shell_join,
    shell_word,
    unit_safe,
)
from gpubox.spec import LlamaCppBuild, ModelFile
from operations.models import verify_script

# Values that break naive quoting in sh or in a unit file (none has a line break or NUL: those are
# refused in units, see the refusal tests).
UNIT_VALUES = [
    "plain",
    "with space",
    "two  spaces and trailing ",
    " leading space",
    "tab\there",
    "dollar$HOME",
    "${HOME}",
    "$",
    "$$",
    "a$1b",
    "back`id`tick",
    "$(id)",
    'double"quote',
    "single'quote",
    "'",
    '"',
    "100%",
    "%n%i%%",
    "%",
    "back\\slash",
    "trailing\\",
    "\\x41 not an escape",
    "\\n",
    "semi;colon",
    ";",
    "\\;",
    "glob*?[a]",
    "-leading-dash",
    "--model",
    "#hash",
    "~tilde",
    "{a,b}",
    "x=y",
    "a&b|c<d>e",
    "",
    "ünïcödé ✓ 模型",
    "nbsp\u00a0x",
    "vt\x0bff\x0cesc\x1bdel\x7f",
]
# Shell words can also carry line breaks (pyinfra runs the whole script with `sh -c`).
SHELL_VALUES = [*UNIT_VALUES, "new\nline", "cr\rlf\r\n", "\n"]
# Directory names for path lists: everything that can be a file name (no '/', no '' or '..').
PATH_VALUES = [f"/srv/q/{value}" for value in UNIT_VALUES if value and "/" not in value and value != ".."]


# -- sh --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", SHELL_VALUES, ids=repr)
def test_shell_word_round_trips_through_sh(value: str) -> None:
    proc = subprocess.run(["sh", "-c", f"printf %s {shell_word(value)}"], capture_output=True, check=True)
    assert proc.stdout == value.encode()


def test_shell_join_round_trips_every_word_through_sh() -> None:
    proc = subprocess.run(["sh", "-c", "printf '%s\\0' " + shell_join(SHELL_VALUES)], capture_output=True, check=True)
    assert proc.stdout.split(b"\0")[:-1] == [value.encode() for value in SHELL_VALUES]


def test_shell_word_is_inert_as_a_command_argument(tmp_path: Path) -> None:
    """`$(...)`, backticks and globs stay text: nothing runs, nothing expands."""
    marker = tmp_path / "ran"
    for value in (f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}", "*"):
        proc = subprocess.run(
            ["sh", "-c", f"printf %s {shell_word(value)}"], capture_output=True, check=True, cwd=tmp_path
        )
        assert proc.stdout == value.encode()
    assert not marker.exists()


def test_shell_word_is_shlex_quote() -> None:
    assert shell_word("/opt/llama.cpp/current") == "/opt/llama.cpp/current"
    assert shell_word("a b") == "'a b'"
    assert shell_word("it's") == "'it'\"'\"'s'"
    assert shell_word("") == "''"


# -- systemd's unit-file parser (offline) ----------------------------------------------------------

SYSTEMD = Path("/lib/systemd/systemd")


def _systemd_command() -> list[str]:
    if not SYSTEMD.exists():
        pytest.fail(f"{SYSTEMD} is missing: apt-get install systemd (its parser is the oracle here)")
    command = [str(SYSTEMD), "--test", "--system", "--log-target=console", "--log-level=notice"]
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing: `systemd --test` refuses to run as root")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]


def _load_units(units: dict[str, str], start: str) -> tuple[str, dict[str, str]]:
    """Load `units` (name -> text) with systemd's parser, starting at `start`.

    Returns systemd's messages (warnings about the files) and the dump of each of `units`.
    """
    with tempfile.TemporaryDirectory(prefix="gpubox-quoting-") as directory:
        os.chmod(directory, 0o755)  # read by nobody
        for name, text in units.items():
            path = Path(directory, name)
            path.write_text(text, encoding="utf-8")
            path.chmod(0o644)
        proc = subprocess.run(
            [*_systemd_command(), f"--unit={start}"],
            env={"SYSTEMD_UNIT_PATH": directory, "HOME": directory, "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            timeout=60,
        )
    # The dump (stdout) prints values raw: split on "\n" only, a value may hold other line breaks.
    # Log messages (stderr) name the unit file and line of a setting systemd ignored.
    dump, log = proc.stdout.decode(), proc.stderr.decode()
    assert "-> By units:" in dump, f"systemd --test failed (rc={proc.returncode}):\n{log}"
    messages = "\n".join(line for line in log.split("\n") if ".service" in line or ".target" in line)
    dumps = {}
    for section in dump.split("\n\t-> Unit ")[1:]:
        name, _, body = section.partition(":\n")
        if name in units:
            dumps[name] = body
    return messages, dumps


def _fields(dump: str, key: str) -> list[str]:
    """The values of `key` in a unit's dump (`\t\tKey: value` lines)."""
    prefix = f"\t\t{key}: "
    return [line[len(prefix) :] for line in dump.split("\n") if line.startswith(prefix)]


_C_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}


def _unescape(text: str) -> bytes:
    """Undo the escapes of systemd's dump of a quoted word (`\\"`, `\\$`, `\\v`, `\\033`, ...)."""
    raw, out, i = text.encode(), bytearray(), 0
    while i < len(raw):
        if raw[i] != ord("\\"):
            out.append(raw[i])
            i += 1
            continue
        escape = chr(raw[i + 1])
        if escape in _C_ESCAPES:
            out.append(_C_ESCAPES[escape])
            i += 2
        elif escape == "x":
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        elif escape in "01234567":
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i + 1])
            i += 2
    return bytes(out)


def split_quoted_words(command_line: str) -> list[str]:
    """The words of systemd's quoted output (a dumped `Command Line:`, `systemctl show` of a list).

    Words are joined by spaces; one that needs it is in "..." with C-style escapes (shell_maybe_quote).
    """
    words = []
    for match in re.finditer(r'"((?:[^"\\]|\\.)*)"|([^ ]+)', command_line):
        quoted, bare = match.groups()
        words.append(_unescape(quoted).decode() if quoted is not None else bare)
    return words


def _probe_unit(index: int, value: str, path: str | None) -> str:
    read_only = f"ReadOnlyPaths={path_list_entry(path)}\n" if path is not None else ""
    return (
        "[Unit]\nDefaultDependencies=no\n\n[Service]\nType=oneshot\n"
        f"Environment={environment_assignment('GPUBOX_T', value)}\n"
        f"{read_only}"
        f"ExecStart=/bin/true {exec_word(value)} end\n"
    )


@pytest.fixture(scope="module")
def parsed() -> Iterator[tuple[str, dict[str, str]]]:
    """One probe unit per value (its ExecStart word, Environment= value, ReadOnlyPaths= entry), loaded at once."""
    paths: list[str | None] = [f"/srv/q/{value}" if f"/srv/q/{value}" in PATH_VALUES else None for value in UNIT_VALUES]
    units = {f"probe-{i}.service": _probe_unit(i, value, paths[i]) for i, value in enumerate(UNIT_VALUES)}
    wants = " ".join(units)
    units["probes.target"] = f"[Unit]\nDefaultDependencies=no\nWants={wants}\n"
    yield _load_units(units, "probes.target")


def test_systemd_parses_every_probe_without_a_warning(parsed: tuple[str, dict[str, str]]) -> None:
    messages, dumps = parsed
    assert messages == ""
    assert len(dumps) == len(UNIT_VALUES) + 1


@pytest.mark.parametrize(("index", "value"), list(enumerate(UNIT_VALUES)), ids=repr)
def test_exec_word_is_one_argv_word_to_systemd(parsed: tuple[str, dict[str, str]], index: int, value: str) -> None:
    """systemd keeps `$` until the spawn, where `$$` becomes `$` (checked by the e2e test)."""
    _, dumps = parsed
    (command_line,) = _fields(dumps[f"probe-{index}.service"], "\tCommand Line")
    assert split_quoted_words(command_line) == ["/bin/true", value.replace("$", "$$"), "end"]


@pytest.mark.parametrize(("index", "value"), list(enumerate(UNIT_VALUES)), ids=repr)
def test_environment_assignment_sets_the_value_exactly(
    parsed: tuple[str, dict[str, str]], index: int, value: str
) -> None:
    _, dumps = parsed
    assert _fields(dumps[f"probe-{index}.service"], "Environment") == [f"GPUBOX_T={value}"]


@pytest.mark.parametrize("path", PATH_VALUES, ids=repr)
def test_path_list_entry_is_one_path_to_systemd(parsed: tuple[str, dict[str, str]], path: str) -> None:
    _, dumps = parsed
    index = UNIT_VALUES.index(path.removeprefix("/srv/q/"))
    assert _fields(dumps[f"probe-{index}.service"], "ReadOnlyPaths") == [path]


def test_path_list_entries_stay_apart_in_one_list() -> None:
    line = " ".join(path_list_entry(path) for path in PATH_VALUES)
    unit = f"[Unit]\nDefaultDependencies=no\n\n[Service]\nType=oneshot\nReadOnlyPaths={line}\nExecStart=/bin/true\n"
    messages, dumps = _load_units({"list.service": unit}, "list.service")
    assert messages == ""
    # The dump joins the list with spaces: the same text, and no warning (a word split off a path
    # is relative and draws "path is not absolute, ignoring").
    assert _fields(dumps["list.service"], "ReadOnlyPaths") == [" ".join(PATH_VALUES)]


def test_the_oracle_sees_naive_quoting_break() -> None:
    """What the escapers prevent: a split path, an expanded specifier, a doubled `$`, a dropped line."""
    unit = (
        "[Unit]\nDefaultDependencies=no\n\n[Service]\nType=oneshot\n"
        "ReadOnlyPaths=/srv/q/with space /srv/q/100%%\n"
        'Environment="A=$HOME$$" "B=a\\;b"\n'
        "ExecStart=/bin/true %n\n"
    )
    messages, dumps = _load_units({"naive.service": unit}, "naive.service")
    assert "ReadOnlyPaths= path is not absolute, ignoring: space" in messages
    assert "Invalid syntax, ignoring" in messages
    dump = dumps["naive.service"]
    assert _fields(dump, "ReadOnlyPaths") == ["/srv/q/with /srv/q/100%"]
    # `$` is stored as written (`$$` stays two), and the assignment after the bad escape is dropped.
    assert _fields(dump, "Environment") == ["A=$HOME$$"]
    assert _fields(dump, "\tCommand Line") == ["/bin/true naive.service"]


def test_systemd_analyze_verify_accepts_a_unit_of_nasty_values(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    unit = tmp_path / "gpubox-quoting.service"
    unit.write_text(
        "[Service]\nType=oneshot\n"
        + "".join(f"Environment={environment_assignment(f'V{i}', value)}\n" for i, value in enumerate(UNIT_VALUES))
        + f"ReadOnlyPaths={' '.join(path_list_entry(path) for path in PATH_VALUES)}\n"
        + f"ExecStart=/bin/true {' '.join(exec_word(value) for value in UNIT_VALUES)}\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert f"{unit}:" not in proc.stdout + proc.stderr


# -- the escapers' text ----------------------------------------------------------------------------


def test_exec_word_text() -> None:
    assert exec_word("/opt/llama.cpp/current/llama-server") == "/opt/llama.cpp/current/llama-server"
    assert exec_word("/m/a b.gguf") == '"/m/a b.gguf"'
    assert exec_word("50%$x") == "50%%$$x"
    assert exec_word('a"b\\c') == '"a\\"b\\\\c"'
    assert exec_word(";") == '";"'
    assert exec_word("") == '""'


def test_path_list_entry_text() -> None:
    assert path_list_entry("/srv/models") == "/srv/models"
    assert path_list_entry("/srv/$HOME/100%") == "/srv/$HOME/100%%"
    assert path_list_entry("/srv/my models") == '"/srv/my models"'
    assert path_list_entry('/srv/a"b\\c') == '"/srv/a\\"b\\\\c"'


def test_environment_assignment_text() -> None:
    assert environment_assignment("CUDA_DEVICE_ORDER", "PCI_BUS_ID") == "CUDA_DEVICE_ORDER=PCI_BUS_ID"
    assert environment_assignment("CUDA_VISIBLE_DEVICES", "") == "CUDA_VISIBLE_DEVICES="
    assert environment_assignment("A", "$x 5%") == '"A=$x 5%%"'


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", UNIT_UNSAFE, ids=repr)
def test_unit_contexts_refuse_line_breaks_and_nul_naming_the_field(char: str) -> None:
    value = f"/srv/models/a{char}b.gguf"
    for call in (
        lambda: unit_safe(value, "model.path"),
        lambda: exec_word(value, "model.path"),
        lambda: path_list_entry(value, "model.path"),
    ):
        with pytest.raises(ValueError, match=r"model\.path contains"):
            call()
    with pytest.raises(ValueError, match="environment variable GPUBOX_T contains"):
        environment_assignment("GPUBOX_T", value)


def test_unit_safe_returns_a_safe_value() -> None:
    assert unit_safe("/srv/a b$%", "model.path") == "/srv/a b$%"


def test_shell_word_refuses_nul_only() -> None:
    with pytest.raises(ValueError, match="api_key_file contains a NUL"):
        shell_word("/etc/a\x00b", "api_key_file")
    with pytest.raises(ValueError, match="NUL"):
        shell_join(["ok", "a\x00"])


def test_path_list_entry_refuses_what_systemd_would_ignore() -> None:
    with pytest.raises(ValueError, match="models_dir must be an absolute path"):
        path_list_entry("models", "models_dir")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        path_list_entry("/srv/../etc")


@pytest.mark.parametrize("key", ["", "1A", "A-B", "A B", "A=B", "Ä"])
def test_environment_assignment_refuses_a_bad_name(key: str) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        environment_assignment(key, "x")


# -- applied: the host scripts with a nasty path, run by sh -------------------------------------------

# A directory name that runs commands, expands or splits if any script pastes it unquoted.
NASTY_NAME = "a b$(touch pwned)`touch pwned2`\"q'%;*$HOME\\"


def test_verify_script_names_a_nasty_model_path_exactly(tmp_path: Path) -> None:
    directory = tmp_path / NASTY_NAME
    directory.mkdir()
    path = f"{directory}/m $x.gguf"
    part = Path(f"{path}.part")
    part.write_bytes(b"not the model")
    model = ModelFile(path=path, sha256="0" * 64, architecture="llama")
    proc = subprocess.run(["sh", "-c", verify_script(model, str(part))], capture_output=True, text=True, cwd=tmp_path)
    found = hashlib.sha256(b"not the model").hexdigest()
    assert proc.returncode == 1
    assert proc.stderr == (
        f"sha256 mismatch for {path}: the source gave {found}, the spec says {'0' * 64}; "
        "kept the existing file, deleted the .part\n"
    )
    assert not part.exists()
    part.write_bytes(b"the model")
    model = ModelFile(path=path, sha256=hashlib.sha256(b"the model").hexdigest(), architecture="llama")
    proc = subprocess.run(["sh", "-c", verify_script(model, str(part))], capture_output=True, text=True, cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert part.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [NASTY_NAME]


# Stands in for cmake: configure succeeds, `--build WORK` makes WORK/bin/llama-server (or fails).
FAKE_CMAKE = """#!/bin/sh
if [ "$1" = --build ]; then
  if [ -n "${FAIL_BUILD:-}" ]; then echo 'ninja: build stopped'; exit 1; fi
  mkdir -p "$2/bin"
  printf '#!/bin/sh\\necho version: 1\\necho "  --port N   port to listen"\\n' > "$2/bin/llama-server"
  chmod +x "$2/bin/llama-server"
fi
"""


def test_build_and_rollback_scripts_quote_a_nasty_prefix(tmp_path: Path) -> None:
    """The spec only allows plain prefixes; the scripts must not depend on that."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "cmake").write_text(FAKE_CMAKE)
    (bin_dir / "cmake").chmod(0o755)
    prefix = f"{tmp_path}/{NASTY_NAME}/llama.cpp"
    first = LlamaCppBuild.model_construct(commit="1" * 40, prefix=prefix)
    second = LlamaCppBuild.model_construct(commit="2" * 40, prefix=prefix)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}

    def run(script: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, cwd=tmp_path, env={**env, **extra})

    for build in (first, second):
        proc = run(build_script(build, "cpu", ccache=False))
        name = f"{build.commit}-cpu"
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
        assert proc.stdout == f"installed {prefix}/builds/{name}; current -> builds/{name}\n"
        assert os.readlink(f"{prefix}/current") == f"builds/{name}"
    assert os.readlink(f"{prefix}/previous") == f"builds/{first.commit}-cpu"

    proc = run(build_script(LlamaCppBuild.model_construct(commit="3" * 40, prefix=prefix), "cpu"), FAIL_BUILD="1")
    log = f"{prefix}/logs/build-{'3' * 40}-cpu.log"
    assert proc.returncode == 1
    assert proc.stderr == f"llama.cpp build failed: build; full log: {log}\nninja: build stopped\n"
    assert os.readlink(f"{prefix}/current") == f"builds/{second.commit}-cpu"

    assert run(rollback_script(second)).returncode == 0
    assert os.readlink(f"{prefix}/current") == f"builds/{first.commit}-cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bin", NASTY_NAME])
