"""Text files written whole: staged beside the target, checked, renamed over it; the old one kept on request.

The one way gpubox writes a file it renders (units, drop-ins, Prometheus and Alertmanager configs,
scripts): a reader never sees half a file, a file its own checker refuses never replaces a working
one, and ``--diff`` shows the change as text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from io import StringIO

from pyinfra import host, state
from pyinfra.api import FileUploadCommand, operation
from pyinfra.facts.files import FileContents
from pyinfra.operations.util.files import generate_color_diff

from gpubox.quoting import shell_join, shell_word

from .host_facts import FactRead, read

STAGED_SUFFIX = ".gpubox-new"


def is_current(old_lines: list[str] | None, text: str) -> bool:
    return old_lines is not None and [line.rstrip("\n") for line in old_lines] == text.splitlines()


def log_diff(path: str, old_lines: list[str] | None, text: str) -> None:
    """With ``--diff``: the change as a colored text diff in the run's output."""
    if not state.config.DIFF:
        return
    host.log(f"{'Will create' if old_lines is None else 'Will modify'} {path}")
    for line in generate_color_diff([f"{line}\n" for line in old_lines or []], text.splitlines(True)):
        host.log(f"  {line}")


def write_commands(
    path: str,
    text: str,
    *,
    exists: bool,
    mode: str = "0644",
    group: str | None = None,
    check: Sequence[str] | None = None,
    keep_previous: str | None = None,
) -> Iterator[FileUploadCommand | str]:
    """Upload ``text`` beside ``path`` (its directory made when the file is new), run ``check`` on it
    (``{}`` names the staged file), keep the old file as ``keep_previous`` when there is one, then
    rename over ``path``. A refused file is removed."""
    staged = f"{path}{STAGED_SUFFIX}"
    quoted_staged, quoted = shell_word(staged), shell_word(path)
    if not exists:
        yield f"mkdir -p {shell_word(path.rsplit('/', 1)[0] or '/')}"
    yield FileUploadCommand(StringIO(text), staged)
    steps = [f"chmod {mode} {quoted_staged}"]
    if group is not None:
        steps.append(f"chgrp {shell_word(group)} {quoted_staged}")
    if check:
        command = shell_join(staged if word == "{}" else word for word in check)
        steps.append(f"{{ {command} || {{ rm -f {quoted_staged}; exit 1; }}; }}")
    if keep_previous is not None and exists:
        steps.append(f"cp -p {quoted} {shell_word(keep_previous)}")
    steps.append(f"mv -f {quoted_staged} {quoted}")
    yield " && ".join(steps)


def contents_read(path: str) -> FactRead:
    return FileContents, {"path": path}


def facts_read(path: str) -> list[FactRead]:
    """What `text_file` reads of `path` (for `host_facts.prefetch`)."""
    return [contents_read(path)]


@operation()
def text_file(  # type: ignore[no-untyped-def]
    path: str,
    text: str,
    mode: str = "0644",
    group: str | None = None,
    check: Sequence[str] | None = None,
    keep_previous: str | None = None,
):
    """
    Write a rendered text file whole: staged beside it, checked, renamed over it.

    + path: the file on the host
    + text: its whole content
    + mode: its mode (octal, as chmod takes it)
    + group: its group, when not root's
    + check: a command that must accept the staged file first (``{}`` is its path), e.g.
      ``["promtool", "check", "rules", "{}"]``; a refused file is removed and the old one stays
    + keep_previous: where the old file is copied before it is replaced (for rollback)

    **Example:**

    .. code:: python

        text_files.text_file(
            name="Prometheus rules", path="/etc/prometheus/gpubox-rules.yml", text=rules,
            check=["promtool", "check", "rules", "{}"],
        )
    """
    old_lines = read(contents_read(path))
    if is_current(old_lines, text):
        host.noop(f"{path} is up to date")
        return
    log_diff(path, old_lines, text)
    yield from write_commands(
        path, text, exists=old_lines is not None, mode=mode, group=group, check=check, keep_previous=keep_previous
    )
