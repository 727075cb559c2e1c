"""An exported model (model.onnx with its card, or a registered models:/ version) scored on this checkout's test
split exactly as the evaluate stage scores a checkpoint, through ONNX Runtime. The champion gate
(medseg.tracking.promotion.champion_reevaluator) measures a champion with it on a challenger's test data.

Its own module so that the evaluate stage does not depend on medseg.deployment.predict (nor the register stage on more of
evaluation than this needs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.deployment.card import sha256_of_test_data
from medseg.errors import ConfigError
from medseg.evaluation.evaluate import read_case_list, scoring_for, summary_metrics
from medseg.layout import ProjectLayout


def evaluate_onnx(params: dict[str, Any], model: str | Path, root: str | Path = ".", *,
                  tracking_uri: str | None = None, expect_test_data: str | None = None) -> dict[str, Any]:
    """metrics.json's scores for an exported model (a model.onnx with its card, or a models:/ URI) on this
    checkout's test split, as evaluate_model scores a checkpoint: the ingested slices, the card's context and
    training size, the same protocol and rules, through ONNX Runtime. The champion gate measures a champion with
    it on a challenger's test data (`expect_test_data`: refuse before predicting if the checkout's differs)."""
    from medseg.data.cases import read_cases
    from medseg.deployment.predict import load_predictor
    from medseg.evaluation.scoring import score_cases

    layout = ProjectLayout.of(params, Path(root))
    cases = read_cases(layout.ingested)
    test_ids = read_case_list(layout.split_file, "test")
    entries = {c["id"]: c for c in cases["cases"]}
    here = sha256_of_test_data(entries, test_ids)
    if expect_test_data and here != expect_test_data:
        raise ConfigError(f"{layout.ingested}: this checkout's test data (sha256 {here[:12]}…) is not the data "
                          f"expected (sha256 {expect_test_data[:12]}…); run the ingest and split stages it was "
                          f"measured with")
    predictor = load_predictor(model, tracking_uri=tracking_uri)
    card = predictor.card
    if dict(card.normalisation) != dict(cases.get("normalisation") or {}):
        raise ConfigError(f"{predictor.source}: trained on {card.normalisation} inputs, but {layout.ingested} was "
                          f"normalised with {cases.get('normalisation')}: its scores on these arrays would mean nothing")
    scoring = scoring_for(params, layout.ingested, test_ids, card.class_names, card.in_channels, card.context)
    rows = score_cases(lambda image, spacing: predictor.segment_normalised(np.asarray(image, dtype=np.float32),
                                                                           spacing=spacing)[0],
                       scoring.rows, layout.ingested, test_ids)
    return {"model": predictor.source, **summary_metrics(scoring, rows, test_ids, arch=card.arch).to_dict()}
