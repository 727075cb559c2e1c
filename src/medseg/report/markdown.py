"""reports/comparison.md and reports/per_class.csv: the summary, statistics, per-class and cross-validation tables."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medseg.config import settings
from medseg.evaluation.metrics import finite_or_none
from medseg.io import write_text
from medseg.report.collect import ArchRow, CVRow, class_names_of
from medseg.report.statistics import STAT_METRICS

log = logging.getLogger(__name__)


SUMMARY_COLUMNS: list[tuple[str, str, Callable[[float], str], str | None]] = [
    ("mean_dsc", "Mean DSC (%)", lambda v: f"{100 * v:.2f}", "max"),
    ("mean_hd95", "Mean HD95", lambda v: f"{v:.2f}", "min"),
    ("mean_nsd", "Mean NSD (%)", lambda v: f"{100 * v:.2f}", "max"),
    ("params_m", "Params (M)", lambda v: f"{v:.2f}" if v >= 1 else f"{v:.3g}", "min"),
    ("gflops", "GFLOPs", lambda v: f"{v:.3g}", "min"),
    ("torch_latency_ms", "PyTorch CPU (ms)", lambda v: f"{v:.1f}", "min"),
    ("onnx_latency_ms", "ONNX Runtime CPU (ms)", lambda v: f"{v:.1f}", "min"),
    ("train_seconds", "Training time", lambda v: _duration(v), "min"),
    ("budget", "Epochs x steps", lambda v: v, None),
    ("network_input", "Batch x input", lambda v: v, None),
    ("seconds_per_epoch", "s / epoch", lambda v: f"{v:.1f}", "min"),
    ("train_memory_mb", "Peak train memory (MiB)", lambda v: f"{v:.0f}", "min"),
]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def best_values(rows: Sequence[ArchRow], key: str, better: str | None) -> float | None:
    """The best value of a column (direction-aware), None if the column has no numbers or is not ranked."""
    return best_of([getattr(row, key) for row in rows], better)


def best_of(column: Sequence[Any], better: str | None) -> float | None:
    values = [v for v in column if finite_or_none(v) is not None]
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


LATENCY_KEYS = ("torch_latency_ms", "onnx_latency_ms")


BUSY_LOAD_PER_CORE = 1.0  # a 1-minute load average above this per core: other work competed while timing


def latency_comparability(rows: Sequence[ArchRow]) -> tuple[set[str], list[str]]:
    """(architectures whose latencies are not comparable with the others', notes for the report). Comparable:
    measured on the machine most of the exports were measured on (same CPU, cores, torch, onnxruntime), with
    the machine not busy; where others have that record, an export without it (made before medseg kept it)
    is not comparable."""
    machines = [(row.latency or {}).get("machine") for row in rows]
    machines = [m for m in machines if m]
    if not machines:  # none recorded (every export older than the record): nothing to tell them apart by
        return set(), []
    counts = sorted(((machines.count(m), m) for m in set(machines)), reverse=True)
    # the machine most exports ran on; with a tie there is none, and every latency is "another machine"'s
    common = counts[0][1] if len(counts) == 1 or counts[0][0] > counts[1][0] else None
    odd, notes = set(), []
    for row in rows:
        record = row.latency or {}
        if not any(finite_or_none(getattr(row, k)) is not None for k in LATENCY_KEYS):
            continue
        load = finite_or_none(record.get("load_per_core"))
        if not record.get("machine"):
            odd.add(row.arch)
            notes.append(f"`{row.arch}`: measured before medseg recorded the machine (re-run its export)")
        elif record["machine"] != common:
            odd.add(row.arch)
            notes.append(f"`{row.arch}`: measured on another machine ({record['machine']})")
        elif load is not None and load > BUSY_LOAD_PER_CORE:
            odd.add(row.arch)
            notes.append(f"`{row.arch}`: measured while the machine was busy (load {load:g} per core)")
    return odd, notes


def summary_table(rows: Sequence[ArchRow], statistics: dict[str, Any] | None = None) -> str:
    """The summary; with `statistics`, DSC's bold marks the best only where it is significant, else the best and
    every architecture tied with it."""
    units = sorted({row.hd95_unit for row in rows})
    ranked = len(rows) > 1
    header = ["Architecture", "Family"] + [
        f"{title} ({', '.join(units)})" if key == "mean_hd95" else title for key, title, _, _ in SUMMARY_COLUMNS
    ] + ["ONNX parity", "MLflow version"]
    odd, _ = latency_comparability(rows)
    best = {key: best_values([r for r in rows if not (key in LATENCY_KEYS and r.arch in odd)], key, better)
            if ranked else None for key, _, _, better in SUMMARY_COLUMNS}
    top = None
    if ranked and statistics and statistics.get("best"):
        top = {statistics["best"], *statistics.get("tied_with_best", [])}
    lines = []
    for row in rows:
        cells = [f"`{row.arch}`", row.family]
        for key, _, fmt, better in SUMMARY_COLUMNS:  # † marks a latency not comparable with the others (see notes)
            value = getattr(row, key)
            if better is None:  # text (budget, network input), not a number to rank
                cells.append(value or "n/a")
                continue
            mark = "†" if key in LATENCY_KEYS and row.arch in odd and finite_or_none(value) is not None else ""
            if key == "mean_dsc" and top is not None:  # the paired test decides, not the printed digits
                number = finite_or_none(value)
                cells.append("n/a" if number is None else (f"**{fmt(number)}**" if row.arch in top else fmt(number)))
                continue
            cells.append(_cell(value, fmt, None if mark else best[key]) + mark)
        parity = row.parity_passed
        cells.append("n/a" if parity is None else ("passed" if parity else "FAILED"))
        cells.append(str(row.registry_version) if row.registry_version else "not registered")
        lines.append(cells)
    return _md_table(header, lines, text_columns=2)


def per_class_table(rows: Sequence[ArchRow], metric: str) -> str:
    """Organs as columns (plus the mean), one line per architecture; best per column in bold."""
    names = class_names_of(rows)
    better = "min" if metric == "hd95" else "max"
    fmt = (lambda v: f"{v:.2f}") if metric == "hd95" else (lambda v: f"{100 * v:.2f}")
    values = [
        {"arch": row.arch, "mean": getattr(row, f"mean_{metric}"),
         **{name: (row.per_class.get(name) or {}).get(metric) for name in names}}
        for row in rows
    ]
    ranked = len(rows) > 1
    best = {key: best_of([v[key] for v in values], better) if ranked else None for key in ["mean", *names]}
    lines = [[f"`{v['arch']}`", _cell(v["mean"], fmt, best["mean"])] + [_cell(v[n], fmt, best[n]) for n in names]
             for v in values]
    return _md_table(["Architecture", "Mean"] + names, lines)


def _latency_lines(rows: Sequence[ArchRow]) -> list[str]:
    """How the latencies were measured, and which are not comparable (marked †)."""
    odd, notes = latency_comparability(rows)
    records = [row.latency for row in rows
               if (row.latency or {}).get("machine") and row.arch not in odd]
    lines = []
    if records:
        r = records[0]
        lines += [f"Latency: median of {r.get('runs')} calls after {r.get('warmup')} warm-up calls, "
                  f"{r.get('threads')} threads, on {r.get('machine')}; the interquartile range is in "
                  f"`export.json` (`*_latency_iqr_ms`).", ""]
    if notes:
        lines += ["> **Latencies marked † are not comparable with the others:** " + "; ".join(notes) + ".", ""]
    return lines


def _devices(rows: Sequence[ArchRow]) -> str:
    devices = sorted({str(row.train_device) for row in rows if row.train_device})
    return ", ".join(devices) if devices else "not recorded"


def _tolerance_text(rows: Sequence[ArchRow], units: Sequence[str]) -> str:
    """"2 mm", or "aorta 1 mm, liver 3 mm, ..." when classes differ; "a tolerance not recorded" for old metrics."""
    tolerances: dict[str, float] = {}
    for row in rows:
        for name, value in (row.nsd_tolerance or {}).items():
            tolerances.setdefault(name, value)
    unit = "/".join(units)
    if not tolerances:
        return "a tolerance not recorded (evaluated before medseg measured NSD)"
    if len(set(tolerances.values())) == 1:
        return f"{next(iter(tolerances.values())):g} {unit}"
    return ", ".join(f"{name} {value:g} {unit}" for name, value in tolerances.items())


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


def baseline_section(statistics: dict[str, Any], scope: str = "test", budget: str = "") -> list[str]:
    """"Against nnU-Net": each architecture's DSC paired with the nnU-Net baseline's, where one was evaluated."""
    baseline = statistics.get("baseline") or {}
    if not baseline.get("paired"):
        return []
    alpha, name = statistics["alpha"], baseline["arch"]
    lines = [f"## Against the nnU-Net baseline (`{name}`, {scope})", "",
             f"Each architecture against nnU-Net v2 trained by nnunetv2 itself on the same split{budget}: DSC over "
             "the same patients, median paired difference (architecture - nnU-Net), two-sided Wilcoxon p, "
             "Holm-corrected over the architectures.", ""]
    table = []
    for arch, pair in baseline["paired"].items():
        diff = pair["median_difference"]
        significant = pair["p_holm"] == pair["p_holm"] and pair["p_holm"] < alpha
        verdict = (("better than nnU-Net" if diff > 0 else "worse than nnU-Net") if significant and diff
                   else "no significant difference")
        mean = pair.get("mean")
        table.append([f"`{arch}`", "n/a" if mean is None else f"{100 * mean:.2f}",
                      "n/a" if baseline["mean"] is None else f"{100 * baseline['mean']:.2f}",
                      "n/a" if diff is None else f"{100 * diff:+.2f}", f"{pair['p']:.3g}", f"{pair['p_holm']:.3g}",
                      str(pair["n"]), verdict])
    lines += [_md_table(["Architecture", "DSC (%)", "nnU-Net DSC (%)", "Median difference (points)", "Wilcoxon p",
                         "Holm p", "Patients", "Verdict"], table), ""]
    return lines


def _nnunet_budget(rows: Sequence[ArchRow], statistics: dict[str, Any] | None) -> str:
    name = ((statistics or {}).get("baseline") or {}).get("arch")
    row = next((r for r in rows if r.arch == name), None)
    if row is None or row.steps_per_epoch is None:
        return ""
    return (f", with {row.epochs} epochs x {row.steps_per_epoch:.0f} iterations (nnU-Net's own budget is 1000 x 250; "
            "a smaller one understates it)")


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


def cv_section(cv_rows: Sequence[CVRow], cv_statistics: dict[str, Any] | None, units: Sequence[str]) -> list[str]:
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

    folds = sorted({len(row.cv.get("folds") or []) for row in cv_rows})
    lines = [f"## Cross-validation ({', '.join(map(str, folds))} folds)", "",
             "Each fold's model is trained on the other folds' development patients, selected on its own held-out "
             "patients and scored on them (out of fold: every development patient once, by the model that never saw "
             "it). Test: each fold's model, and their ensemble (probabilities averaged). Fold columns: mean ± SD over "
             "folds.", ""]
    table = []
    for row in cv_rows:
        cv = row.cv
        coverage = cv.get("coverage") or {}
        table.append([f"`{row.arch}`", pct((cv.get("out_of_fold") or {}).get("mean_dsc")),
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
        lines += baseline_section(cv_statistics, "out of fold")
    return lines


def render_markdown(params: dict[str, Any], rows: Sequence[ArchRow], missing: dict[str, str],
                    qualitative_note: str, statistics: dict[str, Any] | None = None,
                    cv_rows: Sequence[CVRow] = (), cv_statistics: dict[str, Any] | None = None) -> str:
    project = settings(params)
    protocols = sorted({row.protocol for row in rows})
    units = sorted({row.hd95_unit for row in rows})
    splits = {row.test_cases_sha256 for row in rows}
    parts = [f"# medseg comparison: `{project.dataset_name}` (preset `{project.preset or '?'}`)", ""]
    if rows:
        size = "x".join(str(s) for s in project.data.image_size)
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
                  *baseline_section(statistics or {}, budget=_nnunet_budget(rows, statistics)),
                  "## Per-class DSC (%)", "", per_class_table(rows, "dsc"), "",
                  f"## Per-class HD95 ({', '.join(units)})", "", per_class_table(rows, "hd95"), "",
                  "## Per-class NSD (%)", "", per_class_table(rows, "nsd"), "",
                  "## Figures", "",
                  "- `reports/comparison_dsc.png`: per-class DSC, one bar per architecture",
                  "- `reports/comparison_summary.png`: mean DSC against ONNX Runtime CPU latency and against HD95",
                  f"- `reports/qualitative.png`: {qualitative_note}", ""]
    else:
        parts += ["No architecture has evaluation results yet (run `dvc repro`).", ""]
    cv_units = sorted({str((row.cv.get("out_of_fold") or {}).get("hd95_unit")) for row in cv_rows})
    parts += cv_section(cv_rows, cv_statistics, cv_units)
    if missing:
        parts += ["## Missing", ""] + [f"- `{arch}`: {why}" for arch, why in missing.items()] + [""]
    parts += ["Published numbers of the original papers, with their protocol caveats: `docs/results.md`.", ""]
    return "\n".join(parts)


def write_per_class_csv(path: Path, rows: Sequence[ArchRow]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # arch_class: one bar per architecture and class in dvc.yaml's per-class plot (y on `class` alone would
    # stack every architecture's DSC into one bar per class)
    writer.writerow(["arch", "class", "arch_class", "dsc", "hd95", "nsd"])
    for row in rows:
        for name, scores in row.per_class.items():
            values = [finite_or_none((scores or {}).get(key)) for key in ("dsc", "hd95", "nsd")]
            writer.writerow([row.arch, name, f"{name} / {row.arch}",
                             *("" if v is None else repr(v) for v in values)])
    write_text(path, buf.getvalue())
