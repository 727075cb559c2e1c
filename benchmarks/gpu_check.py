"""GPU check: the CUDA measurements medseg has never had, in one run of under 8 minutes (one H200 assumed).

    bash benchmarks/gpu_check.sh [OUT_DIR]            # tries `pip install mamba-ssm` (time-capped), then this
    python benchmarks/gpu_check.py [--out OUT_DIR] [--budget SECONDS]
    python benchmarks/gpu_check.py --dry-run          # no GPU: every part's code path on CPU at tiny sizes

Parts, each in a subprocess of its own under a hard time cap (a share of --budget: time a part leaves unused
goes to the later ones); a part that runs past its cap is killed and recorded as "timeout" with whatever it had
measured so far, and the next part still runs:

train_loop       unet_resnet34 (encoder_weights None) at 224x224, batch 24, AMP (bf16 where supported) and
                 channels_last, num_workers 8 (the paper preset's): medseg's real Trainer loop against a bare
                 PyTorch loop, benchmarks/bench_train_loop.measure (40 steps per epoch, last.pt every 50 steps and
                 at every epoch end, MLflow logging), plus one instrumented round each for a breakdown.
                 Goal: medseg >= 90% of the bare loop's throughput.
vm_unet_eager    the selective scan on random Mamba-initialised inputs (B=8, D=768, N=16, L=56*56: VM-UNet's first
                 stage at 224x224, batch 8): medseg's pure-PyTorch chunked scan against the sequential reference
                 and, where `mamba_ssm` imports, its fused CUDA kernel (outputs and input gradients within 1e-3);
                 then vm_unet (paper size, drop_path_rate 0 so train-mode forwards are comparable) at 224x224, batch
                 8: eval forward in float32 with each scan (logits within 1e-3), and the training step (AMP
                 forward, CE+Dice, backward, AdamW) with each scan.
                 The scan is chosen with `scan_backend()` below: medseg's SS2D calls selective_scan(backend="auto"),
                 which takes mamba_ssm's kernel whenever it imports and the tensors are on CUDA; there is no
                 environment variable or model option, so this script switches medseg.models.mamba.selective_scan's
                 cached kernel off (torch) or requires it (mamba_ssm), and counts which function really ran.
vm_unet_compile  the same under torch.compile (inductor on CUDA): the compiled scan function against the eager one
                 (within 1e-3), and the compiled vm_unet training step (compile time, then steady step time) against
                 the eager one; its first-step logits against eager's (AMP: reported, not gated), and an fp32 eval
                 forward compiled vs eager (gated at 1e-3) when time is left.
onnx_cuda        `medseg predict`'s engine, ONNX Runtime through medseg.deployment.predict.load_predictor(device="cuda"), against
                 PyTorch (medseg.inference.torch_backend.predict_volume on CUDA) for the same exported unet_resnet34 at 224x224:
                 a 64-slice 256x256 CT-like volume in memory (normalise, resize, network, resize back, argmax) and the
                 network alone. The ONNX side runs in a process that never imports torch, as deployed. Without
                 onnxruntime-gpu (no CUDAExecutionProvider) the part records that, with the PyTorch figures.

Writes OUT_DIR/gpu_check.json (OUT_DIR: --out, else $OUT, else ./gpu_check_out) and prints a summary of the ratios.
--dry-run runs all of it on CPU at 32x32, batch 2, 2 steps (torch.compile with the "eager" backend: dynamo's
tracing without code generation), writes the JSON with "dry_run": true and exits 0; it claims no GPU figure.
Without --dry-run and without CUDA it exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

PARTS = ["train_loop", "vm_unet_eager", "onnx_cuda", "vm_unet_compile"]  # the riskiest last: it gets leftovers
# Shares of the budget (seconds when --budget is their sum); the .sh passes what its install step left.
CAPS = {"train_loop": 95, "vm_unet_eager": 85, "onnx_cuda": 70, "vm_unet_compile": 150}
DEFAULT_BUDGET = sum(CAPS.values())
TOLERANCE = 1e-3
NUM_CLASSES = 9  # the Synapse 8 organs + background, as params.yaml
TRAIN_GOAL = 0.90
NO_CUDA_MESSAGE = ("gpu_check: CUDA is not available here (torch.cuda.is_available() is False); this check "
                   "measures on a GPU. Run `python benchmarks/gpu_check.py --dry-run` to exercise its code paths "
                   "on CPU.")

CONFIG = {
    "gpu": {
        "train_loop": dict(arch="unet_resnet34", options={"encoder_weights": None}, size=224, batch=24, steps=40,
                           rounds=3, warmup=1, amp=True, channels_last=True, num_workers=8, profile_rounds=1,
                           phantom_shape=None),
        "vm_unet": dict(size=224, batch=8, options={}, steps=5, warmup=2,
                        scan=dict(batch=8, dim=768, state=16, length=56 * 56), scan_repeats=10),
        "compile_backend": "inductor",
        "onnx": dict(arch="unet_resnet34", options={"encoder_weights": None}, size=224, native=256, depth=64,
                     batch=32, repeats=3),
    },
    "dry": {
        "train_loop": dict(arch="unet_resnet34", options={"encoder_weights": None}, size=32, batch=2, steps=2,
                           rounds=1, warmup=1, amp=True, channels_last=True, num_workers=0, profile_rounds=0,
                           phantom_shape=[48, 48, 8]),
        "vm_unet": dict(size=32, batch=2, options=dict(dims=8, depths=[1, 1, 1, 1], d_state=4), steps=2, warmup=1,
                        scan=dict(batch=2, dim=16, state=4, length=64), scan_repeats=2),
        "compile_backend": "eager",
        "onnx": dict(arch="unet", options={"base_channels": 4}, size=32, native=48, depth=4, batch=2, repeats=2),
    },
}


# ----------------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def max_abs(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def fused_status(device: str) -> dict[str, Any]:
    """Whether medseg's 'auto' scan would take mamba_ssm's fused kernel here, and why not."""
    if not device.startswith("cuda"):
        return {"available": False, "reason": "no CUDA device (the fused kernel is CUDA only)"}
    try:
        import mamba_ssm  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return {"available": False, "reason": f"mamba_ssm cannot be imported: {type(exc).__name__}: {exc}"[:500]}
    from medseg.models.mamba.selective_scan import fused_kernel

    if fused_kernel() is None:
        return {"available": False, "reason": "medseg.models.mamba.selective_scan.fused_kernel() returned None"}
    return {"available": True, "version": getattr(mamba_ssm, "__version__", None)}


@contextlib.contextmanager
def scan_backend(name: str, count: bool = True):
    """Make medseg's selective_scan(backend="auto") (what SS2D calls) use `name` ("torch" or "mamba_ssm"), and with
    `count` count in the yielded dict which implementation ran. medseg has no switch for this: it caches the
    imported kernel in selective_scan._fused_fn / _fused_tried, which this sets for the block and restores after.
    No counting under torch.compile: dynamo guards on the counter's value and would recompile at every call."""
    import medseg.models.mamba.selective_scan as sel

    saved = (sel._fused_fn, sel._fused_tried, sel.selective_scan_torch)
    if name == "mamba_ssm":
        fn = sel.fused_kernel()
        if fn is None:
            raise RuntimeError("mamba_ssm's fused kernel is not available")
    elif name == "torch":
        fn = None
    else:
        raise ValueError(name)
    counts: dict[str, int] = {}

    def counting(impl, key):
        if not count:
            return impl

        def wrapped(*args, **kwargs):
            counts[key] = counts.get(key, 0) + 1
            return impl(*args, **kwargs)

        return wrapped

    try:
        sel._fused_tried = True
        sel._fused_fn = None if fn is None else counting(fn, "mamba_ssm")
        sel.selective_scan_torch = counting(saved[2], "torch")
        yield counts
    finally:
        sel._fused_fn, sel._fused_tried, sel.selective_scan_torch = saved


