"""The shape of the import graph: gpubox's modules import each other without a cycle, the pyinfra
operations and facts don't reach into the CLI, and the product doesn't import its tests."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = ("gpubox.cli", "gpubox.cli_client", "gpubox.cli_monitoring", "gpubox.cli_plan")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import, at module level or inside functions, except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        for child in node.orelse if isinstance(node, ast.If) and _is_type_checking(node) else [node]:
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            yield from _import_nodes(child)


def imported_names(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """Absolute dotted names a module imports, with the line: ``from a import b`` gives ``a.b``
    (which is ``a`` itself when ``b`` isn't a module)."""
    is_package = path.name == "__init__.py"
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
            continue
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor if is_package else anchor[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            yield f"{base}.{alias.name}", node.lineno


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names or lies in."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _ in imported_names(module, path):
            target = _resolve(name, modules)
            if target and target != module:
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            cycle = visit(nxt, [*stack, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imported_names_resolve_relative_lazy_and_skip_type_checking(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import a\n"
        "from ..b import c\n"
        "import x.y\n"
        "if TYPE_CHECKING:\n    import only.typing\n"
        "def f():\n    from gpubox import cli_plan\n"
    )
    names = [name for name, _ in imported_names("pkg.sub.mod", path)]
    assert names == ["typing.TYPE_CHECKING", "pkg.sub.a", "pkg.b.c", "x.y", "gpubox.cli_plan"]
    known = {"gpubox": path, "gpubox.spec": path}
    assert _resolve("gpubox.spec.LlamaServer", known) == "gpubox.spec"
    assert _resolve("gpubox.Box", known) == "gpubox"
    assert _resolve("pydantic.BaseModel", known) is None


def test_gpubox_import_graph_has_no_cycle() -> None:
    graph = import_graph("gpubox")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among gpubox modules: " + " -> ".join(cycle or [])


def test_operations_and_facts_do_not_import_the_cli() -> None:
    offenders = []
    for package in ("operations", "facts"):
        for module, path in _modules(package).items():
            for name, line in imported_names(module, path):
                if any(name == cli or name.startswith(cli + ".") for cli in CLI_MODULES):
                    offenders.append(f"{module} ({path.relative_to(REPO)}:{line}) imports {name}")
    assert not offenders, "operations/facts must not depend on the CLI:\n" + "\n".join(offenders)


def test_the_product_does_not_import_the_tests() -> None:
    offenders = [
        f"{module} ({path.relative_to(REPO)}:{line}) imports {name}"
        for package in ("gpubox", "operations", "facts")
        for module, path in _modules(package).items()
        for name, line in imported_names(module, path)
        if name == "tests" or name.startswith("tests.")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_core_does_not_import_the_monitoring_package() -> None:
    """The monitoring is derived from the core (the Box, its specs): the arrow runs one way. Only the
    package's face (``gpubox/__init__``) and the CLI reach into gpubox.monitoring."""
    allowed = {"gpubox", *CLI_MODULES}
    offenders = [
        f"{module} ({path.relative_to(REPO)}:{line}) imports {name}"
        for module, path in _modules("gpubox").items()
        if module not in allowed and not module.startswith("gpubox.monitoring")
        for name, line in imported_names(module, path)
        if name.startswith("gpubox.monitoring")
    ]
    assert not offenders, "\n".join(offenders)


SERVER_ROOMS = ("gpubox.servers.llama", "gpubox.servers.whisper", "gpubox.servers.piper")
"""The product's server types' modules: only gpubox/servers/ (and the package's face) imports them."""
PRODUCT = ("gpubox", "operations", "facts", "deploys")


def _type_tags() -> set[str]:
    from gpubox.servers import server_types

    return {service_type.type_tag() for service_type in server_types()}


def test_no_module_outside_the_servers_imports_a_server_type() -> None:
    """Behaviour is behind the service's methods: the rest of the product calls them and never asks which
    type a service is (type-only imports, under ``if TYPE_CHECKING:``, don't count)."""
    offenders = [
        f"{module} ({path.relative_to(REPO)}:{line}) imports {name}"
        for package in PRODUCT
        for module, path in _modules(package).items()
        if module != "gpubox" and not module.startswith("gpubox.servers")
        for name, line in imported_names(module, path)
        if any(name == room or name.startswith(room + ".") for room in SERVER_ROOMS)
    ]
    assert not offenders, "\n".join(offenders)


def type_tag_comparisons(path: Path, tags: set[str]) -> Iterator[int]:
    """The lines of ``path`` that compare a value with a server type's tag (``== "llama-server"``, ``in``)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            constants = [
                element
                for operand in operands
                for element in (operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand])
            ]
            if any(isinstance(item, ast.Constant) and item.value in tags for item in constants):
                yield node.lineno


def test_type_tag_comparisons_are_found(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text('a = 1\nif row.type == "llama-server":\n    pass\nb = kind in ("x", "piper")\nc = "piper"\n')
    assert list(type_tag_comparisons(path, {"llama-server", "piper"})) == [2, 4]


def test_no_module_outside_the_servers_compares_a_type_tag() -> None:
    tags = _type_tags()
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for package in PRODUCT
        for module, path in _modules(package).items()
        if not module.startswith("gpubox.servers")
        for line in type_tag_comparisons(path, tags)
    ]
    assert not offenders, "a type tag compared outside gpubox/servers/:\n" + "\n".join(offenders)


UNUSED_BY_A_BOX_DEPLOY = ("numpy", "gguf", "grafana_foundation_sdk", "prometheus_client", "rich")
"""Packages a box deploy's no-op never calls, each 20-100 ms of imports: gguf's package (numpy with it;
the header reader takes its constants module alone), Grafana's SDK and prometheus_client (the
monitoring's own deploy renders their files), rich (imported where a table is drawn: a GPU box's VRAM
budget, a smoke test's result)."""


def test_the_box_deploy_loads_no_package_it_does_not_use() -> None:
    """A no-op run of deploys/danarch4090.py is mostly imports: what it imports (and the inventory's
    gpubox), imported in a fresh interpreter, loads none of UNUSED_BY_A_BOX_DEPLOY."""
    known = {**_modules("operations"), **_modules("gpubox")}
    deploy = REPO / "deploys" / "danarch4090.py"
    modules = {_resolve(name, known) for name, _ in imported_names("deploys.danarch4090", deploy)}
    imported = sorted({"gpubox", *(module for module in modules if module is not None)})
    assert "operations.box_state" in imported and "operations.monitoring" in imported
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[2:]: importlib.import_module(name)\n"
        "print(sorted(set(sys.argv[1].split(',')) & {name.split('.')[0] for name in sys.modules}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, ",".join(UNUSED_BY_A_BOX_DEPLOY), *imported],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "[]"
