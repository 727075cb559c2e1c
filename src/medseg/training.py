"""Training one architecture: seeded, resumable bit for bit, optionally distributed (torchrun).

Checkpoint selection uses the VALIDATION split only (`split["val"]`); the test split is never read here
(it belongs to medseg.evaluation), so reported test scores are not selected on.

Resume: `models/<A>/last.pt` is written atomically at every epoch end and every `train.checkpoint_every_steps`
optimizer steps. It holds model, optimizer, scheduler, GradScaler, every RNG state, the data position (epoch,
batches done in it) and the best weights so far. A run killed at any point (SIGKILL included) and started again
with the same configuration continues from there and ends with the same weights as an uninterrupted run (bitwise
on CPU). The data order is a pure function of (seed, epoch) (DistributedSampler), so skipping the batches already
done needs no data loading. last.pt carries a `config_hash`; a different configuration, or a finished run,
starts fresh (logged).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from medseg.config import config_hash, disable_telemetry, model_options, resolve_device
from medseg.errors import ConfigError, TrainingError
from medseg.checkpoint import load_checkpoint, save_checkpoint
from medseg.io import atomic_path, read_json, write_json, write_text
from medseg.layout import ProjectLayout
from medseg.losses import build_loss

_log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_EVERY_STEPS = 50
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
class Paths:
    root: Path
    ingested: Path
    split: Path
    checkpoint: Path
    last: Path
    reports: Path

    @classmethod
    def of(cls, params: dict[str, Any], arch: str, root: Path) -> "Paths":
        layout = ProjectLayout.of(params, root)
        return cls(root=root, ingested=layout.ingested, split=layout.split_file, checkpoint=layout.checkpoint(arch),
                   last=layout.last_checkpoint(arch), reports=layout.reports_dir(arch))


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> tuple[Dist, str]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: start a process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "LOCAL_RANK" not in os.environ:
        return Dist(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, enabled=True), device


def training_cases_hash(split: dict[str, Any]) -> str:
    """Hash of the case lists training depends on (train + val), part of the run's config hash and stored in the
    checkpoints: a changed test list must not restart a training. The test list is evaluation's business."""
    return config_hash({"train": split.get("train", []), "val": split.get("val", [])})


