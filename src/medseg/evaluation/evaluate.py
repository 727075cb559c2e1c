"""Evaluation of a trained checkpoint on the TEST split, volume by volume, slice by slice.

Checkpoints were selected on the validation split (medseg.training.trainer); this module is the only one that reads
`split["test"]`. Inference (`medseg.data.preprocessing`, the rules training and predict use): each slice (with its
2.5D neighbours) is resized to the training image_size, the network's logits are resized back to the native
slice size (bilinear, on logits), then argmax; DSC and HD95 are computed on the reassembled 3D volume
(medseg.evaluation.metrics, protocol from evaluate.protocol), NSD at evaluate.nsd_tolerance.
HD95 is in mm only when every test case has a known voxel spacing (cases.json `spacing_known`); otherwise every
distance is computed in voxels (spacing 1) and labelled so, never passed off as millimetres.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import disable_telemetry, resolve_device, settings
from medseg.contracts import CheckpointMeta, EvaluationMetrics, write_per_case
from medseg.deployment.card import dataset_version, sha256_of_test_cases, sha256_of_test_data
from medseg.errors import ConfigError
from medseg.evaluation.display import display_slice
from medseg.evaluation.metrics import aggregate, case_metrics, class_tolerance
from medseg.evaluation.scoring import score_cases
from medseg.inference.torch_backend import checkpoint_plan, load_trained_model, predict_volume
from medseg.io import atomic_path, read_json, write_dvc_metrics
from medseg.layout import ProjectLayout
from medseg.runtime.threads import apply_torch_threads, plan_from_params

_log = logging.getLogger(__name__)

HD95_UNITS = {"mm": "mm", "transunet": "voxels"}  # with known spacing; unknown spacing is always "voxels"


def hd95_unit(protocol: str, spacing_known: bool) -> str:
    """The unit HD95 is measured in: the protocol's, except voxels when any test case's spacing is unknown."""
    return HD95_UNITS[protocol] if spacing_known else "voxels"


def nsd_tolerances(setting: float | dict[str, float], class_names: list[str]) -> dict[str, float]:
    """{foreground class: NSD tolerance} from evaluate.nsd_tolerance (a number, or a map naming some classes; the
    others get medseg.evaluation.metrics.DEFAULT_NSD_TOLERANCE). A class the dataset does not have, or a negative value, is
    a ConfigError: a typo must not silently score an organ at the default."""
    foreground = list(class_names[1:])
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - set(foreground))
        if unknown:
            raise ConfigError(f"params.yaml: evaluate.nsd_tolerance names {', '.join(unknown)}, not a foreground "
                              f"class of this dataset ({', '.join(foreground)})")
    tolerance = {name: class_tolerance(setting, name) for name in foreground}
    bad = {name: value for name, value in tolerance.items() if not (math.isfinite(value) and value >= 0)}
    if bad:
        raise ConfigError(f"params.yaml: evaluate.nsd_tolerance {bad}; expected numbers >= 0")
    return tolerance


@dataclass(frozen=True)
class Scoring:
    """How predictions of one dataset are scored (evaluate_model, and cross-validation's out-of-fold and ensemble
    scores): classes, protocol, HD95 unit, NSD tolerances, and the spacing policy for the cases scored."""

    ingested: Path
    class_names: list[str]
    protocol: str
    unit: str
    tolerance: dict[str, float]
    use_spacing: bool  # False when any scored case's spacing is unknown: every distance in voxels
    entries: dict[str, dict[str, Any]]

    def rows(self, case_id: str, pred: np.ndarray, label: np.ndarray, spacing) -> list[dict[str, Any]]:
        return [{"case": case_id, **row} for row in case_metrics(pred, np.asarray(label), self.class_names,
                                                                 spacing if self.use_spacing else None,
                                                                 self.protocol, self.tolerance)]


def scoring_for(params: dict[str, Any], ingested: Path, case_ids: list[str], class_names: list[str] | None,
                in_channels: int, context: int) -> Scoring:
    """The Scoring of `case_ids` for a model (a checkpoint, an exported graph) of these classes (None: the
    dataset's), input channels and 2.5D context; a ConfigError when it does not fit the ingested dataset."""
    from medseg.data.cases import read_cases

    config = settings(params)
    protocol = config.evaluate.protocol
    if protocol not in HD95_UNITS:
        raise ConfigError(f"evaluate.protocol={protocol!r}; expected one of {', '.join(HD95_UNITS)}")
    cases = read_cases(ingested)
    class_names = list(class_names or cases["class_names"])
    if list(cases["class_names"]) != class_names:
        raise ConfigError(f"{ingested / 'cases.json'}: classes {cases['class_names']} differ from the model's "
                          f"{class_names}; retrain on this dataset")
    if int(cases["in_channels"]) * (2 * context + 1) != int(in_channels):
        raise ConfigError(f"{ingested}: {cases['in_channels']} channel(s) x (2*{context}+1) context slices != the "
                          f"model's in_channels {in_channels}")
    entries = {c["id"]: c for c in cases["cases"]}
    unknown = sum(not entries.get(i, {}).get("spacing_known", True) for i in case_ids)
    if unknown:
        _log.warning("%s: voxel spacing unknown for %d of %d scored cases; HD95 in voxels", ingested, unknown,
                     len(case_ids))
    return Scoring(ingested, class_names, protocol, hd95_unit(protocol, not unknown),
                   nsd_tolerances(config.evaluate.nsd_tolerance, class_names), not unknown, entries)


def checkpoint_context(meta: CheckpointMeta, params: dict[str, Any]) -> int:
    return int(meta.context if meta.context is not None else settings(params).data.context)


def checkpoint_scoring(params: dict[str, Any], ingested: Path, case_ids: list[str], meta: CheckpointMeta) -> Scoring:
    """scoring_for a checkpoint (its metadata says its classes, input channels and context)."""
    return scoring_for(params, ingested, case_ids, meta.class_names, meta.in_channels, checkpoint_context(meta, params))


def summary_metrics(scoring: Scoring, rows: list[dict[str, Any]], case_ids: list[str], **extra: Any
                    ) -> EvaluationMetrics:
    """metrics.json's scores of `rows` (per class and mean DSC / HD95 / NSD, with protocol, unit and hashes);
    `extra`: the other fields of the file that holds them (arch, fold, checkpoint_epoch, val_dice)."""
    summary = aggregate(rows, scoring.class_names)
    return EvaluationMetrics(
        protocol=scoring.protocol,
        hd95_unit=scoring.unit,
        test_cases_sha256=sha256_of_test_cases(case_ids),
        test_data_sha256=sha256_of_test_data(scoring.entries, case_ids),  # ids and content: what the gate compares
        dataset_version=dataset_version(scoring.ingested / "cases.json"),
        mean_dsc=summary["mean_dsc"],
        mean_hd95=summary["mean_hd95"],
        mean_nsd=summary["mean_nsd"],
        nsd_tolerance=scoring.tolerance,  # per class, in hd95_unit
        per_class=summary["per_class"],
        num_cases=len(case_ids),
        excluded=sum(v["excluded"] for v in summary["per_class"].values()),
        **extra,
    )


def test_scores(metrics: EvaluationMetrics) -> dict[str, Any]:
    """The evaluate stage's DVC metric: the means, then DSC and HD95 per class (`dsc_<class>`, `hd95_<class>`;
    the class name with anything but letters, digits and _ turned into _). Classes absent from every test case
    (no score) are left out, as None is."""
    import re

    scores: dict[str, Any] = {"dsc": metrics.mean_dsc, "hd95": metrics.mean_hd95, "nsd": metrics.mean_nsd}
    for name, per in metrics.per_class.items():
        key = re.sub(r"[^A-Za-z0-9_]", "_", str(name))
        scores[f"dsc_{key}"], scores[f"hd95_{key}"] = per.dsc, per.hd95
    return scores


def evaluate_model(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """Evaluate models/<arch>/checkpoint.pt on the test split; writes metrics.json, per_case.csv, overlay.png."""
    disable_telemetry()
    apply_torch_threads(plan_from_params(params, num_workers=0))
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    ingested, split_path = layout.ingested, layout.split_file
    config = settings(params)
    model, meta = load_trained_model(layout.checkpoint(arch))
    test_ids = read_case_list(split_path, "test")
    scoring = checkpoint_scoring(params, ingested, test_ids, meta)
    context = checkpoint_context(meta, params)

    device = resolve_device(config.train.device)
    model = model.to(device)
    batch_size, overlay_cases = config.evaluate.batch_size, config.evaluate.overlay_cases
    overlays: list[tuple] = []

    def keep_overlay(case_id: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> None:
        if len(overlays) < overlay_cases:
            overlays.append((case_id, *overlay_slice(image, np.asarray(label), pred)))

    plan = checkpoint_plan(meta)
    rows = score_cases(lambda image, spacing: predict_volume(model, image, meta.image_size, context, batch_size,
                                                             device, plan=plan, spacing=spacing),
                       scoring.rows, ingested, test_ids, desc=f"evaluate {arch}", inspect=keep_overlay)

    metrics = summary_metrics(scoring, rows, test_ids, arch=arch, checkpoint_epoch=meta.epoch,
                              val_dice=meta.val_dice)
    metrics.write(layout.metrics(arch))
    write_dvc_metrics(layout.test_scores(arch), test_scores(metrics), arch)
    write_per_case(layout.per_case(arch), rows)
    plot_overlays(layout.overlay(arch), overlays, scoring.class_names, arch)
    _log.info("%s: mean DSC %s, mean HD95 %s (%s) on %d test cases", arch, metrics.mean_dsc,
              metrics.mean_hd95, metrics.hd95_unit, len(test_ids))
    return metrics.to_dict()


def read_case_list(split_path: Path, subset: str) -> list[str]:
    """The split file's `subset` list ("test", ...); a ConfigError when the file is missing or the list empty."""
    if not split_path.is_file():
        raise ConfigError(f"{split_path}: split file not found (run the split stage first)")
    ids = list(read_json(split_path).get(subset, []))
    if not ids:
        raise ConfigError(f"{split_path}: the {subset} list is empty")
    return ids


def overlay_slice(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The slice with the most ground-truth foreground: (index, displayed image, label, prediction)."""
    index = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1)))
    return index, display_slice(image[index]), label[index], pred[index]


def plot_overlays(path: Path, overlays: list, class_names: list[str], arch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = plt.get_cmap("tab10" if len(class_names) <= 11 else "tab20").colors
    palette = [(0, 0, 0, 0)] + [(*colors[(i - 1) % len(colors)][:3], 0.55) for i in range(1, len(class_names))]
    cmap = ListedColormap(palette)
    rows = max(1, len(overlays))
    fig, axes = plt.subplots(rows, 3, figsize=(10, 3.4 * rows), squeeze=False)
    for r, (case_id, index, img, label, pred) in enumerate(overlays):
        for c, (title, mask) in enumerate((("image", None), ("ground truth", label), ("prediction", pred))):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            if mask is not None:
                ax.imshow(mask, cmap=cmap, vmin=0, vmax=len(class_names) - 1, interpolation="nearest")
            ax.set_title(f"{case_id} slice {index}: {title}", fontsize=9)
            ax.axis("off")
    handles = [Patch(color=palette[i][:3], label=class_names[i]) for i in range(1, len(class_names))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle(f"{arch}: test overlays", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
