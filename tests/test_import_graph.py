"""fastvae has no import loop, counting imports inside functions and the package's lazy public names.

Every module of the installed package (fastvae/, kernels/ as fastvae.kernels, export/ as fastvae.export) is
parsed with ast; every import statement anywhere in it (module level, functions, methods; not the
``if TYPE_CHECKING:`` blocks, which never run) is an edge, and so is each lazy name of a package's
``_LAZY`` map (``import fastvae`` then ``fastvae.train`` imports fastvae.trainer). The graph must be acyclic.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "fastvae": ROOT / "fastvae",
    "fastvae.bench": ROOT / "fastvae" / "bench",
    "fastvae.kernels": ROOT / "kernels",
    "fastvae.export": ROOT / "export",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, (ast.Name, ast.Attribute))
        and (getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING")
    )


def _walk(node: ast.AST):
    """ast.walk without the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            continue
        yield child
        yield from _walk(child)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastvae modules ``name`` imports anywhere in its code."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.stem == "__init__"
    out: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:  # `from pkg import sub` imports the submodule; else the module itself
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            out |= {v.value for v in node.value.values if isinstance(v, ast.Constant)}  # lazy public names
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_checker_finds_a_cycle_and_the_edges_it_must_count():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    g = _graph()
    assert "fastvae.trainer" in g["fastvae"]  # the lazy `fastvae.train`
    assert "fastvae.kernels.vae" in g["fastvae.fused"]  # imported inside a method
    snippet = ast.parse("if TYPE_CHECKING:\n    import a\ndef f():\n    import b\n")
    assert [n.names[0].name for n in _walk(snippet) if isinstance(n, ast.Import)] == ["b"]


def test_fastvae_has_no_import_loop():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)
