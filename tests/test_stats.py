"""Comparison statistics (medseg.evaluation.stats) on constructed data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.evaluation.stats import bootstrap_ci, compare, holm, paired_wilcoxon, patient_scores, rank_first_shares


def _scores(values) -> dict[str, float]:
    return {f"p{i:02d}": float(v) for i, v in enumerate(values)}


def test_patient_scores_average_a_patients_cases_per_class_then_over_classes():
    rows = [
        {"case": "a_ed", "class": "lv", "dsc": "0.8"}, {"case": "a_es", "class": "lv", "dsc": "0.6"},
        {"case": "a_ed", "class": "rv", "dsc": "0.4"}, {"case": "a_es", "class": "rv", "dsc": "nan"},
        {"case": "b", "class": "lv", "dsc": "1.0"}, {"case": "b", "class": "rv", "dsc": "nan"},
        {"case": "c", "class": "lv", "dsc": "nan"},  # nothing defined: c is left out
    ]
    got = patient_scores(rows, {"a_ed": "A", "a_es": "A"}, "dsc")
    # A: lv mean(0.8, 0.6) = 0.7, rv 0.4 (the NaN frame left out) -> 0.55; b is its own patient
    assert got == {"A": pytest.approx(0.55), "b": pytest.approx(1.0)}


def test_identical_models_have_p_one_and_share_the_first_rank():
    a = _scores(np.linspace(0.5, 0.9, 8))
    result = paired_wilcoxon(a, dict(a))
    assert result.p_value == 1.0 and result.median_difference == 0.0 and result.n == 8
    assert rank_first_shares({"x": a, "y": dict(a)}, resamples=200) == {"x": 1.0, "y": 1.0}
    comparison = compare({"x": a, "y": dict(a)}, resamples=200)
    assert not comparison.significant and comparison.tied_with_best == ["y"]
    assert comparison.paired["y"].p_holm == 1.0


def test_a_model_better_on_every_patient_is_significant_from_six_patients():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, 6)
    worse, better = _scores(base), _scores(base + rng.uniform(0.01, 0.1, 6))
    result = paired_wilcoxon(better, worse)
    assert result.p_value == pytest.approx(2 / 2**6)  # exact: all six signs agree
    assert result.median_difference > 0
    comparison = compare({"worse": worse, "better": better}, alpha=0.05, resamples=500)
    assert comparison.best == "better" and comparison.significant and comparison.tied_with_best == []
    assert comparison.rank_first["better"] == 1.0 and comparison.rank_first["worse"] == 0.0
    # five patients cannot get there with a two-sided test (exact p = 2/32)
    five = compare({"worse": _scores(base[:5]), "better": _scores((base + 0.05)[:5])})
    assert not five.significant and five.paired["worse"].p_value == pytest.approx(2 / 2**5)


def test_paired_tests_use_only_the_patients_both_models_have():
    a = _scores([0.9] * 7)
    b = {**_scores([0.5] * 6), "extra": 1.0}
    assert paired_wilcoxon(a, b).n == 6


def test_holm_step_down_known_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == pytest.approx([0.02])
    assert holm([]) == []


def test_holm_correction_can_turn_a_win_into_a_tie():
    """Two comparisons at raw p = 2/64 each: Holm doubles the smaller one to 0.0625 > 0.05."""
    base = np.linspace(0.4, 0.7, 6)
    scores = {"best": _scores(base + 0.2), "b": _scores(base + 0.1), "c": _scores(base)}
    comparison = compare(scores, alpha=0.05, resamples=200)
    assert comparison.paired["b"].p_value == pytest.approx(1 / 32)
    assert comparison.paired["b"].p_holm == pytest.approx(1 / 16)
    assert not comparison.significant and set(comparison.tied_with_best) == {"b", "c"}


def test_bootstrap_interval_is_near_the_normal_one_for_many_patients_and_a_point_for_constants():
    values = np.random.default_rng(1).normal(0.7, 0.1, 200)
    low, high = bootstrap_ci(values, 0.95, 4000, seed=0)
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_ci([0.5]) is None
    # same seed, same interval (the report is reproducible)
    assert bootstrap_ci(values[:20], seed=3) == bootstrap_ci(values[:20], seed=3)