def run_config_hash(params: dict[str, Any], arch: str, split: dict[str, Any]) -> str:
    train = {k: v for k, v in params.get("train", {}).items() if k not in _HASH_IGNORED}
    data = {k: v for k, v in params.get("data", {}).items() if k not in _HASH_IGNORED}
    return config_hash(
        {
            "arch": arch,
            "seed": params.get("seed", 0),
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


def build_optimizer(model: nn.Module, train: dict[str, Any]) -> torch.optim.Optimizer:
    name = train.get("optimizer", "sgd")
    lr, wd = float(train["lr"]), float(train.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=float(train.get("momentum", 0.9)), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    raise ConfigError(f"train.optimizer={name!r}; expected sgd or adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, train: dict[str, Any], max_iter: int):
    """Per-iteration schedule. poly is TransUNet's lr * (1 - iter/max_iter)^0.9."""
    name = train.get("schedule", "poly")
    max_iter = max(1, max_iter)
    if name == "poly":
        power = float(train.get("poly_power", 0.9))
        factor = lambda it: max(0.0, 1.0 - it / max_iter) ** power  # noqa: E731
    elif name == "cosine":
        factor = lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter))  # noqa: E731
    else:
        raise ConfigError(f"train.schedule={name!r}; expected poly or cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _amp_settings(train: dict[str, Any], device: str) -> tuple[bool, torch.dtype]:
    """AMP only on CUDA: bf16 where supported (no scaler needed), else fp16 with a GradScaler."""
    if not (train.get("amp", False) and device.startswith("cuda")):
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _epoch_batches(sampler, epoch: int, batch_size: int, steps_per_epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # drop the ragged last batch (BatchNorm dislikes tiny batches)
    return batches[:steps_per_epoch]


def _steps_per_epoch(num_samples: int, world: int, batch_size: int, max_steps: int | None) -> int:
    per_rank = math.ceil(num_samples / world)
    steps = max(1, per_rank // batch_size) if per_rank >= batch_size else 1
    return min(steps, int(max_steps)) if max_steps else steps


def _check_finite(model: nn.Module, where: str) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(f"{where}: parameter {name} is not finite; the last good checkpoint is kept")


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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


def _validate(model: nn.Module, ingested: Path, case_ids: list[str], image_size, context: int,
              num_classes: int, batch_size: int, device: str, amp: tuple[bool, torch.dtype]) -> float | None:
    """Volume-wise mean foreground Dice on the validation cases (see VAL_DICE_DEFINITION)."""
    from medseg.data.loader import load_case
    from medseg.inference import predict_volume

    scores = []
    for case_id in case_ids:
        image, label, _spacing = load_case(ingested, case_id)
        pred = predict_volume(model, image, image_size, context, batch_size, device, amp=amp)
        label = np.asarray(label)
        # per-class intersection and sizes in one pass over the volume
        joint = np.bincount(label.astype(np.int64).ravel() * num_classes + pred.ravel(), minlength=num_classes**2)
        joint = joint.reshape(num_classes, num_classes)
        inter = np.diag(joint)
        gt_sum, pred_sum = joint.sum(1), joint.sum(0)
        for c in range(1, num_classes):
            if gt_sum[c] + pred_sum[c] > 0:
                scores.append(2.0 * inter[c] / (gt_sum[c] + pred_sum[c]))
    return float(np.mean(scores)) if scores else None


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


class _MlflowLogger:
    """Per-epoch metrics to MLflow, only when MLFLOW_TRACKING_URI is set; failures only warn."""

    def __init__(self, params: dict[str, Any], arch: str, enabled: bool, root: Path):
        self.run = None
        if not (enabled and os.environ.get("MLFLOW_TRACKING_URI")):
            return
        try:
            import mlflow

            from medseg.tracking import ensure_experiment, resolve_tracking_uri

            # created like the register stage creates it, so artifacts of both land in the same store
            uri = resolve_tracking_uri(params, root)
            name = params.get("register", {}).get("experiment", "medseg")
            mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient(uri), name, uri, root))
            # nested when a caller (e.g. a Prefect flow) already has a run open
            self.run = mlflow.start_run(run_name=f"train-{arch}", nested=mlflow.active_run() is not None)
            flat = {f"train.{k}": v for k, v in params.get("train", {}).items()}
            flat.update({f"model.{k}": v for k, v in model_options(params, arch).items()})
            mlflow.log_params({"arch": arch, "seed": params.get("seed"), **flat})
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


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_COLUMNS})
    write_text(path, buf.getvalue())


def _plot_curves(path: Path, history: list[dict[str, Any]], arch: str) -> None:
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


def train_model(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """Train `arch` on the split's train cases, select on its val cases; returns the train summary."""
    from medseg.data.loader import SliceDataset, read_cases
    from medseg.models import build_model
    from medseg.models.complexity import count_params

    disable_telemetry()
    root = Path(root)
    paths = Paths.of(params, arch, root)
    train_p, data_p = dict(params["train"]), dict(params["data"])
    seed = int(params.get("seed", 0))
    cases = read_cases(paths.ingested)
    if not paths.split.is_file():
        raise ConfigError(f"{paths.split}: split file not found (run the split stage first)")
    split = read_json(paths.split)
    train_ids, val_ids = list(split.get("train", [])), list(split.get("val", []))
    if not train_ids:
        raise ConfigError(f"{paths.split}: the train list is empty")
    class_names = list(cases["class_names"])
    context = int(data_p.get("context", 0))
    in_channels = int(cases["in_channels"]) * (2 * context + 1)
    image_size = tuple(int(v) for v in data_p["image_size"])
    options = model_options(params, arch)
    run_hash = run_config_hash(params, arch, split)

    device = resolve_device(train_p.get("device", "auto"))
    dist_info, device = _setup_distributed(device)
    on_cuda = device.startswith("cuda")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if not on_cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(params, arch, paths, train_p, data_p, seed, train_ids, val_ids, class_names, context,
                      in_channels, image_size, options, run_hash, split, device, dist_info,
                      SliceDataset, build_model, count_params)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _train(params, arch, paths: Paths, train_p, data_p, seed, train_ids, val_ids, class_names, context,
           in_channels, image_size, options, run_hash, split, device, dist_info: Dist,
           SliceDataset, build_model, count_params) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    num_classes = len(class_names)
    on_cuda = device.startswith("cuda")
    card = _model_card(params, arch, paths, split, image_size, options)
    seed_everything(seed)
    model = build_model(arch, in_channels, num_classes, image_size, **options).to(device)
    use_channels_last = on_cuda and bool(train_p.get("channels_last", False))
    if use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    dataset = SliceDataset(paths.ingested, train_ids, image_size, context=context,
                           augment=data_p.get("augment"), seed=seed,
                           cache_resized=bool(data_p.get("cache_resized", True)))
    batch_size = int(train_p["batch_size"])
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world, rank=dist_info.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    steps_per_epoch = _steps_per_epoch(len(dataset), dist_info.world, batch_size, train_p.get("max_steps_per_epoch"))
    epochs = int(train_p["epochs"])
    optimizer = build_optimizer(model, train_p)
    scheduler = build_scheduler(optimizer, train_p, epochs * steps_per_epoch)
    amp_enabled, amp_dtype = _amp_settings(train_p, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_enabled and amp_dtype == torch.float16)
    loss_fn = build_loss(train_p, num_classes)
    every = int(train_p.get("checkpoint_every_steps") or DEFAULT_CHECKPOINT_EVERY_STEPS)
    grad_clip = train_p.get("grad_clip")

    # ---- resume state ------------------------------------------------------------------------------------
    start_epoch, start_batch, global_step = 0, 0, 0
    best_dice, best_epoch, best_state = -1.0, None, None
    history: list[dict[str, Any]] = []
    loss_sum, loss_count, elapsed_before = 0.0, 0, 0.0
    resumed_from = None
    state = _try_resume(paths.last, run_hash)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, start_batch, global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        best_dice = state["best_val_dice"] if state["best_val_dice"] is not None else -1.0
        best_epoch, best_state = state["best_epoch"], state["best_state_dict"]
        history = list(state["history"])
        loss_sum, loss_count = state["epoch_loss_sum"], state["epoch_loss_count"]
        elapsed_before = state["train_seconds"]
        resumed_from = global_step
        if best_state is not None and dist_info.main:
            # DVC deletes checkpoint.pt before re-running the stage; last.pt holds the best weights too.
            save_checkpoint(_best_checkpoint(best_state, arch, options, in_channels, num_classes, image_size, class_names,
                                   context, best_epoch, best_dice, run_hash, split, card), paths.checkpoint)

    train_model_ref: nn.Module = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model_ref = DistributedDataParallel(model, device_ids=[dist_info.local_rank] if on_cuda else None)

    mlflow_logger = _MlflowLogger(params, arch, dist_info.main, paths.root)
    t0 = time.perf_counter()

    def last_state(epoch: int, batch_in_epoch: int, finished: bool = False) -> dict[str, Any]:
        return {
            "arch": arch,
            "config_hash": run_hash,
            "training_cases_hash": training_cases_hash(split),
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": global_step,
            "finished": finished,
            "state_dict": _cpu_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": _rng_state(),
            "best_val_dice": None if best_epoch is None else best_dice,
            "best_epoch": best_epoch,
            "best_state_dict": best_state,
            "history": history,
            "epoch_loss_sum": loss_sum,
            "epoch_loss_count": loss_count,
            "train_seconds": elapsed_before + time.perf_counter() - t0,
        }

    def save_last(epoch: int, batch_in_epoch: int, finished: bool = False) -> None:
        if dist_info.main:
            _check_finite(model, f"epoch {epoch}, step {global_step}")
            save_checkpoint(last_state(epoch, batch_in_epoch, finished), paths.last)

    try:
        for epoch in range(start_epoch, epochs):
            batches = _epoch_batches(sampler, epoch, batch_size, steps_per_epoch)
            dataset.set_epoch(epoch)  # augmentation is drawn from (seed, epoch, index): resumable
            skip = start_batch if epoch == start_epoch else 0
            # Own generator: a DataLoader otherwise draws its worker base seed from the global torch RNG when
            # iterated, which a resumed run would do at another point of the stream (dropout would diverge).
            loader = DataLoader(dataset, batch_sampler=batches[skip:], num_workers=int(data_p.get("num_workers", 0)),
                                pin_memory=on_cuda, persistent_workers=False,
                                generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            train_model_ref.train()
            bar = _progress(len(batches), skip, f"{arch} epoch {epoch + 1}/{epochs}", dist_info.main)
            for batch_index, (images, labels) in enumerate(loader, start=skip):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if use_channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda" if on_cuda else "cpu", dtype=amp_dtype, enabled=amp_enabled):
                    logits = train_model_ref(images)
                loss = loss_fn(logits, labels)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{arch}: loss is {loss.item()} at epoch {epoch + 1}, step {global_step + 1}; stopped, "
                        f"the last good checkpoint ({paths.last}) is kept")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                global_step += 1
                loss_sum += float(loss.detach())
                loss_count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if global_step % every == 0 and batch_index + 1 < len(batches):
                    save_last(epoch, batch_index + 1)
                for hook in STEP_HOOKS:
                    hook(global_step)
            bar.close()

            val_dice = None
            if dist_info.main and val_ids:
                val_dice = _validate(model, paths.ingested, val_ids, image_size, context, num_classes,
                                     int(params.get("evaluate", {}).get("batch_size", batch_size)), device,
                                     (amp_enabled, amp_dtype))
            row = {
                "epoch": epoch + 1,
                "step": global_step,
                "train_loss": loss_sum / max(loss_count, 1),
                "val_dice": val_dice,
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(elapsed_before + time.perf_counter() - t0, 3),
            }
            history.append(row)
            loss_sum, loss_count = 0.0, 0
            if dist_info.main:
                _check_finite(model, f"epoch {epoch + 1}, step {global_step}")
                # No validation cases: the last epoch is "best" (nothing else to select on without leakage).
                score = val_dice if val_dice is not None else -1.0
                if best_epoch is None or score > best_dice or (not val_ids):
                    best_dice, best_epoch, best_state = score, epoch + 1, _cpu_state_dict(model)
                    save_checkpoint(_best_checkpoint(best_state, arch, options, in_channels, num_classes, image_size,
                                           class_names, context, best_epoch, val_dice, run_hash, split, card),
                          paths.checkpoint)
                save_last(epoch + 1, 0, finished=epoch + 1 == epochs)
                _write_log(paths.reports / "train_log.csv", history)
                mlflow_logger.epoch(row)
                _log.info("%s epoch %d: loss %.4f, val Dice %s", arch, epoch + 1, row["train_loss"], val_dice)
    finally:
        mlflow_logger.close()

    summary = {
        "arch": arch,
        "params": count_params(model),
        "epochs": epochs,
        "steps": global_step,
        "best_val_dice": best_dice if best_epoch is not None and best_dice >= 0 else None,
        "best_epoch": best_epoch,
        "val_dice_definition": VAL_DICE_DEFINITION,
        "train_seconds": round(history[-1]["seconds"] if history else 0.0, 3),
        "device": device,
        "world_size": dist_info.world,
        "resumed_from_step": resumed_from,
        "config_hash": run_hash,
    }
    if dist_info.main:
        write_json(paths.reports / "train_summary.json", summary)
        _plot_curves(paths.reports / "curves.png", history, arch)
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
    return summary


def _model_card(params, arch, paths: Paths, split, image_size, options):
    """The model card of this run (medseg.card), from the ingested dataset's cases.json and fingerprint.json."""
    from medseg.card import build_card, dataset_version
    from medseg.models import get_model_info, size_multiple_of

    fingerprint = paths.ingested / "fingerprint.json"
    if not fingerprint.is_file():
        raise ConfigError(f"{fingerprint}: not found; run the ingest stage again (it writes the dataset fingerprint)")
    return build_card(params, arch, read_json(paths.ingested / "cases.json"), read_json(fingerprint), split,
                      dataset_version=dataset_version(paths.ingested / "cases.json"),
                      size_multiple=size_multiple_of(arch, image_size, **options),
                      dynamic_hw=get_model_info(arch).dynamic_hw)


def _best_checkpoint(state_dict, arch, options, in_channels, num_classes, image_size, class_names, context, epoch,
                     val_dice, run_hash, split, card) -> dict[str, Any]:
    """The contract's checkpoint.pt dict (docs/architecture.md), with the model card under `card`."""
    return {
        "arch": arch,
        "model_options": options,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": list(image_size),
        "class_names": list(class_names),
        "context": context,
        "state_dict": state_dict,
        "epoch": epoch,
        "val_dice": val_dice if (val_dice is not None and val_dice >= 0) else None,
        "config_hash": run_hash,
        "training_cases_hash": training_cases_hash(split),
        "card": card.to_dict(),
    }
