"""Training one architecture: seeded, resumable bit for bit, optionally distributed (torchrun).

Checkpoint selection uses the VALIDATION split only (`split["val"]`); the test split is never read here
(it belongs to medseg.evaluation.evaluate), so reported test scores are not selected on.

Resume: `models/<A>/last.pt` is written atomically at every epoch end and every `train.checkpoint_every_steps`
optimizer steps. It holds model, optimizer, scheduler, GradScaler, every RNG state, the data position (epoch,
batches done in it) and the best weights so far; once the run finishes, only the final weights and the record
(FINISHED_KEYS), since a finished run is never resumed. A run killed at any point (SIGKILL included) and started again
with the same configuration continues from there and ends with the same weights as an uninterrupted run (bitwise
on CPU). The data order is a pure function of (seed, epoch) (DistributedSampler), so skipping the batches already
done needs no data loading. last.pt carries a `config_hash`; a different configuration, or a finished run,
starts fresh (logged).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medseg.config import (
    DataSettings,
    TrainSettings,
    check_cv_fold,
    config_hash,
    disable_telemetry,
    model_options,
    resolve_device,
    settings,
    validate_params,
)
from medseg.contracts import CheckpointMeta, TrainSummary
from medseg.data.plan import SlicePlan, budget_of, plan_slices
from medseg.errors import ConfigError, TrainingError
from medseg.io import atomic_path, read_json, write_dvc_metrics, write_text
from medseg.layout import ProjectLayout, RunFiles
from medseg.runtime.threads import apply_torch_threads, plan_from_params
from medseg.training.checkpoint import load_checkpoint, save_checkpoint
from medseg.training.losses import build_loss

_log = logging.getLogger(__name__)

# Keys of train:/data: that do not change the numbers a run produces (so they may differ on resume).
_HASH_IGNORED = {"checkpoint_every_steps", "num_workers", "device", "cache_resized"}
VAL_DICE_DEFINITION = (
    "volume-wise: each validation volume is predicted slice by slice at its native size (as in evaluation); "
    "Dice per (case, foreground class) from the 3D volume, pairs where both prediction and ground truth are "
    "empty skipped; val_dice = mean over the remaining pairs"
)

# Called as hook(global_step) after every optimizer step, once that step's checkpoint (if any) is written.
# Tests use it to kill a run at a known step; nothing in medseg registers one.
STEP_HOOKS: list[Callable[[int], None]] = []


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str, timeout_s: float) -> tuple[Dist, str, bool]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: start a process group (nccl on CUDA, gloo on CPU) whose
    collectives give up after `timeout_s` (compute.dist_timeout_s), so a rank that hangs ends the job instead of
    holding it forever. Returns the rank, the device and whether this call started the group (and must end it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "LOCAL_RANK" not in os.environ:
        return Dist(), device, False
    import datetime

    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
    info = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, enabled=True)
    return info, device, started


def training_cases_hash(split: dict[str, Any]) -> str:
    """Hash of the case lists training depends on (train + val), part of the run's config hash and stored in the
    checkpoints: a changed test list must not restart a training. The test list is evaluation's business."""
    return config_hash({"train": split.get("train", []), "val": split.get("val", [])})


