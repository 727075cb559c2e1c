"""A trained nnU-Net v2 2D model -> a medseg model: `model.onnx` whose card carries nnU-Net's inference recipe.

`medseg nnunet import <results folder> -o <model folder> [--fold F ...|all] [--checkpoint final|best]` calls
`import_nnunet_model`. The network is rebuilt from plans.json by nnunetv2 itself (deep supervision off, the
checkpoint's weights), one graph for all chosen folds (their logits averaged, as nnU-Net ensembles folds), and
exported with medseg's exporter; the card (medseg.deployment.card, schema 2) holds what `medseg predict` needs to
reproduce `nnUNetv2_predict` without torch: patch size, target spacing and resampling orders, crop to non-zero,
each channel's normalisation scheme and statistics, sliding-window step, Gaussian weighting, mirroring axes, class
names and the raw label value of each class (dataset.json `medseg.label_values` when medseg wrote the dataset).
Needs the `[nnunet]` extra (nnunetv2 builds the network); the exported model needs none of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.nnunet.inference import RESAMPLING_FN, SCHEMES
from medseg.nnunet.results import NnunetModel, NnunetResultsError, fold_ensemble, read_results

MODALITY_OF_SCHEME = {"CTNormalization": "ct", "RGBTo01Normalization": "rgb"}


def recipe_of(model: NnunetModel, mirror_axes: tuple[int, ...] | None) -> dict[str, Any]:
    """The card's `nnunet` section from the plans (the configuration's and the dataset-wide parts)."""
    config, plans, source = model.config, model.plans, model.folder / "plans.json"
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key) != RESAMPLING_FN:
            raise NnunetResultsError(f"{source}: {key} {config.get(key)!r} is not nnU-Net's default "
                                     f"{RESAMPLING_FN!r}; medseg reproduces only that one")
    schemes = list(config["normalization_schemes"])
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        raise NnunetResultsError(f"{source}: normalization {unknown} is not one of {', '.join(SCHEMES)}")
    properties = plans.get("foreground_intensity_properties_per_channel") or {}
    return {
        "trainer": model.trainer, "plans": model.plans_name, "configuration": model.configuration,
        "folds": sorted(model.checkpoints), "dataset": plans.get("dataset_name"),
        "patch_size": [int(v) for v in config["patch_size"]],
        "spacing": [float(v) for v in config["spacing"]],
        "transpose_forward": [int(v) for v in plans["transpose_forward"]],
        "transpose_backward": [int(v) for v in plans["transpose_backward"]],
        "normalization_schemes": schemes,
        "use_mask_for_norm": [bool(v) for v in config["use_mask_for_norm"]],
        "intensity_properties": [{k: float(v) for k, v in (properties.get(str(c)) or {}).items()}
                                 for c in range(len(schemes))],
        "data_resampling": dict(config.get("resampling_fn_data_kwargs") or {}),
        "logits_resampling": dict(config.get("resampling_fn_probabilities_kwargs") or {}),
        "mirror_axes": list(mirror_axes) if mirror_axes is not None else [0, 1],
        "num_classes": model.num_classes,
        "tile_step_size": 0.5,
        "use_gaussian": True,
        "crop_to_nonzero": True,
        "logits_accumulation": "float16",
        "fold_ensemble": "mean of the folds' logits",
    }


def card_for(model: NnunetModel, recipe: dict[str, Any], arch: str = "nnunet_2d",
             split: dict[str, Any] | None = None):
    from medseg.deployment.card import NNUNET_CARD_SCHEMA, ModelCard

    labels = sorted(model.dataset_json["labels"].items(), key=lambda item: item[1])
    medseg_info = model.dataset_json.get("medseg") or {}
    label_values = [int(v) for v in medseg_info.get("label_values") or [value for _, value in labels]]
    schemes = recipe["normalization_schemes"]
    strides = model.config["architecture"]["arch_kwargs"].get("strides") or []
    multiple = 1
    for stride in strides:
        multiple *= int(stride[0]) if isinstance(stride, (list, tuple)) else int(stride)
    spacing = model.plans.get("original_median_spacing_after_transp")
    card = ModelCard(
        arch=arch,
        model_options={"trainer": model.trainer, "plans": model.plans_name, "configuration": model.configuration,
                       "folds": recipe["folds"]},
        image_channels=len(schemes),
        context=0,
        class_names=[str(name) for name, _ in labels],
        label_values=label_values,
        image_size=list(recipe["patch_size"]),
        size_multiple=multiple,
        dynamic_hw=False,
        modality=str(medseg_info.get("modality") or MODALITY_OF_SCHEME.get(schemes[0], "mr")),
        normalisation={"method": "nnunet"},
        input_kind="volume",
        spacing=[float(v) for v in spacing] if spacing else None,
        dataset={"name": str(medseg_info.get("dataset") or model.plans.get("dataset_name")),
                 "format": "nnunet", "version": str(medseg_info.get("version") or "")},
        # the split the dataset was written with (medseg's own nnU-Net datasets record it): the promotion gate
        # compares versions only on the same test cases
        split=dict(split or {k: medseg_info[k] for k in ("split_sha256", "test_cases_sha256") if k in medseg_info}),
        orientation="native",
        medseg_version=__version__,
        schema=NNUNET_CARD_SCHEMA,
        nnunet=recipe,
    )
    card.validate(f"model card of {model.folder}")
    return card


def import_nnunet_model(results: str | Path, out_dir: str | Path, folds: str | list[str] = "all",
                        checkpoint: str = "final", arch: str = "nnunet_2d", opset: int = 17,
                        split: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """Write `<out_dir>/model.onnx` (with its card, and `evaluation`, metrics.json's summary, where the model was
    evaluated by medseg) and `<out_dir>/nnunet_import.json`; returns the latter."""
    import torch

    from medseg.deployment.export import export_onnx, write_card_metadata
    from medseg.io import atomic_dir

    model = read_results(results, folds, checkpoint)
    network, axes = fold_ensemble(model)
    recipe = recipe_of(model, axes)
    card = card_for(model, recipe, arch, split)
    if evaluation is not None:
        card = card.with_evaluation(evaluation)
    out_dir = Path(out_dir)
    summary = {"source": str(Path(results).resolve()), "folds": recipe["folds"], "checkpoint": checkpoint,
               "trainer": model.trainer, "plans": model.plans_name, "configuration": model.configuration,
               "patch_size": recipe["patch_size"], "num_classes": card.num_classes, "arch": arch}
    with atomic_dir(out_dir) as tmp:
        with torch.no_grad():
            export_onnx(network, card.in_channels, tuple(card.image_size), tmp / "model.onnx", opset=opset,
                        dynamic_hw=False)
        write_card_metadata(tmp / "model.onnx", card)
        (tmp / "nnunet_import.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
