"""The package's layers (issue 30): no two modules of gflow import each other, directly
or through others, and no module imports a private name (``_x``) of another. Read from
the sources' import statements (also those inside functions, which is where a cycle
used to hide)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gflow"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, str | None]]]:
    """``{module: [(imported module, name or None), ...]}`` over gflow's modules."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, list] = {}
    for mod, path in modules.items():
        got = []
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                got += [(a.name, None) for a in node.names if a.name.startswith("gflow")]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                if not base.startswith("gflow"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    got.append((sub, None) if sub in modules else (base, a.name))
        out[mod] = got
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _graph(imports) -> dict[str, set[str]]:
    graph = {}
    for mod, got in imports.items():
        # a package's __init__ re-exports its modules: an import of the package counts as
        # an import of it, and its own imports of its modules do not make cycles
        faces = ("gflow", "gflow.dynamics")
        graph[mod] = {m for m, _ in got if m in imports and m != mod
                      and not (m.startswith(mod + ".") and mod in faces)}  # fmt: skip
    return graph


def test_no_module_imports_another_that_imports_it_back():
    cycles = _cycles(_graph(_imports()))
    assert not cycles, cycles


def test_no_module_imports_a_private_name_of_another():
    bad = [(mod, f"{src}.{name}") for mod, got in _imports().items() for src, name in got
           if name is not None and name.startswith("_") and not name.endswith("__")
           and src != mod]  # fmt: skip
    assert not bad, bad


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The checks can fail: a cycle made by an import inside a function is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert _cycles(graph) == [["a", "b"]]
    tree = ast.parse("def f():\n    from gflow.x import _y\n")
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert found and found[0].names[0].name == "_y"
