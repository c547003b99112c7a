"""Structure checks: the package's imports form no cycle, and the README's registry tables are
the ones the registries generate."""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tools" / "convert_checkpoint"
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _module_name(path: pathlib.Path) -> str:
    parts = ["convert_checkpoint", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at module level or inside functions; not ``if TYPE_CHECKING:``
    blocks (annotations only, never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # "from pkg import sub" imports the submodule; "from mod import attr" the module.
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for target in targets:
                # Importing a.b.c runs a/__init__ and a/b/__init__ first (except the importer's own ancestors).
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_package_imports_have_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and graph["convert_checkpoint.pipeline"], "the walker found the package"
    assert cycles(graph) == []


def test_cycle_detector_finds_a_cycle():
    # The negative control: the walker and Tarjan report a planted cycle.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_executor_knows_no_format():
    """The executor, pipeline and API name no format or direction: they go through endpoints."""
    for module in ("execute.py", "pipeline.py", "api.py", "describe.py", "manifest.py", "report.py"):
        source = (PACKAGE / module).read_text()
        for word in ("mcore_legacy", "endpoints.huggingface", "\"mcore\"", "'mcore'", "->mcore", "hf->",
                     "safetensors_io", "rank_file", "TRACKER", "INDEX_NAME"):
            assert word not in source, (module, word)


@pytest.mark.parametrize("name", ["formats", "converters", "convertors", "loongforge_flags"])
def test_readme_tables_come_from_the_registries(name):
    from convert_checkpoint.docs import registry_tables

    table = registry_tables()[name]
    assert table.count("\n") >= 3
    assert table in README.read_text(), (
        f"README.md lacks the current {name} table; paste the output of `python -m convert_checkpoint.docs`")


def test_help_lists_registered_names(capsys):
    from convert_checkpoint.cli import main
    from convert_checkpoint.converters.registry import BUILTINS
    from convert_checkpoint.endpoints import ENDPOINTS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ENDPOINTS.names() + BUILTINS.names():
        assert name in text, name
    assert os.path.basename(str(PACKAGE)) == "convert_checkpoint"