def amp_dtype(device: str):
    import torch

    if not device.startswith("cuda"):
        return None  # medseg uses AMP on CUDA only
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train_step_fn(model, x, y, device: str, dtype):
    """One training step as medseg's (AMP forward, CE+Dice in float32, backward, AdamW); returns step()."""
    import torch

    from medseg.training.losses import CEDiceLoss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = CEDiceLoss(NUM_CLASSES)  # 0.5 CE + 0.5 soft Dice, medseg's default loss
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step():
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return logits

    return step


def time_train(step, device: str, steps: int, warmup: int) -> dict[str, Any]:
    """First call (includes torch.compile's compilation) timed alone, then `warmup` untimed, then `steps` timed."""
    sync(device)
    start = time.perf_counter()
    first_logits = step()
    sync(device)
    first_s = time.perf_counter() - start
    samples = timed_ms(step, device, steps, warmup=warmup)
    return {"first_call_s": first_s, "step_ms": samples, "step_ms_median": statistics.median(samples),
            "first_logits": first_logits.detach().float()}


def vm_unet(cfg: dict[str, Any], device: str):
    import torch

    from medseg.models import build_model

    torch.manual_seed(0)
    size = cfg["size"]
    return build_model("vm_unet", 1, NUM_CLASSES, (size, size), drop_path_rate=0.0, **cfg["options"]).to(device)


