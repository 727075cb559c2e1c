"""benchmarks/gpu_check.sh / gpu_check.py: the dry run exercises every part on CPU and claims no GPU; without CUDA
a real run refuses with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = {"train_loop", "vm_unet_eager", "vm_unet_compile", "onnx_cuda"}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHON": sys.executable}
    env.pop("OUT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_dry_run_writes_every_part_and_claims_no_gpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert report["device"] == "cpu" and report["gpu"] is None
    assert report["mamba_ssm_install"]["status"] == "skipped"
    assert set(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert part["seconds"] > 0 and part["cap_s"] > 0
        assert part["results"]["device"] == "cpu", name

    a = report["parts"]["train_loop"]["results"]
    assert a["arch"] == "unet_resnet34" and a["medseg_slices_per_s"] > 0 and a["bare_slices_per_s"] > 0
    assert a["ratio"] > 0 and a["amp"] is False and a["channels_last"] is False  # medseg: AMP/channels_last CUDA only
    assert a["last_pt_written"] and a["checkpoint_pt_written"]
    assert a["medseg_global_step"] == (a["warmup"] + a["rounds"]) * a["steps_per_round"]
    assert isinstance(a["goal"]["met"], bool)

    b = report["parts"]["vm_unet_eager"]["results"]
    assert b["fused_kernel"]["available"] is False and b["fused_kernel"]["reason"]
    assert b["scan"]["max_abs_diff_torch_vs_sequential"] <= 1e-3 and b["scan"]["within_tolerance"]
    assert b["scan"]["forward_ms_torch"] > 0 and b["scan"]["forward_backward_ms_torch"] > 0
    assert b["network"]["train_torch_scan"]["step_ms_median"] > 0
    assert b["network"]["scan_calls_torch_train"].get("torch", 0) > 0  # the pure-PyTorch scan really ran
    assert "mamba_ssm" not in b["network"]["scan_calls_torch_train"]

    c = report["parts"]["vm_unet_compile"]["results"]
    assert c["scan"]["max_abs_diff_compiled_vs_eager"] <= 1e-3
    assert c["network"]["train_compiled"]["step_ms_median"] > 0 and c["network"]["compiled_speedup_train_step"] > 0
    assert c["network"]["eval_fp32_max_abs_diff_compiled_vs_eager"] <= 1e-3

    d = report["parts"]["onnx_cuda"]["results"]
    assert d["compared_provider"] == "CPUExecutionProvider"
    assert d["ratio_ort_over_torch_segment"] > 0 and d["ratio_ort_over_torch_network"] > 0
    assert d["onnxruntime"]["devices"]["cpu"]["labels_agree_with_torch"] > 0.99
    if not _cuda():
        assert d["cuda_execution_provider"] == "unavailable" and d["cuda_execution_provider_reason"]
    assert "DRY RUN" in proc.stdout


@pytest.mark.skipif("_cuda()", reason="this machine has CUDA: a real run would start")
@pytest.mark.parametrize("how", ["py", "sh"])
def test_without_cuda_a_real_run_exits_2(tmp_path, how):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out)] if how == "py" else \
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr and "--dry-run" in proc.stderr
    assert not (out / "gpu_check.json").exists()
    assert not (out / "mamba_install.log").exists()  # nothing was installed
