"""Cross-validation: per architecture x fold training (medseg.training.trainer with `fold`), out-of-fold scores, and the
fold ensemble on the test split, as nnU-Net does it.

params.yaml `cv.models` x `cv.folds` is a DVC matrix (dvc.yaml: train_fold, evaluate_fold, then cv_summary per
architecture). The folds are the split file's (`split.folds`, over the development = train + val patients, by
patient): fold k trains on the other folds' patients, selects its checkpoint on its own held-out patients
(validation, as for single runs) and is then scored on them ("out of fold"). Over all folds every development
patient is scored exactly once, by the one model that never saw it; cv_summary checks that. The test split is
scored by each fold's model and by their ensemble (probabilities averaged, then argmax).

Outputs: models/<arch>/folds/<k>/checkpoint.pt, reports/<arch>/folds/<k>/{train_summary.json, train_log.csv,
oof_per_case.csv, oof_metrics.json}; reports/cv/<arch>/{cv_metrics.json, oof_per_case.csv, ensemble_per_case.csv,
cv_scores.json}.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import check_cv_fold, disable_telemetry, resolve_device, settings
from medseg.contracts import EvaluationMetrics, read_per_case, write_per_case
from medseg.errors import ConfigError
from medseg.io import read_json, write_dvc_metrics, write_json
from medseg.layout import ProjectLayout

_log = logging.getLogger(__name__)
ENSEMBLE = "ensemble"  # the fold ensemble's key beside the folds' numbers


def _fold_case_lists(split_path: Path, folds: list[int]) -> tuple[dict[int, list[str]], list[str]]:
    """({fold: its held-out cases}, every development case) from the split file."""
    from medseg.data.split import fold_split

    if not split_path.is_file():
        raise ConfigError(f"{split_path}: split file not found (run the split stage first)")
    split = read_json(split_path)
    held = {k: fold_split(split, k, split_path)["val"] for k in folds}
    development = sorted(set(split.get("train", [])) | set(split.get("val", [])))
    return held, development


def held_out_cases(split_path: Path, fold: int) -> list[str]:
    """Fold `fold`'s held-out cases (scored out of fold); a ConfigError when there are none."""
    case_ids = _fold_case_lists(split_path, [fold])[0][fold]
    if not case_ids:
        raise ConfigError(f"{split_path}: fold {fold} holds out no case")
    return case_ids


def evaluate_fold(params: dict[str, Any], arch: str, fold: int, root: str | Path = ".") -> dict[str, Any]:
    """Score fold `fold`'s model on its held-out patients: reports/<arch>/folds/<k>/oof_per_case.csv and
    oof_metrics.json (the same scoring as the test evaluation: medseg.evaluation.evaluate.Scoring)."""
    from medseg.evaluation.evaluate import checkpoint_context, checkpoint_scoring, summary_metrics
    from medseg.evaluation.scoring import score_cases
    from medseg.inference.torch_backend import checkpoint_plan, load_trained_model, predict_volume
    from medseg.runtime.threads import apply_torch_threads, plan_from_params

    disable_telemetry()
    check_cv_fold(params, arch, fold)
    apply_torch_threads(plan_from_params(params, num_workers=0))
    layout = ProjectLayout.of(params, root)
    case_ids = held_out_cases(layout.split_file, int(fold))
    model, meta = load_trained_model(layout.run_files(arch, fold).checkpoint)
    scoring = checkpoint_scoring(params, layout.ingested, case_ids, meta)
    config = settings(params)
    device = resolve_device(config.train.device)
    model = model.to(device)
    context, batch_size = checkpoint_context(meta, params), config.evaluate.batch_size
    plan = checkpoint_plan(meta)
    rows = score_cases(lambda image, spacing: predict_volume(model, image, meta.image_size, context, batch_size,
                                                             device, plan=plan, spacing=spacing),
                       scoring.rows, layout.ingested, case_ids, desc=f"out-of-fold {arch} fold {fold}")
    metrics = summary_metrics(scoring, rows, case_ids, arch=arch, fold=int(fold), checkpoint_epoch=meta.epoch)
    write_per_case(layout.oof_per_case(arch, fold), rows)
    metrics.write(layout.oof_metrics(arch, fold))
    return metrics.to_dict()


def out_of_fold_rows(params: dict[str, Any], arch: str, root: str | Path = ".") -> tuple[list[dict], dict]:
    """(every fold's out-of-fold rows with a `fold` column, coverage). A case scored by two folds is an error (a
    patient in two held-out sets would be counted twice); coverage says which development cases no trained fold
    scored (all folds trained: none)."""
    layout = ProjectLayout.of(params, root)
    folds = list(settings(params).cv.folds)
    held, development = _fold_case_lists(layout.split_file, folds)
    rows, seen = [], {}
    for k in folds:
        fold_rows = read_per_case(layout.oof_per_case(arch, k))
        cases = {r["case"] for r in fold_rows}
        if cases != set(held[k]):
            raise ConfigError(f"{layout.oof_per_case(arch, k)}: scores cases {sorted(cases)}, but fold {k} holds out "
                              f"{sorted(held[k])}; run `dvc repro evaluate_fold@{arch}-{k}`")
        for case in cases:
            if case in seen:
                raise ConfigError(f"{layout.split_file}: case {case} is held out by folds {seen[case]} and {k}")
            seen[case] = k
        rows += [{**r, "fold": str(k)} for r in fold_rows]
    missing = sorted(set(development) - set(seen))
    coverage = {"development_cases": len(development), "scored_cases": len(seen), "unscored": missing,
                "complete": not missing}
    if missing:
        _log.warning("%s: cv.folds %s score %d of %d development cases out of fold (train every fold for all)",
                     arch, folds, len(seen), len(development))
    return rows, coverage


