"""evaluate@<nnU-Net entry>: each test patient's raw scan through nnU-Net's inference recipe (medseg.nnunet.inference:
crop, normalisation, resampling, Gaussian sliding window, mirroring as nnUNetv2_predict does by default), the network
in torch, scored by the same Scoring and loop as every network (medseg.evaluation) against the ingested labels.
Cross-validation's evaluate_fold and cv_summary of an nnU-Net entry are here too (each fold's held-out patients,
then each fold and their softmax-averaged ensemble on the test patients)."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import disable_telemetry, settings
from medseg.contracts import write_per_case
from medseg.errors import ConfigError
from medseg.io import write_dvc_metrics
from medseg.layout import ProjectLayout
from medseg.nnunet.pack import NnunetBudget, check_trained_on_this_split, unpacked_results

_log = logging.getLogger(__name__)


class RawCases:
    """The project's cases as nnU-Net sees them: the raw scan (its own normalisation and resampling), scored
    against the ingested label. `load` is score_cases' loader; `spacing` is the spacing of the case it loaded last,
    which the segmenter of that case reads."""

    def __init__(self, params: dict[str, Any], root: Path, case_ids: list[str]):
        from medseg.nnunet.dataset import raw_scans

        self.layout = ProjectLayout.of(params, root)
        self.spec, raw_dir, sources = raw_scans(params, root)
        self.by_id = {c.id: c for c in sources}
        missing = [i for i in case_ids if i not in self.by_id]
        if missing:
            raise ConfigError(f"{raw_dir}: {len(missing)} case(s) of {self.layout.split_file} are not in the raw "
                              f"dataset (first: {missing[0]}); re-run ingest and split")
        self.spacing: tuple[float, float, float] | None = None

    def load(self, case_id: str):
        from medseg.data.cases import load_case
        from medseg.nnunet.dataset import raw_case

        raw, _ = raw_case(self.by_id[case_id], self.spec)
        _, label, spacing = load_case(self.layout.ingested, case_id)
        self.spacing = tuple(float(s) for s in (raw.spacing or spacing))
        return raw.image, label, spacing

    def chw(self, image: np.ndarray) -> np.ndarray:
        return image.transpose(1, 0, 2, 3)  # (D, C, H, W) -> nnU-Net's (C, z, y, x)


@contextmanager
def pack_runners(packs: list[Path], split_file: Path):
    """[(tiles -> logits, recipe, epoch, best EMA pseudo-Dice)] of each results pack, each checked to be trained
    on the project's current split; the unpacked folders last as long as the context."""
    with ExitStack() as stack:
        runners = []
        for pack in packs:
            folder, fold = stack.enter_context(unpacked_results(pack))
            check_trained_on_this_split(json.loads((folder / "dataset.json").read_text()), pack, split_file)
            runners.append(torch_runner(folder, fold))
        yield runners


