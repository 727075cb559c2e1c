"""What a run leaves in the checkout that is neither a DVC output nor source must not be committed by `git add -A`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["models/unet/last.pt", "models/msvm_unet/last.pt", "gpu_check_out/gpu_check.json",
                                  "mlflow.db", "onnxruntime_profile__2026.json"])
def test_run_leftovers_are_git_ignored(path):
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert result.returncode == 0, f"{path} is not git-ignored: `git add -A` would commit it"


def test_declared_outputs_are_not_ignored_by_hand():
    """checkpoint.pt / model.onnx are DVC outputs: DVC writes their .gitignore entries itself, not this file."""
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert not any("checkpoint.pt" in line or "model.onnx" in line for line in ignored)


def test_no_code_dependency_of_a_stage_is_an_empty_file():
    """DVC prints "WARNING: '<file>' is empty." for every empty dependency on every run (56 lines in one quick
    `dvc repro` for src/medseg/data/__init__.py): the first thing a new user reads."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    deps = {dep for stage in stages.values() for dep in stage.get("deps", []) if "${" not in dep}
    files = set()
    for dep in deps:
        path = ROOT / dep
        files |= set(path.rglob("*.py")) if path.is_dir() else ({path} if path.is_file() else set())
    assert files, "no code dependencies found in dvc.yaml"
    empty = sorted(str(p.relative_to(ROOT)) for p in files if p.stat().st_size == 0)
    assert not empty, f"empty dependency files (DVC warns on each): {empty}"


def test_no_function_in_the_library_is_over_80_lines():
    """Issue 32: a function that long does several jobs; split it where its parts have names."""
    import ast

    long = []
    for path in sorted((ROOT / "src" / "medseg").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
