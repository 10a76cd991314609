"""The import layers (docs/internals.md): cli -> genrecal_train -> genrecal_cache, and inside
genrecal_cache format -> io -> reader -> parts (the one open_cache) -> verify; no import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["genrecal_cache", "genrecal_train", "cli"]  # each imports only from itself and those before it
# genrecal_cache bottom up: a module of one of these imports only from its own layer and those below
# (never from the rest of the package: the writer, extraction, families...). Local imports count too.
CACHE_LAYERS = ["format", "io", "reader", "parts", "verify"]


def _imports() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported genrecal module, at module level?, line)], for every import statement."""
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
            out[mod] += [(n, node in tree.body, node.lineno) for n in names if n.split(".")[0] in PACKAGES and n != mod]
    return out


def test_packages_import_downward_only() -> None:
    for mod, targets in _imports().items():
        rank = PACKAGES.index(mod.split(".")[0])
        bad = [t for t, _, _ in targets if PACKAGES.index(t.split(".")[0]) > rank]
        assert not bad, f"{mod} imports {bad}: the direction is cli -> genrecal_train -> genrecal_cache"


def test_no_import_cycle_local_imports_included() -> None:
    graph = {m: {t for t, _, _ in ts} for m, ts in _imports().items()}
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


def _cache_layer(mod: str) -> int | None:
    parts = mod.split(".")
    return CACHE_LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == "genrecal_cache" \
        and parts[1] in CACHE_LAYERS else None


def test_cache_layers_import_downward_only() -> None:
    for mod, targets in _imports().items():
        rank = _cache_layer(mod)
        if rank is None:
            continue
        bad = [t for t, _, _ in targets if (_cache_layer(t) is None) or _cache_layer(t) > rank]  # type: ignore[operator]
        assert not bad, f"{mod} imports {bad}: genrecal_cache layers are {' -> '.join(CACHE_LAYERS)}"


def test_function_local_imports_of_genrecal_say_why() -> None:
    """Outside the CLI (whose commands import what they run, for start-up time), a genrecal module is
    imported inside a function only for a reason written on that line (e.g. an optional backend)."""
    for mod, targets in _imports().items():
        if mod.startswith("cli"):
            continue
        path = ROOT / (mod.replace(".", "/") + ".py")
        lines = (path if path.exists() else path.with_suffix("") / "__init__.py").read_text().splitlines()
        bad = [f"{mod}:{n} {t}" for t, top, n in targets if not top and "#" not in lines[n - 1]]
        assert not bad, f"function-local imports without a reason: {bad}"
