"""The README's and docs' examples come from real runs, and stay true: re-run them and compare.

- A fenced block right after `<!-- example: gpubox ARGS -->` is that command's real output (run in this
  process, from the repository root, 120 columns wide). A text block may open with `$ gpubox ARGS`; a line
  `...` in it stands for any number of lines left out. A `json` block must equal the output's JSON.
  `<!-- example: gpubox ARGS (VARIANT) -->` runs the command on a copy of the inventory edited as VARIANTS says.
- Every `gpubox SUBCOMMAND --option` shown (shell blocks, `$ ` lines, inline code) exists in `gpubox --help`.
- Relative links between the pages resolve, anchors included; paths named in code exist.
- The `.cache/e2e-report.json` keys and e2e tests docs/measured.md names still exist.
- The README's Layout block names the repository's top level; docs/layout.md names every file of the
  folders it describes.

After a change of output: `.venv/bin/python tests/test_readme_examples.py --update` re-pastes every
example block without `...` (and prints the real output of those with it, to edit by hand).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: `python tests/test_readme_examples.py --update`
    sys.path.insert(0, str(ROOT))

from gpubox.cli import main  # noqa: E402

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
WIDTH = "120"

# An inventory edit per variant name: (what it shows, old text, new text).
WHISPER_ON_GPU1 = 'whisper = WhisperServer(\n    name="whisper",\n    gpus=(1,),'
VARIANTS: dict[str, Callable[[str], str]] = {
    "whisper on GPU 0": lambda text: text.replace(WHISPER_ON_GPU1, WHISPER_ON_GPU1.replace("(1,)", "(0,)")),
}

EXAMPLE = re.compile(
    r"<!-- example: (?P<command>gpubox [^()]*?)(?: \((?P<variant>[^)]+)\))? -->\n"
    r"```(?P<lang>\w*)\n(?P<body>.*?)^```",
    re.S | re.M,
)
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_]+=\S+ )*(?:\.venv/bin/)?gpubox (?P<rest>.*)$")
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Example:
    page: Path
    command: str
    variant: str | None
    lang: str
    body: str
    span: tuple[int, int]  # of the body in the page's text

    def __str__(self) -> str:
        variant = f" ({self.variant})" if self.variant else ""
        return f"{self.page.relative_to(ROOT)}: {self.command}{variant}"


def examples(page: Path) -> list[Example]:
    text = page.read_text()
    return [
        Example(page, m["command"], m["variant"], m["lang"], m["body"], m.span("body")) for m in EXAMPLE.finditer(text)
    ]


ALL_EXAMPLES = [example for page in PAGES for example in examples(page)]


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_gpubox(args: list[str]) -> tuple[int, str]:
    """`gpubox ARGS` in this process, from the repository root, 120 columns wide: (exit code, stdout)."""
    out = io.StringIO()
    with environment(COLUMNS=WIDTH), contextlib.chdir(ROOT), contextlib.redirect_stdout(out):
        try:
            code = main(args)
        except SystemExit as stop:  # --help
            code = int(stop.code or 0)
    return code, out.getvalue()


def real_output(example: Example) -> str:
    args = example.command.split()[1:]
    if example.variant is None:
        return run_gpubox(args)[1]
    edit = VARIANTS[example.variant]
    with tempfile.TemporaryDirectory() as directory:
        edited = []
        for arg in args:
            if arg.startswith("inventory/") and arg.endswith(".py"):
                original = (ROOT / arg).read_text()
                changed = edit(original)
                assert changed != original, f"variant {example.variant!r} changes nothing in {arg}"
                copy = Path(directory) / Path(arg).name
                copy.write_text(changed)
                headers = Path(directory) / "gguf-headers"  # as if edited in place: its headers next to it
                if not headers.exists():
                    headers.symlink_to(ROOT / Path(arg).parent / "gguf-headers")
                arg = str(copy)
            edited.append(arg)
        return run_gpubox(edited)[1]


def lines(text: str) -> list[str]:
    found = [line.rstrip() for line in text.splitlines()]
    while found and not found[-1]:
        found.pop()
    return found


def matches(shown: list[str], real: list[str]) -> bool:
    """`shown` is `real` with runs of lines replaced by `...` lines."""
    segments: list[list[str]] = [[]]
    for line in shown:
        if line.strip() == "...":
            segments.append([])
        else:
            segments[-1].append(line)
    if len(segments) == 1:
        return shown == real
    first, *middle, last = segments
    if real[: len(first)] != first or (last and real[-len(last) :] != last):
        return False
    position, end = len(first), len(real) - len(last)
    if position > end:
        return False
    for segment in middle:
        while position + len(segment) <= end and real[position : position + len(segment)] != segment:
            position += 1
        if position + len(segment) > end:
            return False
        position += len(segment)
    return True


def shown_output(example: Example) -> list[str]:
    shown = lines(example.body)
    if shown and shown[0].startswith("$ "):
        assert shown[0] == f"$ {example.command}", f"{example}: the block's prompt line is {shown[0]!r}"
        shown = shown[1:]
    return shown


def test_the_examples_are_found() -> None:
    commands = {(example.command, example.variant) for example in ALL_EXAMPLES}
    assert ("gpubox check inventory/home.py", None) in commands
    assert ("gpubox plan inventory/home.py --json", None) in commands
    assert ("gpubox plan inventory/home.py", None) in commands


@pytest.mark.parametrize("example", ALL_EXAMPLES, ids=str)
def test_an_example_is_the_real_output(example: Example) -> None:
    real = real_output(example)
    if example.lang == "json":
        assert json.loads(example.body) == json.loads(real), (
            f"{example} differs from the real output; re-paste it "
            f"(.venv/bin/python tests/test_readme_examples.py --update):\n{real}"
        )
        return
    shown = shown_output(example)
    assert shown, f"{example}: empty block"
    assert matches(shown, lines(real)), (
        f"{example} differs from the real output; re-paste it "
        f"(.venv/bin/python tests/test_readme_examples.py --update):\n{real}"
    )


def test_the_plan_json_shows_both_gpus_and_the_reserve() -> None:
    """The seed box has two GPUs and a reserve on GPU 0: the example shows them (issue 20)."""
    (example,) = [e for e in ALL_EXAMPLES if e.command == "gpubox plan inventory/home.py --json"]
    (host,) = json.loads(example.body)["hosts"]
    assert [gpu["index"] for gpu in host["gpus"]] == [0, 1]
    assert host["gpus"][0]["reserved_bytes"] > 0


# --- every `gpubox ...` shown exists ---------------------------------------------------------------


def shown_commands(page: Path) -> list[str]:
    """The `gpubox` command lines a page shows: shell blocks, `$ ` lines, inline code."""
    text = page.read_text()
    example_bodies = [example.span for example in examples(page)]
    found: list[str] = []
    for fence in FENCE.finditer(text):
        is_example = any(start <= fence.start("body") < end for start, end in example_bodies)
        for line in fence["body"].splitlines():
            line = line.strip()
            if fence["lang"] in SHELL or (line.startswith("$ ") and not is_example):
                found.append(line.split(" # ")[0].split("   #")[0].strip())
    prose = FENCE.sub("", text)
    found += INLINE.findall(prose)
    return [line for line in found if COMMAND.match(line)]


def help_text(*args: str) -> str:
    code, out = run_gpubox([*args, "--help"])
    assert code == 0
    return out


def subcommands() -> set[str]:
    usage = re.search(r"\{([a-z,-]+)\}", help_text())
    assert usage, "no {subcommands} in gpubox --help"
    return set(usage[1].split(","))


def test_every_gpubox_command_shown_exists() -> None:
    known = subcommands()
    options: dict[str, set[str]] = {}
    wrong = []
    for page in PAGES:
        for line in shown_commands(page):
            match = COMMAND.match(line)
            assert match
            sub, *_ = match["rest"].split() or [""]
            if sub.startswith("-"):  # `gpubox --help`
                sub, match_rest = "", match["rest"]
            else:
                match_rest = match["rest"][len(sub) :]
            if sub and sub not in known:
                wrong.append(f"{page.relative_to(ROOT)}: {line!r}: no subcommand {sub!r} in gpubox --help")
                continue
            if sub not in options:
                options[sub] = set(re.findall(r"--[a-z][\w-]*", help_text(*([sub] if sub else []))))
            for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", match_rest):
                if option not in options[sub]:
                    wrong.append(f"{page.relative_to(ROOT)}: {line!r}: gpubox {sub} has no {option}")
    assert not wrong, "\n".join(wrong)


def test_the_readme_shows_commands() -> None:
    assert any(line.startswith("gpubox check") for line in shown_commands(README))


# --- links, paths, layout --------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m[1]) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


def test_links_between_the_pages_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target}: no heading #{anchor}")
    assert not broken, "\n".join(broken)


REPO_PATH = re.compile(r"(?<![\w./{-])((?:deploys|docs|facts|gpubox|inventory|operations|scripts|tests)/[\w./*<>-]*)")


def test_paths_named_in_code_exist() -> None:
    """Every repository path in inline code or a shell block of the README and the pages written for it."""
    missing = []
    for page in PAGES:
        if page.name == "gpu-validation.md":  # the GPU machine's report: paths there are the machine's
            continue
        text = page.read_text()
        code = INLINE.findall(FENCE.sub("", text))
        code += [fence["body"] for fence in FENCE.finditer(text) if fence["lang"] in SHELL]
        for snippet in code:
            for path in REPO_PATH.findall(snippet):
                path = path.split("::")[0].rstrip(".")
                if any(char in path for char in "*<"):
                    continue
                if not (ROOT / path).exists():
                    missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(missing)


E2E_KEY = re.compile(r"^(?:(?:speech|observability) .+|[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?:\.[a-z_]+)?)$")


def test_the_measured_numbers_name_keys_the_e2e_tests_record() -> None:
    """docs/measured.md names `.cache/e2e-report.json` keys and e2e tests: each must still exist."""
    e2e = "\n".join(path.read_text() for path in sorted((ROOT / "tests" / "e2e").glob("*.py")))
    recorded = set(re.findall(r'record\(\s*"([^"]+)"', e2e))
    named = [span for span in INLINE.findall((ROOT / "docs" / "measured.md").read_text()) if E2E_KEY.match(span)]
    assert named
    missing = []
    for span in named:
        if span.endswith(" ..."):
            continue
        if span.startswith("test_"):
            if f"def {span}(" not in e2e:
                missing.append(f"no e2e test {span}")
        elif (span if " " in span else span.split(".")[0]) not in recorded:
            missing.append(f"no e2e test records {span!r}")
    assert not missing, "\n".join(missing)


def repository_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore (the suite runs in a git checkout, CI's clone too)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    return [name for name in listed if name and (ROOT / name).exists()]


def section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section '## {heading}'"
    return match[1]


def test_the_readme_layout_matches_the_top_level_tree() -> None:
    block = FENCE.search(section(README.read_text(), "Layout"))
    assert block, "the README's Layout section has no block"
    shown = {line.split()[0] for line in block["body"].splitlines() if line and not line[0].isspace()}
    top = {name.split("/")[0] + ("/" if "/" in name else "") for name in repository_files()}
    top = {name for name in top if not name.startswith(".") and name != "README.md"}
    assert shown == top


# Folders docs/layout.md must describe file by file (its `## folder/` sections).
DESCRIBED_WHOLE = ("gpubox/", "gpubox/servers/", "gpubox/monitoring/", "facts/", "operations/", "deploys/", "scripts/")
LEFT_OUT = {"__init__.py", "py.typed"}


def test_docs_layout_names_every_file_of_its_folders() -> None:
    text = (ROOT / "docs" / "layout.md").read_text()
    files = repository_files()
    problems = []
    for folder in DESCRIBED_WHOLE:
        named = set(INLINE.findall(section(text, f"`{folder}`")))
        entries = {name[len(folder) :].split("/")[0] + ("/" if "/" in name[len(folder) :] else "")
                   for name in files if name.startswith(folder)}  # fmt: skip
        problems += [f"{folder}{entry} is not in docs/layout.md" for entry in sorted(entries - LEFT_OUT - named)]
        problems += [
            f"docs/layout.md names {folder}{name}, which is not there"
            for name in sorted(named)
            if name.endswith(".py") and "/" not in name and name not in entries
        ]
    assert not problems, "\n".join(problems)


# --- re-paste -------------------------------------------------------------------------------------------------


def update() -> int:
    """Re-paste every example block without `...`; print the real output of those with it."""
    by_hand = 0
    for page in PAGES:
        text = page.read_text()
        for example in reversed(examples(page)):
            real = real_output(example)
            if example.lang == "json":
                body = json.dumps(json.loads(real), indent=2) + "\n"
            elif any(line.strip() == "..." for line in lines(example.body)):
                if not matches(shown_output(example), lines(real)):
                    by_hand += 1
                    print(f"--- {example}: abbreviated with '...', edit by hand; the real output:\n{real}")
                continue
            else:
                body = f"$ {example.command}\n" + "\n".join(lines(real)) + "\n"
            start, end = example.span
            text = text[:start] + body + text[end:]
        if text != page.read_text():
            page.write_text(text)
            print(f"updated {page.relative_to(ROOT)}")
    return 1 if by_hand else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    sys.exit(update())
