"""A trained nnU-Net v2 model folder, read and checked before anything is built from it.

The folder is what `nnUNetv2_train` leaves under `nnUNet_results` (here, or copied from a GPU cluster):

    <Dataset>/<Trainer>__<Plans>__<configuration>/
      plans.json  dataset.json  [dataset_fingerprint.json]
      fold_<k>/checkpoint_final.pth  [checkpoint_best.pth]

Every problem is a MedsegError naming the file: a missing or unreadable plans.json, dataset.json or checkpoint, a
configuration the plans do not have, a 3D configuration (medseg deploys 2D networks; 3d_fullres is planned), a
region-based or cascaded model. Checkpoints are read with torch's weights_only loader (plain tensors and numbers):
a results folder from elsewhere cannot run code on import.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
_FOLDER = re.compile(r"^(?P<trainer>[^_]+(?:_[^_]+)*)__(?P<plans>.+)__(?P<configuration>[^_].*)$")


class NnunetResultsError(MedsegError):
    """A results folder that is not a usable trained nnU-Net model; the message names the file."""


@dataclass(frozen=True)
class NnunetModel:
    """One trained nnU-Net model: its folder, plans, dataset.json and the chosen folds' checkpoint files."""

    folder: Path
    trainer: str
    plans_name: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    checkpoints: dict[str, Path]  # fold name ("0", ...) -> checkpoint file

    @property
    def config(self) -> dict[str, Any]:
        """The configuration's plans with inheritance resolved (`inherits_from`, as nnU-Net's PlansManager does)."""
        return resolved_configuration(self.plans, self.configuration, self.folder / "plans.json")

    @property
    def num_classes(self) -> int:
        return len(self.dataset_json["labels"])


