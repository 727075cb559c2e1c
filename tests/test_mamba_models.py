"""Mamba segmentation networks: registry contract, sizes vs the papers, SS2D geometry, training, ONNX parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medseg.errors import ConfigError
from medseg.models import available_models, build_model, get_model_info
from medseg.models.complexity import count_params_of
from medseg.models.mamba.ss2d import SS2D, MambaLayer, count_scan_gflops

MAMBA_NETS = ["vm_unet", "mamba_unet", "swin_umamba", "msvm_unet", "umamba_bot"]

# Small widths so CPU tests take seconds; the option names are the ones params.yaml uses.
TINY = {
    "vm_unet": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 4},
    "mamba_unet": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 4},
    "swin_umamba": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 4},
    "msvm_unet": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 2},
    "umamba_bot": {"base_channels": 8, "max_channels": 32, "d_state": 4},
}


def test_all_mamba_networks_are_registered_with_their_metadata():
    assert set(MAMBA_NETS) <= set(available_models())
    for name in MAMBA_NETS:
        info = get_model_info(name)
        assert info.family == "mamba" and info.dynamic_hw and info.size_multiple == 32
        assert info.paper


@pytest.mark.parametrize("name", MAMBA_NETS)
def test_logits_shape_for_square_and_rectangular_inputs(name):
    torch.manual_seed(0)
    model = build_model(name, 2, 5, (32, 32), **TINY[name]).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (64, 32)]:
            out = model(torch.randn(2, 2, h, w))
            assert out.shape == (2, 5, h, w) and torch.isfinite(out).all()


def test_quick_preset_options_from_params_yaml_build():
    model = build_model("vm_unet", 1, 9, (64, 64), depths=[1, 1, 1, 1], dims=24)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 9, 64, 64)
    with pytest.raises(ConfigError, match="depths"):
        build_model("vm_unet", 1, 9, (64, 64), depths=[1, 1, 1])


@pytest.mark.parametrize(
    "name,paper_m,tolerance",
    [("vm_unet", 27.43, 0.02), ("swin_umamba", 59.89, 0.02), ("msvm_unet", 35.9, 0.02)],
)
def test_default_sizes_are_close_to_the_papers(name, paper_m, tolerance):
    params_m = count_params_of(name, 3, 9, (224, 224)) / 1e6
    assert abs(params_m - paper_m) / paper_m < tolerance, params_m


def test_ss2d_directions_transpose_consistently():
    """Transposing the image swaps the row/column scans: with direction parameters swapped (and the conv kernel
    transposed) SS2D must return the transposed output. Catches any mix-up in the 4-direction merge."""
    torch.manual_seed(0)
    ss = SS2D(8, d_state=4).eval()
    k, d, n = 4, ss.d_inner, ss.d_state
    with torch.no_grad():  # distinct per-direction A and D, so a wrong merge cannot pass by symmetry
        ss.A_logs.add_(0.5 * torch.rand(k * d, n))
        ss.Ds.copy_(torch.randn(k * d))
    swapped = copy.deepcopy(ss)
    order = [1, 0, 3, 2]
    with torch.no_grad():
        swapped.x_proj_weight.copy_(ss.x_proj_weight[order])
        swapped.dt_projs_weight.copy_(ss.dt_projs_weight[order])
        swapped.dt_projs_bias.copy_(ss.dt_projs_bias[order])
        swapped.A_logs.copy_(ss.A_logs.reshape(k, d, n)[order].reshape(k * d, n))
        swapped.Ds.copy_(ss.Ds.reshape(k, d)[order].reshape(-1))
        swapped.conv2d.weight.copy_(ss.conv2d.weight.transpose(-1, -2))
    x = torch.randn(2, 5, 7, 8)
    with torch.no_grad():
        out = ss(x)
        out_t = swapped(x.transpose(1, 2))
    assert out.shape == x.shape
    torch.testing.assert_close(out_t.transpose(1, 2), out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("d_state", [1, 4])
def test_ss2d_traced_cross_scan_equals_the_eager_one(monkeypatch, d_state):
    """While exporting, SS2D works channels-last: the four directions by Gathers of whole rows of channels and the
    scan in its traced formulation (one state per channel, MSVM-UNet's, has a path of its own). Same output as
    eager, on a non-square map."""
    from medseg.models.mamba import selective_scan as scan_module
    from medseg.models.mamba import ss2d as ss2d_module

    torch.manual_seed(0)
    ss = SS2D(8, d_state=d_state).eval()
    with torch.no_grad():
        ss.A_logs.add_(0.5 * torch.rand_like(ss.A_logs))
        x = torch.randn(2, 5, 7, 8)
        eager = ss(x)
        for module in (scan_module, ss2d_module):
            monkeypatch.setattr(module, "_exporting", lambda: True)
        traced = ss(x)
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-4)


def test_mamba_layer_is_causal():
    torch.manual_seed(0)
    layer = MambaLayer(8, d_state=4).eval()
    x = torch.randn(1, 12, 8)
    changed = x.clone()
    changed[:, 8:] += torch.randn(1, 4, 8)
    with torch.no_grad():
        a, b = layer(x), layer(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_scan_flops_are_counted_analytically():
    ss = SS2D(8, d_state=4)
    # one scan over 4 directions x d_inner (16) channels, L = 5*7, batch 2: 9 * B * L * D * N
    assert count_scan_gflops(ss, (2, 5, 7, 8)) == pytest.approx(9 * 2 * 35 * 4 * 16 * 4 / 1e9)
    model = build_model("vm_unet", 1, 3, (32, 32), **TINY["vm_unet"])
    assert count_scan_gflops(model, (1, 1, 32, 32)) > 0
    assert all(p.device.type == "cpu" for p in model.parameters())  # counting ran on a meta copy


def test_pretrained_encoder_weights_are_loaded_from_a_file(tmp_path):
    source = build_model("vm_unet", 1, 3, (32, 32), **TINY["vm_unet"])
    path = tmp_path / "vmamba.pth"
    torch.save({"model": source.encoder.state_dict()}, path)
    model = build_model("vm_unet", 1, 3, (32, 32), **TINY["vm_unet"], pretrained=str(path))
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value)
    with pytest.raises(ConfigError, match="not found"):
        build_model("vm_unet", 1, 3, (32, 32), **TINY["vm_unet"], pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", MAMBA_NETS)
def test_a_few_training_steps_reduce_the_loss(name):
    torch.manual_seed(0)
    model = build_model(name, 1, 3, (32, 32), **TINY[name]).train()
    x = torch.randn(2, 1, 32, 32)
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.0).long()  # a label the network can learn from the pixels
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)


@pytest.mark.parametrize("name", MAMBA_NETS)
def test_onnx_export_matches_pytorch_at_traced_and_other_sizes(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from medseg.deployment.export import export_onnx, onnx_max_abs_diff, ort_session

    torch.manual_seed(0)
    model = build_model(name, 1, 3, (32, 32), **TINY[name]).eval()
    path = export_onnx(model, 1, (32, 32), tmp_path / "model.onnx", opset=17, dynamic_hw=True)
    session = ort_session(path)
    for shape in [(2, 1, 32, 32), (1, 1, 64, 96)]:
        diff = onnx_max_abs_diff(model, path, torch.randn(*shape), session=session)
        assert diff < 1e-3, (shape, diff)


def test_count_gflops_includes_the_selective_scan():
    from medseg.models import build_model
    from medseg.models.complexity import count_gflops

    model = build_model("vm_unet", 1, 9, (32, 32), depths=[1, 1, 1, 1], dims=8)
    scan = count_scan_gflops(model, (1, 1, 32, 32))
    assert scan > 0
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 1, 32, 32))
    assert count_gflops(model, (1, 1, 32, 32)) == pytest.approx(counter.get_total_flops() / 2e9 + scan)


# ------------------------------------------------------------------------------------- no-Mamba ablation twins
@pytest.mark.parametrize("name", MAMBA_NETS)
def test_the_no_mamba_twin_is_the_same_network_without_its_scans(name, monkeypatch):
    """Same layout and weights but the scans: the twin's state dict is the full network's minus exactly the scan
    parameters (and U-Mamba's bottleneck Mamba branch), and with the twin's weights loaded, the full network with
    its scans made identity (branch skipped) gives the twin's output."""
    from medseg.models.mamba import networks
    from medseg.models.mamba.ss2d import SCAN_PARAMETERS

    twin_name = f"{name}_nomamba"
    info = get_model_info(twin_name)
    assert info.ablation_of == name and info.family == "cnn" and info.size_multiple == get_model_info(name).size_multiple
    torch.manual_seed(0)
    full = build_model(name, 1, 3, (32, 32), **TINY[name]).eval()
    twin = build_model(twin_name, 1, 3, (32, 32), **TINY[name]).eval()
    assert not any(isinstance(m, MambaLayer) for m in twin.modules())
    assert all(not m.scan for m in twin.modules() if isinstance(m, SS2D))
    removed = set(full.state_dict()) - set(twin.state_dict())
    assert set(twin.state_dict()) < set(full.state_dict()) and removed
    assert all(k.rsplit(".", 1)[-1] in SCAN_PARAMETERS or ".mamba." in f".{k}" for k in removed), removed
    x = torch.randn(2, 1, 32, 32)
    assert count_scan_gflops(twin, x.shape) == 0.0 and count_scan_gflops(full, x.shape) > 0
    full.load_state_dict(twin.state_dict(), strict=False)
    monkeypatch.setattr(SS2D, "_scan_4_directions", lambda self, t: t.flatten(2))
    if isinstance(full, networks.UMambaBot):
        full.mamba = None
    with torch.no_grad():
        assert torch.equal(full(x), twin(x))
    assert twin(x).shape == (2, 3, 32, 32)


def test_the_no_mamba_twin_trains_and_exports(tmp_path):
    from medseg.deployment.export import export_onnx, onnx_max_abs_diff

    torch.manual_seed(0)
    twin = build_model("msvm_unet_nomamba", 1, 3, (32, 32), **TINY["msvm_unet"])
    loss = F.cross_entropy(twin(torch.randn(2, 1, 32, 32)), torch.randint(0, 3, (2, 32, 32)))
    loss.backward()
    assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)
    twin.eval()
    path = export_onnx(twin, 1, (32, 32), tmp_path / "twin.onnx")
    assert onnx_max_abs_diff(twin, path, torch.randn(1, 1, 64, 32)) < 1e-4
