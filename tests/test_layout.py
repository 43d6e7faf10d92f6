"""The map of sar_core holds: the public contract at the top, sub-packages importing only
what their layer may, no import cycle (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sar_core"
CONTRACT = {"adapter", "batch", "schedule", "tokens", "hookspecs", "plugins", "checkpoint_io", "_moved"}
SUITES = {"testing", "conformance"}
# what each part of sar_core may import from sar_core (besides itself)
ALLOWED = {
    "contract": {"contract"},
    "suites": {"contract", "suites", "sar", "train", "data"},
    "sar": {"contract"},
    "data": {"contract"},
    "evaluate": {"contract", "sar", "data"},
    "train": {"contract", "sar", "data", "evaluate"},
    "study": {"contract", "sar", "data", "evaluate", "train"},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "contract"
    top = parts[1]
    if top in CONTRACT:
        return "contract"
    if top in SUITES:
        return "suites"
    return top


def imports_of(module: str, path: Path, known: dict) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != module}


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_top_level_is_the_contract():
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    subs = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 12, top
    assert len(subs) >= 4, subs
    assert CONTRACT | SUITES >= set(top), set(top) - CONTRACT - SUITES
    for sub in subs:  # each says what it holds and what it may import
        doc = ast.get_docstring(ast.parse((ROOT / sub / "__init__.py").read_text())) or ""
        assert "May import" in doc, sub


def test_layers(graph):
    bad = [(m, d) for m, deps in graph.items() for d in deps
           if part_of(d) != part_of(m) and part_of(d) not in ALLOWED[part_of(m)]]
    assert not bad, bad


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_old_flat_paths_are_the_new_modules():
    import importlib

    from sar_core._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old


def test_core_imports_nothing_of_ours():
    ours = ("sar_adapters", "sar_plugins", "sar_cli")
    bad = []
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [(m, n) for n in names if n.split(".")[0] in ours]
    assert not bad, bad
