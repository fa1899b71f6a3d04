"""`gpubox --help` describes every subcommand, and `gpubox report --help` names the file it writes by default."""

from __future__ import annotations

import argparse
import re

import pytest

from gpubox.cli import build_parser, main

DEFAULT_REPORT_PNG = "gpubox-report.png"  # what `gpubox report` writes without --png


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes


def _subcommands() -> list[str]:
    parser = build_parser()
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert len(actions) == 1
    return list(actions[0].choices)


def test_gpubox_help_describes_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help([], capsys)
    # the description, between the usage line and the argparse-made list of subcommands (which names them all)
    description = text.split("positional arguments:")[0].split(" ... ", 1)[1]
    subcommands = _subcommands()
    assert {"check", "plan", "smoke", "bench", "monitoring", "top", "report"} <= set(subcommands)
    missing = [name for name in subcommands if not re.search(rf"(?<![\w-]){name}(?![\w-])", description)]
    assert not missing, f"gpubox --help's description leaves out {missing}: {description!r}"


def test_report_help_names_the_default_png_in_the_working_directory(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["report"], capsys)
    assert f"--png PNG where to write the figure (default: {DEFAULT_REPORT_PNG} in the working directory" in text
    assert f"(./{DEFAULT_REPORT_PNG} unless --png)" in _help([], capsys)
