"""docs/reference.md, generated: every field of every spec, from the models and the flag tables.

Like NixOS's option list, one entry per field, written once where the field is declared: its
``Field(description=...)``. The rest is read off the code: the type from the annotation, the
default, and for a server's field the flag it renders (with its other spellings and the binary's
own default) from the server type's flag table. Each server type's rules follow its fields, one
line each, from the rule functions' docstrings. The models are found by walking the fields from
the roots (a host's ``Box``, the fleet's ``Monitoring``); where a field holds a ``Service``, the
server types are the registry's (``gpubox.servers.registry``), so a new server type is documented
once a box can run it.

    .venv/bin/python -m gpubox.reference --write     # regenerate docs/reference.md
    .venv/bin/python -m gpubox.reference --check     # exit 1 when it is stale (tests/test_reference.py)
    .venv/bin/python -m gpubox.reference             # print it
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import gpubox
from gpubox.gateway import Gateway
from gpubox.servers.base import Flag, Service, allow_from_rule, extra_args_rule, unauthenticated_stays_on_loopback
from gpubox.servers.registry import server_types

ROOTS: tuple[type[BaseModel], ...] = (gpubox.Box, gpubox.Monitoring, Gateway)
"""Where the walk starts: a host's ``box``, the fleet's ``monitoring`` and a host's ``gateway`` (the inventory's
data). The first two from the package's face, which documents what ``gpubox`` exports; the core itself never
reaches into gpubox.monitoring (tests/test_imports.py)."""
SHARED_RULES_BEFORE: tuple[Callable[[Any], Any], ...] = (unauthenticated_stays_on_loopback,)
SHARED_RULES_AFTER: tuple[Callable[[Any], Any], ...] = (extra_args_rule, allow_from_rule)
"""The rules every server type runs around its own ``RULES`` (``Service.rule_problems``)."""

REPOSITORY = Path(__file__).resolve().parent.parent
REFERENCE = REPOSITORY / "docs" / "reference.md"
REGENERATE = ".venv/bin/python -m gpubox.reference --write"


@dataclass(frozen=True)
class Section:
    """One model of the reference, and the fields of other models that hold it."""

    model: type[BaseModel]
    held_by: tuple[str, ...]


# --- which models ------------------------------------------------------------------------------------


def product_server_types() -> tuple[type[Service], ...]:
    """The registered server types gpubox ships (one an inventory or a test registers is not documented)."""
    return tuple(service_type for service_type in server_types() if service_type.__module__.startswith("gpubox."))


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The models an annotation names, in order: ``tuple[ExpectedGpu, ...] | None`` -> ExpectedGpu."""
    if annotation is Service:  # a Box's services: every registered server type
        yield from product_server_types()
        return
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return
    arguments = typing.get_args(annotation)
    if origin is typing.Annotated:
        arguments = arguments[:1]
    for argument in arguments:
        yield from _models_in(argument)


def sections(roots: Sequence[type[BaseModel]] = ROOTS) -> list[Section]:
    """Every model reachable from the roots, depth first in field order, each with its holders."""
    order: list[type[BaseModel]] = []
    holders: dict[type[BaseModel], list[str]] = {}

    def visit(model: type[BaseModel]) -> None:
        if model in order:
            return
        order.append(model)
        for name, field in model.model_fields.items():
            for held in _models_in(field.annotation):
                holders.setdefault(held, []).append(f"{model.__name__}.{name}")
                visit(held)

    for root in roots:
        visit(root)
    return [Section(model, tuple(holders.get(model, ()))) for model in order]


def models(roots: Sequence[type[BaseModel]] = ROOTS) -> list[type[BaseModel]]:
    """Every model the reference documents."""
    return [section.model for section in sections(roots)]


def undocumented_fields(documented: Iterable[type[BaseModel]]) -> list[str]:
    """``Model.field`` of every public field without a description."""
    return [
        f"{model.__name__}.{name}"
        for model in documented
        for name, field in model.model_fields.items()
        if not name.startswith("_") and not (field.description or "").strip()
    ]


# --- rendering values and types ----------------------------------------------------------------------


