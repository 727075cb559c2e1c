"""DDP at world size 2 on CPU (torchrun, gloo): disjoint shards, identical weights on both ranks after every step,
the world-size-1 result for the same global batch, files from rank 0 only, an exact resume after a SIGKILL of the
whole job, and a rank that dies or hangs ending the job with a clear message instead of a hang."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import paths

ROOT = Path(__file__).resolve().parents[1]

# The real stage entry point (stages/train.py's run_stage) under torchrun, instrumented from the outside:
# - RECORD_DIR: each rank writes <rank>.json there (outside the project): the slice indices of each epoch's
#   batches, a digest of the weights after every optimizer step, and every write it made under the project;
# - KILL_JOB_AT=k: rank 0 SIGKILLs the whole job (torchrun and both ranks) after step k;
# - DIE_AT=k / HANG_AT=k: rank 1 SIGKILLs itself / stops answering after step k;
# - PAUSE_AT=k: rank 0 sleeps 20 s after step k, outside any collective: torchrun sees rank 1 die and SIGTERMs rank 0
#   before gloo can tell it that its peer is gone (the race a loaded machine plays).
RUNNER = textwrap.dedent(
    """
    import atexit, hashlib, json, os, signal, sys, time
    from pathlib import Path
    import medseg.training.trainer as training
    from medseg.entry import run_stage

    rank, root = int(os.environ["RANK"]), Path.cwd().resolve()
    record = {"batches": {}, "digests": [], "writes": []}

    def audit(event, args):  # every file this process creates, changes or removes under the project
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        else:
            writes = event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree")
        targets = args[:2] if event == "os.rename" else args[:1]  # a rename writes its destination too
        for target in targets if writes else ():
            if isinstance(target, (str, bytes, os.PathLike)):
                path = Path(os.fsdecode(target)).resolve()
                if path.is_relative_to(root):
                    record["writes"].append(str(path.relative_to(root)))
    sys.addaudithook(audit)

    batches_of = training._epoch_batches
    def epoch_batches(sampler, epoch, batch_size, steps):
        batches = batches_of(sampler, epoch, batch_size, steps)
        record["batches"][str(epoch)] = [int(i) for batch in batches for i in batch]
        return batches
    training._epoch_batches = epoch_batches

    step_of = training.Trainer.train_step
    def train_step(self, *args, **kwargs):
        loss = step_of(self, *args, **kwargs)
        weights = b"".join(t.detach().cpu().numpy().tobytes() for t in self.model.state_dict().values())
        record["digests"].append([self.state.global_step, hashlib.sha256(weights).hexdigest()])
        return loss
    training.Trainer.train_step = train_step

    def save():
        out = Path(os.environ["RECORD_DIR"]) / f"{rank}.json"
        out.write_text(json.dumps(record))
    atexit.register(save)

    def hook(step):
        save()
        if rank == 0 and step == int(os.environ.get("KILL_JOB_AT", 0)):
            agent = os.getppid()  # torchrun, then every rank it started (each in a process group of its own)
            ranks = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
            for pid in [agent, *map(int, ranks)]:
                os.kill(pid, signal.SIGKILL)
        if rank == 1 and step == int(os.environ.get("DIE_AT", 0)):
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and step == int(os.environ.get("HANG_AT", 0)):
            time.sleep(3600)
        if rank == 0 and step == int(os.environ.get("PAUSE_AT", 0)):
            time.sleep(20)
    training.STEP_HOOKS.append(hook)
    raise SystemExit(run_stage(training.train_model, [sys.argv[1]], with_arch=True))
    """
)

# Instance-free UNet (no BatchNorm: its statistics are per rank), no dropout and a CE loss: a mean over pixels,
# so DDP's average of the two ranks' gradients is the gradient of the global batch, and world size 2 with 2
# slices per rank must reproduce world size 1 with 4, up to float summation order.
TRAIN = {"epochs": 2, "max_steps_per_epoch": 3, "checkpoint_every_steps": 2, "optimizer": "sgd", "lr": 0.05,
         "dice_weight": 0.0, "ce_weight": 1.0}
UNET = {"base_channels": 4, "batch_norm": False, "dropout": 0.0}
TOLERANCE = 1e-5  # max |w2 - w1| over all weights after 6 SGD steps (measured: 4.5e-7)


def _project(tiny_project: Path, dst: Path, batch_size: int, **compute) -> Path:
    shutil.copytree(tiny_project, dst)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["train"].update(TRAIN, batch_size=batch_size)
    params["model_options"]["unet"] = dict(UNET)
    params["compute"].update(compute)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dst


def _torchrun(root: Path, records: Path, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    records.mkdir(parents=True, exist_ok=True)
    script = records.parent / "runner.py"
    script.write_text(RUNNER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "unet"]
    environment = {**os.environ, "RECORD_DIR": str(records), "OMP_NUM_THREADS": "1",
                   **{k: str(v) for k, v in env.items()}}
    return subprocess.run(cmd, cwd=root, env=environment, capture_output=True, text=True, timeout=timeout)


def _records(folder: Path) -> list[dict]:
    return [json.loads((folder / f"{rank}.json").read_text()) for rank in (0, 1)]


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(paths(root).last_checkpoint("unet"), map_location="cpu", weights_only=True)["state_dict"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world_two(tiny_project, tmp_path_factory):
    """One uninterrupted world-size-2 run (2 slices per rank) and its records."""
    base = tmp_path_factory.mktemp("ws2")
    root = _project(tiny_project, base / "project", batch_size=2)
    before = _files(root)
    done = _torchrun(root, base / "records")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, _records(base / "records"), before


def test_each_rank_trains_on_a_disjoint_shard(world_two):
    root, (rank0, rank1), _ = world_two
    assert rank0["batches"].keys() == rank1["batches"].keys() == {"0", "1"}
    for epoch in ("0", "1"):
        first, second = rank0["batches"][epoch], rank1["batches"][epoch]
        assert len(first) == len(second) == 3 * 2  # 3 steps x 2 slices on each rank
        assert not set(first) & set(second), f"epoch {epoch}: a slice on both ranks"
    assert rank0["batches"]["0"] != rank0["batches"]["1"]  # reshuffled each epoch


@pytest.mark.parametrize("world", [2, 3, 5, 7])
def test_shards_are_disjoint_and_equal_when_the_slices_do_not_divide(world, tiny_project, tmp_path):
    """DistributedSampler pads a shard by repeating slices of another rank unless it drops the tail."""
    from medseg.training.trainer import Dist, RunSpec, Trainer, _epoch_batches

    root = _project(tiny_project, tmp_path / "project", batch_size=2)
    spec = RunSpec.of(yaml.safe_load((root / "params.yaml").read_text()), "unet", root)
    shards = []
    for rank in range(world):
        trainer = Trainer(spec, "cpu", Dist(rank=rank, world=world))
        shards.append([i for batch in _epoch_batches(trainer.sampler, 0, 2, 10**6) for i in batch])
        assert len(trainer.sampler) == len(trainer.dataset) // world
    if world == 5:
        assert len(trainer.dataset) % world  # the case this test is about
    seen = [i for shard in shards for i in shard]
    assert len(seen) == len(set(seen)), "a slice on two ranks"
    assert len({len(shard) for shard in shards}) == 1  # as many steps on every rank: DDP would hang otherwise


def test_weights_are_identical_on_both_ranks_after_every_step(world_two):
    _, (rank0, rank1), _ = world_two
    assert [step for step, _ in rank0["digests"]] == list(range(1, 7))
    assert rank0["digests"] == rank1["digests"]
    assert len({digest for _, digest in rank0["digests"]}) == 6  # the weights did change at every step


def test_world_size_two_matches_world_size_one_with_the_same_global_batch(world_two, tiny_project, tmp_path):
    from medseg.training.trainer import train_model

    root2, _, _ = world_two
    root1 = _project(tiny_project, tmp_path / "project", batch_size=4)
    train_model(yaml.safe_load((root1 / "params.yaml").read_text()), "unet", root1)
    one, two = _weights(root1), _weights(root2)
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"world size 2 vs 1: max |w2 - w1| = {worst:.3g}")
    assert worst < TOLERANCE, worst
    # and the logged loss is the global batch's, not rank 0's half of it
    log = lambda root: [row for row in (paths(root).reports_dir("unet") / "train_log.csv").read_text().splitlines()]
    losses = [[float(line.split(",")[2]) for line in log(root)[1:]] for root in (root1, root2)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    summary = json.loads(paths(root2).train_summary("unet").read_text())
    assert summary["world_size"] == 2


def test_only_rank_zero_writes_files(world_two, tiny_project, tmp_path):
    root, (rank0, rank1), before = world_two
    assert rank1["writes"] == []
    assert "models/unet/last.pt" in rank0["writes"]  # the audit does see the writes
    # and what rank 0 wrote is what a single-process run writes: nothing per rank besides
    from medseg.training.trainer import train_model

    root1 = _project(tiny_project, tmp_path / "project", batch_size=4)
    single_before = _files(root1)
    train_model(yaml.safe_load((root1 / "params.yaml").read_text()), "unet", root1)
    assert _files(root) - before == _files(root1) - single_before


def test_sigkill_of_the_job_mid_epoch_then_resume_at_world_size_two_is_exact(world_two, tiny_project, tmp_path):
    reference, _, _ = world_two
    root = _project(tiny_project, tmp_path / "project", batch_size=2)
    # dropout on: each rank's RNG stream must come back from last.pt, not rank 0's for both
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model_options"]["unet"]["dropout"] = 0.2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reference = _project(tiny_project, tmp_path / "reference", batch_size=2)
    (reference / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _torchrun(reference, tmp_path / "ref-records").returncode == 0

    killed = _torchrun(root, tmp_path / "killed", KILL_JOB_AT=4)  # step 4: mid epoch 2, after its checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = torch.load(paths(root).last_checkpoint("unet"), map_location="cpu", weights_only=True)
    assert (last["global_step"], last["batch_in_epoch"], last["world_size"]) == (4, 1, 2)
    assert len(last["rank_rng"]) == 2
    assert not torch.equal(last["rank_rng"][0]["torch"], last["rank_rng"][1]["torch"])  # a stream per rank

    resumed = _torchrun(root, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(paths(root).train_summary("unet").read_text())["resumed_from_step"] == 4
    one, two = _weights(reference), _weights(root)
    for key in one:
        assert torch.equal(one[key], two[key]), key


@pytest.mark.parametrize("failure", [{"DIE_AT": 2}, {"HANG_AT": 2}, {"DIE_AT": 2, "PAUSE_AT": 2}],
                         ids=["dies", "hangs", "dies-while-rank-0-computes"])
def test_a_rank_that_dies_or_hangs_ends_the_job_with_a_clear_message(failure, tiny_project, tmp_path):
    root = _project(tiny_project, tmp_path / "project", batch_size=2, dist_timeout_s=10)
    start = time.monotonic()
    done = _torchrun(root, tmp_path / "records", timeout=180, **failure)
    took = time.monotonic() - start
    assert done.returncode != 0
    assert took < 120, f"the job took {took:.0f} s to end"
    output = done.stdout + done.stderr
    assert "error: unet: rank 0 of 2 lost the other ranks of this job" in output, output[-4000:]
    assert "compute.dist_timeout_s=10 s" in output
    # the last checkpoint (step 2) is intact and resumable
    last = torch.load(paths(root).last_checkpoint("unet"), map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 and not last["finished"]