def cv_summary(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """One architecture's cross-validation: out-of-fold scores over the development patients, each fold's model
    and the fold ensemble (mean of the folds' probabilities) on the test split. Writes reports/cv/<arch>/."""
    from medseg.evaluation.evaluate import checkpoint_context, checkpoint_scoring, read_case_list, summary_metrics
    from medseg.evaluation.scoring import score_cases
    from medseg.inference.torch_backend import checkpoint_plan, load_trained_model, volume_probabilities
    from medseg.runtime.threads import apply_torch_threads, plan_from_params

    disable_telemetry()
    if arch not in settings(params).cv.models:
        raise ConfigError(f"params.yaml: {arch} is not in cv.models {settings(params).cv.models}")
    apply_torch_threads(plan_from_params(params, num_workers=0))
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    folds = list(settings(params).cv.folds)
    oof_rows, coverage = out_of_fold_rows(params, arch, root)

    models = [load_trained_model(layout.run_files(arch, k).checkpoint) for k in folds]
    metas = [meta for _, meta in models]
    test_ids = read_case_list(layout.split_file, "test")
    scoring = checkpoint_scoring(params, layout.ingested, test_ids, metas[0])
    oof_scoring = checkpoint_scoring(params, layout.ingested, sorted({r["case"] for r in oof_rows}), metas[0])
    config = settings(params)
    device = resolve_device(config.train.device)

    def folds_and_ensemble(image: np.ndarray, spacing: Any) -> dict[str, np.ndarray]:
        """Each fold's labels and the ensemble's (the folds' probabilities averaged, then argmax), in one pass."""
        labels, total = {}, None
        for k, (model, meta) in zip(folds, models):
            probs = volume_probabilities(model.to(device), image, meta.image_size, checkpoint_context(meta, params),
                                         config.evaluate.batch_size, device, plan=checkpoint_plan(meta),
                                         spacing=spacing)
            labels[str(k)] = probs.argmax(axis=1).astype(np.uint8)
            total = probs if total is None else total + probs
        labels[ENSEMBLE] = (total / len(folds)).argmax(axis=1).astype(np.uint8)
        return labels

    by_model = score_cases(folds_and_ensemble, scoring.rows, layout.ingested, test_ids,
                           desc=f"fold ensemble {arch}")
    return write_cv_summary(layout, arch, folds, oof_rows, coverage, by_model, scoring, oof_scoring, test_ids)


def write_cv_summary(layout: ProjectLayout, arch: str, folds: list[int], oof_rows: list[dict], coverage: dict,
                     by_model: dict[str, list[dict]], scoring, oof_scoring, test_ids: list[str]) -> dict[str, Any]:
    """reports/cv/<arch>/ from the out-of-fold rows and the test rows of each fold's model and their ensemble
    (`by_model`: {str(fold): rows, ENSEMBLE: rows}); returns the stage's summary."""
    from medseg.evaluation.evaluate import summary_metrics

    per_fold_rows = {k: by_model[str(k)] for k in folds}
    ensemble_rows = by_model[ENSEMBLE]
    oof = summary_metrics(oof_scoring, oof_rows, sorted({r["case"] for r in oof_rows}))
    oof_by_fold = {}
    for k in folds:
        fold_metrics = EvaluationMetrics.read(layout.oof_metrics(arch, k))
        oof_by_fold[str(k)] = {"mean_dsc": fold_metrics.mean_dsc, "num_cases": fold_metrics.num_cases}
    ensemble = summary_metrics(scoring, ensemble_rows, test_ids)
    metrics = {
        "arch": arch,
        "folds": folds,
        "coverage": coverage,
        "out_of_fold": oof.to_dict(),
        "out_of_fold_by_fold": oof_by_fold,
        "test_by_fold": {str(k): summary_metrics(scoring, per_fold_rows[k], test_ids).to_dict() for k in folds},
        "test_ensemble": ensemble.to_dict(),
    }
    write_per_case(layout.cv_oof_per_case(arch), oof_rows)
    write_per_case(layout.cv_ensemble_per_case(arch), ensemble_rows)
    write_json(layout.cv_metrics(arch), metrics)
    write_dvc_metrics(layout.cv_scores(arch), {"oof_dsc": oof.mean_dsc, "ensemble_dsc": ensemble.mean_dsc}, f"{arch}.cv")
    return {"arch": arch, "folds": len(folds), "oof_dsc": oof.mean_dsc, "ensemble_dsc": ensemble.mean_dsc,
            "complete": coverage["complete"]}
