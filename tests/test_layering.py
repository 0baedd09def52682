"""The import layering of ``src/aal``: nothing imports upward, no package imports close a cycle.

Every ``import`` / ``from ... import`` in every module is read with :mod:`ast`, at module level and
inside functions alike (an import hidden in a function body is still a dependency, it only
postpones the cycle to run time). The layers, bottom to top (CONTRIBUTING.md draws the same
picture):

    0  registry, utils, data, config      names, small runtime helpers, datasets, the YAML schema
    1  attention, models                  attention layers and maps; the networks (models build on attention)
    2  attacks                            threat models, losses, attacks on any ``nn.Module``
    3  tasks, methods                     task losses/metrics/configs; training methods (methods build on tasks)
    4  eval                               evaluator, suites, gradient-masking checks, report pieces
    5  engine                             run folders, trainer, DDP, checkpoints, the runners
    6  cli, viz, the ``aal`` package      the command line, plots over runs, the public facade

``config`` sits at the bottom: it is the schema and its parsing; where it checks names against the
registries (method, model, attention, dataset, attack) it asks :func:`aal.registry.lookup` at call
time, so it imports none of them.

An import may point to a lower layer, or sideways within its layer when the package graph of
that layer stays acyclic. Within one package modules may import each other freely (Python itself
rejects a module-level cycle there at import time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: dict[str, int] = {
    "registry": 0, "utils": 0, "data": 0, "config": 0, "_startup": 0,
    "attention": 1, "models": 1,
    "attacks": 2,
    "tasks": 3, "methods": 3,
    "eval": 4,
    "engine": 5,
    "cli": 6, "viz": 6, "__main__": 6, "<package>": 6,
}
"""Layer of each top-level part of ``aal`` (``<package>`` is ``aal/__init__.py``)."""

ALLOWED: dict[tuple[str, str], str] = {
    ("attention", "attacks"): (
        "associative attention (Eq. 13) differentiates a loss w.r.t. the input: it takes the loss "
        "type, ce_loss and attack_mode from aal.attacks.base, which imports nothing of aal above the registry"
    ),
}
"""Upward package imports allowed, each with its reason (keep this tiny)."""


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _part(module: str) -> str:
    """The top-level part of ``aal`` a module belongs to (``aal.methods.spat`` -> ``methods``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<package>"


def _imports(path: Path, src: Path = SRC) -> list[tuple[str, int]]:
    """``(imported aal module, line)`` for every import in the file, at any depth."""
    module = _module_name(path, src)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                targets = [node.module or ""]
        else:
            continue
        out += [(t, node.lineno) for t in targets if t == "aal" or t.startswith("aal.")]
    return out


def import_edges(src: Path = SRC) -> list[tuple[str, str, str]]:
    """``(importer part, imported part, "file:line -> module")`` for imports between parts."""
    edges = []
    for path in sorted((src / "aal").rglob("*.py")):
        importer = _module_name(path, src)
        for target, line in _imports(path, src):
            a, b = _part(importer), _part(target)
            if a != b:
                edges.append((a, b, f"{path.relative_to(src)}:{line} -> {target}"))
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a node list, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_every_part_has_a_layer():
    parts = {_part(_module_name(p)) for p in (SRC / "aal").rglob("*.py")}
    assert parts - set(LAYERS) == set(), "give each new package/module of aal a layer in LAYERS (and CONTRIBUTING.md)"


def test_no_import_points_up_the_layering():
    upward = [
        where for a, b, where in import_edges()
        if LAYERS.get(b, 99) > LAYERS.get(a, -1) and (a, b) not in ALLOWED
    ]
    assert upward == [], "imports pointing up the layering:\n" + "\n".join(upward)


def test_no_package_import_cycle():
    graph: dict[str, set[str]] = {}
    for a, b, _ in import_edges():
        graph.setdefault(a, set()).add(b)
    assert _cycle(graph) is None, f"package import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_allowed_exceptions_are_still_needed():
    used = {(a, b) for a, b, _ in import_edges()}
    assert set(ALLOWED) <= used, f"remove stale exceptions: {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize("code, expect_up", [
    ("from aal.engine.run import load_run\n", True),        # models -> engine: upward
    ("def f():\n    from aal.methods import METHODS\n", True),  # inside a function counts too
    ("from aal.registry import Registry\n", False),
])
def test_the_walker_sees_imports(tmp_path, code, expect_up):
    """The checks can fail: a planted upward import (module level or in a function) is reported."""
    pkg = tmp_path / "aal" / "models"
    pkg.mkdir(parents=True)
    (tmp_path / "aal" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "planted.py").write_text(code)
    up = [w for a, b, w in import_edges(tmp_path) if LAYERS[b] > LAYERS[a]]
    assert bool(up) is expect_up


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
