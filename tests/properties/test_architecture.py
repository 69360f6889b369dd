"""The layering docs/architecture.md describes, checked on the source: which layer may import which,
no import cycle, a small top level, sub-packages that say what they are for, and short functions
and modules. Read from the code's own imports (ast), so nothing is executed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KITH = Path(__file__).resolve().parents[2] / "kith"

# layer of each top-level part of kith, from the ground up, and what it may import besides itself
MAY_IMPORT = {
    "utils": set(),
    "data": {"utils"},
    "nn": {"utils"},
    "memory": {"utils"},
    "losses": {"utils", "memory"},
    "methods": {"utils", "data", "nn", "memory", "losses"},
    "config": {"utils", "data", "nn", "methods"},
    "runs": {"utils", "config"},
    "evaluation": {"utils", "data", "nn", "memory", "config", "runs"},
    "train": {"utils", "data", "nn", "memory", "losses", "methods", "config", "runs", "evaluation"},
    "api": {"utils", "config", "nn", "runs", "evaluation", "train"},
    "tools": {"utils", "data", "nn", "memory", "losses", "methods", "config", "runs", "evaluation",
              "train", "api"},
    "cli": {"utils", "config", "methods", "runs", "evaluation", "train", "api", "tools"},
    "__init__": {"api", "utils", "methods"},
    "__main__": {"cli"},
}
LONG_FUNCTIONS_ALLOWED = {("cli.py", "build_parser")}  # an argparse table
MAX_FUNCTION_LINES, MAX_MODULE_LINES, MAX_TOP_LEVEL_MODULES = 80, 400, 8


def _modules() -> dict[str, Path]:
    return {".".join(("kith", *p.relative_to(KITH).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in sorted(KITH.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """kith modules `path` imports (`from kith.x import y` counts kith.x.y when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    known = _modules()
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "kith":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kith")
    return found


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, path in _modules().items():
        part = _part(module)
        for target in _imports(path, top_level_only=False):
            other = _part(target)
            if other != part and other not in MAY_IMPORT[part]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against docs/architecture.md's layers: " + "; ".join(wrong)


def test_no_import_cycle():
    graph = {m: _imports(p, top_level_only=True) for m, p in _modules().items()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return path + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for module in graph:
        if module not in state:
            cycle = visit(module, [module])
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_top_level_is_small_and_every_sub_package_says_what_it_is_for():
    top = [p.name for p in KITH.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) + 2 <= MAX_TOP_LEVEL_MODULES, top
    for init in KITH.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.splitlines()) == 2 and "may import" in doc.lower(), \
            f"{init.relative_to(KITH.parent)}: its docstring says in two lines what it is for and may import"


@pytest.mark.parametrize("path", sorted(KITH.rglob("*.py")), ids=lambda p: str(p.relative_to(KITH)))
def test_functions_and_modules_are_short(path):
    text = path.read_text()
    lines = len(text.splitlines())
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_MODULE_LINES or "longer" in doc, \
        f"{path.name} has {lines} lines: split it, or say in its docstring why it stays longer"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if (path.name, node.name) not in LONG_FUNCTIONS_ALLOWED:
                assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.name} is {length} lines"
        if isinstance(node, ast.Nonlocal) and "train" in path.parts:
            pytest.fail(f"{path.name}:{node.lineno}: nonlocal in the training loop")