def vm_inputs(cfg: dict[str, Any], device: str):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.rand(cfg["batch"], 1, cfg["size"], cfg["size"], generator=g)
    y = torch.randint(0, NUM_CLASSES, (cfg["batch"], cfg["size"], cfg["size"]), generator=g)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------- parts (children)


def part_train_loop(cfg: dict[str, Any], device: str, emit, deadline: float) -> dict[str, Any]:
    from bench_train_loop import GOAL_RATIO, measure

    c = dict(cfg["train_loop"])
    arch, options = c.pop("arch"), c.pop("options")
    r = measure(arch, options, device=device, log=log, progress=emit, **c)
    r["goal"] = {"what": f"medseg training loop >= {GOAL_RATIO:.0%} of a bare loop's throughput",
                 "value": r["ratio"], "met": r["ratio"] >= GOAL_RATIO}
    return r


def part_vm_unet_eager(cfg: dict[str, Any], device: str, emit, deadline: float) -> dict[str, Any]:
    import torch
    from bench_selective_scan import make_inputs, sequential_scan

    from medseg.models.mamba.selective_scan import fused_kernel, selective_scan_torch

    c = cfg["vm_unet"]
    res: dict[str, Any] = {"device": device, "fused_kernel": fused_status(device), "tolerance": TOLERANCE,
                           "scan_shape": c["scan"], "model": {"arch": "vm_unet", "size": c["size"],
                                                              "batch": c["batch"], "options": c["options"],
                                                              "drop_path_rate": 0.0}}
    fused = fused_kernel() if res["fused_kernel"]["available"] else None
    s = c["scan"]
    # 1) the scan alone, float32, random Mamba-initialised inputs
    inputs = make_inputs(s["batch"], s["dim"], s["state"], s["length"], device, grad=False, kind="mamba")
    with torch.no_grad():
        ref = sequential_scan(**inputs)
        out_torch = selective_scan_torch(**inputs)
        scan = {"max_abs_diff_torch_vs_sequential": max_abs(out_torch, ref), "output_scale": float(ref.abs().max())}
        scan["forward_ms_torch"] = statistics.median(timed_ms(lambda: selective_scan_torch(**inputs), device,
                                                              c["scan_repeats"]))
        if fused is not None:
            out_fused = fused(**inputs)
            scan["max_abs_diff_fused_vs_torch"] = max_abs(out_fused, out_torch)
            scan["max_abs_diff_fused_vs_sequential"] = max_abs(out_fused, ref)
            scan["forward_ms_fused"] = statistics.median(timed_ms(lambda: fused(**inputs), device, c["scan_repeats"]))
            scan["fused_speedup_forward"] = scan["forward_ms_torch"] / scan["forward_ms_fused"]
    grad_inputs = make_inputs(s["batch"], s["dim"], s["state"], s["length"], device, grad=True, kind="mamba")
    tensors = {k: v for k, v in grad_inputs.items() if isinstance(v, torch.Tensor)}

    def fwd_bwd(fn):
        for t in tensors.values():
            t.grad = None
        fn(**grad_inputs).sum().backward()
        return {k: t.grad.clone() for k, t in tensors.items()}

    grads_torch = fwd_bwd(selective_scan_torch)
    scan["forward_backward_ms_torch"] = statistics.median(timed_ms(lambda: fwd_bwd(selective_scan_torch), device,
                                                                   c["scan_repeats"]))
    if fused is not None:
        grads_fused = fwd_bwd(fused)
        scan["max_abs_diff_grads_fused_vs_torch"] = {k: max_abs(grads_fused[k], grads_torch[k]) for k in tensors}
        scan["grad_scale"] = {k: float(g.abs().max()) for k, g in grads_torch.items()}
        scan["forward_backward_ms_fused"] = statistics.median(timed_ms(lambda: fwd_bwd(fused), device,
                                                                       c["scan_repeats"]))
        scan["fused_speedup_forward_backward"] = scan["forward_backward_ms_torch"] / scan["forward_backward_ms_fused"]
    scan["within_tolerance"] = all(v <= TOLERANCE for k, v in scan.items()
                                   if k.startswith("max_abs_diff") and isinstance(v, float))
    res["scan"] = scan
    emit(res)
    del inputs, grad_inputs, tensors, grads_torch

    # 2) the network: eval forward with each scan (float32), then the training step with each scan
    model = vm_unet(c, device)
    x, y = vm_inputs(c, device)
    net: dict[str, Any] = {}
    with torch.no_grad():
        model.eval()
        with scan_backend("torch") as calls:
            logits_torch = model(x).float()
        net["scan_calls_torch_forward"] = dict(calls)
        net["logit_scale"] = float(logits_torch.abs().max())
        if fused is not None:
            with scan_backend("mamba_ssm") as calls:
                logits_fused = model(x).float()
            net["scan_calls_fused_forward"] = dict(calls)
            net["max_abs_diff_logits_fused_vs_torch"] = max_abs(logits_fused, logits_torch)
            net["within_tolerance"] = net["max_abs_diff_logits_fused_vs_torch"] <= TOLERANCE
    model.train()
    dtype = amp_dtype(device)
    net["amp_dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
    initial = copy.deepcopy(model.state_dict())
    with scan_backend("torch") as calls:
        t = time_train(train_step_fn(model, x, y, device, dtype), device, c["steps"], c["warmup"])
    t.pop("first_logits")
    net["train_torch_scan"] = t
    net["scan_calls_torch_train"] = dict(calls)
    emit({**res, "network": net})
    if fused is not None:
        model.load_state_dict(initial)
        with scan_backend("mamba_ssm") as calls:
            t = time_train(train_step_fn(model, x, y, device, dtype), device, c["steps"], c["warmup"])
        t.pop("first_logits")
        net["train_fused_scan"] = t
        net["scan_calls_fused_train"] = dict(calls)
        net["fused_speedup_train_step"] = net["train_torch_scan"]["step_ms_median"] / t["step_ms_median"]
    res["network"] = net
    return res


def part_vm_unet_compile(cfg: dict[str, Any], device: str, emit, deadline: float) -> dict[str, Any]:
    import torch
    from bench_selective_scan import make_inputs

    from medseg.models.mamba.selective_scan import selective_scan_torch

    c = cfg["vm_unet"]
    backend = cfg["compile_backend"]
    res: dict[str, Any] = {"device": device, "compile_backend": backend, "tolerance": TOLERANCE,
                           "torch": torch.__version__}
    s = c["scan"]
    # 1) the scan function compiled (traced path: medseg's _traced_scan) against the eager chunked scan, float32
    inputs = make_inputs(s["batch"], s["dim"], s["state"], s["length"], device, grad=False, kind="mamba")
    compiled_scan = torch.compile(selective_scan_torch, backend=backend, dynamic=False)
    with torch.no_grad():
        eager_out = selective_scan_torch(**inputs)
        start = time.perf_counter()
        compiled_out = compiled_scan(**inputs)
        sync(device)
        scan = {"compile_s": time.perf_counter() - start,
                "max_abs_diff_compiled_vs_eager": max_abs(compiled_out, eager_out),
                "output_scale": float(eager_out.abs().max())}
        scan["forward_ms_eager"] = statistics.median(timed_ms(lambda: selective_scan_torch(**inputs), device,
                                                              c["scan_repeats"]))
        scan["forward_ms_compiled"] = statistics.median(timed_ms(lambda: compiled_scan(**inputs), device,
                                                                 c["scan_repeats"]))
    scan["compiled_speedup_forward"] = scan["forward_ms_eager"] / scan["forward_ms_compiled"]
    scan["within_tolerance"] = scan["max_abs_diff_compiled_vs_eager"] <= TOLERANCE
    res["scan"] = scan
    emit(res)
    del inputs

    # 2) the network's training step, eager (pure-PyTorch scan) then compiled, from the same initial weights
    model = vm_unet(c, device)
    x, y = vm_inputs(c, device)
    dtype = amp_dtype(device)
    initial = copy.deepcopy(model.state_dict())
    net: dict[str, Any] = {"amp_dtype": None if dtype is None else str(dtype).removeprefix("torch.")}
    with scan_backend("torch", count=False):
        eager = time_train(train_step_fn(model, x, y, device, dtype), device, c["steps"], c["warmup"])
        eager_logits = eager.pop("first_logits")
        net["train_eager"] = eager
        emit({**res, "network": net})
        model.load_state_dict(initial)
        compiled_model = torch.compile(model, backend=backend)
        comp = time_train(train_step_fn(compiled_model, x, y, device, dtype), device, c["steps"], c["warmup"])
        comp_logits = comp.pop("first_logits")
        net["train_compiled"] = comp
        net["compile_s_first_step"] = comp["first_call_s"]
        net["compiled_speedup_train_step"] = eager["step_ms_median"] / comp["step_ms_median"]
        net["first_step_logits_max_abs_diff_compiled_vs_eager"] = max_abs(comp_logits, eager_logits)
        net["first_step_logit_scale"] = float(eager_logits.abs().max())
        net["first_step_note"] = ("same initial weights and input, train mode, AMP as in training: reported, not "
                                  "gated (half-precision rounding differs between eager and compiled kernels)")
        emit({**res, "network": net})
        left = deadline - time.time()
        if left > (20 if device == "cpu" else 60):  # an fp32 eval forward compiles another graph
            model.load_state_dict(initial)
            model.eval()
            with torch.no_grad():
                ref = model(x).float()
                start = time.perf_counter()
                out = torch.compile(model, backend=backend)(x).float()
                sync(device)
            net["eval_fp32_compile_s"] = time.perf_counter() - start
            net["eval_fp32_max_abs_diff_compiled_vs_eager"] = max_abs(out, ref)
            net["eval_fp32_logit_scale"] = float(ref.abs().max())
            net["within_tolerance"] = net["eval_fp32_max_abs_diff_compiled_vs_eager"] <= TOLERANCE
        else:
            net["eval_fp32_skipped"] = f"only {left:.0f} s left in this part's cap"
    res["network"] = net
    return res


def part_onnx_cuda(cfg: dict[str, Any], device: str, emit, deadline: float, work: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from bench_predict import export_model

    from medseg.config import load_params, model_options
    from medseg.data.preprocessing import network_input, normalisation_for, normalise_image
    from medseg.inference.torch_backend import predict_volume
    from medseg.models import build_model

    c = cfg["onnx"]
    arch, size = c["arch"], [c["size"], c["size"]]
    params = load_params(ROOT / "params.yaml")
    params["model_options"] = {**(params.get("model_options") or {}), arch: dict(c["options"])}
    folder = work / arch
    start = time.perf_counter()
    export_model(params, arch, size, folder)  # random init (seed 0), medseg.deployment.export.export_onnx + model card
    res: dict[str, Any] = {"device": device, "arch": arch, "options": c["options"], "image_size": size,
                           "volume": [c["depth"], 1, c["native"], c["native"]], "batch": c["batch"],
                           "export_s": time.perf_counter() - start}
    rng = np.random.default_rng(0)
    raw = rng.integers(-1000, 1500, size=(c["depth"], 1, c["native"], c["native"]), dtype=np.int16)
    np.save(work / "raw.npy", raw)
    normalisation = normalisation_for("synapse", "ct", params["dataset"]["hu_window"])
    classes = len(params["dataset"]["class_names"])
    model = build_model(arch, 1, classes, size, **model_options(params, arch))
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    model = model.eval().to(device)
    image = normalise_image(raw, normalisation)
    labels = {}

    def segment():
        with torch.inference_mode():
            labels["torch"] = predict_volume(model, normalise_image(raw, normalisation), size, 0, c["batch"], device)

    batches = [torch.from_numpy(network_input(image, list(range(s, min(s + c["batch"], c["depth"]))), 0, size))
               for s in range(0, c["depth"], c["batch"])]

    def network():
        with torch.inference_mode():
            for b in batches:
                model(b.to(device, non_blocking=True))

    res["torch_segment_ms"] = timed_ms(segment, device, c["repeats"])
    res["torch_network_ms"] = timed_ms(network, device, c["repeats"])
    np.save(work / "labels_torch.npy", labels["torch"])
    emit(res)
    # ONNX Runtime in a process that never imports torch, as `medseg predict` runs
    meta = {"onnx": str(folder / "model.onnx"), "raw": str(work / "raw.npy"), "batch": c["batch"],
            "repeats": c["repeats"], "devices": ["cuda"] if device.startswith("cuda") else ["cuda", "cpu"],
            "image_size": size, "out": str(work / "ort.json"), "labels": str(work / "labels_ort_{device}.npy")}
    (work / "ort_meta.json").write_text(json.dumps(meta))
    left = max(5.0, deadline - time.time() - 2)
    proc = subprocess.run([sys.executable, __file__, "--ort-child", str(work / "ort_meta.json")], capture_output=True,
                          text=True, timeout=left, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ONNX Runtime child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    ort_res = json.loads((work / "ort.json").read_text())
    res["onnxruntime"] = ort_res
    for dev, r in ort_res["devices"].items():
        if r.get("status") != "ok":
            continue
        r["labels_agree_with_torch"] = float(np.mean(np.load(meta["labels"].format(device=dev)) == labels["torch"]))
        if dev == ("cuda" if device.startswith("cuda") else "cpu"):
            res["ratio_ort_over_torch_segment"] = (statistics.median(r["segment_ms"])
                                                   / statistics.median(res["torch_segment_ms"]))
            res["ratio_ort_over_torch_network"] = (statistics.median(r["network_ms"])
                                                   / statistics.median(res["torch_network_ms"]))
            res["compared_provider"] = r["provider"]
    cuda = ort_res["devices"].get("cuda", {})
    res["cuda_execution_provider"] = cuda.get("status")
    if cuda.get("status") != "ok":
        res["cuda_execution_provider_reason"] = cuda.get("reason")
    return res


def ort_child(meta_path: str) -> None:
    """ONNX Runtime only (torch is never imported): medseg.deployment.predict.load_predictor per device, then timings."""
    import numpy as np
    import onnxruntime as ort

    from medseg.data.preprocessing import network_input, normalise_image
    from medseg.deployment.predict import load_predictor

    meta = json.loads(Path(meta_path).read_text())
    raw = np.load(meta["raw"])
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
                           "devices": {}}
    for device in meta["devices"]:
        try:
            predictor = load_predictor(meta["onnx"], device=device, batch_size=meta["batch"])
        except Exception as exc:  # noqa: BLE001 - ConfigError without onnxruntime-gpu: recorded, not fatal
            out["devices"][device] = {"status": "unavailable", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        labels = {}

        def segment():
            labels["v"] = predictor._segment(raw, False, probabilities=False)[0]  # predict's work, no file I/O

        image = normalise_image(raw, predictor.card.normalisation)
        depth = raw.shape[0]
        batches = [network_input(image, list(range(s, min(s + meta["batch"], depth))), 0, meta["image_size"])
                   for s in range(0, depth, meta["batch"])]
        r = {"status": "ok", "provider": predictor.session.get_providers()[0],
             "segment_ms": timed_ms(segment, "cpu", meta["repeats"]),
             "network_ms": timed_ms(lambda: [predictor._run(b) for b in batches], "cpu", meta["repeats"])}
        np.save(meta["labels"].format(device=device), labels["v"])
        out["devices"][device] = r
    assert "torch" not in sys.modules, "the ONNX Runtime side must run as deployed, without torch"
    Path(meta["out"]).write_text(json.dumps(out))


def run_part(name: str, dry: bool, work: Path, out_file: Path, deadline: float) -> None:
    """Child: run one part, writing its (partial) results to out_file as they come. cuDNN settings are left at
    PyTorch's defaults, as medseg leaves them."""
    device = "cpu" if dry else "cuda"
    cfg = CONFIG["dry" if dry else "gpu"]

    def emit(results: dict[str, Any], status: str = "running") -> None:
        tmp = out_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, "results": results}, default=str))
        os.replace(tmp, out_file)

    work.mkdir(parents=True, exist_ok=True)
    emit({})
    if name == "train_loop":
        results = part_train_loop(cfg, device, emit, deadline)
    elif name == "vm_unet_eager":
        results = part_vm_unet_eager(cfg, device, emit, deadline)
    elif name == "vm_unet_compile":
        results = part_vm_unet_compile(cfg, device, emit, deadline)
    elif name == "onnx_cuda":
        results = part_onnx_cuda(cfg, device, emit, deadline, work)
    else:
        raise SystemExit(f"unknown part {name}")
    emit(results, "ok")


