"""The package's shape: one-way imports, one home per third-party library, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "distbackprop"
MAX_FUNCTION_LINES = 80
# Each third-party library is imported from one place only (module or package).
HOMES = {
    "ray": ("distbackprop/runtime/",),
    "mpi4py": ("distbackprop/comm/mpi.py",),
    "prometheus_client": ("distbackprop/metrics/exporter.py",),
    "yaml": ("distbackprop/config.py",),
    "matplotlib": ("distbackprop/report.py",),
    # the data plane and the history writer; `bench data` times raw pyarrow as its reference
    "pyarrow": ("distbackprop/data/", "distbackprop/metrics/history.py",
                "distbackprop/bench/data.py"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_pkg = _modules()[module].name == "__init__.py"
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, top_level_only: bool) -> set[str]:
    """Modules `module` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def test_no_import_cycle_among_modules():
    mods = _modules()
    graph = {m: {t for t in _imports(m, p, top_level_only=True) if t in mods and t != m}
             for m, p in mods.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of meaning.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


@pytest.mark.parametrize("lib", sorted(HOMES))
def test_each_library_has_one_home(lib):
    where = []
    for m, p in _modules().items():
        rel = p.relative_to(PKG.parent).as_posix()
        if any(t == lib or t.startswith(lib + ".") for t in _imports(m, p, top_level_only=False)):
            where.append(rel)
    stray = [w for w in where if not any(w.startswith(h) for h in HOMES[lib])]
    assert where, f"{lib} is imported nowhere: the test's table is stale"
    assert not stray, f"{lib} imported outside {HOMES[lib]}: {stray}"


def test_no_function_longer_than_the_limit():
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.relative_to(PKG.parent)}:{node.lineno} {node.name} ({n})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_citation_of_documents_outside_the_repository():
    # the team's design notes live outside the repository: the README is the reference
    outside = [name + ".md" for name in ("CONTRACT", "ARCHITECTURE")]
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        assert not any(n in text for n in outside), p