def evaluate_nnunet_entry(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """evaluate@<nnU-Net entry>: the test patients' raw scans through nnU-Net's recipe, scored as every network."""
    from medseg.data.cases import load_case
    from medseg.evaluation.evaluate import overlay_slice, plot_overlays, read_case_list, summary_metrics, test_scores
    from medseg.evaluation.scoring import score_cases
    from medseg.nnunet.inference import segment_case

    disable_telemetry()
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    budget = NnunetBudget.of(params, arch)
    test_ids = read_case_list(layout.split_file, "test")
    scoring = _scoring(params, layout, test_ids)
    cases = RawCases(params, root, test_ids)
    overlays: list[tuple] = []

    def keep_overlay(case_id: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> None:
        if len(overlays) < settings(params).evaluate.overlay_cases:
            normalised, _, _ = load_case(layout.ingested, case_id)
            overlays.append((case_id, *overlay_slice(normalised, np.asarray(label), pred)))

    with pack_runners([layout.checkpoint(arch)], layout.split_file) as [(run, recipe, epoch, val_dice)]:
        rows = score_cases(lambda image, _: segment_case(cases.chw(image), cases.spacing, recipe, run, budget.tta),
                           scoring.rows, layout.ingested, test_ids, desc=f"evaluate {arch}", inspect=keep_overlay,
                           load=cases.load)

    metrics = summary_metrics(scoring, rows, test_ids, arch=arch, checkpoint_epoch=epoch, val_dice=val_dice)
    metrics.write(layout.metrics(arch))
    write_dvc_metrics(layout.test_scores(arch), test_scores(metrics), arch)
    write_per_case(layout.per_case(arch), rows)
    plot_overlays(layout.overlay(arch), overlays, scoring.class_names, arch)
    _log.info("%s: mean DSC %s, mean HD95 %s (%s) on %d test cases (nnU-Net's recipe, mirroring %s)", arch,
              metrics.mean_dsc, metrics.mean_hd95, metrics.hd95_unit, len(test_ids), "on" if budget.tta else "off")
    return metrics.to_dict()


def evaluate_nnunet_fold(params: dict[str, Any], arch: str, fold: int, root: str | Path = ".") -> dict[str, Any]:
    """evaluate_fold@<nnU-Net entry>-<k>: fold k's nnU-Net scored on its held-out patients (out of fold)."""
    from medseg.config import check_cv_fold
    from medseg.evaluation.cross_validation import held_out_cases
    from medseg.evaluation.evaluate import summary_metrics
    from medseg.evaluation.scoring import score_cases
    from medseg.nnunet.inference import segment_case

    disable_telemetry()
    check_cv_fold(params, arch, fold)
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    budget = NnunetBudget.of(params, arch)
    case_ids = held_out_cases(layout.split_file, int(fold))
    scoring = _scoring(params, layout, case_ids)
    cases = RawCases(params, root, case_ids)
    with pack_runners([layout.run_files(arch, fold).checkpoint], layout.split_file) as [(run, recipe, epoch, _)]:
        rows = score_cases(lambda image, _: segment_case(cases.chw(image), cases.spacing, recipe, run, budget.tta),
                           scoring.rows, layout.ingested, case_ids, desc=f"out-of-fold {arch} fold {fold}",
                           load=cases.load)
    metrics = summary_metrics(scoring, rows, case_ids, arch=arch, fold=int(fold), checkpoint_epoch=epoch)
    write_per_case(layout.oof_per_case(arch, fold), rows)
    metrics.write(layout.oof_metrics(arch, fold))
    return metrics.to_dict()


def nnunet_cv_summary(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """cv_summary@<nnU-Net entry>: out-of-fold scores, and each fold's nnU-Net and their ensemble (softmax
    probabilities averaged, as nnU-Net ensembles) on the test patients; the same files as a network's."""
    from medseg.evaluation.cross_validation import ENSEMBLE, out_of_fold_rows, write_cv_summary
    from medseg.evaluation.evaluate import read_case_list
    from medseg.evaluation.scoring import score_cases
    from medseg.nnunet.inference import case_probabilities

    disable_telemetry()
    if arch not in settings(params).cv.models:
        raise ConfigError(f"params.yaml: {arch} is not in cv.models {settings(params).cv.models}")
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    budget = NnunetBudget.of(params, arch)
    folds = list(settings(params).cv.folds)
    oof_rows, coverage = out_of_fold_rows(params, arch, root)
    test_ids = read_case_list(layout.split_file, "test")
    scoring = _scoring(params, layout, test_ids)
    oof_scoring = _scoring(params, layout, sorted({r["case"] for r in oof_rows}))
    cases = RawCases(params, root, test_ids)
    packs = [layout.run_files(arch, k).checkpoint for k in folds]
    with pack_runners(packs, layout.split_file) as runners:

        def folds_and_ensemble(image: np.ndarray, _spacing: Any) -> dict[str, np.ndarray]:
            labels, total = {}, None
            for k, (run, recipe, _, _) in zip(folds, runners):
                probs = case_probabilities(cases.chw(image), cases.spacing, recipe, run, budget.tta)
                labels[str(k)] = probs.argmax(axis=0).astype(np.uint8)
                total = probs if total is None else total + probs
            labels[ENSEMBLE] = total.argmax(axis=0).astype(np.uint8)
            return labels

        by_model = score_cases(folds_and_ensemble, scoring.rows, layout.ingested, test_ids,
                               desc=f"fold ensemble {arch}", load=cases.load)
    return write_cv_summary(layout, arch, folds, oof_rows, coverage, by_model, scoring, oof_scoring, test_ids)


def _scoring(params: dict[str, Any], layout: ProjectLayout, case_ids: list[str]):
    """The Scoring of these cases with the dataset's own classes and channels (nnU-Net reads every channel of a
    slice; no 2.5D context)."""
    from medseg.data.cases import read_cases
    from medseg.evaluation.evaluate import scoring_for

    return scoring_for(params, layout.ingested, case_ids, None, int(read_cases(layout.ingested)["in_channels"]), 0)


def torch_runner(folder: Path, fold: int):
    """(tiles -> logits in torch, the recipe, the checkpoint's epoch, its best EMA pseudo-Dice)."""
    import torch

    from medseg.nnunet.convert import recipe_of
    from medseg.nnunet.inference import NnunetRecipe
    from medseg.nnunet.results import fold_ensemble, load_checkpoint, read_results

    model = read_results(folder, [str(fold)], "final")
    network, axes = fold_ensemble(model)
    recipe = NnunetRecipe.from_dict(recipe_of(model, axes))
    checkpoint = load_checkpoint(model.checkpoints[str(fold)])
    best = checkpoint.get("_best_ema")

    def run(tiles: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))).numpy()

    return run, recipe, int(checkpoint.get("current_epoch") or 0), (float(best) if best is not None else None)
