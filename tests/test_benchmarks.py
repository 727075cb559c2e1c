"""Every benchmark states its goal on its last line: `goal: <what> <figure> -> met` or `-> NOT met`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_prints_a_goal_line_with_a_verdict(script):
    source = script.read_text(encoding="utf-8")
    tree = ast.parse(source)
    goal_prints = [node for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                   and node.value.lstrip().startswith("goal: ")]
    assert goal_prints, f"{script.name}: no `goal: ...` line"
    assert "NOT met" in source and "met" in source, f"{script.name}: the goal line must say met / NOT met"
