"""Comparison report over every architecture in params.yaml `models`.

Reads what the train/evaluate/export/register stages wrote and produces:
- reports/comparison.md: summary table (family, DSC, HD95, NSD, params, GFLOPs, CPU latency, training time, registry
  version), the statistics (medseg.evaluation.stats: patient-bootstrap 95 % intervals, paired Wilcoxon tests against the best
  with Holm's correction, rank stability; DSC's best is bold only where it is significant, ties are all bold),
  per-class DSC, HD95 and NSD tables (organs as columns, like TransUNet's Table 1);
- reports/comparison_dsc.png (per-class grouped bars), reports/comparison_summary.png (DSC vs latency and HD95);
- reports/per_class.csv (long format arch,class,arch_class,dsc,hd95,nsd for `dvc plots`);
- reports/statistics.json: the numbers of comparison.md's Statistics section, also logged (with comparison.md) as
  an MLflow run `comparison-<dataset>` in the register stage's experiment when that store exists;
- reports/qualitative.png: the same test slices (rows): image, ground truth, then each model's prediction.
Architectures without outputs are listed as missing instead of failing the report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medseg.io import write_json, write_text
from medseg.layout import ProjectLayout
from medseg.report.collect import collect_cv_results, collect_results, read_arch_outputs
from medseg.report.figures import plot_dsc_bars, plot_qualitative, plot_summary
from medseg.report.markdown import SUMMARY_COLUMNS, best_values, render_markdown, write_per_class_csv
from medseg.report.mlflow_run import log_comparison_run
from medseg.report.statistics import compute_statistics

__all__ = ["OUTPUTS", "build_report", "read_arch_outputs"]

log = logging.getLogger(__name__)

OUTPUTS = ("comparison.md", "comparison_dsc.png", "comparison_summary.png", "qualitative.png", "per_class.csv",
           "statistics.json")


def build_report(params: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Write the comparison report files under reports/; returns the summary numbers, the missing archs and paths."""
    root = Path(root)
    out = ProjectLayout.of(params, root).comparison_dir
    rows, missing = collect_results(params, root)
    statistics = compute_statistics(params, rows, root)
    cv_rows = collect_cv_results(params, root)
    cv_statistics = compute_statistics(params, cv_rows, root) if cv_rows else None
    qualitative_note = plot_qualitative(out / "qualitative.png", params, root, rows)
    plot_dsc_bars(out / "comparison_dsc.png", rows)
    plot_summary(out / "comparison_summary.png", rows)
    write_per_class_csv(out / "per_class.csv", rows)
    write_json(out / "statistics.json", {"test": statistics, "cross_validation": cv_statistics})
    write_text(out / "comparison.md", render_markdown(params, rows, missing, qualitative_note, statistics, cv_rows,
                                                      cv_statistics))
    # after every file it logs is written: this run's comparison.md, not the previous one (or none, on a first run)
    mlflow_run = log_comparison_run(params, root, statistics, cv_statistics,
                                    [out / "comparison.md", out / "statistics.json"])
    for arch in missing:
        log.warning("report: %s is missing: %s", arch, missing[arch])
    return {
        "architectures": [row.public() for row in rows],
        "missing": missing,
        "statistics": statistics,
        "cv_statistics": cv_statistics,
        "mlflow_run_id": mlflow_run,
        "best": {key: best_values(rows, key, better) for key, _, _, better in SUMMARY_COLUMNS},
        "outputs": [str(out / name) for name in OUTPUTS],
    }
