"""Comparison report over every architecture in params.yaml `models`.

Reads what the train/evaluate/export/register stages wrote and produces:
- reports/comparison.md: summary table (family, DSC, HD95, NSD, params, GFLOPs, CPU latency, training time, registry
  version), the statistics (medseg.stats: patient-bootstrap 95 % intervals, paired Wilcoxon tests against the best
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

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medseg.config import settings
from medseg.contracts import (CheckpointMeta, EvaluationMetrics, ExportReport, RegistryRecord, TrainSummary,
                              read_per_case)
from medseg.display import display_slice
from medseg.errors import MedsegError
from medseg.io import atomic_path, read_json, write_json, write_text
from medseg.layout import ProjectLayout
from medseg.metrics import finite_or_none

log = logging.getLogger(__name__)

OUTPUTS = ("comparison.md", "comparison_dsc.png", "comparison_summary.png", "qualitative.png", "per_class.csv",
           "statistics.json")


# --------------------------------------------------------------------------------------------------- collect
def _optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: cannot read JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _family(arch: str) -> str:
    from medseg.models import get_model_info

    try:
        return get_model_info(arch).family
    except MedsegError:
        return "?"


def _complexity(model, meta: CheckpointMeta) -> tuple[float | None, float | None]:
    """(params in millions, GFLOPs of one slice at the training size) from medseg.models.complexity."""
    from medseg.models.complexity import count_gflops, count_params

    params_m = count_params(model) / 1e6
    try:
        gflops = count_gflops(model, (1, int(meta.in_channels), *[int(s) for s in meta.image_size]))
    except Exception as exc:  # an op the counter cannot trace must not sink the whole report
        log.warning("GFLOPs of %s not counted: %s", meta.arch, exc)
        gflops = None
    return params_m, gflops


def patients_of_cases(params: dict[str, Any], root: str | Path = ".") -> dict[str, str]:
    """{case id: patient} from the ingested cases.json ({} before ingest: every case is then its own patient)."""
    cases_json = ProjectLayout.of(params, root).cases_json
    if not cases_json.is_file():
        return {}
    return {str(c["id"]): str(c.get("patient") or c["id"]) for c in read_json(cases_json).get("cases", [])}


@dataclass(frozen=True)
class ArchOutputs:
    """What one architecture's stages wrote (medseg.contracts), None where a stage has not run."""

    metrics: EvaluationMetrics | None
    export: ExportReport | None
    train_summary: TrainSummary | None
    registry: RegistryRecord | None


def read_arch_outputs(params: dict[str, Any], arch: str, root: str | Path = ".") -> ArchOutputs:
    """The report and the Prefect flows' summaries both read results through this."""
    layout = ProjectLayout.of(params, root)
    return ArchOutputs(EvaluationMetrics.read_if_there(layout.metrics(arch)),
                       ExportReport.read_if_there(layout.export_report(arch)),
                       TrainSummary.read_if_there(layout.train_summary(arch)),
                       RegistryRecord.read_if_there(layout.registry_record(arch)))


def collect_results(params: dict[str, Any], root: str | Path = ".", load_models: bool = True) -> tuple[list, dict]:
    """(rows for the architectures with metrics, {arch: why it is missing}).

    A row holds the numbers of the summary table plus `per_class`, and (if `load_models`) the trained `model`
    and checkpoint `meta` for the complexity columns and the qualitative figure.
    """
    from medseg.evaluation import HD95_UNITS
    from medseg.inference import load_trained_model

    root = Path(root)
    layout = ProjectLayout.of(params, root)
    rows, missing = [], {}
    for arch in params.get("models") or []:
        outputs = read_arch_outputs(params, arch, root)
        metrics = outputs.metrics
        if metrics is None:
            missing[arch] = f"no reports/{arch}/metrics.json (run `dvc repro evaluate@{arch}`)"
            continue
        export, summary = outputs.export or ExportReport(arch=arch), outputs.train_summary or TrainSummary(arch=arch)
        protocol = str(metrics.protocol or "")
        row: dict[str, Any] = {
            "arch": arch,
            "family": _family(arch),
            "mean_dsc": finite_or_none(metrics.mean_dsc),
            "mean_hd95": finite_or_none(metrics.mean_hd95),
            "mean_nsd": finite_or_none(metrics.mean_nsd),
            "nsd_tolerance": metrics.nsd_tolerance,
            "protocol": protocol,
            "hd95_unit": metrics.hd95_unit or HD95_UNITS.get(protocol, "?"),
            "test_cases_sha256": metrics.test_cases_sha256,
            "per_class": {name: scores.to_dict() for name, scores in metrics.per_class.items()},
            "params_m": None,
            "gflops": None,
            "torch_latency_ms": finite_or_none(export.torch_latency_ms),
            "onnx_latency_ms": finite_or_none(export.onnx_latency_ms),
            "latency": export.latency or {},  # runs, warm-up, threads, machine, load (medseg.export)
            "parity_passed": export.parity_passed if outputs.export else None,
            "train_seconds": finite_or_none(summary.train_seconds),
            "seconds_per_epoch": finite_or_none(summary.seconds_per_epoch),
            "train_memory_mb": finite_or_none(summary.train_memory_mb),
            "train_device": summary.device,
            "registry_version": outputs.registry.version if outputs.registry else None,
            "per_case": read_per_case(layout.per_case(arch), missing_ok=True),
            "model": None,
            "meta": None,
        }
        checkpoint = layout.checkpoint(arch)
        if load_models and checkpoint.is_file():
            try:
                row["model"], row["meta"] = load_trained_model(checkpoint)
                row["params_m"], row["gflops"] = _complexity(row["model"], row["meta"])
            except MedsegError as exc:
                log.warning("%s: %s", checkpoint, exc)
        rows.append(row)
    return rows, missing


