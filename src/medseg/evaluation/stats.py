"""Statistics of a comparison: patient-level bootstrap confidence intervals, paired Wilcoxon tests with Holm's
correction, and bootstrap rank stability (as challengeR reports it).

The unit of analysis is the PATIENT: per-case, per-class scores (reports/<arch>/per_case.csv) are averaged per
class over a patient's cases (ACDC's two frames, several scans), then over classes, giving one number per patient;
every resample draws patients, never slices nor one patient's cases separately. Architectures are compared on the
patients they all have a score for, so every difference is paired.

scipy does the distributions (`scipy.stats.bootstrap`, `scipy.stats.wilcoxon`); Holm's step-down correction is the
only arithmetic done here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medseg.evaluation.metrics import finite_or_none


def patient_scores(rows: Iterable[Mapping[str, Any]], patient_of: Mapping[str, str], metric: str) -> dict[str, float]:
    """{patient: score}: per class, the mean of `metric` over the patient's cases (undefined values, e.g. a class
    absent from both masks, left out), then the mean over those classes. A patient with no defined value is left
    out; a case missing from `patient_of` is its own patient."""
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        value = finite_or_none(row.get(metric))
        if value is None:
            continue
        patient = patient_of.get(str(row["case"]), str(row["case"]))
        values.setdefault(patient, {}).setdefault(str(row["class"]), []).append(value)
    return {patient: float(np.mean([np.mean(v) for v in classes.values()]))
            for patient, classes in sorted(values.items())}


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean of `values` (one per patient); None below 2 patients."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    if np.all(values == values[0]):  # every resample has the same mean
        return float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class Paired:
    """One architecture against another on their common patients (difference = this one - the other)."""

    n: int
    median_difference: float | None
    p_value: float  # two-sided Wilcoxon signed-rank; 1.0 when every difference is zero or n < 2
    p_holm: float | None = None  # set by holm()


def paired_wilcoxon(a: Mapping[str, float], b: Mapping[str, float]) -> Paired:
    """Two-sided Wilcoxon signed-rank test of a vs b on the patients both have (zero differences dropped, as
    Wilcoxon's original procedure; exact p-values for small samples, scipy's default)."""
    from scipy import stats

    common = sorted(set(a) & set(b))
    diff = np.asarray([a[p] - b[p] for p in common], dtype=np.float64)
    if diff.size == 0:
        return Paired(0, None, 1.0)
    median = float(np.median(diff))
    if diff.size < 2 or np.all(diff == 0):  # nothing to test: no evidence of a difference
        return Paired(int(diff.size), median, 1.0)
    result = stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return Paired(int(diff.size), median, float(result.pvalue))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def rank_first_shares(scores: Mapping[str, Mapping[str, float]], higher_is_better: bool = True,
                      resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """{arch: share of patient bootstrap resamples in which it ranks first}. Every architecture is scored on the
    same resampled patients (those all have); architectures tied for first all count as first, so identical
    models both get 1.0."""
    archs = list(scores)
    common = sorted(set.intersection(*(set(s) for s in scores.values()))) if archs else []
    if not archs or not common:
        return {arch: math.nan for arch in archs}
    table = np.asarray([[scores[a][p] for p in common] for a in archs], dtype=np.float64)  # (archs, patients)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(common), size=(resamples, len(common)))
    means = table[:, picks].mean(axis=2)  # (archs, resamples)
    best = means.max(axis=0) if higher_is_better else means.min(axis=0)
    first = np.isclose(means, best, rtol=0.0, atol=1e-12)
    return {arch: float(first[i].mean()) for i, arch in enumerate(archs)}


@dataclass(frozen=True)
class Comparison:
    """What reports/comparison.md shows under "Statistics"."""

    best: str | None  # the highest mean DSC
    significant: bool  # the best differs from every other architecture at Holm-corrected alpha
    tied_with_best: list[str]  # architectures whose difference from the best is not significant
    paired: dict[str, Paired]  # arch -> its comparison with the best (the best itself is absent)
    rank_first: dict[str, float]
    patients: int  # patients every architecture was scored on


def compare(scores: Mapping[str, Mapping[str, float]], alpha: float = 0.05, resamples: int = 2000,
            seed: int = 0) -> Comparison:
    """Every architecture against the one with the highest mean (DSC: higher is better), Holm-corrected."""
    archs = [a for a in scores if scores[a]]
    if not archs:
        return Comparison(None, False, [], {}, {}, 0)
    common = sorted(set.intersection(*(set(scores[a]) for a in archs)))
    means = {a: float(np.mean([scores[a][p] for p in common])) if common else -math.inf for a in archs}
    best = max(archs, key=lambda a: means[a])
    others = [a for a in archs if a != best]
    raw = {a: paired_wilcoxon(scores[a], scores[best]) for a in others}
    adjusted = holm([raw[a].p_value for a in others]) if others else []
    paired = {a: Paired(raw[a].n, raw[a].median_difference, raw[a].p_value, p) for a, p in zip(others, adjusted)}
    tied = [a for a in others if paired[a].p_holm is None or paired[a].p_holm >= alpha]
    return Comparison(best, bool(others) and not tied, tied, paired,
                      rank_first_shares({a: scores[a] for a in archs}, True, resamples, seed), len(common))