# ----------------------------------------------------------------------------------------------- parent


def start_part(name: str, args, out_dir: Path, cap: float) -> dict[str, Any]:
    out_file = out_dir / "parts" / f"{name}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.unlink(missing_ok=True)
    log_file = out_dir / "parts" / f"{name}.log"
    cmd = [sys.executable, __file__, "--part", name, "--part-out", str(out_file), "--work",
           str(out_dir / "work" / name), "--deadline", str(time.time() + cap)] + (["--dry-run"] if args.dry_run else [])
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    start = time.perf_counter()
    status, rc = None, None
    with open(log_file, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            status = "timeout"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the part and its DataLoader workers / ORT child
            proc.wait()
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"cap_s": round(cap, 1), "seconds": round(seconds, 1), "log": str(log_file)}
    saved = json.loads(out_file.read_text()) if out_file.is_file() else {"status": None, "results": {}}
    record["results"] = saved.get("results", {})
    if status == "timeout" and saved.get("status") == "ok":
        record["status"] = "ok"  # it had finished and written its results; killed while exiting
        record["note"] = f"killed at its cap of {cap:.0f} s after writing its results (while exiting)"
    elif status == "timeout":
        record["status"] = "timeout"
        record["error"] = f"killed after its cap of {cap:.0f} s; results holds what it had measured by then"
    elif rc == 0 and saved.get("status") == "ok":
        record["status"] = "ok"
    else:
        record["status"] = "error"
        tail = log_file.read_text()[-3000:] if log_file.is_file() else ""
        record["error"] = f"exit code {rc}: {tail}"
    return record


