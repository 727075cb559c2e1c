"""The import graph of src/medseg, read from the source (ast), and what each DVC stage's code is made of.

    python tests/import_graph.py        # print, per dvc.yaml stage, the src/ deps its imports call for

Imports inside functions count like module-level ones: they run when the stage runs. tests/test_import_graph.py
checks the layering and that dvc.yaml lists exactly these deps.
"""

from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "medseg"
# The network builders are looked up by name at run time (medseg.models.table imports the family that defines a
# name), which no static reading sees: a stage that builds any network depends on the whole package.
WHOLE_PACKAGES = ("medseg.models",)


def module_file(module: str) -> Path | None:
    """src/medseg/a/b.py or src/medseg/a/b/__init__.py for `medseg.a.b`, None if neither exists."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> list[str]:
    return sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


@lru_cache(maxsize=None)
def imports_of_file(path: Path, own_module: str | None = None) -> frozenset[str]:
    """medseg modules a file imports anywhere in it (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = (own_module or "").split(".")
                package = package if is_package else package[:-1]
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # `from medseg.data import loader` imports the submodule loader
                if module_file(f"{target}.{alias.name}") is not None:
                    found.add(f"{target}.{alias.name}")
    return frozenset(m for m in found if m == "medseg" or m.startswith("medseg."))


def imports_of(module: str) -> frozenset[str]:
    path = module_file(module)
    return imports_of_file(path, module) if path else frozenset()


def with_parents(module: str) -> set[str]:
    """Importing medseg.a.b runs medseg/__init__.py and medseg/a/__init__.py first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(start: set[str]) -> set[str]:
    """Every medseg module that importing `start` can run (parents and function-level imports included)."""
    seen: set[str] = set()
    todo = [m for s in start for m in with_parents(s)]
    while todo:
        module = todo.pop()
        if module in seen or module_file(module) is None:
            continue
        seen.add(module)
        for imported in imports_of(module):
            todo.extend(with_parents(imported))
        for package in WHOLE_PACKAGES:
            if module.startswith(package + "."):
                todo.extend(m for m in library_modules() if m.startswith(package + ".") or m == package)
    return seen


def stage_script_modules(script: Path) -> set[str]:
    return set(imports_of_file(script))


def stage_code_files(script: Path) -> set[Path]:
    """The files a stage script runs: itself and the closure of its medseg imports."""
    files = {script.resolve()}
    files.update(module_file(m).resolve() for m in closure(stage_script_modules(script)))  # type: ignore[union-attr]
    return files


def expected_src_deps(script: Path) -> list[str]:
    """dvc.yaml deps for a stage script: whole packages collapsed to their folder, the rest file by file."""
    files = stage_code_files(script)
    entries: set[str] = set()
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for package in WHOLE_PACKAGES:
            folder = (SRC / Path(*package.split("."))).relative_to(ROOT).as_posix()
            if rel.startswith(folder + "/"):
                rel = folder
        entries.add(rel)
    return sorted(entries)


def covered_files(entries: list[str]) -> set[Path]:
    """The .py files dvc.yaml deps entries stand for (a folder: every .py file under it)."""
    files: set[Path] = set()
    for entry in entries:
        path = (ROOT / entry).resolve()
        files.update(p.resolve() for p in path.rglob("*.py")) if path.is_dir() else files.add(path)
    return files


def main() -> None:
    import yaml

    for path in (ROOT / "dvc.yaml", ROOT / "builtin" / "dvc.yaml"):
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            script = ROOT / stage["cmd"].split()[1]
            print(f"{path.relative_to(ROOT)} {name}:")
            for entry in expected_src_deps(script):
                print(f"      - {entry}")


if __name__ == "__main__":
    sys.exit(main())
