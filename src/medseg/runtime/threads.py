"""How many CPU threads a medseg process uses: never more than the cores it may really run on.

Two torch processes with the default thread count (one per core) on the same cores do not share them fairly:
their OpenMP pools spin and preempt each other, and a small-op workload such as the selective scan became 100x
slower (measured: benchmarks/bench_threads.py). So every stage that computes (train, evaluate, export) and
`medseg predict` size their thread pools with `plan_threads`:

    cpus   = the cores this process may use: its CPU affinity (os.sched_getaffinity), lowered by a cgroup CPU
             quota where one is set (containers, Kubernetes limits: cgroup v2 cpu.max or v1 cfs_quota_us)
    jobs   = how many medseg jobs share those cores: MEDSEG_PARALLEL_JOBS (the Prefect pipeline sets it from
             its max_parallel for every stage it starts), else params.yaml compute.parallel_jobs, else 1;
             times torchrun's LOCAL_WORLD_SIZE (each rank on this machine is a process of its own)
    share  = max(1, cpus // jobs)
    loader workers = min(data.num_workers, share - 1)   (each DataLoader worker runs one thread)
    intra-op threads = share - loader workers            (at least 1)

Overrides, strongest first: MEDSEG_THREADS, then the usual OMP_NUM_THREADS, then params.yaml compute.threads
set the intra-op thread count outright (loader workers are still capped by the share). Interop threads are one:
medseg runs no parallel graph branches. ONNX Runtime sessions take the same intra-op count.

This module imports no torch: predict (ONNX Runtime only) uses it too.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

_log = logging.getLogger(__name__)

THREADS_ENV = "MEDSEG_THREADS"
PARALLEL_JOBS_ENV = "MEDSEG_PARALLEL_JOBS"
# The usual variables that set a process's thread count; the first one set wins after MEDSEG_THREADS.
THREAD_ENVS = (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    """The thread budget of one process: `intra_op` compute threads plus `loader_workers` DataLoader workers."""

    cpus: int  # cores this process may use
    jobs: int  # medseg jobs sharing them
    intra_op: int
    loader_workers: int
    source: str  # where intra_op came from: "auto" or the override's name

    @property
    def total(self) -> int:
        return self.intra_op + self.loader_workers

    def describe(self) -> str:
        return (f"{self.intra_op} intra-op thread(s) ({self.source}) + {self.loader_workers} loader worker(s); "
                f"{self.cpus} usable core(s) shared by {self.jobs} job(s)")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores (e.g. 1.5) of this process's cgroup, or None when there is none."""
    candidates = [(root / "cpu.max", None), (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"),
                  (root / "cpu,cpuacct" / "cpu.cfs_quota_us", root / "cpu,cpuacct" / "cpu.cfs_period_us")]
    for quota_file, period_file in candidates:
        try:
            text = quota_file.read_text().split()
            if period_file is None:  # cgroup v2: "<quota|max> <period>"
                if text[0] == "max":
                    return None
                quota, period = float(text[0]), float(text[1])
            else:  # cgroup v1: quota -1 means none
                quota, period = float(text[0]), float(period_file.read_text().split()[0])
                if quota < 0:
                    return None
        except (OSError, ValueError, IndexError):
            continue
        if quota > 0 and period > 0:
            return quota / period
    return None


def available_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its affinity, lowered by a cgroup quota (rounded up, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def _positive_int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        _log.warning("%s=%r is not an integer; ignored", name, value)
        return None
    if number < 1:
        _log.warning("%s=%r must be >= 1; ignored", name, value)
        return None
    return number


def plan_threads(
    num_workers: int = 0,
    *,
    threads: int | None = None,
    parallel_jobs: int | None = None,
    cpus: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ThreadPlan:
    """The thread plan for a process that wants `num_workers` loader workers (see the module docstring).

    `threads` and `parallel_jobs` are params.yaml's compute.threads / compute.parallel_jobs (None: not set)."""
    env = os.environ if env is None else env
    cpus = cpus or available_cpus()
    jobs = _positive_int(env.get(PARALLEL_JOBS_ENV), PARALLEL_JOBS_ENV) or parallel_jobs or 1
    # torchrun starts LOCAL_WORLD_SIZE ranks of one job on this machine: each is a process sharing the cores
    jobs *= _positive_int(env.get("LOCAL_WORLD_SIZE"), "LOCAL_WORLD_SIZE") or 1
    share = max(1, cpus // jobs)
    workers = max(0, min(int(num_workers), share - 1))
    if workers < int(num_workers):
        _log.info("data.num_workers=%d lowered to %d: %d core(s) for this job", num_workers, workers, share)
    for name in THREAD_ENVS:
        override = _positive_int(env.get(name), name)
        if override:
            return ThreadPlan(cpus, jobs, override, workers, name)
    if threads:
        return ThreadPlan(cpus, jobs, int(threads), workers, "compute.threads")
    return ThreadPlan(cpus, jobs, max(1, share - workers), workers, "auto")


def plan_from_params(params: Mapping[str, Any], num_workers: int | None = None) -> ThreadPlan:
    """plan_threads with params.yaml's compute section (and data.num_workers unless given)."""
    from medseg.config import settings

    project = settings(dict(params))
    workers = project.data.num_workers if num_workers is None else num_workers
    return plan_threads(workers, threads=project.compute.threads, parallel_jobs=project.compute.parallel_jobs)


def apply_torch_threads(plan: ThreadPlan) -> ThreadPlan:
    """Set torch's intra-op threads to the plan's (interop to one where torch still allows it)."""
    import torch

    torch.set_num_threads(plan.intra_op)
    # set_num_interop_threads in recent torch, set_interop_threads in older ones
    set_interop = getattr(torch, "set_num_interop_threads", None) or getattr(torch, "set_interop_threads", None)
    if set_interop is not None and torch.get_num_interop_threads() != 1:
        try:
            set_interop(1)
        except RuntimeError:  # only settable before the first parallel work of the process; keep what is there
            pass
    _log.info("threads: %s", plan.describe())
    return plan


def onnxruntime_options(intra_op: int) -> Any:
    """ONNX Runtime SessionOptions with `intra_op` threads (e.g. a ThreadPlan's) and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op)
    options.inter_op_num_threads = 1
    return options