def run_config_hash(params: dict[str, Any], arch: str, split: dict[str, Any]) -> str:
    params = validate_params(params)  # the same hash whether or not the caller's dict spelled out the defaults
    train = {k: v for k, v in params["train"].items() if k not in _HASH_IGNORED}
    data = {k: v for k, v in params["data"].items() if k not in _HASH_IGNORED}
    return config_hash(
        {
            "arch": arch,
            "seed": params["seed"],
            "dataset": params["dataset"]["name"],
            "model_options": model_options(params, arch),
            "train": train,
            "data": data,
            "split": training_cases_hash(split),
        }
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every global RNG as tensors/primitives, so torch.load(weights_only=True) can read it back."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(model: nn.Module, train: TrainSettings) -> torch.optim.Optimizer:
    name = train.optimizer
    lr, wd = float(train.lr), float(train.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=float(train.momentum), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    raise ConfigError(f"train.optimizer={name!r}; expected sgd or adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSettings, max_iter: int):
    """Per-iteration schedule. poly is TransUNet's lr * (1 - iter/max_iter)^0.9."""
    name = train.schedule
    max_iter = max(1, max_iter)
    if name == "poly":
        power = float(train.poly_power)
        factor = lambda it: max(0.0, 1.0 - it / max_iter) ** power  # noqa: E731
    elif name == "cosine":
        factor = lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter))  # noqa: E731
    else:
        raise ConfigError(f"train.schedule={name!r}; expected poly or cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _amp_settings(train: TrainSettings, device: str) -> tuple[bool, torch.dtype]:
    """AMP only on CUDA: bf16 where supported (no scaler needed), else fp16 with a GradScaler."""
    if not (train.amp and device.startswith("cuda")):
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _epoch_batches(sampler, epoch: int, batch_size: int, steps_per_epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # drop the ragged last batch (BatchNorm dislikes tiny batches)
    return batches[:steps_per_epoch]


def _patch_batches(epoch: int, rank: int, world: int, batch_size: int, steps: int) -> list[list[int]]:
    """The planned recipe's epoch on one rank: `steps` batches of item numbers no other (epoch, rank, step) uses
    (PatchDataset draws item i's patch from (seed, i)): disjoint across ranks, the same on a resume."""
    first = (epoch * world + rank) * steps * batch_size
    return [list(range(first + s * batch_size, first + (s + 1) * batch_size)) for s in range(steps)]


def _check_finite(model: nn.Module, where: str) -> None:
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()]) if tensors else None
    if flags is not None and not bool(flags.all()):  # one device sync for the whole model
        name = next(name for name, ok in zip(tensors, flags.tolist()) if not ok)
        raise TrainingError(f"{where}: parameter {name} is not finite; the last good checkpoint is kept")


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# What a finished run's last.pt keeps: the final weights and the record, not the resume state.
FINISHED_KEYS = ("arch", "config_hash", "training_cases_hash", "epoch", "batch_in_epoch", "global_step", "finished",
                 "state_dict", "best_val_dice", "best_epoch", "history", "train_seconds")


def _try_resume(path: Path, expected_hash: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except TrainingError as exc:
        _log.warning("%s; starting fresh", exc)
        return None
    if state.get("config_hash") != expected_hash:
        _log.warning("%s: written with another configuration (hash %s != %s); starting fresh",
                     path, state.get("config_hash"), expected_hash)
        return None
    if state.get("finished"):
        _log.info("%s: that run finished; training again from scratch", path)
        return None
    _log.info("%s: resuming at epoch %d, step %d", path, state["epoch"], state["global_step"])
    return state


def _validate(model: nn.Module, ingested: Path, case_ids: list[str], plan: SlicePlan, context: int,
              num_classes: int, batch_size: int, device: str) -> float | None:
    """Volume-wise mean foreground Dice on the validation cases (see VAL_DICE_DEFINITION)."""
    from medseg.evaluation.scoring import dice_rows, score_cases
    from medseg.inference.torch_backend import predict_volume

    rows = score_cases(lambda image, spacing: predict_volume(model, image, plan.image_size, context, batch_size,
                                                             device, plan=plan, spacing=spacing),
                       dice_rows(num_classes), ingested, case_ids)  # as evaluation predicts: no AMP
    return float(np.mean([r["dsc"] for r in rows])) if rows else None


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from medseg.runtime.progress import progress

    # off a terminal the epoch's own log line (loss, val Dice) is the progress: no bar lines in a DVC log
    return progress(total=total, initial=initial, desc=desc, enabled=enabled, log_every=None)


class _MlflowLogger:
    """Per-epoch metrics to MLflow, only when MLFLOW_TRACKING_URI is set; failures only warn."""

    def __init__(self, params: dict[str, Any], arch: str, enabled: bool, root: Path, fold: int | None = None):
        self.run = None
        if not (enabled and os.environ.get("MLFLOW_TRACKING_URI")):
            return
        try:
            import mlflow

            from medseg.tracking.store import ensure_experiment, resolve_tracking_uri

            # created like the register stage creates it, so artifacts of both land in the same store
            uri = resolve_tracking_uri(params, root)
            name = settings(params).register.experiment
            mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(uri), name, uri, root))
            # nested when a caller (e.g. a Prefect flow) already has a run open
            run_name = f"train-{arch}" if fold is None else f"train-{arch}-fold{fold}"
            self.run = mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None)
            flat = {f"train.{k}": v for k, v in params.get("train", {}).items()}
            flat.update({f"model.{k}": v for k, v in model_options(params, arch).items()})
            mlflow.log_params({"arch": arch, "seed": params.get("seed"), **({} if fold is None else {"fold": fold}),
                               **flat})
        except Exception as exc:  # noqa: BLE001
            _log.warning("MLflow logging disabled: %s", exc)
            self.run = None

    def epoch(self, row: dict[str, Any]) -> None:
        if self.run is None:
            return
        import mlflow

        metrics = {k: float(row[k]) for k in ("train_loss", "val_dice", "lr") if row.get(k) not in (None, "")}
        try:
            mlflow.log_metrics(metrics, step=int(row["epoch"]))
        except Exception as exc:  # noqa: BLE001
            _log.warning("MLflow log_metrics failed: %s", exc)

    def close(self) -> None:
        if self.run is not None:
            import mlflow

            mlflow.end_run()


