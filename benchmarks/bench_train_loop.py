"""Training-loop overhead: medseg's real training loop against a bare PyTorch loop, side by side.

    python benchmarks/bench_train_loop.py                    # unet + msvm_unet, CPU, 64x64, batch 16
    python benchmarks/bench_train_loop.py --archs unet --steps 16 --rounds 7 --profile
    python benchmarks/bench_train_loop.py --device cuda --amp --channels-last --archs unet_resnet34 --size 224

For every architecture a small real project is made in a temporary folder, as tests/conftest.py makes its
fixtures: the built-in phantom (as many cases as the epoch needs) -> ingest -> split, with this repo's params.yaml
(the quick preset) shrunk to one model. Then:

medseg loop: a real `medseg.training.trainer.Trainer` (`RunSpec.of(params, arch, root)`, `Trainer(spec, device, Dist())`),
    one round = `Trainer.train_epoch()` + `Trainer.end_epoch(None)` + the per-epoch MLflow log, exactly the body of
    `Trainer.fit()` without validation: CE+Dice loss, the non-finite-loss check, GradScaler calls, the poly LR
    schedule stepped per batch, the tqdm progress bar (postfix updated per step), last.pt every
    `train.checkpoint_every_steps` optimizer steps (the project's value, 50, unless --checkpoint-every) and at every
    epoch end, checkpoint.pt when the epoch is the best so far (the first one: no validation cases are scored),
    reports/<arch>/train_log.csv, and `mlflow.log_metrics` through the Trainer's own `_MlflowLogger` into a sqlite
    store in the temporary folder (MLFLOW_TRACKING_URI). Creating that MLflow run (experiment lookup, start_run,
    log_params: once per training) is setup, outside the timed part. On CPU, as `train_model` does, the medseg
    rounds run with `torch.use_deterministic_algorithms(True, warn_only=True)` and without torch's NaN-filling
    of new tensors, which that switch turns on (--deterministic fill: with it, as train_model did before; off:
    neither).
bare loop: the same architecture with the same initial weights (a second `build_model` loaded with the Trainer's
    state_dict before either trains), the same optimizer settings (`build_optimizer` on the project's train
    section: AdamW lr 3e-3, weight decay 1e-4), the same loss (`medseg.training.losses.build_loss`: 0.5 CE + 0.5 soft Dice,
    so only loop overhead differs), the same AMP dtype / channels_last as the Trainer resolved, and the same
    batches: the Trainer's own SliceDataset through a DataLoader with the batch lists of the same epoch, the same
    num_workers and pin_memory. Per step: to(device), forward, loss, zero_grad, backward, optimizer.step; no
    schedule, no checks, no sync, no logging, no checkpoints.
Augmentation: the project's (data.augment of params.yaml: p 0.5, flip, rot90, rotate 15 degrees, intensity jitter
    0.1) for both loops, from the same dataset object; `--no-augment` turns it off for both.

One round is one epoch of --steps optimizer steps (default 8, the quick preset's epoch: 140 training slices /
batch 16). After --warmup rounds of each loop, the loops alternate for --rounds rounds (medseg, bare, medseg,
bare, ...), so a passing disturbance of the machine hits both alike; each figure is the median over rounds of
slices/s (steps x batch / round wall time, synchronised on CUDA at the round's end). The goal (not a test): the
medseg loop reaches >= 90% of the bare loop's throughput (ratio of the medians) for every architecture. A median
all but ignores the mid-epoch last.pt (one round in 6.25 at the defaults); the "totals" column (summed times)
counts it, and --profile shows its cost per round.
`--profile` adds rounds (after the measured ones, so no measured round is instrumented) that time the parts of
`train_epoch` / `end_epoch` by wrapping the Trainer's methods and medseg.training.trainer's helpers.

`measure(...)` is the reusable function (benchmarks/gpu_check.py calls it with device="cuda", AMP and
channels_last).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.90
DEFAULT_ARCHS = ["unet", "msvm_unet"]
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "unet": {"base_channels": 16},
    "msvm_unet": {"depths": [1, 1, 1, 1], "dims": 24},
    "unet_resnet34": {"encoder_weights": None},
}


# ----------------------------------------------------------------------------------------------- the project


def project_params(arch: str, options: dict[str, Any], *, size: int, batch: int, steps: int, epochs: int,
                   device: str, amp: bool, channels_last: bool, augment: bool, num_workers: int | None,
                   checkpoint_every: int | None, phantom_shape: list[int] | None = None,
                   base: dict[str, Any] | None = None) -> dict[str, Any]:
    """This repo's params.yaml (the quick preset) reduced to one model, with as many phantom cases as an epoch of
    `steps` batches of `batch` training slices needs."""
    import yaml

    params = copy.deepcopy(base) if base is not None else yaml.safe_load((ROOT / "params.yaml").read_text())
    shape = list(phantom_shape or params["phantom"]["shape"])
    split = params["split"]
    train_share = (1 - float(split["test_fraction"])) * (1 - float(split["val_fraction"]))
    needed = steps * batch
    # a margin of 2 cases for the split's rounding; at least 6 so that test and val get a case each
    cases = max(6, math.ceil(needed / (shape[2] * train_share)) + 2)
    params["phantom"].update(num_cases=cases, shape=shape)
    params["data"].update(image_size=[size, size])
    if not augment:
        params["data"]["augment"] = None
    if num_workers is not None:
        params["data"]["num_workers"] = int(num_workers)
    params["models"] = [arch]
    params["model_options"] = {arch: dict(options)}
    params["train"].update(batch_size=batch, max_steps_per_epoch=steps, epochs=epochs, device=device, amp=amp,
                           channels_last=channels_last)
    if checkpoint_every is not None:
        params["train"]["checkpoint_every_steps"] = int(checkpoint_every)
    return params


def make_project(root: Path, params: dict[str, Any]) -> Path:
    """phantom -> ingest -> split under `root`, as tests/conftest.py's tiny_project fixture."""
    import yaml

    from medseg.data.ingest import ingest_from_params
    from medseg.data.phantom import generate_from_params
    from medseg.data.split import split_from_params

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate_from_params(params, root)
    ingest_from_params(params, root)
    split_from_params(params, root)
    return root


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


