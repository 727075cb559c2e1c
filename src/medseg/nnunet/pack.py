"""An nnU-Net entry's budget (params.yaml `model_options.<entry>`) and its results pack (models/<A>/checkpoint.pt).

An nnU-Net entry (`nnunet_2d`, `nnunet_resenc_m_2d` in params.yaml `models:`) has the same stages and declared
outputs as a network (medseg.nnunet.train, .evaluate, .export hold them). nnU-Net's raw, preprocessed and results
folders live in a temporary work folder during training, and are no declared output; `checkpoint.pt` is the "results
pack": the trained model folder's plans.json, dataset.json and the fold's checkpoint_final.pth, which is all that
evaluation and export need (last.pt is the same file: an interrupted nnU-Net training starts over).

The budget: epochs, iterations_per_epoch, val_iterations_per_epoch (nnU-Net's defaults 1000, 250, 50), fold (0:
medseg's train/val split), dataset_id (900) and tta (mirroring in evaluation, as nnUNetv2_predict; default on).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.io import atomic_path

PACK_FORMAT = "medseg-nnunet-results"
PACK_VERSION = 1


@dataclass(frozen=True)
class NnunetBudget:
    """model_options.<entry> of an nnU-Net entry (nnU-Net's own defaults where it says nothing)."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    fold: int = 0
    dataset_id: int = 900
    tta: bool = True
    # nnU-Net's planner sizes patch and batch for this much GPU memory (GB; its -gpu_memory_target, default 8):
    # a smaller target plans a smaller patch and batch, e.g. for a CPU's budget
    gpu_memory_target: float | None = None

    @classmethod
    def of(cls, params: dict[str, Any], arch: str) -> NnunetBudget:
        options = dict((params.get("model_options") or {}).get(arch) or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"params.yaml: model_options.{arch} has {', '.join(unknown)}; an nnU-Net entry takes "
                              f"{', '.join(sorted(known))}")
        budget = cls(**options)
        for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch", "dataset_id"):
            value = getattr(budget, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"params.yaml: model_options.{arch}.{name}={value!r}; expected an integer >= 1")
        if not isinstance(budget.fold, int) or budget.fold < 0:
            raise ConfigError(f"params.yaml: model_options.{arch}.fold={budget.fold!r}; expected 0 (medseg's "
                              "train/val split) or 1 + a CV fold")
        target = budget.gpu_memory_target
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0):
            raise ConfigError(f"params.yaml: model_options.{arch}.gpu_memory_target={target!r}; expected GB > 0")
        if not isinstance(budget.tta, bool):
            raise ConfigError(f"params.yaml: model_options.{arch}.tta={budget.tta!r}; expected true or false")
        return budget


# ------------------------------------------------------------------ the results pack (checkpoint.pt)

def pack_results(model_folder: Path, fold: int, path: Path, checkpoint: str = "final") -> None:
    """models/<A>/checkpoint.pt: the files of a trained nnU-Net model folder that inference needs, in one file
    (the chosen checkpoint, final or best, is packed as the fold's checkpoint_final.pth; `checkpoint` records it)."""
    import torch

    files = {}
    for rel in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (model_folder / rel).is_file():
            files[rel] = (model_folder / rel).read_bytes()
    files[f"fold_{fold}/checkpoint_final.pth"] = (model_folder / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth"
                                                  ).read_bytes()
    pack = {"format": PACK_FORMAT, "version": PACK_VERSION, "folder": model_folder.name, "fold": int(fold),
            "checkpoint": checkpoint, "files": files}
    with atomic_path(path) as tmp:
        torch.save(pack, tmp)


@contextmanager
def unpacked_results(path: Path) -> Iterator[tuple[Path, int]]:
    """(the trained model folder, rebuilt in a temporary folder, and its fold) of a results pack."""
    import torch

    if not path.is_file():
        raise ConfigError(f"{path}: not found; run the train stage of this nnU-Net entry first")
    try:
        pack = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from exc
    if not isinstance(pack, dict) or pack.get("format") != PACK_FORMAT:
        raise ConfigError(f"{path}: not an nnU-Net results pack (a network's checkpoint under an nnU-Net entry's "
                          "name?); re-run its train stage")
    if int(pack.get("version", 0)) > PACK_VERSION:
        raise ConfigError(f"{path}: results pack version {pack.get('version')} is newer than this medseg reads")
    with tempfile.TemporaryDirectory(prefix="medseg-nnunet-") as tmp:
        folder = Path(tmp) / str(pack["folder"])
        for rel, data in pack["files"].items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ConfigError(f"{path}: the results pack names a file outside its folder ({rel})")
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield folder, int(pack["fold"])


def check_trained_on_this_split(dataset_json: dict[str, Any], source: Path, split_file: Path) -> str:
    """The current split's sha256; a ConfigError unless an nnU-Net model's dataset.json (`source` names where it came from) records the project's
    current split: one `medseg nnunet dataset` did not write, or one written before the split changed, may have
    trained on the test patients. Adoption and every evaluation check it."""
    import json

    from medseg.data.split import split_sha256

    recorded = (dataset_json.get("medseg") or {}).get("split_sha256")
    if not split_file.is_file():
        raise ConfigError(f"{split_file}: not found; run the split stage first")
    ours = split_sha256(json.loads(split_file.read_text()))
    if recorded is None:
        raise ConfigError(f"{source}: records no medseg split (not written by `medseg nnunet dataset`), so nothing "
                          "proves the test patients were left out of its training; train it on the folder "
                          "`medseg nnunet dataset` writes")
    if recorded != ours:
        raise ConfigError(f"{source}: trained on split {recorded[:12]}, this project's is {ours[:12]} ({split_file}); "
                          "its training may include this split's test patients")
    return ours
