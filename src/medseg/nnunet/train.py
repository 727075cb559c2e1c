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
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError, TrainingError
from medseg.nnunet.results import nnunetv2_required

# the two presets a params.yaml `models:` entry names: (nnU-Net planner, the plans it writes)
PRESETS = {
    "nnunet_2d": ("ExperimentPlanner", "nnUNetPlans"),
    "nnunet_resenc_m_2d": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
}
TRAINER = "nnUNetTrainer"
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
                        threads: int = 1) -> str:
    """nnunetv2's fingerprint, 2d plans and preprocessing of the dataset; returns the plans' name."""
    planner, plans_name = PRESETS[preset]
    env = folders.environment("cpu", threads)
    env["nnUNet_n_proc_DA"] = str(max(1, int(env["nnUNet_n_proc_DA"] or 1)))
    code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
            "plan_and_preprocess_entry as main; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; main()")
    _run([sys.executable, "-c", code, "-d", str(dataset_id), "-c", CONFIGURATION, "-np", "1",
          "--verify_dataset_integrity", "-pl", planner], env, "planning and preprocessing", log_file)
    return plans_name


def train_fold(folders: NnunetFolders, dataset_id: int, plans_name: str, fold: int, epochs: int, iterations: int,
               val_iterations: int, device: str, threads: int, log_file: Path) -> Path:
    """One fold with nnunetv2's trainer and this budget; returns the trained model folder."""
    env = folders.environment(device, threads)
    command = [sys.executable, "-m", "medseg.nnunet.worker", "--dataset", str(dataset_id), "--plans", plans_name,
               "--configuration", CONFIGURATION, "--fold", str(fold), "--epochs", str(epochs),
               "--iterations", str(iterations), "--val-iterations", str(val_iterations), "--device", device,
               "--threads", str(threads)]
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
                 iterations: int, val_iterations: int, device: str, threads: int, log_file: Path) -> Path:
    """Plan, preprocess and train one fold of `preset` on the dataset medseg wrote; the trained model folder."""
    if preset not in PRESETS:
        raise MedsegError(f"{preset}: not an nnU-Net preset ({', '.join(PRESETS)})")
    _nnunetv2_available()
    plans_name = plan_and_preprocess(folders, dataset_id, preset, log_file, threads)
    check_splits(folders, dataset_id, raw_dataset)
    return train_fold(folders, dataset_id, plans_name, fold, epochs, iterations, val_iterations, device, threads,
                      log_file)