# --------------------------------------------------------------------------------------------------- tables
# (key, header, format, better): better is "max", "min" or None (not ranked)
SUMMARY_COLUMNS: list[tuple[str, str, Callable[[float], str], str | None]] = [
    ("mean_dsc", "Mean DSC (%)", lambda v: f"{100 * v:.2f}", "max"),
    ("mean_hd95", "Mean HD95", lambda v: f"{v:.2f}", "min"),
    ("mean_nsd", "Mean NSD (%)", lambda v: f"{100 * v:.2f}", "max"),
    ("params_m", "Params (M)", lambda v: f"{v:.2f}" if v >= 1 else f"{v:.3g}", "min"),
    ("gflops", "GFLOPs", lambda v: f"{v:.3g}", "min"),
    ("torch_latency_ms", "PyTorch CPU (ms)", lambda v: f"{v:.1f}", "min"),
    ("onnx_latency_ms", "ONNX Runtime CPU (ms)", lambda v: f"{v:.1f}", "min"),
    ("train_seconds", "Training time", lambda v: _duration(v), "min"),
    ("seconds_per_epoch", "s / epoch", lambda v: f"{v:.1f}", "min"),
    ("train_memory_mb", "Peak train memory (MiB)", lambda v: f"{v:.0f}", "min"),
]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def best_values(rows: Sequence[dict], key: str, better: str | None) -> float | None:
    """The best value of a column (direction-aware), None if the column has no numbers or is not ranked."""
    values = [row[key] for row in rows if finite_or_none(row.get(key)) is not None]
    if not values or better is None:
        return None
    return max(values) if better == "max" else min(values)


def _cell(value: Any, fmt: Callable[[float], str], best: float | None) -> str:
    number = finite_or_none(value)
    if number is None:
        return "n/a"
    text = fmt(number)
    # Compared as printed, so values that read the same are all bold.
    return f"**{text}**" if best is not None and text == fmt(best) else text


