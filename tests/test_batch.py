"""Several facts in one round trip: the batch runs each fact's own command and parser, for real."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from pyinfra.facts.files import File, FileContents

from facts.batch import Facts, _raw, values
from facts.systemd import ExistingUsers
from gpubox.batch import join_commands, split_outputs
from operations.host_facts import fact_name


def run(command: str) -> list[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()


def test_outputs_are_framed_with_their_exit_status() -> None:
    lines = run(join_commands(["echo one; echo two", "echo noise >&2; false", "printf 'no newline'"]))
    assert split_outputs(lines) == [(["one", "two"], 0), ([], 1), (["no newline"], 0)]
    with pytest.raises(ValueError, match="has no end"):
        split_outputs(["@@gpubox-fact 0", "cut"])


def test_the_batch_gives_what_each_fact_gives_alone(tmp_path: Path) -> None:
    model = tmp_path / "model file.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    reads = [
        (File, {"path": str(model)}),
        (File, {"path": str(tmp_path / "missing")}),
        (FileContents, {"path": str(tmp_path / "missing.stamp")}),  # FileContents' own marker for "missing"
        (FileContents, {"path": str(model)}),
        (ExistingUsers, {"names": ("root", "no-such-user-here")}),
    ]
    requests = tuple((fact_name(fact), tuple(sorted(arguments.items()))) for fact, arguments in reads)
    found = values(requests, Facts().process(run(Facts().command(requests=requests))))
    info, missing, no_stamp, contents, users = found
    assert info["size"] == 64 and isinstance(info["mtime"], datetime) and missing is None
    assert no_stamp is None and contents == [(b"GGUF" + bytes(60)).decode()]
    assert users == ["root"]
    # the same values as each fact's own command and parser, one by one
    for (fact, arguments), value in zip(reads, found, strict=True):
        alone = fact()
        lines = run(_raw(alone.command(**arguments)))
        assert (alone.process(lines) if lines else alone.default()) == value


def test_fact_names_are_what_pyinfra_fact_takes() -> None:
    assert fact_name(File) == "files.File" and fact_name(ExistingUsers) == "facts.systemd.ExistingUsers"
