"""The import layering of raypipe, read from the source (ast), so a new cycle or a wrong-way import fails here
before anyone has to untangle it (issue #12).

Every ``import`` / ``from ... import`` counts, function-local ones included: a lazy import still ties the two
modules together. Imports under ``if TYPE_CHECKING:`` do not, since they never run. Rules:

- no import cycle between raypipe's modules, nor between its packages (``raypipe.io``, ``raypipe.embed``, ...
  and the top-level modules, each a node of its own);
- the model code (``raypipe.models``, ``losses``, ``metrics``, ``corruptions``) imports no ``ray``: it must run in
  a plain Python process (notebooks, the pyfunc wrapper, unit tests);
- ``raypipe.io`` owns bytes and imports nothing from the stages (``embed``, ``train``, ``label``, ``tune``).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import raypipe

ROOT = Path(raypipe.__file__).resolve().parent
NO_RAY = ("raypipe.models", "raypipe.losses", "raypipe.metrics", "raypipe.corruptions")
IO_MUST_NOT_IMPORT = ("raypipe.embed", "raypipe.train", "raypipe.label", "raypipe.tune")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is package) for every .py file of the raypipe package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["raypipe", *path.relative_to(ROOT).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """All nodes of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


@cache
def imports_of(name: str) -> frozenset[str]:
    """Absolute dotted names imported (at runtime) by module ``name``; ``from pkg import sub`` names ``pkg.sub``."""
    path, is_pkg = MODULES[name]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return frozenset(out)


def _owner(dotted: str) -> str | None:
    """The raypipe module that ``dotted`` lives in (``raypipe.io.fs.join`` -> ``raypipe.io.fs``)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = {_owner(i) for i in imports_of(name) if i == "raypipe" or i.startswith("raypipe.")}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def package_of(module: str) -> str:
    """``raypipe.io.fs`` -> ``raypipe.io``; top-level modules (``raypipe.train``) are their own node."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for src, targets in module_graph().items():
        # raypipe/__init__ (the version string) is a leaf everyone may read: not a package of its own here
        graph.setdefault(package_of(src), set()).update(
            package_of(t) for t in targets if t != "raypipe" and package_of(t) != package_of(src))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_walker_sees_local_and_relative_imports():
    """Guards the checks below against passing vacuously: the graph must contain edges we know exist."""
    graph = module_graph()
    assert len(MODULES) > 30
    assert "raypipe.io.fs" in graph["raypipe.embed.pipeline"]
    assert "raypipe.config" in graph["raypipe.cli"]
    # a function-local import (embed_videos reads WBDC/YT-8M corpora through the importers)
    assert "raypipe.embed.importers" in graph["raypipe.embed.pipeline"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle)


def test_no_import_cycle_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_model_code_imports_no_ray():
    bad = {name: sorted(i for i in imports_of(name) if i == "ray" or i.startswith("ray."))
           for name in MODULES if package_of(name) in NO_RAY}
    checked = [n for n in MODULES if package_of(n) in NO_RAY]
    assert len(checked) >= 5, checked
    assert not {k: v for k, v in bad.items() if v}, f"model code importing ray: { {k: v for k, v in bad.items() if v} }"


def test_io_imports_no_stage():
    graph = module_graph()
    bad = {name: sorted(t for t in targets if package_of(t) in IO_MUST_NOT_IMPORT)
           for name, targets in graph.items() if package_of(name) == "raypipe.io"}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"raypipe.io imports a stage (io owns bytes, stages own models): {bad}"
