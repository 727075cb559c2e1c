"""Cross-validation (medseg.evaluation.cross_validation): fold training, out-of-fold scores covering every development patient once, the
fold ensemble on test, the report's CV part, and the DVC matrix that runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import numpy as np
import pytest
import yaml

from medseg.errors import ConfigError
from medseg.io import read_json

from conftest import make_dvc_project, paths


@pytest.fixture()
def cv_params(tiny_params):
    params = json.loads(json.dumps(tiny_params))
    params["cv"] = {"models": ["unet"], "folds": [0, 1]}  # tiny_params: split.folds 2
    return params


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cross_validation_covers_every_development_patient_once_and_ensembles_the_folds(project_copy, cv_params):
    from medseg.data.cases import load_case
    from medseg.data.split import fold_split
    from medseg.evaluation.cross_validation import cv_summary, evaluate_fold
    from medseg.evaluation.evaluate import checkpoint_scoring
    from medseg.inference.torch_backend import load_trained_model, volume_probabilities
    from medseg.report import build_report
    from medseg.training.trainer import train_model, training_cases_hash

    root, params = project_copy, cv_params
    layout = paths(root)
    split = read_json(layout.split_file)
    development = sorted(split["train"] + split["val"])
    for k in (0, 1):
        summary = train_model(params, "unet", root, fold=k)
        assert summary["fold"] == k
        meta = load_trained_model(layout.fold_model_dir("unet", k) / "checkpoint.pt")[1]
        view = fold_split(split, k)
        # trained on the other fold's patients, selected on its own held-out ones: never on a patient it scores
        assert meta.training_cases_hash == training_cases_hash(view)
        assert not set(view["train"]) & set(view["val"]) and set(view["train"]) | set(view["val"]) == set(development)
        oof = evaluate_fold(params, "unet", k, root)
        assert {r["case"] for r in _rows(layout.oof_per_case("unet", k))} == set(view["val"])
        assert oof["fold"] == k and oof["num_cases"] == len(view["val"])
    assert not layout.checkpoint("unet").exists()  # the single-run model is not touched by CV

    result = cv_summary(params, "unet", root)
    out = layout.cv_dir("unet")
    metrics = read_json(out / "cv_metrics.json")
    assert metrics["coverage"] == {"development_cases": len(development), "scored_cases": len(development),
                                   "unscored": [], "complete": True}
    oof_cases = [r["case"] for r in _rows(out / "oof_per_case.csv")]
    names = params["dataset"]["class_names"]
    assert sorted(set(oof_cases)) == development and len(oof_cases) == len(development) * (len(names) - 1)
    assert result["complete"] and result["oof_dsc"] == metrics["out_of_fold"]["mean_dsc"]
    assert set(metrics["test_by_fold"]) == {"0", "1"}

    # the ensemble is the argmax of the folds' mean probabilities, scored like the test evaluation
    case = split["test"][0]
    image, label, spacing = load_case(layout.ingested, case)
    models = [load_trained_model(layout.fold_model_dir("unet", k) / "checkpoint.pt") for k in (0, 1)]
    mean = sum(volume_probabilities(m, image, meta.image_size) for m, meta in models) / 2
    expected = checkpoint_scoring(params, layout.ingested, split["test"], models[0][1]).rows(
        case, mean.argmax(axis=1).astype(np.uint8), label, spacing)
    got = [r for r in _rows(out / "ensemble_per_case.csv") if r["case"] == case]
    assert [float(r["dsc"]) for r in got] == pytest.approx([r["dsc"] for r in expected], nan_ok=True)
    scores = read_json(out / "cv_scores.json")
    assert set(scores) == {"unet.cv.oof_dsc", "unet.cv.ensemble_dsc"}

    # the report: a cross-validation part with statistics over the development patients
    build_report(params, root)
    md = (layout.comparison_dir / "comparison.md").read_text()
    assert "## Cross-validation (2 folds)" in md
    assert f"## Cross-validation statistics ({len(development)} development patients, out of fold)" in md
    cv_stats = read_json(layout.comparison_dir / "statistics.json")["cross_validation"]
    assert cv_stats["patients"] == len(development)


def test_a_fold_outside_the_cv_matrix_or_a_bad_cv_section_is_refused(project_copy, cv_params, tiny_params):
    from medseg.config import validate_params
    from medseg.evaluation.cross_validation import evaluate_fold
    from medseg.training.trainer import train_model

    with pytest.raises(ConfigError, match="fold 5 is not in cv.folds"):
        train_model(cv_params, "unet", project_copy, fold=5)
    with pytest.raises(ConfigError, match="unetpp is not in cv.models"):
        evaluate_fold(cv_params, "unetpp", 0, project_copy)
    bad = {**tiny_params, "cv": {"models": ["unet"], "folds": [0, 2]}}
    with pytest.raises(ConfigError, match=r"cv.folds \[0, 2\] must be distinct folds of split.folds=2"):
        validate_params(bad)
    with pytest.raises(ConfigError, match="cv.models is set but cv.folds is empty"):
        validate_params({**tiny_params, "cv": {"models": ["unet"], "folds": []}})


def test_an_incomplete_fold_set_is_reported_not_hidden(project_copy, cv_params):
    """Training only fold 0 of 2 scores half the development patients out of fold: the summary says so."""
    from medseg.evaluation.cross_validation import cv_summary, evaluate_fold
    from medseg.training.trainer import train_model

    params = {**cv_params, "cv": {"models": ["unet"], "folds": [0]}}
    train_model(params, "unet", project_copy, fold=0)
    evaluate_fold(params, "unet", 0, project_copy)
    result = cv_summary(params, "unet", project_copy)
    coverage = read_json(paths(project_copy).cv_dir("unet") / "cv_metrics.json")["coverage"]
    assert not result["complete"] and coverage["unscored"] and coverage["scored_cases"] < coverage["development_cases"]


def _dvc(root, *args):
    done = subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_cv_switch_adds_the_fold_matrix_to_the_dvc_pipeline(tmp_path, tiny_params, cv_params):
    off = make_dvc_project(tmp_path / "off", tiny_params)
    assert "fold" not in _dvc(off, "stage", "list")  # cv off: no fold stage exists
    on = make_dvc_project(tmp_path / "on", cv_params)
    stages = {line.split()[0] for line in _dvc(on, "stage", "list").splitlines()}
    assert {"train_fold@unet-0", "train_fold@unet-1", "evaluate_fold@unet-0", "evaluate_fold@unet-1",
            "cv_summary@unet"} <= stages
    upstream = _dvc(on, "dag", "--md", "report")
    for stage in ("cv_summary@unet", "evaluate_fold@unet-1", "train_fold@unet-0"):
        assert stage in upstream  # the report waits for the cross-validation


@pytest.mark.slow
def test_dvc_repro_runs_the_cross_validation_then_is_a_no_op(tmp_path, cv_params):
    root = make_dvc_project(tmp_path / "project", cv_params)
    _dvc(root, "repro", "-q")
    assert read_json(paths(root).cv_dir("unet") / "cv_metrics.json")["coverage"]["complete"]
    status = _dvc(root, "status")
    assert "up to date" in status, status
    plots = json.loads(_dvc(root, "plots", "show", "--json"))
    assert any("folds/1/train_log.csv" in key for key in json.dumps(plots).split('"')), "per-fold learning curves"
    assert "Cross-validation" in (paths(root).comparison_dir / "comparison.md").read_text()
    # every file the run left is a declared output (dvc.lock lists them), the MLflow store, or DVC's own
    outs = set()
    for lock_file in ("dvc.lock", "builtin/dvc.lock"):  # builtin's paths are relative to the project root too
        for stage in yaml.safe_load((root / lock_file).read_text())["stages"].values():
            outs |= {out["path"].removeprefix("../") for out in stage.get("outs", [])}
    project = {"dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", "reports/cv/README.md", "mlflow.db"}
    stray = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if (path.is_dir() or rel in project or path.name == ".gitignore"
                or rel.split("/")[0] in {".dvc", "src", "stages", "builtin", "mlartifacts"}):
            continue
        if not any(rel == out or rel.startswith(out.rstrip("/") + "/") for out in outs):
            stray.append(rel)
    assert not stray, f"files no stage declares: {stray}"
    # a report setting re-runs the report only: the fold models stay
    checkpoint = paths(root).fold_model_dir("unet", 0) / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    (root / "params.yaml").write_text(yaml.safe_dump({**cv_params, "report": {**cv_params["report"],
                                                                              "qualitative_slices": 2}}))
    _dvc(root, "repro", "-q")
    assert checkpoint.stat().st_mtime_ns == before and "up to date" in _dvc(root, "status")


@pytest.mark.slow
def test_a_queued_sweep_over_architectures_runs_their_cross_validation(tmp_path, cv_params):
    """`dvc exp run --queue` per architecture, then `--run-all`: each experiment ran its own fold matrix and
    reports its CV metrics (what `dvc exp show` compares)."""
    params = json.loads(json.dumps(cv_params))
    params["model_options"]["unetpp"] = {"base_channels": 4, "depth": 2}
    root = make_dvc_project(tmp_path / "project", params, git=True)
    for args in (["add", "-A"], ["commit", "-q", "-m", "baseline"]):  # experiments need a Git baseline
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    _dvc(root, "exp", "run", "--queue", "-n", "cv-unet")
    _dvc(root, "exp", "run", "--queue", "-n", "cv-unetpp", "-S", "models=[unetpp]", "-S", "cv.models=[unetpp]")
    _dvc(root, "exp", "run", "--run-all")
    shown = json.loads(_dvc(root, "exp", "show", "--json"))
    scores = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                metrics = rev["data"]["metrics"]
                scores[rev["name"]] = {key for path, entry in metrics.items() if "/cv/" in path
                                       for key in (entry.get("data") or {})}
    assert scores == {"cv-unet": {"unet.cv.oof_dsc", "unet.cv.ensemble_dsc"},
                      "cv-unetpp": {"unetpp.cv.oof_dsc", "unetpp.cv.ensemble_dsc"}}, scores


def test_a_fold_training_killed_mid_epoch_resumes_to_the_same_weights(tiny_project, tmp_path):
    """Fold runs resume like single runs: SIGKILL after step 4 (a mid-epoch last.pt), run again, same weights as
    an uninterrupted fold run (bit for bit on CPU)."""
    import shutil
    import sys
    import textwrap

    import torch

    runner = textwrap.dedent("""
        import os, signal, sys, yaml
        from pathlib import Path
        import medseg.training.trainer as training
        kill_at = int(os.environ.get("KILL_AT", "0"))
        if kill_at:
            training.STEP_HOOKS.append(lambda step: step == kill_at and os.kill(os.getpid(), signal.SIGKILL))
        root = Path(sys.argv[1])
        training.train_model(yaml.safe_load((root / "params.yaml").read_text()), "unet", root, fold=1)
    """)
    script = tmp_path / "run.py"
    script.write_text(runner)
    roots = []
    for name in ("reference", "killed"):
        root = tmp_path / name
        shutil.copytree(tiny_project, root)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train"].update(epochs=2, batch_size=2, max_steps_per_epoch=3, checkpoint_every_steps=2)
        params["cv"] = {"models": ["unet"], "folds": [0, 1]}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        roots.append(root)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run([sys.executable, str(script), str(roots[0])], env=env, check=True, capture_output=True)
    killed = subprocess.run([sys.executable, str(script), str(roots[1])], env={**env, "KILL_AT": "4"},
                            capture_output=True)
    assert killed.returncode == -9
    subprocess.run([sys.executable, str(script), str(roots[1])], env=env, check=True, capture_output=True)
    summary = read_json(paths(roots[1]).fold_reports_dir("unet", 1) / "train_summary.json")
    assert summary["resumed_from_step"] == 4 and summary["fold"] == 1
    for name in ("checkpoint.pt", "last.pt"):
        a, b = (torch.load(paths(r).fold_model_dir("unet", 1) / name, weights_only=True)["state_dict"] for r in roots)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
