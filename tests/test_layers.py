"""The import layers (docs/internals.md): cli -> genrecal_train -> genrecal_cache, and inside
genrecal_cache format -> io -> reader -> parts -> verify; no import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["genrecal_cache", "genrecal_train", "cli"]  # each imports only from itself and those before it


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported genrecal module, at module level?)], for every import statement."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "compat" not in p.parts}
    out: dict[str, list[tuple[str, bool]]] = {}
    for mod, path in files.items():
        tree, pkg = ast.parse(path.read_text()), mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out[mod] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(x for x in (base, node.module) if x)
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out[mod] += [(n, node in tree.body) for n in names if n.split(".")[0] in PACKAGES and n != mod]
    return out


def test_packages_import_downward_only() -> None:
    for mod, targets in _imports().items():
        rank = PACKAGES.index(mod.split(".")[0])
        bad = [t for t, _ in targets if PACKAGES.index(t.split(".")[0]) > rank]
        assert not bad, f"{mod} imports {bad}: the direction is cli -> genrecal_train -> genrecal_cache"


def test_no_import_cycle_at_module_level() -> None:
    graph = {m: {t for t, top in ts if top} for m, ts in _imports().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            assert state.get(t) != 1, f"import cycle: {' -> '.join(path[path.index(t):] + [t])}"
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
