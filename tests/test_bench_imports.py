"""Every benchmark script under bench/ imports what it names from the package (a move inside diffuse/ that forgets a
script fails here, not when someone next runs the benchmark)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_a_bench_script_imports_what_it_names(script):
    tree = ast.parse((BENCH / script).read_text())
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):  # an import guarded for another checkout's layout (bench/digit_space.py)
            for handler in node.handlers:
                for sub in ast.walk(handler):
                    sub.guarded = True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffuse") and not getattr(node, "guarded", False):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name} (line {node.lineno})" for a in node.names
                        if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []
