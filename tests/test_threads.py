"""The thread policy: a process's compute threads plus loader workers never exceed the cores it may use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medseg.config import validate_params
from medseg.errors import ConfigError
from medseg.runtime.threads import available_cpus, cgroup_cpu_limit, plan_from_params, plan_threads

NO_ENV: dict[str, str] = {}


@pytest.mark.parametrize("cpus,jobs,workers,want", [
    (2, 1, 0, (2, 0)),   # alone: every core
    (2, 2, 0, (1, 0)),   # two jobs: a core each
    (2, 1, 2, (1, 1)),   # workers count against the share: 2 requested, 1 kept
    (2, 2, 4, (1, 0)),   # a share of one core leaves no room for a worker
    (16, 2, 4, (4, 4)),
    (16, 3, 0, (5, 0)),  # 16 // 3
    (1, 4, 0, (1, 0)),   # never below one thread
])
def test_plan_never_exceeds_the_share(cpus, jobs, workers, want):
    plan = plan_threads(workers, parallel_jobs=jobs, cpus=cpus, env=NO_ENV)
    assert (plan.intra_op, plan.loader_workers) == want and plan.source == "auto"
    assert plan.total <= max(1, cpus // jobs)


def test_environment_overrides_params_and_the_flow_sets_the_job_count():
    env = {"MEDSEG_PARALLEL_JOBS": "4"}
    assert plan_threads(0, parallel_jobs=1, cpus=16, env=env).intra_op == 4  # env jobs beat params' 1
    assert plan_threads(0, threads=3, cpus=16, env=NO_ENV).intra_op == 3 and \
        plan_threads(0, threads=3, cpus=16, env=NO_ENV).source == "compute.threads"
    omp = plan_threads(2, threads=3, cpus=16, env={"OMP_NUM_THREADS": "6"})
    assert (omp.intra_op, omp.loader_workers, omp.source) == (6, 2, "OMP_NUM_THREADS")
    ours = plan_threads(0, cpus=16, env={"OMP_NUM_THREADS": "6", "MEDSEG_THREADS": "2"})
    assert (ours.intra_op, ours.source) == (2, "MEDSEG_THREADS")
    assert plan_threads(0, cpus=8, env={"LOCAL_WORLD_SIZE": "2"}).intra_op == 4  # torchrun ranks share the cores
    bad = plan_threads(0, cpus=4, env={"OMP_NUM_THREADS": "lots", "MEDSEG_PARALLEL_JOBS": "0"})
    assert (bad.intra_op, bad.source) == (4, "auto")  # unusable values are ignored (with a warning)


def test_cgroup_quota_lowers_the_usable_cores(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5 and available_cpus(v2) == min(2, len(os.sched_getaffinity(0)))
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 1.0 and available_cpus(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1) is None
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_params_compute_section(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MEDSEG_THREADS", "MEDSEG_PARALLEL_JOBS"):
        monkeypatch.delenv(name, raising=False)
    params = validate_params({"compute": {"threads": 1}, "data": {"num_workers": 0}})
    assert params["compute"] == {"threads": 1, "parallel_jobs": 1, "dist_timeout_s": 1800}
    assert plan_from_params(params).intra_op == 1
    with pytest.raises(ConfigError, match="compute.parallel_jobs must be >= 1"):
        validate_params({"compute": {"parallel_jobs": 0}})
    with pytest.raises(ConfigError, match="compute.dist_timeout_s must be >= 1"):
        validate_params({"compute": {"dist_timeout_s": 0}})
    with pytest.raises(ConfigError, match="unknown key compute.thread"):
        validate_params({"compute": {"thread": 2}})


def test_predict_sessions_take_the_plan_without_importing_torch(tmp_path):
    """ONNX Runtime ignores OMP_NUM_THREADS; medseg's session options carry the plan's count (no torch)."""
    code = ("import sys; from medseg.runtime.threads import onnxruntime_options, plan_threads\n"
            "o = onnxruntime_options(plan_threads(cpus=2, parallel_jobs=2, env={}).intra_op)\n"
            "assert o.intra_op_num_threads == 1 and o.inter_op_num_threads == 1\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
