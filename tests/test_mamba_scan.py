"""The chunked pure-PyTorch selective scan against a sequential reference written here (a loop over L)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from medseg.models.mamba import selective_scan as scan_module
from medseg.models.mamba.selective_scan import selective_scan, selective_scan_channels_last, selective_scan_torch


def sequential_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """selective_scan_ref semantics, one token at a time; returns (out, last_state)."""
    delta = delta + delta_bias[..., None] if delta_bias is not None else delta
    delta = F.softplus(delta) if delta_softplus else delta
    batch, dim, length = u.shape
    n = A.shape[1]

    def per_channel(x):  # -> (batch, dim, N, L)
        if x.dim() == 2:
            return x[None, :, :, None].expand(batch, dim, n, length)
        if x.dim() == 3:
            return x[:, None].expand(batch, dim, n, length)
        return x.repeat_interleave(dim // x.shape[1], dim=1)

    Bd, Cd = per_channel(B), per_channel(C)
    state = u.new_zeros(batch, dim, n)
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, :, t, None] * A) * state + delta[:, :, t, None] * Bd[..., t] * u[:, :, t, None]
        ys.append((state * Cd[..., t]).sum(-1))
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out, state


def make_inputs(batch, dim, length, n, bc, *, gating=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    if bc == "variable":
        B, C = rnd(batch, n, length), rnd(batch, n, length)
    elif bc == "fixed":
        B, C = rnd(dim, n), rnd(dim, n)
    else:  # grouped, bc = number of groups
        B, C = rnd(batch, bc, n, length), rnd(batch, bc, n, length)
    A = (-torch.exp(torch.randn(dim, n, generator=g, dtype=dtype))).requires_grad_()
    return {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length, scale=0.5),
        "A": A,
        "B": B,
        "C": C,
        "D": rnd(dim),
        "z": rnd(batch, dim, length) if gating else None,
        "delta_bias": rnd(dim, scale=0.5),
    }


CASES = [
    # batch, dim, length, N, B/C kind, softplus, gating, chunk (length not a multiple of the chunk in most)
    (2, 8, 37, 4, "variable", True, True, 8),
    (1, 8, 50, 16, 4, True, False, 16),
    (2, 6, 5, 3, "variable", False, True, 64),
    (2, 4, 41, 2, "fixed", True, True, 7),
    (1, 4, 64, 5, 2, False, False, 16),
    (1, 3, 1, 4, "variable", True, True, 64),
]


@pytest.mark.parametrize("batch,dim,length,n,bc,softplus,gating,chunk", CASES)
def test_chunked_scan_matches_sequential_reference_values_and_gradients(
    batch, dim, length, n, bc, softplus, gating, chunk
):
    inputs = make_inputs(batch, dim, length, n, bc, gating=gating)
    names = [k for k, v in inputs.items() if v is not None]
    out, last = selective_scan_torch(**inputs, delta_softplus=softplus, return_last_state=True, chunk_size=chunk)
    ref_out, ref_last = sequential_reference(**inputs, delta_softplus=softplus)
    assert out.shape == (batch, dim, length) and last.shape == (batch, dim, n)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, ref_last, atol=1e-4, rtol=1e-4)

    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum() + last.sum(), [inputs[k] for k in names])
    ref_grads = torch.autograd.grad((ref_out * weights).sum() + ref_last.sum(), [inputs[k] for k in names])
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("batch,dim,length,n,bc,softplus,gating,chunk", CASES)
def test_inference_path_matches_reference_and_leaves_inputs_untouched(
    batch, dim, length, n, bc, softplus, gating, chunk
):
    """Without autograd the scan updates its own buffers in place: same values, inputs unchanged."""
    inputs = {k: v.detach() if v is not None else None for k, v in make_inputs(batch, dim, length, n, bc,
                                                                                   gating=gating).items()}
    before = {k: v.clone() for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        out, last = selective_scan_torch(**inputs, delta_softplus=softplus, return_last_state=True, chunk_size=chunk)
    ref_out, ref_last = sequential_reference(**inputs, delta_softplus=softplus)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, ref_last, atol=1e-4, rtol=1e-4)
    for k, v in before.items():
        assert torch.equal(inputs[k], v), f"{k} was modified"


def test_default_chunk_size_matches_reference_on_a_long_sequence():
    """The default (eager) chunk size with many chunks, with and without autograd."""
    inputs = make_inputs(1, 6, 300, 4, "variable")
    ref, ref_last = sequential_reference(**inputs, delta_softplus=True)
    out, last = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        out_inference = selective_scan_torch(**inputs, delta_softplus=True)
    for got in (out, out_inference):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, ref_last, atol=1e-4, rtol=1e-4)
    # Gradients through ten chunks of the backward carry, from the output alone (no last-state gradient).
    names = [k for k, v in inputs.items() if v is not None]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * weights).sum(), [inputs[k] for k in names])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [inputs[k] for k in names])
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("bc,length", [("variable", 45), ("fixed", 45), (2, 45), ("variable", 600), (2, 7)])
def test_traced_formulation_matches_reference_values_and_gradients(monkeypatch, bc, length):
    """The formulation used while tracing (ONNX export, torch.compile): plain autograd ops, chunk levels and a
    segment sum. Run eagerly here by pretending to trace, so its gradients can be compared too. With chunks of 8 and
    three levels, 600 positions leave 2 for the segment sum; 7 is shorter than one chunk."""
    monkeypatch.setattr(scan_module, "_exporting", lambda: True)
    inputs = make_inputs(2, 4, length, 3, bc)
    names = [k for k, v in inputs.items() if v is not None]
    out, last = selective_scan_torch(**inputs, delta_softplus=True, return_last_state=True, chunk_size=8)
    ref_out, ref_last = sequential_reference(**inputs, delta_softplus=True)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, ref_last, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out.sum() + last.sum(), [inputs[k] for k in names])
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_last.sum(), [inputs[k] for k in names])
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("n,length", [(1, 45), (3, 45), (1, 600), (2, 600), (3, 7)])
def test_channels_last_formulation_matches_reference_values_and_gradients(n, length):
    """SS2D's traced scan on channels-last groups, (batch, G, L, dim // G): the same values and gradients as the
    sequential reference on the (batch, dim, L) layout, with one state per channel (MSVM-UNet, a path of its own)
    and several; 600 positions reach the segment sum after three chunk levels."""
    groups, dg = 2, 3
    inputs = make_inputs(2, groups * dg, length, n, groups, gating=False)
    inputs.pop("z")

    def last(x):  # (batch, dim, L) -> (batch, G, L, dg); grouped B/C (batch, G, N, L) -> (batch, G, L, N)
        return x.reshape(2, groups, dg, length).transpose(2, 3) if x.shape[1] == groups * dg else x.transpose(2, 3)

    out = selective_scan_channels_last(last(inputs["u"]), last(inputs["delta"]), inputs["A"], last(inputs["B"]),
                                       last(inputs["C"]), inputs["D"], inputs["delta_bias"], delta_softplus=True)
    out = out.transpose(2, 3).reshape(2, groups * dg, length)
    ref, _ = sequential_reference(**inputs, delta_softplus=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    names = list(inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * weights).sum(), [inputs[k] for k in names])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [inputs[k] for k in names])
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_chunk_size_does_not_change_the_result():
    inputs = make_inputs(2, 4, 70, 3, "variable")
    outs = [selective_scan_torch(**inputs, delta_softplus=True, chunk_size=c) for c in (1, 3, 16, 70, 128)]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-5, rtol=1e-5)


def test_strong_decay_stays_finite_and_exact():
    """Large delta*A (state forgets almost at once) must not overflow anywhere in the chunked formulation, forward
    or backward (log-decays there are far below the -60 clamp)."""
    inputs = make_inputs(1, 4, 90, 4, "variable")
    with torch.no_grad():
        inputs["delta"].mul_(0).add_(30.0)  # delta*A of several hundred per token
    out = selective_scan_torch(**inputs, chunk_size=32)
    with torch.no_grad():
        out_inference = selective_scan_torch(**inputs, chunk_size=32)
        with pytest.MonkeyPatch.context() as patch:  # the traced formulation (ONNX), segment sum included
            patch.setattr(scan_module, "_exporting", lambda: True)
            out_traced = selective_scan_torch(**inputs, chunk_size=4)
    ref, _ = sequential_reference(**inputs)
    for got in (out, out_inference, out_traced):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad(out.sum(), [inputs[k] for k in names])
    ref_grads = torch.autograd.grad(ref.sum(), [inputs[k] for k in names])
    for name, got, want in zip(names, grads, ref_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_float64_gradcheck_tiny_case():
    inputs = make_inputs(1, 2, 7, 2, "variable", dtype=torch.float64)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        out, last = selective_scan_torch(**kw, delta_softplus=True, return_last_state=True, chunk_size=3)
        return out, last

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in names], eps=1e-6, atol=1e-6)


def test_half_precision_input_is_computed_in_float32_and_returned_in_input_dtype():
    inputs = make_inputs(1, 4, 20, 3, "variable", gating=False)
    half = {k: v.detach().to(torch.bfloat16) if k in ("u", "delta", "z") else v.detach() for k, v in inputs.items()
            if v is not None}
    out = selective_scan(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref, _ = sequential_reference(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_scan_stays_in_float32_under_autocast():
    """Mixed-precision training must not turn the scan's readout matmuls into bfloat16 (about 1e-2 error)."""
    inputs = make_inputs(2, 8, 100, 16, "variable")
    ref, _ = sequential_reference(**inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan_torch(**inputs, delta_softplus=True)
        with torch.no_grad():
            out_inference = selective_scan_torch(**inputs, delta_softplus=True)
    for got in (out, out_inference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_rejected_with_a_clear_message():
    inputs = {k: v for k, v in make_inputs(1, 4, 8, 2, "variable").items() if k in "u delta A B C"}
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inputs, backend="triton")
    with pytest.raises(NotImplementedError, match="complex"):
        selective_scan(**{**inputs, "A": inputs["A"].detach().to(torch.complex64)})
    with pytest.raises(ValueError, match="groups"):
        selective_scan(**{**inputs, "B": torch.randn(1, 3, 2, 8)})
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan(**inputs, backend="mamba_ssm")


def test_missing_or_broken_mamba_ssm_falls_back_with_one_warning(monkeypatch, caplog):
    """An import that blows up (e.g. undefined CUDA symbol) must mean: warn once, use the torch scan."""
    import builtins

    real_import = builtins.__import__

    def broken_import(name, *args, **kwargs):
        if name.startswith("mamba_ssm"):
            raise OSError("selective_scan_cuda.so: undefined symbol: _ZN3c10")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken_import)
    monkeypatch.setattr(scan_module, "_fused_tried", False)
    monkeypatch.setattr(scan_module, "_fused_fn", None)
    with caplog.at_level(logging.WARNING, logger=scan_module.__name__):
        assert scan_module.fused_kernel() is None
        assert scan_module.fused_kernel() is None
    warnings = [r for r in caplog.records if "mamba_ssm" in r.getMessage()]
    assert len(warnings) == 1 and "undefined symbol" in warnings[0].getMessage()


def test_scan_exports_to_onnx_and_handles_other_lengths(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")

    class Scan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.A = torch.nn.Parameter(-torch.exp(torch.randn(6, 4, generator=g)))
            self.D = torch.nn.Parameter(torch.randn(6, generator=g))

        def forward(self, u, delta, B, C, z):
            return selective_scan(u, delta, self.A, B, C, self.D, z, delta_softplus=True, chunk_size=8)

    model = Scan().eval()

    def args(length, seed):
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(*s, generator=g) for s in [(2, 6, length), (2, 6, length), (2, 2, 4, length),
                                                             (2, 2, 4, length), (2, 6, length)])

    names = ["u", "delta", "B", "C", "z"]
    path = tmp_path / "scan.onnx"
    torch.onnx.export(model, args(20, 0), str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["out"], dynamic_axes={k: {0: "b", 2 if k not in "BC" else 3: "L"} for k in names})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (20, 3, 45, 600):  # shorter than a chunk, more chunks than traced, beyond the chunk levels
        a = args(length, length)
        (got,) = session.run(None, {k: v.numpy() for k, v in zip(names, a)})
        with torch.no_grad():
            want = model(*a).numpy()
        assert abs(got - want).max() < 1e-4, length
