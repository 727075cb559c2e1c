"""The one scoring loop: each case of an ingested dataset loaded, segmented by any segmenter, and scored.

A segmenter maps a normalised (D, C, H, W) volume and its (sz, sy, sx) spacing (which a planned recipe resamples
from, medseg.data.plan) to its labels (D, H, W): a checkpoint through
`medseg.inference.torch_backend.predict_volume`, an ONNX session through `medseg.deployment.predict.Predictor`, a fold ensemble; or to a
mapping name -> labels when one pass gives several (each fold's model and their ensemble). A scorer turns
(case id, labels, truth, spacing) into per-class rows: `medseg.evaluation.evaluate.Scoring.rows` (DSC, HD95, NSD, as
metrics.json holds them) for evaluation, cross-validation and the champion's re-evaluation, `dice_rows` (DSC only,
cheap) for training's validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medseg.evaluation.metrics import foreground_dice

Segmenter = Callable[[np.ndarray, Any], "np.ndarray | Mapping[str, np.ndarray]"]
Scorer = Callable[[str, np.ndarray, np.ndarray, Any], list[dict[str, Any]]]
Inspector = Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]
Loader = Callable[[str], tuple[np.ndarray, np.ndarray, Any]]


def score_cases(segment: Segmenter, score: Scorer, ingested: str | Path, case_ids: Sequence[str], *,
                desc: str | None = None, inspect: Inspector | None = None, load: Loader | None = None
                ) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
    """Rows of every case in `case_ids`, in order: a list, or, for a segmenter that gives a mapping, a mapping of
    lists by the same names. `desc` shows progress (medseg.runtime.progress); `inspect(case_id, image, label, labels)` sees
    each case (evaluation keeps a few for its overlay figure). `load(case_id)` gives (image, label, spacing): by
    default the ingested case (normalised image); nnU-Net's entry gives its raw scan (medseg.nnunet.evaluate)."""
    from medseg.data.cases import load_case
    from medseg.runtime.progress import progress

    rows: Any = None
    for case_id in progress(case_ids, desc=desc, unit="case") if desc else case_ids:
        image, label, spacing = load(case_id) if load is not None else load_case(ingested, case_id)
        labels = segment(image, spacing)
        if isinstance(labels, Mapping):
            rows = rows if rows is not None else {name: [] for name in labels}
            for name, pred in labels.items():
                rows[name] += score(case_id, pred, label, spacing)
        else:
            rows = rows if rows is not None else []
            rows += score(case_id, labels, label, spacing)
        if inspect is not None:
            inspect(case_id, image, label, labels)
    return rows if rows is not None else []


def dice_rows(num_classes: int) -> Scorer:
    """A scorer of foreground Dice only (medseg.evaluation.metrics.foreground_dice): one row per class present in the case's
    truth or labels."""

    def score(case_id: str, pred: np.ndarray, label: np.ndarray, spacing: Any) -> list[dict[str, Any]]:
        return [{"case": case_id, "dsc": d} for d in foreground_dice(pred, label, num_classes)]

    return score