DETERMINISTIC_MODES = ("train_model", "fill", "off")


@contextlib.contextmanager
def _deterministic(enabled: bool, fill: bool = True):
    """What train_model does around a CPU run (`fill=False`: the same without torch's NaN-filling of every new
    tensor, torch.utils.deterministic.fill_uninitialized_memory, which use_deterministic_algorithms turns on)."""
    import torch
    import torch.utils.deterministic

    before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before


# ----------------------------------------------------------------------------------------------- the two loops


class BareLoop:
    """A plain PyTorch training loop over the Trainer's dataset and batches (see the module docstring)."""

    def __init__(self, trainer):
        import torch

        from medseg.models import build_model
        from medseg.training.losses import build_loss
        from medseg.training.trainer import build_optimizer

        spec = trainer.spec
        self.trainer, self.device = trainer, trainer.device
        self.on_cuda = trainer.on_cuda
        self.model = build_model(spec.arch, spec.in_channels, spec.num_classes, spec.image_size, **spec.options)
        self.model.load_state_dict(trainer.model.state_dict())  # the Trainer's initial weights
        self.model.to(self.device)
        self.channels_last = trainer.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, spec.train)
        self.loss_fn = build_loss(spec.train, spec.num_classes)
        self.amp_enabled, self.amp_dtype = trainer.amp_enabled, trainer.amp_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_enabled and self.amp_dtype == torch.float16)
        self.num_workers = int(spec.data.num_workers)
        self.losses: list[float] = []
        self.steps = 0

    def epoch(self, epoch: int, step_clock: Callable[[float], None] | None = None) -> None:
        import torch
        from torch.utils.data import DataLoader

        from medseg.training.trainer import _epoch_batches

        tr = self.trainer
        batches = _epoch_batches(tr.sampler, epoch, tr.batch_size, tr.steps_per_epoch)  # the Trainer's batches
        tr.dataset.set_epoch(epoch)
        loader = DataLoader(tr.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.on_cuda, generator=torch.Generator().manual_seed(epoch))
        self.model.train()
        total = torch.zeros((), device=self.device)
        for images, labels in loader:
            start = time.perf_counter()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda" if self.on_cuda else "cpu", dtype=self.amp_dtype, enabled=self.amp_enabled):
                logits = self.model(images)
            loss = self.loss_fn(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total += loss.detach()
            self.steps += 1
            if step_clock is not None:
                step_clock(time.perf_counter() - start)
        self.losses.append(float(total) / max(1, len(batches)))  # one sync per epoch, after the last step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


DETERMINISTIC_BARE = "bare round total, under use_deterministic_algorithms (medseg's CPU setting)"


def _medseg_round(trainer, logger) -> dict[str, Any]:
    trainer.train_epoch()
    row = trainer.end_epoch(None)
    logger.epoch(row)
    return row


class _Clock:
    """Sums of wall seconds per name, for --profile."""

    def __init__(self, device: str):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


@contextlib.contextmanager
def _instrumented(trainer, logger, clock: _Clock):
    """Time the Trainer's parts by wrapping its methods and medseg.training.trainer's module-level helpers."""
    import medseg.training.trainer as training

    class TimedBar:
        def __init__(self, bar):
            self.bar = bar
            self.update = clock.wrap("train_epoch: progress bar update + set_postfix", bar.update)
            self.set_postfix = clock.wrap("train_epoch: progress bar update + set_postfix", bar.set_postfix)
            self.close = bar.close

    saved_module = {name: getattr(training, name) for name in ("_progress", "write_train_log", "_check_finite",
                                                                "save_checkpoint", "_cpu_state_dict")}
    saved_instance = {"train_step": trainer.train_step, "save_last": trainer.save_last,
                      "save_best": trainer.save_best, "state_dict": trainer.state_dict}
    saved_logger = logger.epoch
    in_end = {"flag": False}

    def where() -> str:
        return "end_epoch" if in_end["flag"] else "train_epoch"

    def save_last(*args, **kwargs):
        return clock.wrap(f"{where()}: save_last (last.pt, total)", saved_instance["save_last"])(*args, **kwargs)

    def state_dict(*args, **kwargs):
        return clock.wrap(f"{where()}:   of which Trainer.state_dict (copies)", saved_instance["state_dict"])(
            *args, **kwargs)

    def save_checkpoint(*args, **kwargs):
        return clock.wrap(f"{where()}:   of which torch.save (last.pt / checkpoint.pt)",
                          saved_module["save_checkpoint"])(*args, **kwargs)

    def check_finite(*args, **kwargs):
        return clock.wrap(f"{where()}:   _check_finite", saved_module["_check_finite"])(*args, **kwargs)

    try:
        training._progress = lambda *a, **k: TimedBar(saved_module["_progress"](*a, **k))
        training.write_train_log = clock.wrap("end_epoch: train_log.csv", saved_module["write_train_log"])
        training._check_finite = check_finite
        training.save_checkpoint = save_checkpoint
        trainer.train_step = clock.wrap("train_epoch: train_step (forward, loss, backward, step, sync)",
                                        saved_instance["train_step"])
        trainer.save_last = save_last
        trainer.save_best = clock.wrap("end_epoch: save_best (checkpoint.pt, total)", saved_instance["save_best"])
        trainer.state_dict = state_dict
        logger.epoch = clock.wrap("mlflow log_metrics (_MlflowLogger.epoch)", saved_logger)
        yield in_end
    finally:
        for name, value in saved_module.items():
            setattr(training, name, value)
        for name in saved_instance:
            delattr(trainer, name)  # back to the class's methods
        logger.epoch = saved_logger


def _profile(trainer, logger, bare: BareLoop, first_epoch: int, rounds: int, device: str,
             deterministic: bool, fill: bool = True) -> dict[str, Any]:
    """Per-round mean seconds of each part of the medseg round and of the bare round; with `deterministic` (the
    medseg rounds' setting) the bare round is also timed under it, which attributes that setting's cost."""
    clock = _Clock(device)
    bare_steps: list[float] = []
    for r in range(rounds):
        with _instrumented(trainer, logger, clock) as in_end, _deterministic(deterministic, fill):
            _sync(device)
            start = time.perf_counter()
            in_end["flag"] = False
            trainer.train_epoch()
            _sync(device)
            mid = time.perf_counter()
            in_end["flag"] = True
            row = trainer.end_epoch(None)
            _sync(device)
            end = time.perf_counter()
            logger.epoch(row)
            _sync(device)
            clock.seconds["round total"] += time.perf_counter() - start
            clock.seconds["train_epoch (total)"] += mid - start
            clock.seconds["end_epoch (total)"] += end - mid
        _sync(device)
        start = time.perf_counter()
        bare.epoch(first_epoch + r, step_clock=bare_steps.append)
        _sync(device)
        clock.seconds["bare round total"] += time.perf_counter() - start
        if deterministic:
            with _deterministic(True, fill):
                start = time.perf_counter()
                bare.epoch(first_epoch + r)
                clock.seconds[DETERMINISTIC_BARE] += time.perf_counter() - start
    parts = {name: seconds / rounds for name, seconds in clock.seconds.items()}
    inside = sum(v for k, v in parts.items() if k.startswith("train_epoch: ") and not k.startswith("train_epoch:   "))
    parts["train_epoch: data loading + rest (remainder)"] = parts["train_epoch (total)"] - inside
    parts["bare: steps (to(device), forward, loss, backward, step)"] = sum(bare_steps) / rounds
    parts["bare: data loading + rest (remainder)"] = parts["bare round total"] - sum(bare_steps) / rounds
    return parts


# ----------------------------------------------------------------------------------------------- measuring


def measure(arch: str, options: dict[str, Any] | None = None, *, size: int = 64, batch: int = 16, steps: int = 8,
            rounds: int = 6, warmup: int = 1, device: str = "cpu", amp: bool = False, channels_last: bool = False,
            augment: bool = True, num_workers: int | None = None, checkpoint_every: int | None = None,
            profile_rounds: int = 0, phantom_shape: list[int] | None = None, workdir: str | Path | None = None,
            deterministic: str = "train_model", log: Callable[[str], None] | None = print,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Throughput (slices/s) of medseg's training loop and of a bare loop for one architecture.

    Returns the per-round samples of both loops, their medians, the ratio medseg / bare, what the medseg loop wrote
    (last.pt, the global step, the MLflow metrics), and with `profile_rounds` a breakdown (seconds per round).
    `amp` and `channels_last` are the project's train.amp / train.channels_last: medseg uses them on CUDA only,
    and the bare loop copies whatever the Trainer resolved. `workdir` keeps the project (else a temporary folder).
    `deterministic` (CPU only; CUDA runs never set it, as train_model): "train_model" runs the medseg rounds under
    use_deterministic_algorithms(True, warn_only=True) with torch.utils.deterministic.fill_uninitialized_memory
    = False, as train_model does; "fill" the same with the NaN fill left on (what train_model did before);
    "off" neither.
    `progress`, if given, gets the round times measured so far after every round (for callers with a time cap).
    """
    if deterministic not in DETERMINISTIC_MODES:
        raise ValueError(f"deterministic={deterministic!r}; expected one of {DETERMINISTIC_MODES}")
    import torch

    from medseg.config import disable_telemetry
    from medseg.training.trainer import Dist, RunSpec, Trainer, _MlflowLogger

    say = log or (lambda _msg: None)
    disable_telemetry()
    options = dict(DEFAULT_OPTIONS.get(arch, {}) if options is None else options)
    epochs = warmup + rounds + profile_rounds
    params = project_params(arch, options, size=size, batch=batch, steps=steps, epochs=epochs, device=device,
                            amp=amp, channels_last=channels_last, augment=augment, num_workers=num_workers,
                            checkpoint_every=checkpoint_every, phantom_shape=phantom_shape)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"medseg-bench-train-{arch}-")))
        else:
            work = Path(workdir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        setup_start = time.perf_counter()
        root = make_project(work / "project", params)
        stack.enter_context(_env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}"))
        spec = RunSpec.of(params, arch, root)
        trainer = Trainer(spec, device, Dist())
        if trainer.steps_per_epoch != steps:
            raise RuntimeError(f"{arch}: the project's epoch has {trainer.steps_per_epoch} steps, not {steps} "
                               f"({len(trainer.dataset)} training slices)")
        bare = BareLoop(trainer)
        logger = _MlflowLogger(spec.params, spec.arch, True, spec.paths.root)  # as fit() does; setup
        if logger.run is None:
            raise RuntimeError(f"{arch}: the MLflow run could not be created (see the warning above)")
        setup_s = time.perf_counter() - setup_start
        say(f"  {arch}: project with {params['phantom']['num_cases']} phantom cases, {len(trainer.dataset)} training "
            f"slices, {steps} steps of {batch} per epoch; setup (project, Trainer, MLflow run) {setup_s:.1f} s")
        cpu_deterministic = not trainer.on_cuda and deterministic != "off"
        fill = deterministic == "fill"
        medseg_s: list[float] = []
        bare_s: list[float] = []
        medseg_rows = []
        try:
            for r in range(warmup + rounds):
                with _deterministic(cpu_deterministic, fill):
                    _sync(device)
                    start = time.perf_counter()
                    medseg_rows.append(_medseg_round(trainer, logger))
                    _sync(device)
                    m = time.perf_counter() - start
                _sync(device)
                start = time.perf_counter()
                bare.epoch(r)
                _sync(device)
                b = time.perf_counter() - start
                tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
                say(f"    {tag:12s} medseg {m:7.3f} s  bare {b:7.3f} s")
                if r >= warmup:
                    medseg_s.append(m)
                    bare_s.append(b)
                if progress is not None:
                    progress({"arch": arch, "device": device, "size": size, "batch": batch, "steps_per_round": steps,
                              "setup_s": setup_s, "rounds_done": r + 1, "medseg_round_s": list(medseg_s),
                              "bare_round_s": list(bare_s), "complete": False})
            profile = None
            if profile_rounds:
                profile = _profile(trainer, logger, bare, warmup + rounds, profile_rounds, device, cpu_deterministic,
                                   fill)
        finally:
            logger.close()
        run_id = logger.run.info.run_id
        import mlflow

        client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        mlflow_steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
        last = spec.paths.last
        last_state = torch.load(last, map_location="cpu", weights_only=True) if last.is_file() else None
        log_rows = (spec.paths.reports / "train_log.csv").read_text().strip().splitlines()[1:]
        checkpoint_written = spec.paths.checkpoint.is_file()  # before a temporary folder goes

    slices = steps * batch
    total_steps = (warmup + rounds) * steps
    every = int(params["train"]["checkpoint_every_steps"])
    mid_epoch_checkpoints = sum(1 for s in range(1, total_steps + 1) if s % every == 0 and s % steps != 0)
    medseg_sps = [slices / s for s in medseg_s]
    bare_sps = [slices / s for s in bare_s]
    result = {
        "arch": arch, "options": options, "device": device, "size": size, "batch": batch, "steps_per_round": steps,
        "rounds": rounds, "warmup": warmup, "augment": augment, "num_workers": int(params["data"]["num_workers"]),
        "threads": torch.get_num_threads(),
        "amp": trainer.amp_enabled, "amp_dtype": str(trainer.amp_dtype).removeprefix("torch."),
        "channels_last": trainer.channels_last, "checkpoint_every_steps": every,
        "setup_s": setup_s,
        "medseg_round_s": medseg_s, "bare_round_s": bare_s,
        "medseg_slices_per_s": statistics.median(medseg_sps), "bare_slices_per_s": statistics.median(bare_sps),
        "paired_ratios": [b / m for m, b in zip(medseg_s, bare_s)],
        "medseg_global_step": trainer.state.global_step, "bare_steps": bare.steps,
        "last_pt_global_step": None if last_state is None else int(last_state["global_step"]),
        "last_pt_written": last_state is not None, "checkpoint_pt_written": checkpoint_written,
        "mid_epoch_checkpoints": mid_epoch_checkpoints, "epoch_end_checkpoints": warmup + rounds,
        "train_log_rows": len(log_rows), "mlflow_metric_steps": mlflow_steps,
        "medseg_losses": [row["train_loss"] for row in medseg_rows], "bare_losses": bare.losses,
        "profile_s_per_round": profile, "profile_rounds": profile_rounds,
        "deterministic_algorithms": cpu_deterministic, "deterministic_mode": deterministic if not trainer.on_cuda
        else "off (CUDA)", "fill_uninitialized_memory": cpu_deterministic and fill,
    }
    result["ratio"] = result["medseg_slices_per_s"] / result["bare_slices_per_s"]
    result["paired_ratio_median"] = statistics.median(result["paired_ratios"])
    result["ratio_of_totals"] = sum(bare_s) / sum(medseg_s)  # the mean rate: every round's checkpoints count
    return result


# ----------------------------------------------------------------------------------------------- report


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}..{max(values):.1f})"


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'arch':14s} {'options':34s} {'medseg slices/s':>22s} {'bare slices/s':>22s} {'medseg/bare':>12s} "
          f"{'paired':>7s} {'totals':>7s}")
    for r in results:
        m = [r["steps_per_round"] * r["batch"] / s for s in r["medseg_round_s"]]
        b = [r["steps_per_round"] * r["batch"] / s for s in r["bare_round_s"]]
        print(f"{r['arch']:14s} {json.dumps(r['options']):34s} {spread(m):>22s} {spread(b):>22s} "
              f"{r['ratio']:11.1%} {r['paired_ratio_median']:7.1%} {r['ratio_of_totals']:7.1%}")
    print("(median (min..max) over rounds; medseg/bare = ratio of the medians (the goal's figure); paired = median "
          "of the per-round ratios; totals = ratio of the summed round times, in which the rare mid-epoch last.pt "
          "writes count in full)")


PROFILE_ORDER = [
    "train_epoch (total)",
    "train_epoch: train_step (forward, loss, backward, step, sync)",
    "train_epoch: save_last (last.pt, total)",
    "train_epoch:   _check_finite",
    "train_epoch:   of which Trainer.state_dict (copies)",
    "train_epoch:   of which torch.save (last.pt / checkpoint.pt)",
    "train_epoch: progress bar update + set_postfix",
    "train_epoch: data loading + rest (remainder)",
    "end_epoch (total)",
    "end_epoch:   _check_finite",
    "end_epoch: save_best (checkpoint.pt, total)",
    "end_epoch: save_last (last.pt, total)",
    "end_epoch:   of which Trainer.state_dict (copies)",
    "end_epoch:   of which torch.save (last.pt / checkpoint.pt)",
    "end_epoch: train_log.csv",
    "mlflow log_metrics (_MlflowLogger.epoch)",
    "bare round total",
    "bare: steps (to(device), forward, loss, backward, step)",
    "bare: data loading + rest (remainder)",
    DETERMINISTIC_BARE,
]


def print_profile(r: dict[str, Any]) -> None:
    prof = r["profile_s_per_round"]
    if not prof:
        return
    total = prof["round total"]
    print(f"\nprofile {r['arch']}: seconds per round (mean of {r['profile_rounds']} instrumented rounds after the "
          f"measured ones), share of the medseg round; _check_finite lines include its calls inside save_last")
    print(f"  {'medseg round total':70s} {total:8.4f} s  100.0%")
    for k in PROFILE_ORDER + sorted(set(prof) - set(PROFILE_ORDER) - {"round total"}):
        if k in prof:
            print(f"  {k:70s} {prof[k]:8.4f} s {prof[k] / total:6.1%}")


def goal_line(results: list[dict[str, Any]]) -> str:
    figures = ", ".join(f"{r['arch']} {r['ratio']:.1%}" for r in results)
    met = all(r["ratio"] >= GOAL_RATIO for r in results)
    return (f"goal: medseg training loop >= {GOAL_RATIO:.0%} of a bare loop's throughput ({figures}) -> "
            f"{'met' if met else 'NOT met'}")


def parse_options(text: str | None, arch: str) -> dict[str, Any]:
    return dict(DEFAULT_OPTIONS.get(arch, {})) if text is None else json.loads(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=DEFAULT_ARCHS)
    parser.add_argument("--options", action="append", default=[], metavar="ARCH=JSON",
                        help=f"model options of an arch (default {DEFAULT_OPTIONS})")
    parser.add_argument("--size", type=int, default=64, help="image size (square)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per round (= per epoch)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="timed rounds of each loop, alternating (6: with the warm-up, 56 steps, so the timed "
                             "part includes the step-50 mid-epoch last.pt)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of each loop first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="train.amp (medseg uses it on CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="train.channels_last (CUDA only)")
    parser.add_argument("--no-augment", action="store_true", help="no augmentation in either loop")
    parser.add_argument("--num-workers", type=int, default=None, help="data.num_workers (default: params.yaml's)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="train.checkpoint_every_steps (default: params.yaml's, 50)")
    parser.add_argument("--deterministic", choices=DETERMINISTIC_MODES, default="train_model",
                        help="CPU medseg rounds: as train_model (use_deterministic_algorithms), the same without "
                             "fill_uninitialized_memory (a possible fix), or off")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", type=int, nargs="?", const=2, default=0, metavar="ROUNDS",
                        help="extra instrumented rounds with a breakdown of the medseg round (default 2)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {arch: parse_options(None, arch) for arch in args.archs}
    for item in args.options:
        arch, _, text = item.partition("=")
        options[arch] = json.loads(text)
    augmentation = "off" if args.no_augment else "on (the project's data.augment)"
    print(f"training-loop overhead on {args.device} ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs), "
          f"torch {torch.__version__}: {args.size}x{args.size}, batch {args.batch}, {args.steps} steps per round, "
          f"{args.warmup} warm-up + {args.rounds} timed rounds per loop, alternating; augmentation {augmentation}; "
          f"medseg rounds on CPU: deterministic={args.deterministic}")
    start = time.perf_counter()
    results = []
    for arch in args.archs:
        results.append(measure(arch, options[arch], size=args.size, batch=args.batch, steps=args.steps,
                               rounds=args.rounds, warmup=args.warmup, device=args.device, amp=args.amp,
                               channels_last=args.channels_last, augment=not args.no_augment,
                               num_workers=args.num_workers, checkpoint_every=args.checkpoint_every,
                               profile_rounds=args.profile, deterministic=args.deterministic))
    r0 = results[0]
    print_table(results)
    print(f"medseg loop per round: train_epoch + end_epoch + MLflow log_metrics; last.pt every "
          f"{r0['checkpoint_every_steps']} steps ({sum(r['mid_epoch_checkpoints'] for r in results)} mid-epoch "
          f"writes in all) and at every epoch end; AMP {r0['amp']}, channels_last {r0['channels_last']}; "
          f"{time.perf_counter() - start:.0f} s in all")
    for r in results:
        print_profile(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    print(goal_line(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
