"""The package's rooms import one way, and dvc.yaml's code deps are exactly what each stage's script imports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

import import_graph as graph

# Lowest first: a module may import its own layer or lower ones, never higher. preprocessing (the numeric rules,
# numpy only) sits below data because ingest applies it; tracking (which MLflow store) is plumbing both training
# and predict use; predict and serving are the torch-free inference path.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("medseg", "medseg.errors", "medseg.io", "medseg.config", "medseg.layout", "medseg.contracts",
              "medseg.runtime", "medseg.tracking.store", "medseg.evaluation.metrics", "medseg.evaluation.stats",
              "medseg.evaluation.display")),
    ("preprocessing", ("medseg.data.preprocessing", "medseg.data.plan", "medseg.inference.sliding",
                       "medseg.inference.inferer", "medseg.nnunet.inference")),
    ("data", ("medseg.data",)),
    ("models", ("medseg.models", "medseg.training.losses")),
    ("card / checkpoint", ("medseg.deployment.card", "medseg.training.checkpoint")),
    ("inference", ("medseg.inference.torch_backend", "medseg.deployment.dicom_seg", "medseg.deployment.predict",
                   "medseg.deployment.serving",
                   "medseg.evaluation.scoring", "medseg.serving")),
    ("training / evaluation / export", ("medseg.training", "medseg.evaluation", "medseg.deployment",
                                        "medseg.nnunet")),
    ("registry", ("medseg.tracking",)),
    ("report / cli", ("medseg.report", "medseg.data.doctor", "medseg.cli", "medseg.entry")),
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module}: in no layer of LAYERS; add it where it belongs"
    return max(matches)[1]  # the longest prefix decides ("medseg.data.loader" is data, not core's "medseg")


def test_every_import_points_to_the_same_or_a_lower_layer():
    upward = []
    for module in graph.library_modules():
        for imported in graph.imports_of(module):
            if graph.module_file(imported) is not None and layer_of(imported) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} "
                              f"({LAYERS[layer_of(imported)][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    modules = graph.library_modules()
    edges = {m: {i for i in graph.imports_of(m) if i in modules and i != m} for m in modules}
    # medseg/__init__.py and package __init__s are parents, not dependents: an edge to a parent is not a cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if module.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_library_never_imports_stages_or_flows():
    for path in graph.PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for forbidden in ("import flows", "from flows", "import stages", "from stages"):
            assert forbidden not in text, f"{path}: {forbidden}"


def test_the_import_reader_sees_function_level_and_submodule_imports(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("import os\nfrom medseg.data import loader\n\ndef f():\n    from medseg.inference.torch_backend import x\n")
    assert graph.imports_of_file(source) == {"medseg.data", "medseg.data.loader", "medseg.inference.torch_backend"}


def _dvc_stages():
    for path in (graph.ROOT / "dvc.yaml", graph.ROOT / "builtin" / "dvc.yaml"):
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            yield path, name, stage


@pytest.mark.parametrize("path,name,stage", list(_dvc_stages()), ids=lambda v: v if isinstance(v, str) else "")
def test_dvc_yaml_code_deps_are_exactly_what_the_stage_imports(path, name, stage):
    script = graph.ROOT / stage["cmd"].split()[1]
    listed = [d for d in stage["deps"] if d.startswith(("src/", "stages/"))]
    expected = graph.expected_src_deps(script)
    assert graph.covered_files(listed) == graph.covered_files(expected), (
        f"{path.name} stage {name}: code deps should be\n" + "\n".join(f"      - {e}" for e in expected)
        + "\n(`python tests/import_graph.py` prints them for every stage)")


def test_a_training_does_not_depend_on_the_report_or_the_overlay_code():
    files = {p.relative_to(graph.ROOT).as_posix() for p in graph.stage_code_files(graph.ROOT / "stages" / "train.py")}
    assert "src/medseg/training/trainer.py" in files
    for other in ("src/medseg/report/__init__.py", "src/medseg/report/markdown.py", "src/medseg/report/figures.py",
                  "src/medseg/evaluation/evaluate.py", "src/medseg/evaluation/display.py", "src/medseg/tracking/registry.py", "src/medseg/deployment/export.py"):
        assert other not in files, other


def _touch(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_dvc_status_restyling_the_report_leaves_trainings_up_to_date(tmp_path, tiny_params):
    """Real DVC: record train@A and report as done, then edit report.py (and evaluation's overlay code): only
    report is stale. Editing training.py makes train@A stale."""
    from conftest import make_dvc_project

    root = make_dvc_project(tmp_path / "project", tiny_params)
    arch = tiny_params["models"][0]
    name = tiny_params["dataset"]["name"]
    # every dep and out of the two stages, as files with some content (DVC only hashes them)
    for rel in (f"data/ingested/{name}/cases.json", f"data/splits/{name}.json", "registry/a.json",
                f"models/{arch}/checkpoint.pt", f"models/{arch}/last.pt", f"reports/{arch}/curves.png",
                f"reports/{arch}/train_summary.json", f"reports/{arch}/train_scores.json",
                f"reports/{arch}/train_log.csv", "reports/comparison.md",
                "reports/comparison_dsc.png", "reports/comparison_summary.png", "reports/qualitative.png",
                "reports/per_class.csv", "reports/statistics.json"):
        _touch(root / rel, "{}" if rel.endswith(".json") else "epoch,val_dice\n1,0.5\n")
    train = f"train@{arch}"

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    dvc("commit", "-f", "-q", train, "report")
    assert "up to date" in dvc("status", train, "report")

    for rel in ("src/medseg/report/markdown.py", "src/medseg/evaluation/evaluate.py", "src/medseg/evaluation/display.py"):
        with open(root / rel, "a", encoding="utf-8") as handle:
            handle.write("\n# restyled\n")
    assert "up to date" in dvc("status", train), "restyling the report or the overlay made the training stale"
    assert "report" in dvc("status", "report")

    with open(root / "src/medseg/training/trainer.py", "a", encoding="utf-8") as handle:
        handle.write("\n# changed\n")
    status = dvc("status", train)
    assert train in status and "src/medseg/training/trainer.py" in status