def _md_table(header: list[str], lines: list[list[str]], text_columns: int = 1) -> str:
    """Markdown table; the first `text_columns` columns left-aligned, the numbers right-aligned."""
    align = [":---"] * text_columns + ["---:"] * (len(header) - text_columns)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _class_names(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row["per_class"]:
            if name not in names:
                names.append(name)
    return names


LATENCY_KEYS = ("torch_latency_ms", "onnx_latency_ms")
BUSY_LOAD_PER_CORE = 1.0  # a 1-minute load average above this per core: other work competed while timing


def latency_comparability(rows: Sequence[dict]) -> tuple[set[str], list[str]]:
    """(architectures whose latencies are not comparable with the others', notes for the report). Comparable:
    measured on the machine most of the exports were measured on (same CPU, cores, torch, onnxruntime), with
    the machine not busy; where others have that record, an export without it (made before medseg kept it)
    is not comparable."""
    machines = [(row.get("latency") or {}).get("machine") for row in rows]
    machines = [m for m in machines if m]
    if not machines:  # none recorded (every export older than the record): nothing to tell them apart by
        return set(), []
    counts = sorted(((machines.count(m), m) for m in set(machines)), reverse=True)
    # the machine most exports ran on; with a tie there is none, and every latency is "another machine"'s
    common = counts[0][1] if len(counts) == 1 or counts[0][0] > counts[1][0] else None
    odd, notes = set(), []
    for row in rows:
        record = row.get("latency") or {}
        if not any(finite_or_none(row.get(k)) is not None for k in LATENCY_KEYS):
            continue
        load = finite_or_none(record.get("load_per_core"))
        if not record.get("machine"):
            odd.add(row["arch"])
            notes.append(f"`{row['arch']}`: measured before medseg recorded the machine (re-run its export)")
        elif record["machine"] != common:
            odd.add(row["arch"])
            notes.append(f"`{row['arch']}`: measured on another machine ({record['machine']})")
        elif load is not None and load > BUSY_LOAD_PER_CORE:
            odd.add(row["arch"])
            notes.append(f"`{row['arch']}`: measured while the machine was busy (load {load:g} per core)")
    return odd, notes


def summary_table(rows: Sequence[dict], statistics: dict[str, Any] | None = None) -> str:
    """The summary; with `statistics`, DSC's bold marks the best only where it is significant, else the best and
    every architecture tied with it."""
    units = sorted({row["hd95_unit"] for row in rows})
    ranked = len(rows) > 1
    header = ["Architecture", "Family"] + [
        f"{title} ({', '.join(units)})" if key == "mean_hd95" else title for key, title, _, _ in SUMMARY_COLUMNS
    ] + ["ONNX parity", "MLflow version"]
    odd, _ = latency_comparability(rows)
    best = {key: best_values([r for r in rows if not (key in LATENCY_KEYS and r["arch"] in odd)], key, better)
            if ranked else None for key, _, _, better in SUMMARY_COLUMNS}
    top = None
    if ranked and statistics and statistics.get("best"):
        top = {statistics["best"], *statistics.get("tied_with_best", [])}
    lines = []
    for row in rows:
        cells = [f"`{row['arch']}`", row["family"]]
        for key, _, fmt, _ in SUMMARY_COLUMNS:  # † marks a latency not comparable with the others (see notes)
            value = row.get(key)  # rows built by callers may lack newer columns: "n/a"
            mark = "†" if key in LATENCY_KEYS and row["arch"] in odd and finite_or_none(value) is not None else ""
            if key == "mean_dsc" and top is not None:  # the paired test decides, not the printed digits
                number = finite_or_none(value)
                cells.append("n/a" if number is None else (f"**{fmt(number)}**" if row["arch"] in top else fmt(number)))
                continue
            cells.append(_cell(value, fmt, None if mark else best[key]) + mark)
        parity = row["parity_passed"]
        cells.append("n/a" if parity is None else ("passed" if parity else "FAILED"))
        cells.append(str(row["registry_version"]) if row["registry_version"] else "not registered")
        lines.append(cells)
    return _md_table(header, lines, text_columns=2)


def per_class_table(rows: Sequence[dict], metric: str) -> str:
    """Organs as columns (plus the mean), one line per architecture; best per column in bold."""
    names = _class_names(rows)
    better = "min" if metric == "hd95" else "max"
    fmt = (lambda v: f"{v:.2f}") if metric == "hd95" else (lambda v: f"{100 * v:.2f}")
    values = [
        {"arch": row["arch"], "mean": row.get(f"mean_{metric}"),
         **{name: (row["per_class"].get(name) or {}).get(metric) for name in names}}
        for row in rows
    ]
    ranked = len(rows) > 1
    best = {key: best_values(values, key, better) if ranked else None for key in ["mean", *names]}
    lines = [[f"`{v['arch']}`", _cell(v["mean"], fmt, best["mean"])] + [_cell(v[n], fmt, best[n]) for n in names]
             for v in values]
    return _md_table(["Architecture", "Mean"] + names, lines)


def _latency_lines(rows: Sequence[dict]) -> list[str]:
    """How the latencies were measured, and which are not comparable (marked †)."""
    odd, notes = latency_comparability(rows)
    records = [row["latency"] for row in rows
               if (row.get("latency") or {}).get("machine") and row["arch"] not in odd]
    lines = []
    if records:
        r = records[0]
        lines += [f"Latency: median of {r.get('runs')} calls after {r.get('warmup')} warm-up calls, "
                  f"{r.get('threads')} threads, on {r.get('machine')}; the interquartile range is in "
                  f"`export.json` (`*_latency_iqr_ms`).", ""]
    if notes:
        lines += ["> **Latencies marked † are not comparable with the others:** " + "; ".join(notes) + ".", ""]
    return lines


def _devices(rows: Sequence[dict]) -> str:
    devices = sorted({str(row.get("train_device")) for row in rows if row.get("train_device")})
    return ", ".join(devices) if devices else "not recorded"


def _tolerance_text(rows: Sequence[dict], units: Sequence[str]) -> str:
    """"2 mm", or "aorta 1 mm, liver 3 mm, ..." when classes differ; "a tolerance not recorded" for old metrics."""
    tolerances: dict[str, float] = {}
    for row in rows:
        for name, value in (row.get("nsd_tolerance") or {}).items():
            tolerances.setdefault(name, value)
    unit = "/".join(units)
    if not tolerances:
        return "a tolerance not recorded (evaluated before medseg measured NSD)"
    if len(set(tolerances.values())) == 1:
        return f"{next(iter(tolerances.values())):g} {unit}"
    return ", ".join(f"{name} {value:g} {unit}" for name, value in tolerances.items())


STAT_METRICS = (("dsc", "DSC (%)", 100.0), ("hd95", "HD95", 1.0), ("nsd", "NSD (%)", 100.0))


def compute_statistics(params: dict[str, Any], rows: Sequence[dict], root: str | Path = ".") -> dict[str, Any]:
    """Patient-level statistics of the evaluated architectures (medseg.stats), JSON-able: per architecture the
    mean and bootstrap interval of each metric over patients, and the paired comparison of DSC with the best."""
    from medseg import stats

    config = settings(params).report
    seed = int(params.get("seed", 0) or 0)
    patient_of = patients_of_cases(params, root)
    scored = [row for row in rows if row.get("per_case")]
    per_metric = {metric: {row["arch"]: stats.patient_scores(row["per_case"], patient_of, metric) for row in scored}
                  for metric, _, _ in STAT_METRICS}
    common = set.intersection(*(set(v) for v in per_metric["dsc"].values())) if scored else set()
    archs: dict[str, Any] = {}
    for row in scored:
        entry = {}
        for metric, _, _ in STAT_METRICS:
            values = [v for p, v in per_metric[metric][row["arch"]].items() if p in common]
            interval = stats.bootstrap_ci(values, config.confidence, config.bootstrap_resamples, seed)
            entry[metric] = {"mean": float(np.mean(values)) if values else None,
                             "ci": list(interval) if interval else None, "patients": len(values)}
        archs[row["arch"]] = entry
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
    }


