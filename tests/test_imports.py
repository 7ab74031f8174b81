"""The package's layers import one way (ARCHITECTURE.md), with no cycles.

errors -> config -> ops -> parallel -> model -> data -> train, checkpoint -> infer, eval, plan
-> api -> cli: a module may import its own layer and the layers before it, never a later one.
Every import statement counts, function-local ones too (read from the source with `ast`, nothing
is executed). Cycles are refused between modules and between the subpackages.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gigajax"
LAYERS = [("errors",), ("config",), ("ops",), ("parallel",), ("model",), ("data",),
          ("train", "checkpoint"), ("infer", "eval", "plan"), ("api",), ("cli",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from a import b` imports a.b when that is a module, else a's attribute b
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> str | None:
    """The layer a module belongs to (`gigajax.train.loop` -> train); None for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = itertools.count()

    def visit(v: str) -> None:
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_layer():
    unknown = sorted(m for m in modules() if layer_of(m) not in RANK and m != "gigajax")
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_no_import_against_the_layer_order():
    violations = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets)
                  if a != "gigajax" and layer_of(b) in RANK and layer_of(a) in RANK
                  and RANK[layer_of(b)] > RANK[layer_of(a)]]
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_only_the_package_root_imports_the_package_root():
    """`gigajax/__init__.py` is the public API (it imports everything); inside the package a
    module names what it uses, so `from gigajax import x` of a non-module is not allowed."""
    offenders = [a for a, targets in graph().items() if "gigajax" in targets and a != "gigajax"]
    assert not offenders, offenders


def test_no_cycle_between_modules():
    assert not cycles(graph())


def test_no_cycle_between_subpackages():
    package_edges: dict[str, set[str]] = {}
    for a, targets in graph().items():
        for b in targets:
            pa, pb = layer_of(a), layer_of(b)
            if pa and pb and pa != pb:
                package_edges.setdefault(pa, set()).add(pb)
    assert not cycles(package_edges)


def test_the_walker_sees_function_local_and_relative_imports(tmp_path):
    """A control: the walker finds imports inside functions and relative ones."""
    source = ("def f():\n    from gigajax.cli import main\n    from . import store\n"
              "    import gigajax.api\n")
    path = tmp_path / "x.py"
    path.write_text(source)
    known = {"gigajax.cli", "gigajax.data.store", "gigajax.api", "gigajax.data.x"}
    assert imports_of("gigajax.data.x", path, known) == {"gigajax.cli", "gigajax.data.store",
                                                         "gigajax.api"}