def nnunetv2_required(what: str) -> MedsegError:
    """The error where nnunetv2 (the optional [nnunet] extra) is needed and missing."""
    return MedsegError(f"{what} needs nnunetv2 (the optional extra): pip install 'medseg[nnunet]'")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NnunetResultsError(f"{path}: not found; is this an nnU-Net results folder "
                                 f"(<Trainer>__<Plans>__<configuration>)?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NnunetResultsError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise NnunetResultsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def resolved_configuration(plans: dict[str, Any], name: str, source: Path) -> dict[str, Any]:
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or name not in configurations:
        known = ", ".join(sorted(configurations)) if isinstance(configurations, dict) else "none"
        raise NnunetResultsError(f"{source}: has no configuration {name!r} (it has: {known})")
    config = dict(configurations[name])
    seen = {name}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configurations:
            raise NnunetResultsError(f"{source}: configuration {name!r} inherits from {parent!r}, which is "
                                     f"{'a loop' if parent in seen else 'not in the plans'}")
        seen.add(parent)
        config = {**configurations[parent], **config}
    return config


def read_results(folder: str | Path, folds: str | list[str] = "all", checkpoint: str = "final") -> NnunetModel:
    """Check `folder` and pick the checkpoints: `folds` "all" (every fold_<k> with the checkpoint) or fold names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NnunetResultsError(f"{folder}: not a folder")
    if checkpoint not in CHECKPOINTS:
        raise NnunetResultsError(f"checkpoint {checkpoint!r}: expected one of {', '.join(CHECKPOINTS)}")
    match = _FOLDER.match(folder.name)
    if match is None:
        raise NnunetResultsError(f"{folder}: the folder name is not nnU-Net's <Trainer>__<Plans>__<configuration>")
    plans = _read_json(folder / "plans.json")
    dataset_json = _read_json(folder / "dataset.json")
    configuration = match["configuration"]
    config = resolved_configuration(plans, configuration, folder / "plans.json")
    _check_supported(folder, configuration, config, dataset_json)
    checkpoints = _checkpoints(folder, folds, CHECKPOINTS[checkpoint])
    return NnunetModel(folder, match["trainer"], match["plans"], configuration, plans, dataset_json, checkpoints)


def _check_supported(folder: Path, name: str, config: dict[str, Any], dataset_json: dict[str, Any]) -> None:
    patch = config.get("patch_size")
    if not isinstance(patch, list) or not patch:
        raise NnunetResultsError(f"{folder / 'plans.json'}: configuration {name!r} has no patch_size")
    if len(patch) != 2:
        raise NnunetResultsError(
            f"{folder}: configuration {name!r} is a {len(patch)}D network (patch {patch}); medseg imports 2D "
            f"nnU-Net models (a `2d` configuration) for now: train `nnUNetv2_train <dataset> 2d <fold>`")
    if config.get("previous_stage"):
        raise NnunetResultsError(f"{folder}: configuration {name!r} is a cascade stage; medseg imports single-stage "
                                 f"2D models")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or len(labels) < 2:
        raise NnunetResultsError(f"{folder / 'dataset.json'}: labels must map at least background and one class "
                                 f"to label values, got {labels!r}")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise NnunetResultsError(f"{folder / 'dataset.json'}: region-based labels ({labels}) are not supported; "
                                 f"medseg imports models with one integer label per class")
    if sorted(labels.values()) != list(range(len(labels))):
        raise NnunetResultsError(f"{folder / 'dataset.json'}: label values {sorted(labels.values())} are not "
                                 f"0..{len(labels) - 1} (nnU-Net requires consecutive labels)")


def _checkpoints(folder: Path, folds: str | list[str], filename: str) -> dict[str, Path]:
    if folds == "all":
        found = {p.name[len("fold_"):]: p / filename for p in sorted(folder.glob("fold_*")) if (p / filename).is_file()}
        if not found:
            raise NnunetResultsError(f"{folder}: no fold_<k>/{filename}; train a fold first "
                                     f"(or choose --checkpoint best)")
        return found
    chosen = {}
    for fold in folds:
        path = folder / f"fold_{fold}" / filename
        if not path.is_file():
            raise NnunetResultsError(f"{path}: not found (fold {fold} is not trained, or is still training)")
        chosen[str(fold)] = path
    return chosen


def load_weights(path: Path) -> tuple[dict[str, Any], tuple[int, ...] | None]:
    """(network state dict, mirroring axes the trainer allowed) of one checkpoint."""
    checkpoint = load_checkpoint(path)
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return checkpoint["network_weights"], (tuple(int(a) for a in axes) if axes is not None else None)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint (weights, its logger's history, epoch), through torch's weights_only loader: nnU-Net
    stores plain tensors, numbers and strings, so nothing in the file is executed."""
    import numpy as np
    import torch

    # nnU-Net logs numpy scalars (losses, the EMA Dice) beside the weights: allow them, and nothing else
    numpy_scalars = [np._core.multiarray.scalar, np.dtype,
                     *{type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")}]
    try:
        with torch.serialization.safe_globals(numpy_scalars):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling error, a truncated zip, a file that is not a checkpoint
        raise NnunetResultsError(f"{path}: cannot read it as an nnU-Net checkpoint ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise NnunetResultsError(f"{path}: has no network_weights; not an nnU-Net v2 checkpoint")
    return checkpoint


def build_network(model: NnunetModel):
    """The configuration's network as nnunetv2 builds it (deep supervision off), in eval mode, untrained."""
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    except ImportError as exc:
        raise nnunetv2_required(f"importing {model.folder}") from exc
    arch = model.config["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  len(model.config["normalization_schemes"]), model.num_classes,
                                  allow_init=True, deep_supervision=False).eval()


def fold_ensemble(model: NnunetModel):
    """(one module averaging every chosen fold's logits, the mirroring axes the trainers allowed)."""
    import torch
    from torch import nn

    class FoldMean(nn.Module):
        def __init__(self, networks):
            super().__init__()
            self.networks = nn.ModuleList(networks)

        def forward(self, x):
            if len(self.networks) == 1:
                return self.networks[0](x)
            return torch.stack([net(x) for net in self.networks]).mean(0)

    networks, axes = [], None
    for fold, path in model.checkpoints.items():
        weights, fold_axes = load_weights(path)
        network = build_network(model)
        try:
            network.load_state_dict(weights)
        except RuntimeError as exc:
            raise NnunetResultsError(f"{path}: the weights do not fit the network plans.json describes "
                                     f"({str(exc).splitlines()[0]})") from exc
        networks.append(network)
        axes = fold_axes if axes is None else tuple(sorted(set(axes) & set(fold_axes or ())))
    return FoldMean(networks).eval(), axes
