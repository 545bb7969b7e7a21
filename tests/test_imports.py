"""The package's imports go one way (issue 26): no cycle between m3jax modules, no m3jax import inside a function.

Reads every m3jax/*.py with `ast` (nothing is imported), so it also sees imports that only run when a function is
called. Imports of third-party packages may stay lazy (torch, gcsfs, libtpu, sentence-transformers, ... are
optional or heavy); an import of an m3jax module may not: it hides an edge of the graph below, and often a cycle.
The layering that results is the README's code map ("Layers: imports go one way"), checked here too.
"""
import ast
import pathlib
import re

PACKAGE = "m3jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: pathlib.Path) -> str:
    """m3jax/core/storage.py -> m3jax.core.storage; a folder's __init__.py -> the folder's name."""
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
FOLDERS = sorted({name.rsplit(".", 1)[0] for name in MODULES if name.count(".") > 1})


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The m3jax modules an import statement loads (`from m3jax import x`: m3jax.x when x is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
    if node.level:  # relative: from . import x, from .x import y
        base = importer if MODULES[importer].stem == "__init__" else importer.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    if source != PACKAGE and not source.startswith(PACKAGE + "."):
        return []
    if source == PACKAGE or source in FOLDERS:  # from m3jax import x, from m3jax.core import storage
        return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    return [source]


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported m3jax module, line, inside a function) for every import statement of module `name`."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, child.lineno, in_function) for target in _targets(child, name))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(MODULES[name].read_text(), filename=str(MODULES[name])), False)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the m3jax modules it imports, at module level or in a function."""
    return {name: {target for target, _, _ in _imports(name) if target != name} for name in MODULES}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:  # a shortest closed path through the component's first module
        start = min(component)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            following = sorted(graph[path[-1]] & component)
            if start in following:
                cycles.append(path + [start])
                break
            for w in following:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_graph_reads_the_package():
    graph = import_graph()
    assert len(graph) > 30 and "m3jax.trainer" in graph
    assert {"m3jax.train.step", "m3jax.io.checkpoint", "m3jax.core.storage"} <= graph["m3jax.trainer"]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "m3jax import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_m3jax_import_inside_a_function():
    lazy = [f"{MODULES[name].relative_to(ROOT.parent)}:{line}: imports {target} inside a function"
            for name in MODULES for target, line, in_function in _imports(name) if in_function]
    assert not lazy, "import these at the top of the module (move shared pieces down if that makes a cycle):\n" + \
        "\n".join(lazy)


def readme_layers() -> dict[str, tuple[int, int]]:
    """module -> (floor, step within the floor) from the README's layer table: rows `| N | `folder/` | `a`, `b` -> `c` |`
    (a folder's modules by their names in it; `m3jax/` for the package's own top-level modules). A folder's
    `__init__` (a docstring, no imports) takes the floor of its row."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("### Layers: imports go one way"):].split("\n\n")[2]
    place = {}
    for row in table.splitlines()[2:]:
        floor, folder, modules = row.strip("|").split("|")[:3]
        folder = folder.strip().strip("`").rstrip("/")
        base = PACKAGE if folder == PACKAGE else f"{PACKAGE}.{folder}"
        if base != PACKAGE:
            place[base] = (int(floor), -1)
        for step, group in enumerate(modules.split("->")):
            for name in re.findall(r"`(\w+)`", group):
                place[base if name == "__init__" else f"{base}.{name}"] = (int(floor), step)
    return place


def test_readme_layers_match_the_imports():
    place, graph = readme_layers(), import_graph()
    assert sorted(place) == sorted(graph), "README's layer table: modules missing " + \
        f"{sorted(set(graph) - set(place))}, unknown {sorted(set(place) - set(graph))}"
    wrong = [f"{name} {place[name]} imports {target} {place[target]}" for name in sorted(graph)
             for target in sorted(graph[name]) if place[target] >= place[name]]
    assert not wrong, "README's layer table places a module at or below one it imports:\n" + "\n".join(wrong)


def test_folders_are_floors():
    """Each folder of the package is one floor of the layer table: every module in it sits on its folder's row."""
    place = readme_layers()
    for folder in FOLDERS:
        floors = {place[name][0] for name in MODULES if name == folder or name.startswith(folder + ".")}
        assert floors == {place[folder][0]}, f"{folder}: its modules sit on floors {sorted(floors)}"


def test_cycle_finder():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
