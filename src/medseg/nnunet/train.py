"""nnU-Net v2 trained on medseg's split, with nnunetv2's own planning, preprocessing and trainer.

`train_nnunet` runs, each in a child process whose environment names this project's nnU-Net folders (nnunetv2
reads nnUNet_raw, nnUNet_preprocessed and nnUNet_results once, at import):
1. `nnUNetv2_plan_and_preprocess -d <id> -c 2d` (`-pl nnUNetPlannerResEncM` for the ResEnc M preset), which copies
   the dataset's splits_final.json (medseg's split) into the preprocessed folder;
2. `python -m medseg.nnunet.worker`: nnunetv2's `nnUNetTrainer` for one fold, with the epochs and iterations per
   epoch given (nnU-Net's defaults are 1000 x 250; a quick comparison gives it a small budget, and the report
   says so), on the device given.
It returns the trained model folder, `<results>/<Dataset>/nnUNetTrainer__<plans>__2d`, for `medseg.nnunet.convert`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import config_hash, disable_telemetry, resolve_device, settings
from medseg.contracts import TrainSummary
from medseg.errors import MedsegError, TrainingError
from medseg.io import atomic_path, read_json, write_dvc_metrics
from medseg.layout import ProjectLayout, RunFiles
from medseg.nnunet.pack import NnunetBudget, check_trained_on_this_split, pack_results
from medseg.nnunet.results import build_network, load_checkpoint, nnunetv2_required, read_results

# the two presets a params.yaml `models:` entry names: (nnU-Net planner, the plans it writes)
PRESETS = {
    "nnunet_2d": ("ExperimentPlanner", "nnUNetPlans"),
    "nnunet_resenc_m_2d": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
}
_log = logging.getLogger(__name__)

TRAINER = "nnUNetTrainer"
FAMILY = "nnU-Net (baseline)"


def family_of(arch: str) -> str:
    """The family a report or registry tag gives `arch`: nnU-Net's entries, or medseg.models' (its ConfigError for
    an unknown name)."""
    from medseg.models import get_model_info

    return FAMILY if is_nnunet_entry(arch) else get_model_info(arch).family


def is_nnunet_entry(arch: str) -> bool:
    """A params.yaml `models:` entry that nnunetv2 trains (train_nnunet_entry below, medseg.nnunet.evaluate,
    .export), not a network of medseg.models."""
    return arch in PRESETS


CONFIGURATION = "2d"


@dataclass(frozen=True)
class NnunetFolders:
    raw: Path
    preprocessed: Path
    results: Path

    def environment(self, device: str, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results),
                   # data augmentation in the trainer's own process on a CPU (workers would fight it for cores);
                   # planning sets torch's threads to this value, so it is at least 1 there (see `_plan`)
                   nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA") or ("0" if device == "cpu" else "4"),
                   nnUNet_compile=env.get("nnUNet_compile") or ("false" if device == "cpu" else "true"),
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return env


def _run(command: list[str], env: dict[str, str], what: str, log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
        raise TrainingError(f"nnU-Net {what} failed (exit {done.returncode}); the end of {log_file}:\n"
                            + "\n".join(tail))


def _nnunetv2_available() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise nnunetv2_required("training nnU-Net (nnunet_2d, nnunet_resenc_m_2d)") from exc


def plan_and_preprocess(folders: NnunetFolders, dataset_id: int, preset: str, log_file: Path,
                        threads: int = 1, gpu_memory_target: float | None = None) -> str:
    """nnunetv2's fingerprint, 2d plans (for `gpu_memory_target` GB, nnU-Net's default where None) and
    preprocessing of the dataset; returns the plans' name."""
    planner, plans_name = PRESETS[preset]
    env = folders.environment("cpu", threads)
    env["nnUNet_n_proc_DA"] = str(max(1, int(env["nnUNet_n_proc_DA"] or 1)))
    code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
            "plan_and_preprocess_entry as main; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; main()")
    _run([sys.executable, "-c", code, "-d", str(dataset_id), "-c", CONFIGURATION, "-np", "1",
          "--verify_dataset_integrity", "-pl", planner,
          *(["-gpu_memory_target", f"{gpu_memory_target:g}"] if gpu_memory_target else [])],
         env, "planning and preprocessing", log_file)
    return plans_name


