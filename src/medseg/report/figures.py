"""The report's figures: per-class DSC bars, DSC vs latency and HD95, and the qualitative slices."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.config import settings
from medseg.contracts import CheckpointMeta
from medseg.evaluation.display import display_slice
from medseg.evaluation.metrics import finite_or_none
from medseg.io import atomic_path, read_json
from medseg.layout import ProjectLayout
from medseg.report.collect import ArchRow, class_names_of

log = logging.getLogger(__name__)


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


def plot_dsc_bars(path: Path, rows: Sequence[ArchRow]) -> None:
    if not rows:
        return _placeholder(path, "no evaluated architecture yet")
    plt = _pyplot()
    names = class_names_of(rows)
    x = np.arange(len(names))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    for i, row in enumerate(rows):
        values = [finite_or_none((row.per_class.get(n) or {}).get("dsc")) for n in names]
        ax.bar(x - 0.4 + width * (i + 0.5), [100 * v if v is not None else 0 for v in values], width,
               label=row.arch)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("DSC (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class test DSC")
    ax.legend(fontsize=8, ncol=min(len(rows), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_summary(path: Path, rows: Sequence[ArchRow]) -> None:
    if not rows:
        return _placeholder(path, "no evaluated architecture yet")
    plt = _pyplot()
    unit = ", ".join(sorted({row.hd95_unit for row in rows}))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "onnx_latency_ms", "ONNX Runtime CPU latency (ms / slice)"),
                           (axes[1], "mean_hd95", f"mean HD95 ({unit})")):
        for row in rows:
            if row.mean_dsc is None or finite_or_none(getattr(row, key)) is None:
                continue
            ax.scatter(getattr(row, key), 100 * row.mean_dsc, s=40)
            ax.annotate(row.arch, (getattr(row, key), 100 * row.mean_dsc), textcoords="offset points",
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


def predict_slice(model, meta: CheckpointMeta, image: np.ndarray, index: int, spacing: Any = None) -> np.ndarray:
    """Label map (H, W) of one slice with medseg.inference.torch_backend.predict_volume (same resize and argmax as evaluation).

    Only the slice's 2.5D context window is passed, which clamps at the volume ends exactly as the full volume would.
    """
    from medseg.inference.torch_backend import checkpoint_plan, predict_volume

    context = int(meta.context or 0)
    lo, hi = max(index - context, 0), min(index + context + 1, image.shape[0])
    return predict_volume(model, np.asarray(image[lo:hi]), meta.image_size, context, plan=checkpoint_plan(meta),
                          spacing=spacing)[index - lo]


def _predicted_slices(rows: Sequence[ArchRow], cases: dict[str, tuple[np.ndarray, np.ndarray]],
                      slices: Sequence[tuple[str, int]]) -> dict[str, list[np.ndarray]]:
    """{arch: its label map of each slice}; each checkpoint is loaded, used and let go in turn."""
    from medseg.inference.torch_backend import load_trained_model

    predicted = {}
    for row in rows:
        model, meta = load_trained_model(row.checkpoint)
        predicted[row.arch] = [predict_slice(model, meta, cases[case_id][0], index, cases[case_id][2])
                              for case_id, index in slices]
        del model
    return predicted


def plot_qualitative(path: Path, params: dict[str, Any], root: Path, rows: Sequence[ArchRow]) -> str:
    """Figure 1-style grid; returns a one-line description for comparison.md."""
    from medseg.data.cases import load_case, read_cases

    layout = ProjectLayout.of(params, root)
    ingested, split_path = layout.ingested, layout.split_file
    with_models = [row for row in rows if row.checkpoint is not None]
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
    titles = ["image", "ground truth"] + [row.arch for row in with_models]
    fig, axes = plt.subplots(len(slices), len(titles), figsize=(2.3 * len(titles), 2.4 * len(slices) + 0.6),
                             squeeze=False)
    cases = {case_id: load_case(ingested, case_id) for case_id, _ in slices}
    predicted = _predicted_slices(with_models, cases, slices)  # one network in memory at a time
    for r, (case_id, index) in enumerate(slices):
        image, label, _ = cases[case_id]
        background = display_slice(image[index])
        masks = [None, np.asarray(label[index])] + [predicted[row.arch][r] for row in with_models]
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
