"""One flag table per server type: a field added to it shows up in argv, the extra_args refusal,
the `--help` check and the bench's variants, with nothing else edited."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import ValidationError

from gpubox.bench import BenchConfig, bench_variant
from gpubox.binaries import UnsupportedServerArgumentError, check_flags_supported, parse_server_help
from gpubox.servers.base import Flag, typed_flags
from gpubox.servers.llama import LLAMA_SERVER_FLAGS, LlamaServer
from gpubox.spec import ModelFile, problems_from

HELP_TEXT = Path(__file__).parent / "fixtures/llamacpp/server-help-0c1e57098.txt"
HELP = parse_server_help(HELP_TEXT.read_text().splitlines())
MODEL = ModelFile(path="/srv/models/m.gguf", sha256="a" * 64, architecture="llama")


class ThreadedServer(LlamaServer):
    """llama-server with one more typed field, declared only in the table."""

    FLAGS: ClassVar[tuple[Flag, ...]] = (*LLAMA_SERVER_FLAGS, Flag("threads", "--threads", ("-t",)))

    threads: int | None = None


def test_the_new_field_is_rendered_into_argv() -> None:
    argv = ThreadedServer(name="s", model=MODEL, threads=8).argv("/bin/llama-server")
    assert argv[argv.index("--threads") + 1] == "8"
    assert "--threads" not in ThreadedServer(name="s", model=MODEL).argv("/bin/llama-server")


@pytest.mark.parametrize("word", ["-t", "--threads", "--threads=4"])
def test_the_new_flag_is_refused_in_extra_args(word: str) -> None:
    with pytest.raises(ValidationError) as error:
        ThreadedServer(name="s", model=MODEL, extra_args=(word, "4"))
    (problem,) = problems_from(error.value)
    assert problem.field == "extra_args.0" and "set threads instead" in problem.message
    LlamaServer(name="s", model=MODEL, extra_args=(word, "4"))  # not typed for plain llama-server
    assert typed_flags(ThreadedServer)["-t"] == "threads"


def test_the_new_flag_is_checked_against_the_binarys_help() -> None:
    service = ThreadedServer(name="s", model=MODEL, threads=8)
    check_flags_supported(service.command_flags(), HELP, "pinned")
    without = HELP.model_copy(update={"flags": tuple(f for f in HELP.flags if f not in ("-t", "--threads"))})
    with pytest.raises(UnsupportedServerArgumentError, match="does not support --threads"):
        check_flags_supported(service.command_flags(), without, "older")


def test_the_bench_variant_keeps_the_new_field() -> None:
    service = ThreadedServer(name="s", model=MODEL, threads=8, parallel=2, ctx_size=4096)
    variant = bench_variant(service, BenchConfig(parallel=4, draft=False, context="short"), 9001)
    argv = variant.argv("/tmp/llama-server")
    assert argv[argv.index("--threads") + 1] == "8"
    assert argv[argv.index("--parallel") + 1] == "4" and argv[argv.index("--port") + 1] == "9001"


class NoAuthServer(LlamaServer):
    """A server type without authentication (as whisper-server and piper's HTTP server are)."""

    AUTHENTICATES: ClassVar[bool] = False


def test_a_server_without_authentication_may_listen_on_loopback_only() -> None:
    NoAuthServer(name="s", model=MODEL, host="127.0.0.1")
    with pytest.raises(ValidationError) as error:
        NoAuthServer(name="s", model=MODEL, host="0.0.0.0", api_key_file="/k", allow_from=("10.0.0.0/8",))
    fields = {problem.field: problem.message for problem in problems_from(error.value)}
    assert "host" in fields and "has no authentication" in fields["host"]


HELP_DESCRIPTION_COLUMN = 40  # llama-server's --help: the spellings, then the description from column 40


def _help_defaults(help_text: str) -> dict[str, str]:
    """Each long flag of the pinned `--help` and the `(default: X)` its description gives."""
    defaults: dict[str, str] = {}
    flag: str | None = None
    for line in help_text.splitlines():
        if line.startswith("-"):
            spellings = re.findall(r"(?<![\w-])(--[a-z0-9-]+)", line[:HELP_DESCRIPTION_COLUMN])
            flag = spellings[0] if spellings else None
        match = re.search(r"\(default: '?([^,)']+)'?", line)
        if flag and match and flag not in defaults:
            defaults[flag] = match[1].strip()
    return defaults


def test_the_flag_table_s_defaults_are_the_pinned_help_s() -> None:
    """A recorded default that the pinned llama-server's --help contradicts fails here."""
    defaults = _help_defaults(HELP_TEXT.read_text())
    recorded = {flag.flag: flag.default for flag in LLAMA_SERVER_FLAGS if flag.default is not None}
    assert recorded, "the table records no default"
    assert {flag: str(value) for flag, value in recorded.items()} == {flag: defaults[flag] for flag in recorded}
    assert recorded["--spec-draft-n-max"] == 3


def test_every_reader_takes_the_draft_n_max_default_from_the_table() -> None:
    """The planner and the bench once disagreed (0 and 3) on an unset --spec-draft-n-max."""
    from gpubox.bench import quick_sweep

    server = LlamaServer(name="s", model=MODEL, spec_type="ngram-simple", port=8080)
    assert server.spec_draft_n_max is None and server.setting("spec_draft_n_max") == 3
    assert [config.draft_n_max for config in quick_sweep(server) if config.draft] == [3]
