"""The comparison's statistics (medseg.evaluation.stats): per-patient scores, bootstrap intervals, paired tests against the best
with Holm's correction, rank stability, the Mamba ablation pairs, and every architecture against the nnU-Net
baseline where one was evaluated."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.config import settings
from medseg.errors import MedsegError
from medseg.evaluation.metrics import finite_or_none
from medseg.report.collect import ArchRow, CVRow, patients_of_cases

log = logging.getLogger(__name__)


STAT_METRICS = (("dsc", "DSC (%)", 100.0), ("hd95", "HD95", 1.0), ("nsd", "NSD (%)", 100.0))


def compute_statistics(params: dict[str, Any], rows: Sequence[ArchRow | CVRow], root: str | Path = "."
                       ) -> dict[str, Any]:
    """Patient-level statistics of the evaluated architectures (medseg.evaluation.stats), JSON-able: per architecture
    the mean and bootstrap interval of each metric over patients, and the paired comparison of DSC with the best."""
    from medseg.evaluation import stats

    project = settings(params)
    config, seed = project.report, project.seed
    patient_of = patients_of_cases(params, root)
    scored = [row for row in rows if row.per_case]
    per_metric = {metric: {row.arch: stats.patient_scores(row.per_case, patient_of, metric) for row in scored}
                  for metric, _, _ in STAT_METRICS}
    common = set.intersection(*(set(v) for v in per_metric["dsc"].values())) if scored else set()
    archs: dict[str, Any] = {}
    for row in scored:
        entry = {}
        for metric, _, _ in STAT_METRICS:
            values = [v for p, v in per_metric[metric][row.arch].items() if p in common]
            interval = stats.bootstrap_ci(values, config.confidence, config.bootstrap_resamples, seed)
            entry[metric] = {"mean": float(np.mean(values)) if values else None,
                             "ci": list(interval) if interval else None, "patients": len(values)}
        archs[row.arch] = entry
    dsc = {a: {p: v for p, v in s.items() if p in common} for a, s in per_metric["dsc"].items()}
    result = stats.compare(dsc, config.alpha, config.bootstrap_resamples, seed)
    return {
        "patients": len(common), "confidence": config.confidence, "alpha": config.alpha,
        "resamples": config.bootstrap_resamples, "architectures": archs, "best": result.best,
        "significant": result.significant, "tied_with_best": result.tied_with_best,
        "paired": {a: {"n": c.n, "median_difference": c.median_difference, "p": c.p_value, "p_holm": c.p_holm}
                   for a, c in result.paired.items()},
        "rank_first": result.rank_first,
        "ablation": _ablation(dsc),
        "baseline": _against_baseline(dsc),
    }


def _against_baseline(dsc: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """Every architecture against the nnU-Net baseline (the first nnU-Net entry evaluated): DSC paired over the
    same patients, median difference (architecture - nnU-Net), two-sided Wilcoxon p, Holm-corrected over them."""
    from medseg.evaluation import stats
    from medseg.nnunet.train import is_nnunet_entry

    baseline = next((arch for arch in dsc if is_nnunet_entry(arch)), None)
    if baseline is None:
        return None
    paired = {}
    for arch in dsc:
        if arch != baseline:
            test = stats.paired_wilcoxon(dsc[arch], dsc[baseline])
            paired[arch] = {"n": test.n, "median_difference": test.median_difference, "p": test.p_value,
                            "mean": float(np.mean(list(dsc[arch].values()))) if dsc[arch] else None}
    for entry, adjusted in zip(paired.values(), stats.holm([entry["p"] for entry in paired.values()])):
        entry["p_holm"] = adjusted
    values = list(dsc[baseline].values())
    return {"arch": baseline, "mean": float(np.mean(values)) if values else None, "paired": paired}


def _ablation(dsc: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each Mamba network against its no-Mamba twin (both evaluated): what the selective scans add to DSC, paired
    over patients, Holm-corrected over the pairs."""
    from medseg.evaluation import stats
    from medseg.models import get_model_info

    pairs = []
    for twin in dsc:
        try:
            original = get_model_info(twin).ablation_of
        except MedsegError:
            continue
        if original and original in dsc:
            test = stats.paired_wilcoxon(dsc[original], dsc[twin])
            pairs.append({"mamba": original, "twin": twin, "n": test.n, "p": test.p_value,
                          "median_difference": test.median_difference,
                          "mamba_mean": float(np.mean(list(dsc[original].values()))),
                          "twin_mean": float(np.mean(list(dsc[twin].values())))})
    for pair, adjusted in zip(pairs, stats.holm([pair["p"] for pair in pairs])):
        pair["p_holm"] = adjusted
    return pairs


def statistics_metrics(statistics: dict[str, Any] | None, prefix: str) -> dict[str, float]:
    """Flat MLflow metrics of one statistics block: `<prefix>dsc_mean.<arch>`, `..._ci_low/_ci_high` (DSC, HD95,
    NSD), `<prefix>p_holm.<arch>` and `<prefix>median_diff.<arch>` against the best, `<prefix>p_first.<arch>`."""
    if not statistics:
        return {}
    out: dict[str, float] = {}
    for arch, entry in statistics["architectures"].items():
        for metric, _, _ in STAT_METRICS:
            values = entry[metric]
            out[f"{prefix}{metric}_mean.{arch}"] = values["mean"]
            if values["ci"]:
                out[f"{prefix}{metric}_ci_low.{arch}"], out[f"{prefix}{metric}_ci_high.{arch}"] = values["ci"]
        out[f"{prefix}p_first.{arch}"] = statistics["rank_first"].get(arch)
    for arch, paired in statistics["paired"].items():
        out[f"{prefix}p_holm.{arch}"] = paired["p_holm"]
        out[f"{prefix}median_diff.{arch}"] = paired["median_difference"]
    for arch, paired in ((statistics.get("baseline") or {}).get("paired") or {}).items():
        out[f"{prefix}vs_nnunet_p_holm.{arch}"] = paired["p_holm"]
        out[f"{prefix}vs_nnunet_median_diff.{arch}"] = paired["median_difference"]
    return {k: float(v) for k, v in out.items() if finite_or_none(v) is not None}