def _ablation(dsc: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each Mamba network against its no-Mamba twin (both evaluated): what the selective scans add to DSC, paired
    over patients, Holm-corrected over the pairs."""
    from medseg import stats
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


def ablation_section(statistics: dict[str, Any], scope: str = "test") -> list[str]:
    """"What the Mamba layers add": each Mamba network paired with its twin, where both were evaluated."""
    pairs = statistics.get("ablation") or []
    if not pairs:
        return []
    alpha = statistics["alpha"]
    lines = [f"## Ablation: what the Mamba layers add ({scope})", "",
             "Each Mamba network against its `_nomamba` twin (the same network with the selective scans removed, "
             "as nnU-Net Revisited's No-Mamba Base): DSC over the same patients, median paired difference "
             "(Mamba - twin), two-sided Wilcoxon p, Holm-corrected over the pairs.", ""]
    table = []
    for pair in pairs:
        diff = pair["median_difference"]
        significant = pair["p_holm"] < alpha
        verdict = (("the scans help" if diff > 0 else "the scans hurt") if significant and diff
                   else "no significant difference")
        table.append([f"`{pair['mamba']}` vs `{pair['twin']}`", f"{100 * pair['mamba_mean']:.2f}",
                      f"{100 * pair['twin_mean']:.2f}", "n/a" if diff is None else f"{100 * diff:+.2f}",
                      f"{pair['p']:.3g}", f"{pair['p_holm']:.3g}", str(pair["n"]), verdict])
    lines += [_md_table(["Pair", "Mamba DSC (%)", "Twin DSC (%)", "Median difference (points)", "Wilcoxon p",
                         "Holm p", "Patients", "Verdict"], table), ""]
    return lines


def statistics_section(statistics: dict[str, Any], units: Sequence[str], title: str = "Statistics",
                       population: str = "test patients") -> list[str]:
    """The "Statistics" part of comparison.md (and, on out-of-fold scores, of its cross-validation part)."""
    archs = statistics["architectures"]
    if not archs:
        return []
    n, level = statistics["patients"], f"{100 * statistics['confidence']:g} %"
    best, paired = statistics["best"], statistics["paired"]
    lines = [f"## {title} ({n} {population})", "",
             f"Means over patients (each patient's cases and classes averaged first) with {level} percentile-bootstrap "
             f"intervals resampling patients ({statistics['resamples']} resamples). Each architecture's DSC is compared "
             f"with the best's on the same patients: median paired difference, two-sided Wilcoxon signed-rank p, and "
             f"p Holm-corrected over the {len(paired)} comparison(s) (alpha {statistics['alpha']:g}). "
             "P(first): the share of bootstrap resamples in which it ranks first on DSC (ties count for each).", ""]

    def interval(entry: dict[str, Any], scale: float) -> str:
        if entry["mean"] is None:
            return "n/a"
        ci = entry["ci"]
        text = f"{scale * entry['mean']:.2f}"
        return text + (f" [{scale * ci[0]:.2f}, {scale * ci[1]:.2f}]" if ci else " [n/a]")

    header = ["Architecture"] + [f"{title} [{level} CI]" if metric != "hd95" else f"HD95 ({', '.join(units)}) "
                                 f"[{level} CI]" for metric, title, _ in STAT_METRICS]
    header += ["DSC vs best (median, points)", "Wilcoxon p", "Holm p", "P(first)"]
    table = []
    for arch, entry in archs.items():
        cells = [f"`{arch}`"] + [interval(entry[metric], scale) for metric, _, scale in STAT_METRICS]
        if arch == best:
            cells += ["best mean", "", "", ""]
        else:
            c = paired.get(arch) or {}
            diff = c.get("median_difference")
            cells += ["n/a" if diff is None else f"{100 * diff:+.2f}", f"{c['p']:.3g}", f"{c['p_holm']:.3g}", ""]
        share = statistics["rank_first"].get(arch)
        cells[-1] = "n/a" if share is None or share != share else f"{100 * share:.0f} %"
        table.append(cells)
    lines += [_md_table(header, table), ""]
    if len(archs) < 2:
        return lines
    if statistics["significant"]:
        lines += [f"**`{best}` is the best on DSC**: it differs from every other architecture (Holm-corrected "
                  f"p < {statistics['alpha']:g}).", ""]
    else:
        tied = ", ".join(f"`{a}`" for a in statistics["tied_with_best"])
        why = (f" (with {n} patients no paired test can reach p < {statistics['alpha']:g}; add test patients or "
               "use cross-validation)") if n < 6 else ""
        lines += [f"**No significant winner on DSC:** `{best}` has the highest mean, but it is tied with {tied}: "
                  f"not significantly different at Holm-corrected p < {statistics['alpha']:g}{why}. The Summary "
                  "shows the tied DSCs all in bold.", ""]
    return lines


def collect_cv_results(params: dict[str, Any], root: str | Path = ".") -> list[dict[str, Any]]:
    """Rows for the cross-validated architectures with a CV summary (reports/cv/<arch>/): `per_case` = the
    out-of-fold rows (every development patient once), `cv` = cv_metrics.json."""
    layout = ProjectLayout.of(params, root)
    rows = []
    for arch in settings(params).cv.models:
        metrics = _optional_json(layout.cv_metrics(arch))
        if metrics:
            rows.append({"arch": arch, "per_case": read_per_case(layout.cv_oof_per_case(arch), missing_ok=True),
                         "cv": metrics})
    return rows


def cv_section(cv_rows: Sequence[dict], cv_statistics: dict[str, Any] | None, units: Sequence[str]) -> list[str]:
    """Cross-validation: out-of-fold DSC per fold and pooled, each fold's model and the fold ensemble on test,
    then the statistics and the ablation on the out-of-fold patients (more patients than the test split)."""
    if not cv_rows:
        return []

    def pct(value: Any) -> str:
        number = finite_or_none(value)
        return "n/a" if number is None else f"{100 * number:.2f}"

    def spread(values: list[Any]) -> str:
        numbers = [v for v in (finite_or_none(x) for x in values) if v is not None]
        if not numbers:
            return "n/a"
        return f"{100 * np.mean(numbers):.2f} ± {100 * np.std(numbers, ddof=1):.2f}" if len(numbers) > 1 \
            else f"{100 * numbers[0]:.2f}"

    folds = sorted({len(row["cv"].get("folds") or []) for row in cv_rows})
    lines = [f"## Cross-validation ({', '.join(map(str, folds))} folds)", "",
             "Each fold's model is trained on the other folds' development patients, selected on its own held-out "
             "patients and scored on them (out of fold: every development patient once, by the model that never saw "
             "it). Test: each fold's model, and their ensemble (probabilities averaged). Fold columns: mean ± SD over "
             "folds.", ""]
    table = []
    for row in cv_rows:
        cv = row["cv"]
        coverage = cv.get("coverage") or {}
        table.append([f"`{row['arch']}`", pct((cv.get("out_of_fold") or {}).get("mean_dsc")),
                      spread([v.get("mean_dsc") for v in (cv.get("out_of_fold_by_fold") or {}).values()]),
                      pct((cv.get("out_of_fold") or {}).get("mean_nsd")),
                      spread([v.get("mean_dsc") for v in (cv.get("test_by_fold") or {}).values()]),
                      pct((cv.get("test_ensemble") or {}).get("mean_dsc")),
                      f"{coverage.get('scored_cases', '?')} / {coverage.get('development_cases', '?')}"])
    lines += [_md_table(["Architecture", "Out-of-fold DSC (%)", "Per-fold out-of-fold DSC (%)", "Out-of-fold NSD (%)",
                         "Per-fold test DSC (%)", "Ensemble test DSC (%)", "Cases scored out of fold"], table), ""]
    if cv_statistics:
        lines += statistics_section(cv_statistics, units, "Cross-validation statistics", "development patients, "
                                    "out of fold")
        lines += ablation_section(cv_statistics, "out of fold")
    return lines


def render_markdown(params: dict[str, Any], rows: Sequence[dict], missing: dict[str, str],
                    qualitative_note: str, statistics: dict[str, Any] | None = None,
                    cv_rows: Sequence[dict] = (), cv_statistics: dict[str, Any] | None = None) -> str:
    dataset = params["dataset"]["name"]
    protocols = sorted({row["protocol"] for row in rows})
    units = sorted({row["hd95_unit"] for row in rows})
    splits = {row["test_cases_sha256"] for row in rows}
    parts = [f"# medseg comparison: `{dataset}` (preset `{params.get('preset', '?')}`)", ""]
    if rows:
        size = "x".join(str(s) for s in (params.get("data") or {}).get("image_size", []))
        parts += [
            f"Test-set metrics from `reports/<arch>/metrics.json`; evaluation protocol `{', '.join(protocols)}` "
            f"(HD95 in {', '.join(units)}). DSC and NSD in %, higher is better; HD95, size, latency and training "
            "time: lower is better. Best per column in **bold** (DSC: the best only where the paired test says "
            "so, else every tied architecture; see Statistics). GFLOPs count one multiply-add as one FLOP for one "
            f"{size} slice; latencies are single-slice CPU timings from `reports/<arch>/export.json`.",
            "",
            f"NSD: the share of both surfaces within {_tolerance_text(rows, units)} of the other surface "
            "(`evaluate.nsd_tolerance`). Compute, from each training run: s / epoch is the median epoch "
            "(training + validation); peak train memory is what torch allocated on the GPU, or on CPU the training "
            f"process's peak resident memory (trained on: {_devices(rows)}).",
            "",
        ]
        parts += _latency_lines(rows)
        if len(protocols) > 1 or len(units) > 1:
            parts += ["> **Warning:** the architectures were evaluated under different protocols or HD95 units "
                      f"({', '.join(units)}); their HD95 values are not comparable.", ""]
        if len(splits) > 1:
            parts += ["> **Warning:** the architectures were evaluated on different test splits "
                      "(test_cases_sha256 differs); re-run `dvc repro evaluate` for all of them.", ""]
        parts += ["## Summary", "", summary_table(rows, statistics), "",
                  *statistics_section(statistics or {"architectures": {}}, units),
                  *ablation_section(statistics or {}),
                  "## Per-class DSC (%)", "", per_class_table(rows, "dsc"), "",
                  f"## Per-class HD95 ({', '.join(units)})", "", per_class_table(rows, "hd95"), "",
                  "## Per-class NSD (%)", "", per_class_table(rows, "nsd"), "",
                  "## Figures", "",
                  "- `reports/comparison_dsc.png`: per-class DSC, one bar per architecture",
                  "- `reports/comparison_summary.png`: mean DSC against ONNX Runtime CPU latency and against HD95",
                  f"- `reports/qualitative.png`: {qualitative_note}", ""]
    else:
        parts += ["No architecture has evaluation results yet (run `dvc repro`).", ""]
    cv_units = sorted({str((row["cv"].get("out_of_fold") or {}).get("hd95_unit")) for row in cv_rows})
    parts += cv_section(cv_rows, cv_statistics, cv_units)
    if missing:
        parts += ["## Missing", ""] + [f"- `{arch}`: {why}" for arch, why in missing.items()] + [""]
    parts += ["Published numbers of the original papers, with their protocol caveats: `docs/results.md`.", ""]
    return "\n".join(parts)


def write_per_class_csv(path: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # arch_class: one bar per architecture and class in dvc.yaml's per-class plot (y on `class` alone would
    # stack every architecture's DSC into one bar per class)
    writer.writerow(["arch", "class", "arch_class", "dsc", "hd95", "nsd"])
    for row in rows:
        for name, scores in row["per_class"].items():
            values = [finite_or_none((scores or {}).get(key)) for key in ("dsc", "hd95", "nsd")]
            writer.writerow([row["arch"], name, f"{name} / {row['arch']}",
                             *("" if v is None else repr(v) for v in values)])
    write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _placeholder(path: Path, text: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.axis("off")
    _save(fig, path)


def plot_dsc_bars(path: Path, rows: Sequence[dict]) -> None:
    if not rows:
        return _placeholder(path, "no evaluated architecture yet")
    plt = _pyplot()
    names = _class_names(rows)
    x = np.arange(len(names))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    for i, row in enumerate(rows):
        values = [finite_or_none((row["per_class"].get(n) or {}).get("dsc")) for n in names]
        ax.bar(x - 0.4 + width * (i + 0.5), [100 * v if v is not None else 0 for v in values], width,
               label=row["arch"])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("DSC (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class test DSC")
    ax.legend(fontsize=8, ncol=min(len(rows), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_summary(path: Path, rows: Sequence[dict]) -> None:
    if not rows:
        return _placeholder(path, "no evaluated architecture yet")
    plt = _pyplot()
    unit = ", ".join(sorted({row["hd95_unit"] for row in rows}))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "onnx_latency_ms", "ONNX Runtime CPU latency (ms / slice)"),
                           (axes[1], "mean_hd95", f"mean HD95 ({unit})")):
        for row in rows:
            if row["mean_dsc"] is None or finite_or_none(row[key]) is None:
                continue
            ax.scatter(row[key], 100 * row["mean_dsc"], s=40)
            ax.annotate(row["arch"], (row[key], 100 * row["mean_dsc"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.margins(0.15)  # room for the labels of the extreme points
        ax.set_xlabel(label + " (lower is better)")
        ax.set_ylabel("mean DSC (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against cost")
    fig.tight_layout()
    _save(fig, path)


def pick_slices(ingested: Path, case_ids: Sequence[str], count: int) -> list[tuple[str, int]]:
    """Test slices with the most organs in the ground truth (then the most foreground), from distinct cases first.

    Deterministic, so every model is shown on the same slices and re-runs give the same figure.
    """
    from medseg.data.cases import load_case

    candidates = []
    for case_id in case_ids:
        _, label, _ = load_case(ingested, case_id)
        for index in range(label.shape[0]):
            counts = np.bincount(np.asarray(label[index]).ravel())[1:]  # voxels per foreground class
            if counts.sum():
                candidates.append((-int(np.count_nonzero(counts)), -int(counts.sum()), case_id, index))
    candidates.sort()
    chosen: list[tuple[str, int]] = []
    for distinct_cases in (True, False):
        for _, _, case_id, index in candidates:
            if len(chosen) == count:
                return chosen
            if (case_id, index) in chosen or (distinct_cases and any(c == case_id for c, _ in chosen)):
                continue
            chosen.append((case_id, index))
    return chosen


def predict_slice(model, meta: CheckpointMeta, image: np.ndarray, index: int) -> np.ndarray:
    """Label map (H, W) of one slice with medseg.inference.predict_volume (same resize and argmax as evaluation).

    Only the slice's 2.5D context window is passed, which clamps at the volume ends exactly as the full volume would.
    """
    from medseg.inference import predict_volume

    context = int(meta.context or 0)
    lo, hi = max(index - context, 0), min(index + context + 1, image.shape[0])
    return predict_volume(model, np.asarray(image[lo:hi]), meta.image_size, context)[index - lo]



def plot_qualitative(path: Path, params: dict[str, Any], root: Path, rows: Sequence[dict]) -> str:
    """Figure 1-style grid; returns a one-line description for comparison.md."""
    from medseg.data.cases import load_case, read_cases

    layout = ProjectLayout.of(params, root)
    ingested, split_path = layout.ingested, layout.split_file
    with_models = [row for row in rows if row["model"] is not None]
    if not with_models or not (ingested / "cases.json").is_file() or not split_path.is_file():
        _placeholder(path, "no trained model or no ingested test data to show")
        return "not drawn (no checkpoint or no ingested test split)"
    class_names = list(read_cases(ingested)["class_names"])
    count = settings(params).report.qualitative_slices
    slices = pick_slices(ingested, read_json(split_path).get("test", []), count)
    if not slices:
        _placeholder(path, "the test split has no slice with foreground")
        return "not drawn (no test slice with foreground)"

    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = plt.get_cmap("tab10" if len(class_names) <= 11 else "tab20").colors
    palette = [(0, 0, 0, 0)] + [(*colors[(i - 1) % len(colors)][:3], 0.6) for i in range(1, len(class_names))]
    cmap = ListedColormap(palette)
    titles = ["image", "ground truth"] + [row["arch"] for row in with_models]
    fig, axes = plt.subplots(len(slices), len(titles), figsize=(2.3 * len(titles), 2.4 * len(slices) + 0.6),
                             squeeze=False)
    for r, (case_id, index) in enumerate(slices):
        image, label, _ = load_case(ingested, case_id)
        background = display_slice(image[index])
        masks = [None, np.asarray(label[index])] + [predict_slice(row["model"], row["meta"], image, index)
                                                    for row in with_models]
        for c, mask in enumerate(masks):
            ax = axes[r][c]
            ax.imshow(background, cmap="gray" if background.ndim == 2 else None)
            if mask is not None:
                ax.imshow(mask, cmap=cmap, vmin=0, vmax=len(class_names) - 1, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{case_id}\nslice {index}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=palette[i][:3], label=class_names[i]) for i in range(1, len(class_names))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, path)
    return (f"{len(slices)} test slices (rows: {', '.join(f'{c}#{i}' for c, i in slices)}); image, ground truth, "
            f"then {len(with_models)} model(s)")


# --------------------------------------------------------------------------------------------------- MLflow
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
    return {k: float(v) for k, v in out.items() if finite_or_none(v) is not None}


def log_comparison_run(params: dict[str, Any], root: str | Path, statistics: dict[str, Any],
                       cv_statistics: dict[str, Any] | None, files: Sequence[Path]) -> str | None:
    """The comparison as its own MLflow run in the register stage's experiment (run name `comparison-<dataset>`,
    tag `medseg.kind=comparison`): the statistics as metrics, comparison.md and statistics.json as artifacts.
    Only into a store that exists (a local store the register stage made, or a server): the report never creates
    one. A store that does not answer is a warning, not a failed report. Returns the run id."""
    from medseg.tracking import connect, ensure_experiment, resolve_tracking_uri, short_error

    uri = resolve_tracking_uri(params, root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        log.info("report: no MLflow store at %s yet (the register stage makes it); comparison not logged", uri)
        return None
    run = None
    try:
        from mlflow.entities import Metric

        client = connect(uri, retries=0)
        experiment_id = ensure_experiment(client, settings(params).register.experiment, uri, root)
        dataset = params["dataset"]["name"]
        run = client.create_run(experiment_id, run_name=f"comparison-{dataset}",
                                tags={"medseg.kind": "comparison", "dataset": dataset,
                                      "best": str((statistics or {}).get("best")),
                                      "significant": str((statistics or {}).get("significant"))})
        values = {**statistics_metrics(statistics, "test."), **statistics_metrics(cv_statistics, "cv.")}
        stamp = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in values.items()])
        for path in files:
            client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - the report's files are written; MLflow is a copy of them
        log.warning("report: comparison not logged to MLflow at %s: %s", uri, short_error(exc))
        if run is not None:  # not left RUNNING in the UI
            try:
                client.set_terminated(run.info.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the store is what failed; the warning above says so
                pass
        return None


# --------------------------------------------------------------------------------------------------- entry point
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
    public = [{k: v for k, v in row.items() if k not in ("model", "meta", "per_case")} for row in rows]
    return {
        "architectures": public,
        "missing": missing,
        "statistics": statistics,
        "cv_statistics": cv_statistics,
        "mlflow_run_id": mlflow_run,
        "best": {key: best_values(rows, key, better) for key, _, _, better in SUMMARY_COLUMNS},
        "outputs": [str(out / name) for name in OUTPUTS],
    }
