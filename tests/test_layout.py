"""The engine's layout shows its architecture: no import cycles, no private names across modules,
variants that see only the contract, and one place that chooses a scope."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(path: Path, *, executed_at_import: bool):
    """(imported module, names, line) of each import in ``path``; only the module-level ones (outside
    ``if TYPE_CHECKING:``) when ``executed_at_import``."""
    tree = ast.parse(path.read_text())
    module, is_package = _module_name(path), path.name == "__init__.py"
    nodes = []
    if executed_at_import:
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.extend(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
        nodes = [n for n in nodes if not _inside_function(tree, n)]
    else:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for n in nodes:
        if isinstance(n, ast.Import):
            for alias in n.names:
                yield alias.name, [], n.lineno
        else:
            target = _resolve(module, is_package, n.level, n.module)
            yield target, [a.name for a in n.names], n.lineno


def _inside_function(tree: ast.AST, target: ast.AST) -> bool:
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(n is target for n in ast.walk(fn)):
            return True
    return False


ENGINE = sorted((ROOT / "surgery").rglob("*.py"))
MODULES = {_module_name(p) for p in ENGINE}


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in ENGINE:
        src = _module_name(path)
        out = edges.setdefault(src, set())
        for target, names, _ in _imports(path, executed_at_import=True):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in MODULES and cand != src:
                    out.add(cand)
                    break
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` (module -> modules it imports at import time), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_engine_has_no_import_cycles():
    edges = _edges()
    assert {"surgery.scope", "surgery.variant"} <= edges["surgery.ops"], "the import scan is broken"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_planted_cycle():
    edges = _edges()
    edges["surgery.variant"] = edges["surgery.variant"] | {"surgery.ops"}
    assert find_cycle(edges) is not None


def test_no_private_name_crosses_a_module_boundary():
    crossing = []
    for path in ENGINE + sorted((ROOT / "adapters").glob("*.py")):
        for target, names, line in _imports(path, executed_at_import=False):
            if target.startswith(("surgery", "adapters")):
                crossing += [f"{path.relative_to(ROOT)}:{line} imports {n} from {target}"
                             for n in names if n.startswith("_")]
    assert not crossing, crossing


def test_variants_see_only_the_contract():
    for path in sorted((ROOT / "adapters").glob("*.py")):
        for target, _, line in _imports(path, executed_at_import=False):
            if target.startswith("surgery"):
                assert target in ("surgery.variant", "surgery.errors"), f"{path.name}:{line} imports {target}"


def test_importing_adapters_does_not_load_the_engine():
    code = ("import sys, adapters; print(sorted(m for m in sys.modules "
            "if m.startswith('surgery') or m == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert eval(out) == ["surgery", "surgery.errors", "surgery.variant"]  # noqa: S307 - our own printed list


def test_one_place_chooses_the_scope():
    """Only surgery/scope/__init__.py asks whether a model is traced; every verb goes through scope_of."""
    askers = [p.relative_to(ROOT).as_posix() for p in ENGINE
              if "is_traced(" in p.read_text() and p.name != "capture.py"]
    assert askers == ["surgery/scope/__init__.py"], askers