def train_fold(folders: NnunetFolders, dataset_id: int, plans_name: str, fold: int, epochs: int, iterations: int,
               val_iterations: int, device: str, threads: int, log_file: Path, seed: int | None = None) -> Path:
    """One fold with nnunetv2's trainer and this budget; returns the trained model folder."""
    env = folders.environment(device, threads)
    command = [sys.executable, "-m", "medseg.nnunet.worker", "--dataset", str(dataset_id), "--plans", plans_name,
               "--configuration", CONFIGURATION, "--fold", str(fold), "--epochs", str(epochs),
               "--iterations", str(iterations), "--val-iterations", str(val_iterations), "--device", device,
               "--threads", str(threads)] + ([] if seed is None else ["--seed", str(seed)])
    _run(command, env, f"training (fold {fold})", log_file)
    dataset = json.loads((folders.preprocessed / _dataset_folder(folders, dataset_id) / f"{plans_name}.json")
                         .read_text())["dataset_name"]
    model = folders.results / dataset / f"{TRAINER}__{plans_name}__{CONFIGURATION}"
    if not (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
        raise TrainingError(f"{model}: nnU-Net ended without fold_{fold}/checkpoint_final.pth (see {log_file})")
    return model


def _dataset_folder(folders: NnunetFolders, dataset_id: int) -> str:
    prefix = f"Dataset{int(dataset_id):03d}_"
    found = [p.name for p in folders.preprocessed.glob(prefix + "*") if p.is_dir()]
    if len(found) != 1:
        raise TrainingError(f"{folders.preprocessed}: expected one {prefix}* folder after planning, found {found}")
    return found[0]


def check_splits(folders: NnunetFolders, dataset_id: int, raw_dataset: Path) -> None:
    """The preprocessed splits_final.json nnU-Net trains with is the dataset's (medseg's split)."""
    ours = json.loads((raw_dataset / "splits_final.json").read_text())
    used_path = folders.preprocessed / _dataset_folder(folders, dataset_id) / "splits_final.json"
    used = json.loads(used_path.read_text()) if used_path.is_file() else None
    if used is None or [{k: sorted(s[k]) for k in ("train", "val")} for s in used[: len(ours)]] != ours:
        raise TrainingError(f"{used_path}: nnU-Net would train on other folds than {raw_dataset / 'splits_final.json'}")


def train_nnunet(raw_dataset: Path, folders: NnunetFolders, dataset_id: int, preset: str, fold: int, epochs: int,
                 iterations: int, val_iterations: int, device: str, threads: int, log_file: Path,
                 seed: int | None = None, gpu_memory_target: float | None = None) -> Path:
    """Plan, preprocess and train one fold of `preset` on the dataset medseg wrote; the trained model folder."""
    if preset not in PRESETS:
        raise MedsegError(f"{preset}: not an nnU-Net preset ({', '.join(PRESETS)})")
    _nnunetv2_available()
    plans_name = plan_and_preprocess(folders, dataset_id, preset, log_file, threads, gpu_memory_target)
    check_splits(folders, dataset_id, raw_dataset)
    return train_fold(folders, dataset_id, plans_name, fold, epochs, iterations, val_iterations, device, threads,
                      log_file, seed)


# ------------------------------------------------------------------ the train stage of an nnU-Net entry

VAL_DICE_DEFINITION = ("nnU-Net's pseudo-Dice: mean foreground Dice over its validation patches each epoch "
                       "(best_val_dice: the best of its exponential moving average, which selects checkpoint_best)")
TRAIN_LOG_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_dice", "ema_val_dice", "lr", "seconds"]


def train_nnunet_entry(params: dict[str, Any], arch: str, root: str | Path = ".", fold: int | None = None
                       ) -> dict[str, Any]:
    """train@<nnU-Net entry>: plan, preprocess and train with the budget, then write the network's outputs. With
    `fold` (train_fold@<entry>-<k>, params.yaml `cv`): nnU-Net's fold 1 + k, which splits_final.json makes medseg's
    CV fold k, written under models/<A>/folds/<k>/ and reports/<A>/folds/<k>/."""
    import resource

    from medseg.config import check_cv_fold
    from medseg.nnunet.dataset import write_nnunet_raw
    from medseg.runtime.threads import plan_from_params
    from medseg.training.trainer import training_cases_hash

    disable_telemetry()
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    budget = NnunetBudget.of(params, arch)
    if fold is not None:
        check_cv_fold(params, arch, fold)
        budget = replace(budget, fold=1 + int(fold))
    device = resolve_device(settings(params).train.device)
    device = "cuda" if device.startswith("cuda") else device
    threads = plan_from_params(params).intra_op
    split = read_json(layout.split_file) if layout.split_file.is_file() else {}
    with tempfile.TemporaryDirectory(prefix=f"medseg-{arch}-") as work:
        work = Path(work)
        dataset = write_nnunet_raw(params, root, budget.dataset_id, raw_root=work / "raw")
        folders = NnunetFolders(work / "raw", work / "preprocessed", work / "results")
        _log.info("%s: nnU-Net planning, preprocessing and training fold %d (%d epochs x %d iterations) on %s",
                  arch, budget.fold, budget.epochs, budget.iterations_per_epoch, device)
        model_folder = train_nnunet(dataset, folders, budget.dataset_id, arch, budget.fold, budget.epochs,
                                    budget.iterations_per_epoch, budget.val_iterations_per_epoch, device, threads,
                                    log_file=work / "nnunet.log", seed=settings(params).seed,
                                    gpu_memory_target=budget.gpu_memory_target)
        summary = write_training_outputs(
            layout.run_files(arch, fold), arch, model_folder, budget.fold, "final",
            iterations=budget.iterations_per_epoch, device=device, cv_fold=fold,
            # nnU-Net trains in a child process: its high-water mark is the children's
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            run_hash=config_hash({"arch": arch, "budget": asdict(budget), "seed": params.get("seed"),
                                  "cases": training_cases_hash(split)}))
    return summary.to_dict()


def adopt_nnunet_results(params: dict[str, Any], arch: str, results: str | Path, fold: int = 0,
                         checkpoint: str = "final", root: str | Path = ".") -> dict[str, Any]:
    """Make a model nnU-Net trained elsewhere (on `medseg nnunet dataset`'s folder, a GPU cluster) this project's
    `arch` training: the train stage's outputs, so evaluate, export, register and the report take it as if
    train@<arch> had run. Refused unless its dataset.json records this project's split: a model trained on other
    patients could have seen the test patients."""
    layout = ProjectLayout.of(params, Path(root))
    if not is_nnunet_entry(arch):
        raise MedsegError(f"{arch}: not an nnU-Net entry ({', '.join(PRESETS)})")
    model = read_results(results, [str(fold)], checkpoint)
    split = check_trained_on_this_split(model.dataset_json, Path(results) / "dataset.json", layout.split_file)
    summary = write_training_outputs(layout.run_files(arch), arch, model.folder, fold, checkpoint, iterations=None,
                                     device=None, peak_rss_mb=None,
                                     run_hash=config_hash({"adopted": str(model.checkpoints[str(fold)].name),
                                                           "split": split, "trainer": model.trainer}))
    return summary.to_dict()


def write_training_outputs(files: RunFiles, arch: str, model_folder: Path, fold: int, checkpoint: str, *,
                           iterations: int | None, device: str | None, peak_rss_mb: float | None,
                           run_hash: str, cv_fold: int | None = None) -> TrainSummary:
    """The train stage's outputs of a trained nnU-Net model folder (nnU-Net's `fold`; `cv_fold`: the medseg CV
    fold they are, if any): checkpoint.pt (the results pack) and last.pt, train_log.csv and curves.png from
    nnU-Net's logger, train_summary.json and train_scores.json."""
    from medseg.training.trainer import median_epoch_seconds, plot_curves, write_train_log

    state = load_checkpoint(model_folder / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth")
    num_params = _count_params(model_folder, fold, checkpoint)
    pack_results(model_folder, fold, files.checkpoint, checkpoint)
    with atomic_path(files.last) as tmp:
        shutil.copyfile(files.checkpoint, tmp)
    history = training_history(state.get("logging") or {}, iterations)
    write_train_log(files.log, history, TRAIN_LOG_COLUMNS)
    plot_curves(files.curves, history, arch)
    ema = [row["ema_val_dice"] for row in history if row.get("ema_val_dice") is not None]
    best = int(np.argmax(ema)) if ema else None
    summary = TrainSummary(
        arch=arch,
        fold=cv_fold,
        params=num_params,
        epochs=len(history),
        steps=len(history) * iterations if iterations else None,
        best_val_dice=round(float(ema[best]), 6) if best is not None else None,
        best_epoch=best + 1 if best is not None else None,
        val_dice_definition=VAL_DICE_DEFINITION,
        train_seconds=history[-1]["seconds"] if history else None,
        seconds_per_epoch=median_epoch_seconds(history),
        peak_rss_mb=peak_rss_mb,
        device=device,
        world_size=1,
        config_hash=run_hash,
        recipe="nnunet",
        **_patch_and_batch(model_folder),
    )
    summary.write(files.summary)
    write_dvc_metrics(files.scores, {"val_dice": summary.best_val_dice, "train_s": summary.train_seconds},
                      arch if cv_fold is None else f"{arch}.fold{cv_fold}")
    return summary


def _patch_and_batch(model_folder: Path) -> dict[str, Any]:
    """{input_size, batch_size} of the configuration nnU-Net trained (<trainer>__<plans>__<configuration>), from its
    plans.json; {} where it cannot be read."""
    try:
        plans = json.loads((model_folder / "plans.json").read_text())
        configuration = plans["configurations"][model_folder.name.split("__")[-1]]
        return {"input_size": [int(v) for v in configuration["patch_size"]],
                "batch_size": int(configuration["batch_size"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _count_params(model_folder: Path, fold: int, checkpoint: str = "final") -> int:
    network = build_network(read_results(model_folder, [str(fold)], checkpoint))
    return int(sum(p.numel() for p in network.parameters()))


def training_history(logging_: dict[str, list], iterations: int | None) -> list[dict[str, Any]]:
    """train_log.csv rows from nnU-Net's logger (per epoch: losses, pseudo-Dice and its EMA, lr, timestamps)."""
    def at(key: str, i: int) -> float | None:
        values = list(logging_.get(key) or [])
        return round(float(values[i]), 6) if i < len(values) and values[i] is not None else None

    starts, ends = list(logging_.get("epoch_start_timestamps") or []), list(logging_.get("epoch_end_timestamps") or [])
    rows = []
    for i in range(min(len(logging_.get("train_losses") or []), len(ends))):
        rows.append({"epoch": i + 1, "step": (i + 1) * iterations if iterations else None,
                     "train_loss": at("train_losses", i),
                     "val_loss": at("val_losses", i), "val_dice": at("mean_fg_dice", i),
                     "ema_val_dice": at("ema_fg_dice", i), "lr": at("lrs", i),
                     "seconds": round(float(ends[i]) - float(starts[0]), 3) if starts else None})
    return rows