def _constraints(metadata: Iterable[Any]) -> list[str]:
    """``Field(ge=1, le=65535)`` -> ``['>= 1', '<= 65535']``."""
    words: list[str] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            words += _constraints(item.metadata)
        elif isinstance(item, annotated_types.Ge):
            words.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            words.append(f"<= {item.le}")
        elif isinstance(item, annotated_types.Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.MinLen):
            words.append(f"length >= {item.min_length}")
        elif isinstance(item, annotated_types.MaxLen):
            words.append(f"length <= {item.max_length}")
        elif getattr(item, "pattern", None) is not None:
            words.append(f"matching {item.pattern}")
    return words


def type_text(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """An annotation as a person reads it: ``int (>= 0) | 'auto' | 'all' | None``."""
    constraints = _constraints(metadata)
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(arguments[0], [*arguments[1:], *metadata])
    if annotation is None or annotation is type(None):
        text = "None"
    elif origin is typing.Literal:
        text = " | ".join(repr(value) for value in arguments)
    elif origin is typing.Union or origin is types.UnionType:
        # a field's constraints hold for its values, not for None or a literal: `int (>= 1) | None`
        plain = (type(None), typing.Literal)
        return " | ".join(
            type_text(argument, () if argument in plain or typing.get_origin(argument) in plain else metadata)
            for argument in arguments
        )
    elif origin is tuple:
        items = [type_text(argument) for argument in arguments if argument is not Ellipsis]
        text = f"tuple[{', '.join(items)}{', ...' if Ellipsis in arguments else ''}]"
    elif origin is not None:
        text = f"{getattr(origin, '__name__', origin)}[{', '.join(type_text(argument) for argument in arguments)}]"
    elif annotation is Service:
        text = " | ".join(service_type.__name__ for service_type in product_server_types())
    elif inspect.isclass(annotation):
        text = annotation.__name__
    else:
        text = str(annotation).replace("typing.", "")
    return f"{text} ({', '.join(constraints)})" if constraints else text


def value_text(value: Any) -> str:
    """A default as it is written in an inventory: ``'f16'``, ``None``, ``HostMonitoring()``."""
    if isinstance(value, BaseModel):
        changed = ", ".join(f"{name}={value_text(getattr(value, name))}" for name in sorted(value.model_fields_set))
        return f"{type(value).__name__}({changed})"
    return repr(value)


def code(text: str) -> str:
    """Inline code, whatever backticks the text holds."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def prose(docstring: str | None) -> str:
    """A docstring as one markdown paragraph: reST's ````x```` becomes ```x```, lines are joined."""
    text = inspect.cleandoc(docstring or "")
    return re.sub(r"\s+", " ", text.replace("``", "`")).strip()


def first_paragraph(docstring: str | None) -> str:
    return prose(inspect.cleandoc(docstring or "").split("\n\n")[0])


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _link(model: type[BaseModel]) -> str:
    return f"[{model.__name__}](#{_anchor(model)})"


def _source(model: type[BaseModel]) -> str:
    """Where a model is declared, relative to the repository: ``gpubox/servers/llama.py``."""
    path = Path(inspect.getfile(model)).resolve()
    try:
        return path.relative_to(REPOSITORY).as_posix()
    except ValueError:
        return model.__module__


def _flag_table_name(model: type[Service]) -> str | None:
    """The module-level name of a server type's flag table (``LLAMA_SERVER_FLAGS``)."""
    module = sys.modules[model.__module__]
    names = [name for name, value in vars(module).items() if value is model.FLAGS and name.isupper()]
    return names[0] if names else None


def _flag_lines(model: type[Service], name: str, field: FieldInfo) -> list[str]:
    flags = [flag for flag in model.FLAGS if flag.field == name]
    if not flags:
        return []
    (flag,) = flags
    return [f"- flag: {_flag_usage(flag, field)}", *_flag_default(flag)]


def _flag_usage(flag: Flag, field: FieldInfo) -> str:
    if flag.style == "switch":
        usage = f"{code(flag.flag)} when true, nothing when false"
    elif flag.style == "toggle":
        usage = f"{code(flag.flag)} when true, {code(flag.negative or '')} when false"
    elif any(True for _ in _models_in(field.annotation)):
        usage = f"{code(flag.flag)} with the file's `path`"
    else:
        usage = code(flag.flag)
    if flag.aliases:
        usage += f" (also spelled {', '.join(code(alias) for alias in flag.aliases)})"
    left_out = ([None] if _allows_none(field) else []) + ([flag.omit] if flag.omit is not None else [])
    if left_out:
        usage += f"; not rendered when {' or '.join(code(value_text(value)) for value in left_out)}"
    return usage


def _allows_none(field: FieldInfo) -> bool:
    return field.default is None or type(None) in typing.get_args(field.annotation)


def _flag_default(flag: Flag) -> list[str]:
    if flag.default is None:
        return []
    return [f"- the server's own default: {code(value_text(flag.default))}"]


# --- the page ------------------------------------------------------------------------------------------


def _field_entry(model: type[BaseModel], name: str, field: FieldInfo) -> list[str]:
    held = list(dict.fromkeys(_models_in(field.annotation)))
    type_line = f"- type: {code(type_text(field.annotation, field.metadata))}"
    if held:
        type_line += f" ({', '.join(_link(each) for each in held)})"
    default = "required" if field.is_required() else code(value_text(field.get_default(call_default_factory=True)))
    lines = [f"### `{model.__name__}.{name}`", "", (field.description or "").strip(), "", type_line]
    lines.append(f"- default: {default}")
    if issubclass(model, Service):
        lines += _flag_lines(model, name, field)
    return [*lines, ""]


def _rules(model: type[BaseModel]) -> list[Callable[[Any], Any]]:
    if not issubclass(model, Service):
        return []
    return [*SHARED_RULES_BEFORE, *model.RULES, *SHARED_RULES_AFTER]


def _section(section: Section) -> list[str]:
    model = section.model
    lines = [f"## {model.__name__}", "", first_paragraph(model.__doc__), ""]
    where = [f"Declared in {code(_source(model))}"]
    if section.held_by:
        where.append(f"held by {', '.join(code(holder) for holder in section.held_by)}")
    if issubclass(model, Service):
        table = _flag_table_name(model)
        program = " ".join((model.PROGRAM, *model.PROGRAM_ARGS))
        where.append(f"runs {code(program)}" + (f"; its flag table is {code(table)}" if table else ""))
    lines += ["; ".join(where) + ".", ""]
    for name, field in model.model_fields.items():
        if not name.startswith("_"):
            lines += _field_entry(model, name, field)
    rules = _rules(model)
    if rules:
        lines += [
            f"### {model.__name__} rules",
            "",
            "Run at validation, in this order; each refuses the field it names and says what to change.",
            "",
        ]
        lines += [f"- `{rule.__name__}`: {prose(rule.__doc__)}" for rule in rules]
        lines.append("")
    return lines


def render(roots: Sequence[type[BaseModel]] = ROOTS) -> str:
    """docs/reference.md's text."""
    found = sections(roots)
    lines = [
        "# Reference: every field",
        "",
        f"<!-- Generated from the models and flag tables: do not edit. Regenerate with `{REGENERATE}`. -->",
        "",
        "Every field of a box's specs and of the fleet's monitoring: its description (the field's "
        "`Field(description=...)`), its type and default and, for a server's field, the flag it renders and "
        "the server's own default, from its flag table. A server type's rules follow its fields; what each "
        "rule refuses, in a table: [refusals.md](refusals.md). The page is generated by "
        f"{code('gpubox/reference.py')} ({code(REGENERATE)}); {code('tests/test_reference.py')} fails when it "
        "is stale.",
        "",
    ]
    lines += [f"- {_link(section.model)}: {first_paragraph(section.model.__doc__)}" for section in found]
    lines.append("")
    for section in found:
        lines += _section(section)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpubox.reference", description="Generate docs/reference.md from the models and flag tables."
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write the page (default: print it)")
    action.add_argument("--check", action="store_true", help="exit 1 when the page is not what it would be")
    parser.add_argument("--path", type=Path, default=REFERENCE, help="the page (default: docs/reference.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.path.write_text(text)
        return 0
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is stale: regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
