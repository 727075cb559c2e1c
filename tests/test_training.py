"""Training: outputs, exact resume after SIGKILL, NaN stop, torchrun (world size 1), no test-split access."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medseg.errors import TrainingError
from medseg.io import read_json

from conftest import paths

# 2 epochs x 3 steps, a mid-epoch checkpoint every 2 steps: step 4 is a mid-epoch save in epoch 2.
TRAIN = {"epochs": 2, "batch_size": 4, "max_steps_per_epoch": 3, "checkpoint_every_steps": 2}

# Runs one training in a fresh interpreter; KILL_AT=k makes it SIGKILL itself right after optimizer step k.
RUNNER = textwrap.dedent(
    """
    import os, signal, sys, yaml
    from pathlib import Path
    import medseg.training.trainer as training
    kill_at = int(os.environ.get("KILL_AT", "0"))
    if kill_at:
        training.STEP_HOOKS.append(lambda step: step == kill_at and os.kill(os.getpid(), signal.SIGKILL))
    root = Path(sys.argv[1])
    training.train_model(yaml.safe_load((root / "params.yaml").read_text()), "unet", root)
    """
)


def _make_project(tiny_project: Path, dst: Path, **train) -> tuple[Path, dict]:
    shutil.copytree(tiny_project, dst)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["train"].update(TRAIN, **train)
    # dropout draws from the global torch RNG during training: resume must restore that stream exactly too
    params["model_options"]["unet"] = {**params["model_options"]["unet"], "dropout": 0.2}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst, params


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tiny_project, tmp_path_factory):
    """One uninterrupted in-process run, recording every case the training touches."""
    import medseg.data.cases as cases
    import medseg.data.loader as loader
    from medseg.training.trainer import train_model

    root, params = _make_project(tiny_project, tmp_path_factory.mktemp("ref") / "project")
    touched: set[str] = set()
    original_init, original_load = loader.SliceDataset.__init__, cases.load_case

    def init(self, ingested_dir, case_ids, *args, **kwargs):
        touched.update(case_ids)
        original_init(self, ingested_dir, case_ids, *args, **kwargs)

    def load_case(ingested_dir, case_id):
        touched.add(case_id)
        return original_load(ingested_dir, case_id)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader.SliceDataset, "__init__", init)
        mp.setattr(cases, "load_case", load_case)
        summary = train_model(params, "unet", root)
    return root, params, summary, touched


def test_outputs_follow_the_contract(reference):
    root, params, summary, _ = reference
    checkpoint = _load(paths(root).checkpoint("unet"))
    for key in ("arch", "model_options", "in_channels", "num_classes", "image_size", "class_names", "state_dict",
                "epoch", "val_dice", "config_hash", "training_cases_hash"):
        assert key in checkpoint, key
    assert checkpoint["arch"] == "unet" and checkpoint["num_classes"] == len(params["dataset"]["class_names"])
    assert checkpoint["image_size"] == params["data"]["image_size"]
    with open(paths(root).train_log("unet"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "step", "train_loss", "val_dice", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [3, 6]
    assert float(rows[-1]["lr"]) == 0.0  # poly schedule reaches zero at max_iter
    dices = [float(r["val_dice"]) for r in rows]
    best = max(range(2), key=lambda i: dices[i])
    assert checkpoint["epoch"] == best + 1 and checkpoint["val_dice"] == pytest.approx(dices[best])
    saved = read_json(paths(root).train_summary("unet"))
    assert saved["best_val_dice"] == pytest.approx(dices[best]) and saved["best_epoch"] == best + 1
    from medseg.inference.torch_backend import load_trained_model

    model, _ = load_trained_model(paths(root).checkpoint("unet"))
    assert saved["params"] == sum(p.numel() for p in model.parameters())
    assert saved["device"] == "cpu" and saved["resumed_from_step"] is None
    # compute on equal terms: the median epoch from the log's cumulative seconds, this process's peak memory
    ends = [float(r["seconds"]) for r in rows]
    assert saved["seconds_per_epoch"] == pytest.approx(float(np.median([ends[0], ends[1] - ends[0]])), abs=1e-3)
    import resource

    assert 0 < saved["peak_rss_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + 0.1
    assert saved["cuda_max_allocated_mb"] is None  # trained on CPU
    # the DVC metric: numbers only, the summary's detail stays in train_summary.json
    scores = read_json(paths(root).train_scores("unet"))
    assert scores == {"unet.val_dice": float(f"{saved['best_val_dice']:.4g}"),
                      "unet.train_s": float(f"{saved['train_seconds']:.4g}")}
    assert paths(root).curves("unet").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = _load(paths(root).last_checkpoint("unet"))
    assert last["finished"] and last["global_step"] == 6


def test_training_never_reads_the_test_split(reference):
    root, params, _, touched = reference
    split = read_json(paths(root, params["dataset"]["name"]).split_file)
    assert set(split["train"]) | set(split["val"]) <= touched
    assert not touched & set(split["test"])


def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(reference, tiny_project, tmp_path):
    ref_root = reference[0]
    root, _ = _make_project(tiny_project, tmp_path / "project")
    env = {**os.environ, "KILL_AT": "5"}
    killed = subprocess.run([sys.executable, "-c", RUNNER, str(root)], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = _load(paths(root).last_checkpoint("unet"))
    assert (last["epoch"], last["batch_in_epoch"], last["global_step"]) == (1, 1, 4)  # the step-4 save
    assert not [p for p in paths(root).model_dir("unet").iterdir() if ".tmp" in p.name]

    env.pop("KILL_AT")
    resumed = subprocess.run([sys.executable, "-c", RUNNER, str(root)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_json(paths(root).train_summary("unet"))["resumed_from_step"] == 4
    for name in ("checkpoint.pt", "last.pt"):
        _assert_same_weights(_load(paths(ref_root).model_dir("unet") / name)["state_dict"],
                             _load(paths(root).model_dir("unet") / name)["state_dict"])
    # a finished run's last.pt: the final weights and the record, no resume state (it is never resumed)
    from medseg.training.trainer import FINISHED_KEYS

    assert set(_load(paths(root).last_checkpoint("unet"))) == set(FINISHED_KEYS)


def test_resume_only_with_the_same_configuration(reference, tmp_path):
    from medseg.training.trainer import _try_resume

    last = _load(paths(reference[0]).last_checkpoint("unet"))
    path = tmp_path / "last.pt"
    torch.save({**last, "finished": False}, path)
    assert _try_resume(path, last["config_hash"]) is not None
    assert _try_resume(path, "another-config") is None
    torch.save(last, path)  # a finished run is not resumed: re-running means training again
    assert _try_resume(path, last["config_hash"]) is None
    path.write_bytes(b"truncated")
    assert _try_resume(path, last["config_hash"]) is None


def test_config_hash_tracks_what_changes_the_result(reference):
    from medseg.training.trainer import run_config_hash

    _, params, _, _ = reference
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    base = run_config_hash(params, "unet", split)
    changed_lr = {**params, "train": {**params["train"], "lr": 0.5}}
    moved_ckpt = {**params, "train": {**params["train"], "checkpoint_every_steps": 7}}
    assert run_config_hash(changed_lr, "unet", split) != base
    assert run_config_hash(params, "unet", {**split, "train": ["a", "d"]}) != base
    assert run_config_hash(params, "unet", {**split, "test": ["z"]}) == base  # the test list is not training's
    assert run_config_hash(moved_ckpt, "unet", split) == base


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_project, tmp_path, monkeypatch):
    import medseg.data.loader as loader
    from medseg.training.trainer import train_model

    root, params = _make_project(tiny_project, tmp_path / "project", epochs=1, checkpoint_every_steps=1)
    original = loader.SliceDataset.__getitems__
    calls = []

    def corrupt_second_batch(self, indices):
        calls.append(1)
        items = original(self, indices)
        if len(calls) == 2:
            items = [(torch.full_like(image, float("nan")), label) for image, label in items]
        return items

    monkeypatch.setattr(loader.SliceDataset, "__getitems__", corrupt_second_batch)
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, step 2"):
        train_model(params, "unet", root)
    last = _load(paths(root).last_checkpoint("unet"))
    assert last["global_step"] == 1
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not paths(root).checkpoint("unet").exists()


def test_non_finite_weights_are_never_checkpointed():
    from medseg.training.trainer import _check_finite

    model = torch.nn.Linear(2, 2)
    _check_finite(model, "epoch 1, step 1")
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match="epoch 3, step 9: parameter weight is not finite"):
        _check_finite(model, "epoch 3, step 9")


def test_torchrun_world_size_one_matches_single_process(reference, tiny_project, tmp_path):
    root, _ = _make_project(tiny_project, tmp_path / "project")
    script = tmp_path / "run.py"
    script.write_text(RUNNER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script), str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_json(paths(root).train_summary("unet"))["world_size"] == 1
    # DDP with one gloo rank averages gradients over one replica: the same weights, bit for bit
    _assert_same_weights(_load(paths(reference[0]).last_checkpoint("unet"))["state_dict"],
                         _load(paths(root).last_checkpoint("unet"))["state_dict"])


def test_epochs_are_logged_to_mlflow_when_a_tracking_uri_is_set(tiny_project, tmp_path, monkeypatch):
    import mlflow

    from medseg.training.trainer import train_model

    root, params = _make_project(tiny_project, tmp_path / "project", epochs=2, checkpoint_every_steps=50)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train_model(params, "unet", root)

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(params["register"]["experiment"])
    assert experiment.artifact_location == (root / "mlartifacts").resolve().as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["arch"] == "unet"
    history = client.get_metric_history(run.info.run_id, "val_dice")
    assert [m.step for m in history] == [1, 2]


def test_trainer_steps_and_state_round_trip(tiny_project, tmp_path):
    """The Trainer's named steps, driven by hand: its state_dict() carries a run mid-way, and a second Trainer
    that loads it continues to exactly the weights of one that never stopped."""
    from medseg.training.trainer import Dist, RunSpec, Trainer

    root, params = _make_project(tiny_project, tmp_path / "project", epochs=2, checkpoint_every_steps=100)
    spec = RunSpec.of(params, "unet", root)
    first = Trainer(spec, "cpu", Dist())
    first.train_epoch()
    row = first.end_epoch(first.validate())
    assert row["epoch"] == 1 and row["step"] == first.state.global_step == 3 and 0 <= row["val_dice"] <= 1
    assert (first.state.epoch, first.state.batch_in_epoch, first.state.loss_count) == (1, 0, 0)
    saved = first.state_dict()
    assert (saved["epoch"], saved["global_step"], saved["best_epoch"]) == (1, 3, 1)

    first.train_epoch()
    first.end_epoch(first.validate())
    uninterrupted = {k: v.clone() for k, v in first.model.state_dict().items()}

    # fresh objects (its own initialisation; the global RNG is shared in-process, so after `first` is done) ...
    second = Trainer(spec, "cpu", Dist())
    second.load_state_dict(saved)  # ... until the state is loaded: RNG streams and position included
    assert second.state.history == first.state.history[:1] and second.state.resumed_from == 3
    second.train_epoch()
    second.end_epoch(second.validate())
    _assert_same_weights(uninterrupted, second.model.state_dict())
    assert first.state.epoch == second.state.epoch == 2


def test_augmentation_deferred_to_the_training_step_trains_the_same_weights(tiny_project, tmp_path):
    """On a GPU the loader hands over un-augmented batches with their augmentation table and train_step augments
    on the device; on the CPU that path is taken by hand here and must give the very weights of the default."""
    from medseg.training.trainer import Dist, RunSpec, Trainer

    root, params = _make_project(tiny_project, tmp_path / "project", epochs=1, checkpoint_every_steps=100)
    assert params["data"]["augment"], "the tiny project must augment for this test to mean anything"
    spec = RunSpec.of(params, "unet", root)
    weights = []
    for deferred in (False, True):
        trainer = Trainer(spec, "cpu", Dist())
        trainer.dataset.defer_augmentation = deferred
        seen = []
        original = trainer.train_step
        trainer.train_step = lambda *batch: seen.append(len(batch)) or original(*batch)
        trainer.train_epoch()
        assert seen and set(seen) == {3 if deferred else 2}  # the table travelled with the batch
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    _assert_same_weights(*weights)


def test_training_sizes_its_threads_and_loader_workers_to_the_cores(tiny_project, tmp_path, monkeypatch):
    """train_model applies the thread plan: 2 parallel jobs on this machine's cores -> the share each, and a
    data.num_workers above the share is lowered (the DataLoader is built with the lowered count)."""
    import medseg.training.trainer as training
    from medseg.runtime.threads import available_cpus

    root, params = _make_project(tiny_project, tmp_path / "project", epochs=1, max_steps_per_epoch=1)
    params["data"]["num_workers"] = 8
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MEDSEG_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDSEG_PARALLEL_JOBS", "2")
    built = []
    monkeypatch.setattr(training.Trainer, "fit", lambda self: built.append(self.loader_workers) or {})
    before = torch.get_num_threads()
    try:
        training.train_model(params, "unet", root)
        share = max(1, available_cpus() // 2)
        assert built == [max(0, share - 1)]
        assert torch.get_num_threads() == max(1, share - built[0])
    finally:
        torch.set_num_threads(before)


def test_loader_workers_train_the_same_weights_with_one_persistent_loader(tiny_project, tmp_path):
    """data.num_workers > 0: one SliceLoader for the run, its workers persisting across epochs, gives the very
    weights of in-process loading (the epoch's augmentation reaches persistent workers with each batch)."""
    from medseg.training.trainer import Dist, RunSpec, Trainer

    root, params = _make_project(tiny_project, tmp_path / "project", epochs=2, checkpoint_every_steps=100)
    spec = RunSpec.of(params, "unet", root)
    weights = []
    for workers in (0, 1):
        trainer = Trainer(spec, "cpu", Dist(), loader_workers=workers)
        trainer.train_epoch()
        loader = trainer._loader
        trainer.end_epoch(None)
        trainer.train_epoch()
        assert trainer._loader is loader and loader.persistent_workers == (workers > 0)
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        loader.close()
    _assert_same_weights(*weights)
