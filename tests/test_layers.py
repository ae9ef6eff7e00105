"""The package's layers: every import of a pcbtl module points down, and none goes round.

Layers, bottom to top (a module may import its own layer and those below):

0. ``_validation``, ``_files`` — argument checks, atomic file writing;
1. the maths — ``kl``, ``priors``, ``models``, ``networks``, ``tangent``, ``interweave``,
   ``predictive``, ``simulation``, ``plots`` and ``classification`` (source, priors, models);
2. ``inference`` — model + arguments → posterior; knows no estimator;
3. ``estimators`` — the scikit-learn estimators and the registry;
4. ``evaluation`` — metrics and scoring;
5. ``materials`` (data, features, band gap) and ``jobs`` (demo, study, batch);
6. ``cli`` — argument parsing.

The package root ``pcbtl/__init__.py`` re-exports the public names and stands above all.
Imports of pcbtl inside functions are refused too (they hid the old cycles): function-local
imports are for optional third-party packages only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pcbtl"

LAYERS = {
    "_validation": 0,
    "_files": 0,
    "kl": 1,
    "priors": 1,
    "models": 1,
    "networks": 1,
    "tangent": 1,
    "interweave": 1,
    "predictive": 1,
    "simulation": 1,
    "plots": 1,
    "classification": 1,
    "inference": 2,
    "estimators": 3,
    "evaluation": 4,
    "materials": 5,
    "jobs": 5,
    "cli": 6,
    "__main__": 6,
}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package root
        return 99
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return LAYERS[parts[1]]


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module an imported dotted name lives in (``pcbtl.a.b`` may be a name in ``pcbtl.a``)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(
    path: Path, modules: dict[str, Path], root: Path = ROOT
) -> list[tuple[str, int, bool]]:
    """``(module imported, line, at module level?)`` for every import of a pcbtl module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] if mod else []
        for t in targets:
            if t == "pcbtl" or t.startswith("pcbtl."):
                out.append((_resolve(t, modules), node.lineno, id(node) in top))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _, _ in _imports(p, modules) if t != m} for m, p in modules.items()}


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def _wrong_imports(root: Path = ROOT) -> list[str]:
    modules = _modules(root)
    bad = []
    for m, path in modules.items():
        for target, line, at_top in _imports(path, modules, root):
            if not at_top:
                bad.append(f"{m}:{line} imports {target} inside a function")
            elif target != m and _layer(target) > _layer(m):
                bad.append(
                    f"{m}:{line} (layer {_layer(m)}) imports {target} (layer {_layer(target)})"
                )
    return bad


def test_imports_point_down_and_sit_at_module_level():
    bad = _wrong_imports()
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None (depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if colour.get(t, 2) == 1:
                return stack[stack.index(t) :] + [t]
            if colour.get(t, 2) == 0 and (found := visit(t)):
                return found
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    # a package's __init__ re-exports its own submodules: that edge is a parent's, not a cycle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in _graph().items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    ("graph", "has_cycle"),
    [({"a": {"b"}, "b": {"c"}, "c": set()}, False), ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)],
)
def test_the_cycle_finder_finds_cycles(graph, has_cycle):
    assert (_cycle(graph) is not None) is has_cycle


def test_the_direction_check_sees_upward_and_local_imports(tmp_path):
    fake = tmp_path / "pcbtl"
    (fake / "estimators").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "estimators" / "__init__.py").write_text("")
    (fake / "estimators" / "pc.py").write_text("X = 1\n")
    (fake / "kl.py").write_text("from pcbtl.estimators.pc import X\n")
    (fake / "priors.py").write_text("def f():\n    from pcbtl import kl\n")
    assert _wrong_imports(fake) == [
        "pcbtl.kl:1 (layer 1) imports pcbtl.estimators.pc (layer 3)",
        "pcbtl.priors:2 imports pcbtl.kl inside a function",
    ]
