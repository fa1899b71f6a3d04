import subprocess
import typing
from pathlib import Path

import pytest

from gpubox.binaries import (
    GitCheckoutError,
    ServerFlags,
    UnsupportedServerArgumentError,
    check_flags_supported,
    check_spec_type_supported,
    checkout_command,
    parse_checkout,
    parse_server_help,
    parse_server_version,
    server_version_command,
    unsupported_flags,
)
from gpubox.servers.llama import LLAMA_SERVER_FLAGS, CacheType, LlamaServer, SpecType
from gpubox.spec import ModelFile

FIXTURES = Path(__file__).parent / "fixtures" / "llamacpp"
HELP = parse_server_help((FIXTURES / "server-help-0c1e57098.txt").read_text().splitlines())
VERSION = "0.5.0-dev build 0 commit unknown"


# --- --version ---


def test_version_without_git() -> None:
    version = parse_server_version((FIXTURES / "version-0c1e57098.txt").read_text().splitlines())
    assert (version.version, version.build, version.commit) == ("0.5.0-dev", 0, None)
    assert version.built_with == "GNU 13.3.0 for Linux x86_64"
    assert str(version) == VERSION


def test_version_formats() -> None:
    current = parse_server_version(["version: 0.5.0-dev (build 1, commit a9a16a5)"])
    assert (current.version, current.build, current.commit, current.built_with) == ("0.5.0-dev", 1, "a9a16a5", None)
    old = parse_server_version(["version: 4200 (abc1234)", "built with cc 12.2.0 for x86_64-linux-gnu"])
    assert (old.version, old.build, old.commit) == ("4200", 4200, "abc1234")
    assert str(old) == "4200 commit abc1234"


def test_version_line_need_not_come_first() -> None:
    lines = ["some backend line printed first", "version: 0.5.0-dev (build 1, commit a9a16a5)"]
    assert parse_server_version(lines).commit == "a9a16a5"


def test_binary_that_does_not_start_raises_with_its_output() -> None:
    with pytest.raises(ValueError, match="libcuda"):
        parse_server_version(["llama-server: error while loading shared libraries: libcuda.so.1"])


def test_missing_binary_prints_nothing(tmp_path: Path) -> None:
    command = server_version_command(str(tmp_path / "no such llama-server"))
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert result.stdout == ""


# --- --help ---


@pytest.mark.parametrize(
    "flag",
    [
        "-fit",
        "--fit",
        "-cb",
        "--cont-batching",
        "-nocb",
        "--no-cont-batching",
        "-h",
        "--help",
        "--usage",
        "-hf",
        "-hfr",
        "--hf-repo",
        "--spec-draft-model",
        "-md",
        "--model-draft",
        "--spec-type",
        "--ui",
        "--webui",
        "--no-ui",
        "--no-webui",
        "--mmproj-auto",
        "--no-mmproj",
        "--no-mmproj-auto",
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        "--fim-qwen-1.5b-default",
        "--control-vector-layer-range",
        "--spec-default",
        "-np",
        "--parallel",
        "--port",
        "--host",
    ],
)
def test_help_lists_every_alias(flag: str) -> None:
    assert flag in HELP.flags
    assert HELP.supports(flag)


def test_help_does_not_take_arguments_or_descriptions_for_flags() -> None:
    assert "none" not in HELP.flags
    assert "--threads" in HELP.flags  # named in descriptions only as well
    assert all(flag.startswith("-") and " " not in flag for flag in HELP.flags)
    assert len(HELP.flags) > 400


def test_spec_types() -> None:
    """The spec's SpecType is exactly what the pinned llama-server's --help lists."""
    assert HELP.spec_types == typing.get_args(SpecType)
    assert "draft-mtp" in HELP.spec_types


def test_removed_flags_are_listed_but_unsupported() -> None:
    assert "--draft-max" in HELP.flags
    assert not HELP.supports("--draft-max")
    assert "--spec-draft-n-max" in HELP.removed["--draft-max"]


def test_choices() -> None:
    assert HELP.choices["-ctk"] == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
    assert HELP.choices["--split-mode"] == ("none", "layer", "row", "tensor")


# --- the flags a service uses, against the pinned --help ---

MODEL = ModelFile(path="/x.gguf", sha256="a" * 64, architecture="llama")


