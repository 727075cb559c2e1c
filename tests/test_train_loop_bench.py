"""benchmarks/bench_train_loop.py: its measuring function really drives medseg's Trainer and a bare loop."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train_loop

        yield bench_train_loop
    finally:
        sys.path.remove(str(BENCH))


def test_measure_runs_the_trainer_and_a_bare_loop(bench, tmp_path, one_torch_thread, monkeypatch):
    import torch

    import medseg.training.trainer as training

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    names = ("_progress", "write_train_log", "_check_finite", "save_checkpoint")
    helpers = {name: getattr(training, name) for name in names}
    import torch.utils.deterministic

    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    steps, warmup, rounds, profile = 3, 1, 1, 1
    r = bench.measure("unet", {"base_channels": 4}, size=32, batch=4, steps=steps, rounds=rounds, warmup=warmup,
                      checkpoint_every=2, profile_rounds=profile, phantom_shape=[48, 48, 8], workdir=tmp_path,
                      log=None)
    epochs = warmup + rounds + profile

    assert r["medseg_slices_per_s"] > 0 and r["bare_slices_per_s"] > 0 and r["ratio"] > 0
    assert len(r["medseg_round_s"]) == len(r["bare_round_s"]) == rounds
    # the medseg side went through the real Trainer: steps, last.pt, checkpoint.pt, the CSV log, MLflow per epoch
    assert r["medseg_global_step"] == epochs * steps
    assert r["last_pt_written"] and r["last_pt_global_step"] == epochs * steps
    assert r["checkpoint_pt_written"]
    assert list(tmp_path.glob("project/**/last.pt"))
    assert r["train_log_rows"] == epochs
    assert r["mlflow_metric_steps"] == list(range(1, epochs + 1))
    assert all(math.isfinite(v) for v in r["medseg_losses"])
    # checkpoint_every=2 with 3-step epochs: mid-epoch last.pt at global steps 2 and 4 of the timed rounds, and the
    # profiled round (steps 7..9) wrote one at step 8 from inside train_epoch
    assert r["mid_epoch_checkpoints"] == 2
    prof = r["profile_s_per_round"]
    assert prof["train_epoch: save_last (last.pt, total)"] > 0
    assert prof["end_epoch: save_last (last.pt, total)"] > 0
    assert prof["train_epoch: train_step (forward, loss, backward, step, sync)"] > 0
    # the bare side ran its own steps on the same batches (on CPU the profile times one more bare round per profiled
    # round, under the medseg rounds' use_deterministic_algorithms)
    bare_epochs = epochs + profile * bool(r["deterministic_algorithms"])
    assert r["deterministic_algorithms"] is True  # CPU: as train_model
    assert r["bare_steps"] == bare_epochs * steps
    assert len(r["bare_losses"]) == bare_epochs and all(math.isfinite(v) for v in r["bare_losses"])
    # the first epoch starts from the same weights on the same batches: the first epochs' mean losses are close
    assert abs(r["medseg_losses"][0] - r["bare_losses"][0]) < 0.1 * r["bare_losses"][0]
    # everything the profile patched and the CPU determinism switch are restored
    assert {name: getattr(training, name) for name in helpers} == helpers
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.utils.deterministic.fill_uninitialized_memory == fill


def test_goal_line(bench):
    line = bench.goal_line([{"arch": "unet", "ratio": 0.971}, {"arch": "msvm_unet", "ratio": 0.953}])
    assert line == "goal: medseg training loop >= 90% of a bare loop's throughput (unet 97.1%, msvm_unet 95.3%) -> met"
    assert bench.goal_line([{"arch": "unet", "ratio": 0.899}]).endswith("(unet 89.9%) -> NOT met")