LOG_COLUMNS = ["epoch", "step", "train_loss", "val_dice", "lr", "seconds"]


def write_train_log(path: Path, history: list[dict[str, Any]], columns: list[str] = LOG_COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    write_text(path, buf.getvalue())


def plot_curves(path: Path, history: list[dict[str, Any]], arch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss (CE + Dice)", title=f"{arch}: training loss")
    dice_points = [(r["epoch"], r["val_dice"]) for r in history if r.get("val_dice") is not None]
    if dice_points:
        ax_dice.plot(*zip(*dice_points), marker="o", color="tab:green")
    ax_dice.set(xlabel="epoch", ylabel="val Dice (foreground mean)", title=f"{arch}: validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class RunSpec:
    """What one training run is, fixed before it starts (from params.yaml, cases.json and the split)."""

    params: dict[str, Any]
    arch: str
    paths: RunFiles
    train: TrainSettings
    data: DataSettings
    seed: int
    train_ids: list[str]
    val_ids: list[str]
    class_names: list[str]
    context: int
    in_channels: int
    image_size: tuple[int, int]
    options: dict[str, Any]
    run_hash: str
    split: dict[str, Any]
    fold: int | None = None  # cross-validation fold (its train/val lists), None: the split's train/val
    plan: SlicePlan | None = None  # how slices meet the network (medseg.data.plan); None: resize to image_size

    @property
    def slice_plan(self) -> SlicePlan:
        return self.plan if self.plan is not None else SlicePlan("resize", self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def metric_prefix(self) -> str:
        """DVC metric keys' prefix (`unet.val_dice`, `unet.fold0.val_dice`): unique across files for dvc exp show."""
        return self.arch if self.fold is None else f"{self.arch}.fold{self.fold}"

    @classmethod
    def of(cls, params: dict[str, Any], arch: str, root: Path, fold: int | None = None) -> "RunSpec":
        from medseg.data.cases import read_cases
        from medseg.data.split import fold_split

        params = validate_params(params)  # every section with its defaults: below, no key is optional
        paths = ProjectLayout.of(params, root).run_files(arch, fold)
        cases = read_cases(paths.ingested)
        if not paths.split.is_file():
            raise ConfigError(f"{paths.split}: split file not found (run the split stage first)")
        split = read_json(paths.split)
        if fold is not None:  # the fold's development patients: train on the others, select on its held-out ones
            split = fold_split(split, fold, paths.split)
        train_ids, val_ids = list(split.get("train", [])), list(split.get("val", []))
        if not train_ids:
            raise ConfigError(f"{paths.split}: the train list is empty")
        config = settings(params)
        context = int(config.data.context)
        options = model_options(params, arch)
        plan = plan_for(config.data, arch, options, paths.ingested)
        return cls(params=params, arch=arch, paths=paths, train=config.train, data=config.data,
                   seed=int(config.seed), train_ids=train_ids, val_ids=val_ids,
                   class_names=list(cases["class_names"]), context=context,
                   in_channels=int(cases["in_channels"]) * (2 * context + 1),
                   image_size=plan.image_size, options=options, run_hash=run_config_hash(params, arch, split),
                   split=split, fold=fold, plan=plan)


@dataclass
class TrainState:
    """Everything that changes while training and that a resume must restore (besides the model, optimizer,
    scheduler, scaler and RNG states, which Trainer.state_dict adds)."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of `epoch` already done (a mid-epoch checkpoint)
    global_step: int = 0
    best_dice: float = -1.0
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0  # of the current epoch
    loss_count: int = 0
    seconds_before: float = 0.0  # training seconds of the runs this one resumes
    resumed_from: int | None = None


class Trainer:
    """One architecture's training: the objects it needs, its state in one TrainState, and short named steps
    (train_step, train_epoch, validate, end_epoch, save_last) that `fit` strings together. last.pt is
    `state_dict()`; a resumed run continues bit for bit (every RNG and the position in the epoch are in it)."""

    def __init__(self, spec: RunSpec, device: str, dist_info: Dist, loader_workers: int | None = None):
        from torch.utils.data.distributed import DistributedSampler

        from medseg.data.loader import PatchDataset, SliceDataset
        from medseg.models import build_model

        self.spec, self.device, self.dist = spec, device, dist_info
        self.on_cuda = device.startswith("cuda")
        train, data = spec.train, spec.data
        self.card = _model_card(spec.params, spec.arch, spec.paths, spec.split, spec.slice_plan, spec.options)
        seed_everything(spec.seed)
        self.model = build_model(spec.arch, spec.in_channels, spec.num_classes, spec.image_size,
                                 **spec.options).to(device)
        if dist_info.rank:  # the same initial weights everywhere; then each rank its own dropout masks
            seed_everything(spec.seed + dist_info.rank)
        self.channels_last = self.on_cuda and bool(train.channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        augment = dataclasses.asdict(data.augment) if data.augment else None
        plan = spec.slice_plan
        if plan.planned:
            self.dataset = PatchDataset(spec.paths.ingested, spec.train_ids, plan, context=spec.context,
                                        augment=augment, seed=spec.seed)
        else:
            self.dataset = SliceDataset(spec.paths.ingested, spec.train_ids, spec.image_size, context=spec.context,
                                        augment=augment, seed=spec.seed, cache_resized=data.cache_resized)
        # On a GPU the batch is augmented there (train_step): the loader only gathers slices and draws the table.
        self.dataset.defer_augmentation = self.on_cuda
        self.dataset.uint8_labels = True  # made int64 in train_step (after the copy to the device)
        # DataLoader workers: data.num_workers unless the thread plan (medseg.runtime.threads) lowered it to fit the cores
        self.loader_workers = int(data.num_workers) if loader_workers is None else int(loader_workers)
        self._loader = None  # the run's SliceLoader, made by the first train_epoch
        if len(self.dataset) < dist_info.world:
            raise ConfigError(f"{len(self.dataset)} training slices for {dist_info.world} ranks: every rank needs "
                              f"at least one")
        if plan.planned and int(train.steps_per_epoch) < 1:
            raise ConfigError(f"train.steps_per_epoch must be >= 1, got {train.steps_per_epoch}")
        # planned: patches drawn with replacement, train.steps_per_epoch steps; resize: one pass over the slices
        self.budget = budget_of(plan, train, len(self.dataset), dist_info.world)
        self.batch_size, self.steps_per_epoch = self.budget.batch_size, self.budget.steps_per_epoch
        self.sampler = None
        if not plan.planned:
            # drop_last: the ranks' shards are disjoint (padding would repeat slices on several ranks); at world
            # size 1 it drops nothing
            self.sampler = DistributedSampler(self.dataset, num_replicas=dist_info.world, rank=dist_info.rank,
                                              shuffle=True, seed=spec.seed, drop_last=True)
        self.epochs = int(train.epochs)
        self.optimizer = build_optimizer(self.model, train)
        self.scheduler = build_scheduler(self.optimizer, train, self.epochs * self.steps_per_epoch)
        self.amp_enabled, self.amp_dtype = _amp_settings(train, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_enabled and self.amp_dtype == torch.float16)
        self.loss_fn = build_loss(train, spec.num_classes)
        self.checkpoint_every = int(train.checkpoint_every_steps)
        self.grad_clip = train.grad_clip
        self.state = TrainState()
        self.network: nn.Module = self.model  # what the training steps call: DDP's wrapper when distributed
        self._t0 = time.perf_counter()

    # ---- state ---------------------------------------------------------------------------------------------
    def seconds(self) -> float:
        return self.state.seconds_before + time.perf_counter() - self._t0

    def state_dict(self, finished: bool = False, rank_rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """last.pt: the run's state, readable with torch.load(weights_only=True). `rank_rng`: every rank's RNG
        states in rank order (rank_rng_states); None: this process's alone (one process)."""
        st = self.state
        return {
            "arch": self.spec.arch,
            "world_size": self.dist.world,
            "config_hash": self.spec.run_hash,
            "training_cases_hash": training_cases_hash(self.spec.split),
            "epoch": st.epoch,
            "batch_in_epoch": st.batch_in_epoch,
            "global_step": st.global_step,
            "finished": finished,
            "state_dict": _cpu_state_dict(self.model),
            # copies: optimizer.state_dict() shares the moment tensors that the next steps update in place
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rank_rng": rank_rng if rank_rng is not None else [_rng_state()],
            "best_val_dice": None if st.best_epoch is None else st.best_dice,
            "best_epoch": st.best_epoch,
            "best_state_dict": st.best_state,
            "history": [dict(row) for row in st.history],  # a snapshot: the run goes on appending
            "epoch_loss_sum": st.loss_sum,
            "epoch_loss_count": st.loss_count,
            "train_seconds": self.seconds(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(self._own_rng(state))
        self.state = TrainState(
            epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"], global_step=state["global_step"],
            best_dice=state["best_val_dice"] if state["best_val_dice"] is not None else -1.0,
            best_epoch=state["best_epoch"], best_state=state["best_state_dict"], history=list(state["history"]),
            loss_sum=state["epoch_loss_sum"], loss_count=state["epoch_loss_count"],
            seconds_before=state["train_seconds"], resumed_from=state["global_step"])
        self._t0 = time.perf_counter()

    def _own_rng(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG states from last.pt; at another world size than the run's, rank 0's (the run goes on,
        but the shards and dropout streams are not the ones an uninterrupted run would have had)."""
        saved = int(state.get("world_size", 1))
        ranks = state.get("rank_rng") or [state["rng"]]  # "rng": one process's, in last.pt before world sizes
        if saved != self.dist.world or len(ranks) != self.dist.world:
            if self.dist.main:
                _log.warning("%s: written at world size %d, resumed at %d: training continues, not bit for bit as "
                             "an uninterrupted run (each rank's data shard and RNG stream change)",
                             self.spec.paths.last, saved, self.dist.world)
            return ranks[0]
        return ranks[self.dist.rank]

    def resume(self) -> None:
        """Continue from last.pt when it was written by this configuration and did not finish. Distributed, rank 0
        reads it and sends it to the others (their nodes need not see the file)."""
        state = _try_resume(self.spec.paths.last, self.spec.run_hash) if self.dist.main else None
        if self.dist.enabled:
            import torch.distributed as dist

            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if state is None:
            return
        self.load_state_dict(state)
        if self.state.best_state is not None and self.dist.main:
            # DVC deletes checkpoint.pt before re-running the stage; last.pt holds the best weights too.
            self.save_best()

    def save_last(self, finished: bool = False, checked: bool = False) -> None:
        """last.pt, after checking the weights are finite (unless the caller just did: `checked`). A finished run
        is never resumed, so its last.pt keeps only the final weights and the record (FINISHED_KEYS): a DVC output
        the size of the model, pushed to and pulled from a remote like checkpoint.pt, instead of the optimizer,
        scheduler and RNG states a teammate's clone has no use for."""
        rank_rng = None if finished else self.rank_rng_states()  # a collective: every rank calls save_last
        if self.dist.main:
            if not checked:
                _check_finite(self.model, f"epoch {self.state.epoch}, step {self.state.global_step}")
            state = self.state_dict(finished, rank_rng)
            if finished:
                state = {key: state[key] for key in FINISHED_KEYS}
            save_checkpoint(state, self.spec.paths.last)

    def rank_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states, in rank order (gathered when distributed): dropout draws differ per rank, and
        a resume restores each rank's own stream."""
        if not self.dist.enabled:
            return [_rng_state()]
        import torch.distributed as dist

        states: list[Any] = [None] * self.dist.world
        dist.all_gather_object(states, _rng_state())
        return states

    def save_best(self) -> None:
        spec, st = self.spec, self.state
        meta = CheckpointMeta(arch=spec.arch, in_channels=spec.in_channels, num_classes=spec.num_classes,
                              image_size=list(spec.image_size), model_options=spec.options,
                              class_names=list(spec.class_names), context=spec.context, epoch=st.best_epoch,
                              val_dice=st.best_dice if (st.best_dice is not None and st.best_dice >= 0) else None,
                              config_hash=spec.run_hash, training_cases_hash=training_cases_hash(spec.split),
                              card=self.card.to_dict(),
                              recipe=spec.slice_plan.to_dict() if spec.slice_plan.planned else None)
        save_checkpoint(meta.with_weights(st.best_state), spec.paths.checkpoint)

    # ---- steps ---------------------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor, augmentation: torch.Tensor | None = None
                   ) -> float:
        """One optimizer step; returns the batch loss. `augmentation`: the batch's table when the loader left the
        augmentation to the training device (SliceDataset.defer_augmentation)."""
        from medseg.data.augment import apply_augmentation

        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if augmentation is not None:
            images, labels = apply_augmentation(images, labels, augmentation)
        labels = labels.long()
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda" if self.on_cuda else "cpu", dtype=self.amp_dtype, enabled=self.amp_enabled):
            logits = self.network(images)
        loss = self.loss_fn(logits, labels)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"{self.spec.arch}: loss is {loss.item()} at epoch {self.state.epoch + 1}, step "
                f"{self.state.global_step + 1}; stopped, the last good checkpoint ({self.spec.paths.last}) is kept")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), float(self.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state.global_step += 1
        return float(loss.detach())

    def train_epoch(self) -> None:
        """The batches of epoch `state.epoch` from `state.batch_in_epoch` on, checkpointing every N steps."""
        from medseg.data.loader import SliceLoader

        st, epoch = self.state, self.state.epoch
        if self.sampler is None:
            batches = _patch_batches(epoch, self.dist.rank, self.dist.world, self.batch_size, self.steps_per_epoch)
        else:
            batches = _epoch_batches(self.sampler, epoch, self.batch_size, self.steps_per_epoch)
        self.dataset.set_epoch(epoch)  # augmentation is drawn from (seed, epoch, index): resumable
        skip = st.batch_in_epoch
        if self._loader is None:
            # One SliceLoader for the run: its workers persist across epochs (each batch carries the epoch it
            # is augmented for) and hand batches back through shared buffers. Own generator: a DataLoader
            # otherwise draws its worker base seed from the global torch RNG, which a resumed run would do at
            # another point of the stream (dropout would diverge).
            self._loader = SliceLoader(self.dataset, batch_sampler=batches[skip:], max_batch=self.batch_size,
                                       num_workers=self.loader_workers, pin_memory=self.on_cuda,
                                       persistent_workers=self.loader_workers > 0,
                                       generator=torch.Generator().manual_seed(self.spec.seed * 1000 + epoch))
        else:
            self._loader.set_batches(batches[skip:])
        loader = self._loader
        self.network.train()
        bar = _progress(len(batches), skip, f"{self.spec.arch} epoch {epoch + 1}/{self.epochs}", self.dist.main)
        for batch_index, batch in enumerate(loader, start=skip):
            st.loss_sum += self.train_step(*batch)
            st.loss_count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{st.loss_sum / st.loss_count:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if st.global_step % self.checkpoint_every == 0 and batch_index + 1 < len(batches):
                st.batch_in_epoch = batch_index + 1
                self.save_last()
            for hook in STEP_HOOKS:
                hook(st.global_step)
        bar.close()

    def validate(self) -> float | None:
        """Volume-wise validation Dice (VAL_DICE_DEFINITION) on rank 0, exactly as evaluation predicts."""
        if not (self.dist.main and self.spec.val_ids):
            return None
        spec = self.spec
        batch = int(settings(spec.params).evaluate.batch_size)
        return _validate(self.model, spec.paths.ingested, spec.val_ids, spec.slice_plan, spec.context,
                         spec.num_classes, batch, self.device)

    def end_epoch(self, val_dice: float | None) -> dict[str, Any]:
        """Log the epoch, keep the best weights (checkpoint.pt) and write last.pt at the epoch boundary."""
        st = self.state
        loss_sum, loss_count = st.loss_sum, st.loss_count
        if self.dist.enabled:  # the epoch's loss over every rank's batches, as one process would log it
            import torch.distributed as dist

            totals = torch.tensor([loss_sum, float(loss_count)], dtype=torch.float64, device=self.device)
            dist.all_reduce(totals)
            loss_sum, loss_count = float(totals[0]), int(totals[1])
        row = {
            "epoch": st.epoch + 1,
            "step": st.global_step,
            "train_loss": loss_sum / max(loss_count, 1),
            "val_dice": val_dice,
            "lr": self.scheduler.get_last_lr()[0],
            "seconds": round(self.seconds(), 3),
        }
        st.history.append(row)
        st.loss_sum, st.loss_count = 0.0, 0
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        if self.dist.main:
            _check_finite(self.model, f"epoch {st.epoch}, step {st.global_step}")
            # No validation cases: the last epoch is "best" (nothing else to select on without leakage).
            score = val_dice if val_dice is not None else -1.0
            if st.best_epoch is None or score > st.best_dice or not self.spec.val_ids:
                st.best_dice, st.best_epoch, st.best_state = score, st.epoch, _cpu_state_dict(self.model)
                self.save_best()
        self.save_last(finished=st.epoch == self.epochs, checked=True)
        if self.dist.main:
            write_train_log(self.spec.paths.log, st.history)
            _log.info("%s epoch %d: loss %.4f, val Dice %s", self.spec.arch, st.epoch, row["train_loss"], val_dice)
        return row

    def fit(self) -> dict[str, Any]:
        """Resume if possible, train the remaining epochs, write the summary; returns it."""
        from medseg.models.complexity import count_params

        spec = self.spec
        self.resume()
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.network = DistributedDataParallel(self.model,
                                                   device_ids=[self.dist.local_rank] if self.on_cuda else None)
        if self.dist.main:  # the budget in optimizer steps, and whether it is too small for this dataset
            _log.info("%s: %s", spec.arch, self.budget.describe())
            for warning in self.budget.warnings(self.dataset.training_pixels()):
                _log.warning("%s: %s", spec.arch, warning)
        mlflow_logger = _MlflowLogger(spec.params, spec.arch, self.dist.main, spec.paths.root, spec.fold)
        try:
            while self.state.epoch < self.epochs:
                self.train_epoch()
                mlflow_logger.epoch(self.end_epoch(self.validate()))
        finally:
            mlflow_logger.close()
            if self._loader is not None:
                self._loader.close()  # persistent workers stop with the run, not at garbage collection
                self._loader = None

        st = self.state
        summary = TrainSummary(
            arch=spec.arch,
            fold=spec.fold,
            params=count_params(self.model),
            epochs=self.epochs,
            steps=st.global_step,
            best_val_dice=st.best_dice if st.best_epoch is not None and st.best_dice >= 0 else None,
            best_epoch=st.best_epoch,
            val_dice_definition=VAL_DICE_DEFINITION,
            train_seconds=round(st.history[-1]["seconds"] if st.history else 0.0, 3),
            seconds_per_epoch=median_epoch_seconds(st.history),
            **peak_memory(self.device),
            device=self.device,
            world_size=self.dist.world,
            resumed_from_step=st.resumed_from,
            config_hash=spec.run_hash,
            recipe=spec.slice_plan.recipe,
            input_size=list(spec.image_size),
            batch_size=self.batch_size,
        )
        if self.dist.main:
            summary.write(spec.paths.summary)
            # the DVC metric: numbers only (train_summary.json keeps the detail)
            write_dvc_metrics(spec.paths.scores, {"val_dice": summary.best_val_dice, "train_s": summary.train_seconds},
                              spec.metric_prefix)
            plot_curves(spec.paths.curves, st.history, spec.arch)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        return summary.to_dict()


def plan_for(data: DataSettings, arch: str, options: dict[str, Any], ingested: Path) -> SlicePlan:
    """`arch`'s recipe on the ingested dataset (medseg.data.plan): planned from its fingerprint.json, patch sizes
    rounded to the network's size multiple; the resize recipe needs no fingerprint."""
    if data.recipe == "resize":
        return plan_slices(data, {}, lambda size: 1)
    fingerprint = ingested / "fingerprint.json"
    if not fingerprint.is_file():
        raise ConfigError(f"{fingerprint}: not found; run the ingest stage again (the planned recipe plans from it)")
    from medseg.models import input_multiple_of

    return plan_slices(data, read_json(fingerprint), lambda size: input_multiple_of(arch, size, **options))


def median_epoch_seconds(history: list[dict[str, Any]]) -> float | None:
    """Median wall time of one epoch (training + validation) from the log's cumulative seconds: the median, so a
    first epoch's warm-up or a resume does not stand for the rest. Rows without seconds are left out."""
    ends = [float(row["seconds"]) for row in history if row.get("seconds") is not None]
    durations = [b - a for a, b in zip([0.0] + ends[:-1], ends)]
    return round(float(np.median(durations)), 3) if durations else None


def peak_memory(device: str) -> dict[str, float | None]:
    """Peak memory of this training process: CPU resident set (the process's high-water mark, what a machine must
    have), and on CUDA the most memory torch allocated on the device."""
    import resource

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    cuda = None
    if device.startswith("cuda"):
        cuda = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"peak_rss_mb": round(rss_kb / 1024, 1), "cuda_max_allocated_mb": cuda}


def train_model(params: dict[str, Any], arch: str, root: str | Path = ".", fold: int | None = None) -> dict[str, Any]:
    """Train `arch` on the split's train cases, select on its val cases; returns the train summary. With `fold`
    (cross-validation, params.yaml `cv`): on fold k's training patients, selected on its held-out ones, written
    under models/<arch>/folds/<k>/ and reports/<arch>/folds/<k>/."""
    disable_telemetry()
    if fold is not None:
        check_cv_fold(params, arch, fold)
    spec = RunSpec.of(params, arch, Path(root), fold)
    threads = apply_torch_threads(plan_from_params(spec.params))
    device = resolve_device(spec.train.device)
    dist_info, device, started_group = _setup_distributed(device, settings(spec.params).compute.dist_timeout_s)
    import torch.utils.deterministic as deterministic_mode

    deterministic_before = torch.are_deterministic_algorithms_enabled()
    fill_before = deterministic_mode.fill_uninitialized_memory
    if not device.startswith("cuda"):
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN (a guard against reading uninitialised memory,
        # which no medseg op does): 8% of a UNet training step on CPU (benchmarks/bench_train_loop.py).
        deterministic_mode.fill_uninitialized_memory = False
    restore_sigterm = _sigterm_raises() if dist_info.enabled else None
    try:
        return Trainer(spec, device, dist_info, loader_workers=threads.loader_workers).fit()
    except Exception as exc:
        if dist_info.enabled and _lost_a_rank(exc):
            raise TrainingError(
                f"{arch}: rank {dist_info.rank} of {dist_info.world} lost the other ranks of this job (one died or "
                f"did not answer within compute.dist_timeout_s={settings(spec.params).compute.dist_timeout_s} s): "
                f"{_first_line(exc)}. torchrun's report names the rank that failed; {spec.paths.last} keeps the last "
                f"checkpoint, the same command resumes from it") from exc
        raise
    finally:
        if restore_sigterm is not None:
            restore_sigterm()
        torch.use_deterministic_algorithms(deterministic_before)
        deterministic_mode.fill_uninitialized_memory = fill_before
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class StoppedByLauncher(RuntimeError):
    """SIGTERM in a rank: torchrun sends it to the survivors as soon as one rank fails."""


def _sigterm_raises() -> Callable[[], None] | None:
    """Turn SIGTERM into StoppedByLauncher in this rank, so a rank that torchrun stops while it computes (before
    a collective notices the dead peer) reports why, like one whose collective failed. Returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stopped(signum, frame):
        raise StoppedByLauncher("torchrun stopped this rank (SIGTERM), as it does when another rank fails")

    before = signal.signal(signal.SIGTERM, stopped)
    return lambda: signal.signal(signal.SIGTERM, before)


def _lost_a_rank(exc: BaseException) -> bool:
    """A collective that failed because a peer died or timed out (gloo/nccl raise DistError or RuntimeError), or
    torchrun's SIGTERM after another rank failed."""
    import torch.distributed as dist

    if isinstance(exc, StoppedByLauncher):
        return True
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("connection closed", "connection reset", "timed out", "timeout", "broken pipe",
                                  "gloo", "nccl"))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _model_card(params, arch, paths: RunFiles, split, plan: SlicePlan, options):
    """The model card of this run (medseg.deployment.card), from the ingested dataset's cases.json and fingerprint.json."""
    from medseg.deployment.card import build_card, dataset_version
    from medseg.models import get_model_info, size_multiple_of

    fingerprint = paths.ingested / "fingerprint.json"
    if not fingerprint.is_file():
        raise ConfigError(f"{fingerprint}: not found; run the ingest stage again (it writes the dataset fingerprint)")
    return build_card(params, arch, read_json(paths.ingested / "cases.json"), read_json(fingerprint), split,
                      dataset_version=dataset_version(paths.ingested / "cases.json"),
                      size_multiple=size_multiple_of(arch, plan.image_size, **options),
                      dynamic_hw=get_model_info(arch).dynamic_hw, plan=plan)