def fmt(value: Any, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def summarise(report: dict[str, Any]) -> list[str]:
    p = report["parts"]
    lines = [f"gpu_check ({'DRY RUN on CPU: code paths only, no GPU figures' if report['dry_run'] else report['gpu']})"]
    for name in [n for n in PARTS if n in p]:
        rec = p[name]
        lines.append(f"  {name:16s} {rec.get('status', 'missing'):8s} {rec.get('seconds', 0):6.1f} s "
                     f"(cap {rec.get('cap_s', 0):.0f} s)")
    r = p.get("train_loop", {}).get("results", {})
    if "ratio" in r:
        lines.append(f"  a. {r['arch']} {r['size']}x{r['size']} batch {r['batch']} AMP {r['amp']} ({r['amp_dtype']}) "
                     f"channels_last {r['channels_last']}: medseg {r['medseg_slices_per_s']:.1f} vs bare "
                     f"{r['bare_slices_per_s']:.1f} slices/s = {r['ratio']:.1%} (goal >= {TRAIN_GOAL:.0%}: "
                     f"{'met' if r['ratio'] >= TRAIN_GOAL else 'NOT met'})")
    e = p.get("vm_unet_eager", {}).get("results", {})
    if e:
        s, n = e.get("scan", {}), e.get("network", {})
        fused = e.get("fused_kernel", {})
        lines.append(f"  b. scan max|torch - sequential| {fmt(s.get('max_abs_diff_torch_vs_sequential'))}; "
                     f"fused kernel: {'available' if fused.get('available') else 'unavailable'}"
                     + (f" ({fused.get('reason', '')[:120]})" if not fused.get("available") else
                        f", max|fused - torch| {fmt(s.get('max_abs_diff_fused_vs_torch'))}, fused speed-up fwd "
                        f"{fmt(s.get('fused_speedup_forward'))}x fwd+bwd "
                        f"{fmt(s.get('fused_speedup_forward_backward'))}x"))
        if "train_torch_scan" in n:
            lines.append(f"     vm_unet train step, torch scan eager: {n['train_torch_scan']['step_ms_median']:.1f} ms"
                         + (f"; fused: {n['train_fused_scan']['step_ms_median']:.1f} ms "
                            f"({n['fused_speedup_train_step']:.2f}x); logits max|fused - torch| "
                            f"{fmt(n.get('max_abs_diff_logits_fused_vs_torch'))}" if "train_fused_scan" in n else ""))
    cp = p.get("vm_unet_compile", {}).get("results", {})
    if cp:
        s, n = cp.get("scan", {}), cp.get("network", {})
        lines.append(f"  b. torch.compile ({cp.get('compile_backend')}): scan max|compiled - eager| "
                     f"{fmt(s.get('max_abs_diff_compiled_vs_eager'))}, fwd speed-up "
                     f"{fmt(s.get('compiled_speedup_forward'))}x; vm_unet train step compiled "
                     f"{fmt(n.get('train_compiled', {}).get('step_ms_median'), '.1f')} ms vs eager "
                     f"{fmt(n.get('train_eager', {}).get('step_ms_median'), '.1f')} ms = "
                     f"{fmt(n.get('compiled_speedup_train_step'))}x "
                     f"(compile {fmt(n.get('compile_s_first_step'), '.0f')} s)")
    o = p.get("onnx_cuda", {}).get("results", {})
    if o:
        lines.append(f"  c. ONNX Runtime CUDA EP: {o.get('cuda_execution_provider')}"
                     + (f" ({str(o.get('cuda_execution_provider_reason'))[:150]})"
                        if o.get("cuda_execution_provider") != "ok" else "")
                     + f"; ORT ({o.get('compared_provider')}) / PyTorch ({o.get('device')}): segmentation "
                       f"{fmt(o.get('ratio_ort_over_torch_segment'))}x, network "
                       f"{fmt(o.get('ratio_ort_over_torch_network'))}x")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise every code path")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu_check_out)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all parts together (default {DEFAULT_BUDGET})")
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    parser.add_argument("--install-record", default=None, help="JSON written by gpu_check.sh's install step")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--ort-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ort_child:
        ort_child(args.ort_child)
        return 0
    if args.part:
        try:
            run_part(args.part, args.dry_run, Path(args.work), Path(args.part_out), args.deadline)
        except Exception:
            traceback.print_exc()
            return 1
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or Path.cwd() / "gpu_check_out").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET
    report: dict[str, Any] = {
        "dry_run": bool(args.dry_run),
        "device": "cpu" if args.dry_run else "cuda",
        "gpu": None if args.dry_run else torch.cuda.get_device_name(0),
        "cuda_available": cuda,
        "torch": torch.__version__, "cuda_version": torch.version.cuda, "python": platform.python_version(),
        "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "budget_s": budget, "tolerance": TOLERANCE, "train_goal": TRAIN_GOAL,
        "config": CONFIG["dry" if args.dry_run else "gpu"],
        "mamba_ssm_install": None, "parts": {},
    }
    if args.install_record and Path(args.install_record).is_file():
        report["mamba_ssm_install"] = json.loads(Path(args.install_record).read_text())
    json_path = out_dir / "gpu_check.json"
    deadline = time.time() + budget
    todo = list(args.parts)
    for i, name in enumerate(todo):
        remaining = deadline - time.time()
        share = sum(CAPS[n] for n in todo[i:])
        cap = max(5.0, remaining * CAPS[name] / share)  # unused time of earlier parts goes to the later ones
        log(f"gpu_check: part {name} (cap {cap:.0f} s)")
        report["parts"][name] = start_part(name, args, out_dir, cap)
        log(f"gpu_check: part {name}: {report['parts'][name]['status']} in {report['parts'][name]['seconds']} s")
        json_path.write_text(json.dumps(report, indent=2, default=str))
    report["summary"] = summarise(report)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    ratio = report["parts"].get("train_loop", {}).get("results", {}).get("ratio")
    if report["dry_run"] or ratio is None:
        figure, verdict = "not measured" + (" (dry run on CPU)" if report["dry_run"] else ""), "NOT met"
    else:
        figure, verdict = f"{ratio:.1%}", "met" if ratio >= TRAIN_GOAL else "NOT met"
    report["goal"] = f"goal: medseg training step >= {TRAIN_GOAL:.0%} of a bare loop on CUDA ({figure}) -> {verdict}"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(report["summary"]))
    print(f"written: {json_path}")
    print(report["goal"])  # last line, as every benchmark's
    return 0


if __name__ == "__main__":
    sys.exit(main())
