"""evaluate@<nnU-Net entry>: each test patient's raw scan through nnU-Net's inference recipe (medseg.nnunet.inference:
crop, normalisation, resampling, Gaussian sliding window, mirroring as nnUNetv2_predict does by default), the network
in torch, scored by the same Scoring and loop as every network (medseg.evaluation) against the ingested labels."""

from __future__ import annotations

import logging
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


def evaluate_nnunet_entry(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """evaluate@<nnU-Net entry>: the test patients' raw scans through nnU-Net's recipe, scored as every network."""
    from medseg.data.cases import load_case, read_cases
    from medseg.evaluation.evaluate import (
        overlay_slice,
        plot_overlays,
        read_case_list,
        scoring_for,
        summary_metrics,
        test_scores,
    )
    from medseg.evaluation.scoring import score_cases
    from medseg.nnunet.dataset import raw_case, raw_scans
    from medseg.nnunet.inference import segment_case

    disable_telemetry()
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    budget = NnunetBudget.of(params, arch)
    test_ids = read_case_list(layout.split_file, "test")
    cases = read_cases(layout.ingested)
    scoring = scoring_for(params, layout.ingested, test_ids, None, int(cases["in_channels"]), 0)
    spec, raw_dir, sources = raw_scans(params, root)
    by_id = {c.id: c for c in sources}
    missing = [i for i in test_ids if i not in by_id]
    if missing:
        raise ConfigError(f"{raw_dir}: {len(missing)} test case(s) of {layout.split_file} are not in the raw dataset "
                          f"(first: {missing[0]}); re-run ingest and split")
    overlays: list[tuple] = []

    with unpacked_results(layout.checkpoint(arch)) as (folder, fold):
        check_trained_on_this_split(folder, layout.checkpoint(arch), layout.split_file)
        run, recipe, epoch, val_dice = torch_runner(folder, fold)
        current: dict[str, Any] = {}

        # nnU-Net sees the raw scan (its own normalisation and resampling), scored against the ingested label:
        # the loader hands the segmenter the raw volume and its spacing of the case being scored
        def load(case_id: str):
            raw, _ = raw_case(by_id[case_id], spec)
            _, label, spacing = load_case(layout.ingested, case_id)
            current["spacing"] = tuple(float(s) for s in (raw.spacing or spacing))
            return raw.image, label, spacing

        def segment(image: np.ndarray) -> np.ndarray:
            return segment_case(image.transpose(1, 0, 2, 3), current["spacing"], recipe, run, mirror=budget.tta)

        def keep_overlay(case_id: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> None:
            if len(overlays) < settings(params).evaluate.overlay_cases:
                normalised, _, _ = load_case(layout.ingested, case_id)
                overlays.append((case_id, *overlay_slice(normalised, np.asarray(label), pred)))

        rows = score_cases(segment, scoring.rows, layout.ingested, test_ids, desc=f"evaluate {arch}",
                           inspect=keep_overlay, load=load)

    metrics = summary_metrics(scoring, rows, test_ids, arch=arch, checkpoint_epoch=epoch, val_dice=val_dice)
    metrics.write(layout.metrics(arch))
    write_dvc_metrics(layout.test_scores(arch), test_scores(metrics), arch)
    write_per_case(layout.per_case(arch), rows)
    plot_overlays(layout.overlay(arch), overlays, scoring.class_names, arch)
    _log.info("%s: mean DSC %s, mean HD95 %s (%s) on %d test cases (nnU-Net's recipe, mirroring %s)", arch,
              metrics.mean_dsc, metrics.mean_hd95, metrics.hd95_unit, len(test_ids), "on" if budget.tta else "off")
    return metrics.to_dict()


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
