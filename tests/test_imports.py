"""The package's import graph has no cycle (parsed with ``ast``, every import statement,
function-level ones included).

Nodes are seqjax's modules (a package is its ``__init__``); an edge ``a -> b`` is an import
of ``b`` written in ``a`` (``import seqjax.b``, ``from seqjax import b``, ``from seqjax.b import
x``, relative forms). The implicit import of a parent package by Python is not an edge.
"""

import ast
import pathlib

import seqjax

ROOT = pathlib.Path(seqjax.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = ("seqjax",) + p.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: pathlib.Path, mods) -> set[str]:
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "seqjax"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "seqjax":
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in mods else base)
    return {m for m in out if m in mods and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle met by a depth-first search (empty: the graph is acyclic)."""
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_graph_sees_known_edges():
    g = import_graph()
    assert "seqjax.cells._core" in g["seqjax.cells.lstm"]
    assert "seqjax.unroll" in g["seqjax.spectrum.jacobians"]
    assert "seqjax._scan" in g["seqjax.unroll"]


def test_import_graph_is_acyclic():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_bottom_modules_import_nothing_of_seqjax():
    g = import_graph()
    assert g["seqjax._scan"] == set() and g["seqjax._util"] == set()
