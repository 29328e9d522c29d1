"""The package's shape (issue #24): the top level groups modules by role, no import circle among kdrun's
modules, no function over 80 lines."""
from __future__ import annotations

import ast
from pathlib import Path

KDRUN = Path(__file__).resolve().parents[1] / "kdrun"
# What may sit at the top level beside the packages: the entry points and what every part reads.
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "compose.py", "config.py", "errors.py", "extras.py"}
ROLES = {"commands", "runtime", "analysis", "engine", "teacher_cache", "balancers", "data", "losses", "models",
         "optim", "projectors", "tasks"}


def modules() -> dict[str, Path]:
    out = {}
    for f in KDRUN.rglob("*.py"):
        parts = list(f.relative_to(KDRUN.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside functions, not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    visit(block)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in module_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
            for name in names:
                if name in mods and name not in own:
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_top_level_holds_roles_not_loose_modules() -> None:
    loose = {p.name for p in KDRUN.glob("*.py")} - TOP_LEVEL
    assert not loose, f"modules beside the packages: {sorted(loose)}; put them in a package of their role"
    packages = {p.name for p in KDRUN.iterdir() if (p / "__init__.py").is_file()}
    assert packages == ROLES


def test_no_function_is_over_80_lines() -> None:
    long = [f"{f.relative_to(KDRUN.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1})"
            for f in KDRUN.rglob("*.py") for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, long