def test_every_spelling_in_the_flag_table_is_in_the_pinned_help() -> None:
    spellings = [spelling for flag in LLAMA_SERVER_FLAGS for spelling in flag.spellings]
    assert unsupported_flags(spellings, HELP) == []


def test_supported_service() -> None:
    service = LlamaServer(name="s", model=MODEL, extra_args=("--seed", "-1", "--no-webui", "--threads_batch", "4"))
    assert service.command_flags()[-3:] == ["--seed", "--no-webui", "--threads_batch"]
    assert unsupported_flags(service.command_flags(), HELP) == []  # `_` is `-` in long options, as llama.cpp reads them
    check_flags_supported(service.command_flags(), HELP, VERSION)


def test_unsupported_flag_names_flag_version_and_fix() -> None:
    service = LlamaServer(name="s", model=MODEL, extra_args=("--temperature-scale", "-0.5", "--draft-max", "16"))
    assert unsupported_flags(service.command_flags(), HELP) == ["--temperature-scale", "--draft-max"]
    with pytest.raises(UnsupportedServerArgumentError) as error:
        check_flags_supported(service.command_flags(), HELP, VERSION)
    message = str(error.value)
    assert "--temperature-scale" in message
    assert "--draft-max (the argument has been removed. use --spec-draft-n-max" in message
    assert VERSION in message
    assert "upgrade the pinned llama.cpp commit" in message
    assert "remove the field" in message


def test_a_typed_field_missing_from_the_binary_is_refused() -> None:
    older = HELP.model_copy(update={"flags": tuple(flag for flag in HELP.flags if flag not in ("--fit", "-fit"))})
    service = LlamaServer(name="s", model=MODEL, fit="off")
    with pytest.raises(UnsupportedServerArgumentError, match="does not support --fit"):
        check_flags_supported(service.command_flags(), older, VERSION)
    check_flags_supported(LlamaServer(name="s", model=MODEL).command_flags(), older, VERSION)


def test_spec_type_checks() -> None:
    check_spec_type_supported("draft-mtp", HELP, VERSION)
    check_spec_type_supported("ngram-mod,draft-simple", HELP, VERSION)
    with pytest.raises(UnsupportedServerArgumentError, match="draft-medusa.*allows none, draft-simple"):
        check_spec_type_supported("draft-medusa", HELP, VERSION)
    old = ServerFlags(flags=("--model",), removed={}, spec_types=(), choices={})
    with pytest.raises(UnsupportedServerArgumentError, match="has no --spec-type"):
        check_spec_type_supported("draft-mtp", old, VERSION)


# --- checkout (real git output) ---


def run_checkout(path: Path) -> list[str]:
    result = subprocess.run(["sh", "-c", checkout_command(str(path))], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=cwd, check=True)


def test_checkout_clean_dirty_and_origin(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "init")
    git(tmp_path, "remote", "add", "origin", "https://github.com/ggml-org/llama.cpp.git")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    checkout = parse_checkout(run_checkout(tmp_path))
    assert checkout is not None
    assert (checkout.commit, checkout.dirty, checkout.origin_url) == (
        sha,
        False,
        "https://github.com/ggml-org/llama.cpp.git",
    )
    assert checkout.path == str(tmp_path.resolve())
    (tmp_path / "patch.diff").write_text("x")
    dirty = parse_checkout(run_checkout(tmp_path))
    assert dirty is not None and dirty.dirty and dirty.changes == ("?? patch.diff",)


def test_checkout_without_origin(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "init")
    checkout = parse_checkout(run_checkout(tmp_path))
    assert checkout is not None and checkout.origin_url is None


def test_not_a_checkout(tmp_path: Path) -> None:
    assert run_checkout(tmp_path) == []
    assert run_checkout(tmp_path / "missing") == []
    assert parse_checkout([]) is None


def test_checkout_without_commit_raises(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    with pytest.raises(GitCheckoutError, match="git rev-parse HEAD failed"):
        parse_checkout(run_checkout(tmp_path))


def test_cache_types_are_the_pinned_binarys() -> None:
    """The spec's CacheType is exactly what the pinned --help allows for K and V."""
    assert HELP.choices["--cache-type-k"] == typing.get_args(CacheType)
    assert HELP.choices["--cache-type-v"] == typing.get_args(CacheType)
