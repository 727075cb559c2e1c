"""Every zoo entry: full-size build vs the paper's parameter count, then (at a small image size) forward,
one training step and ONNX export with onnxruntime parity.

Cost: the full-size (224x224, the architectures' defaults) builds are counted on the meta device (no memory,
no initialisation). The functional test runs
each network at 64x64; the very heavy entries listed in REDUCED run it with fewer blocks (same layer types,
widths and wiring), which the budget of the whole CI needs. Their full-size build is still checked.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medseg.deployment.export import export_onnx, onnx_max_abs_diff, ort_session
from medseg.models import available_models, build_model, get_model_info
from medseg.models.complexity import count_params_of


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core runner OpenMP's spinning threads made
    these modules 4x slower (9.6 min with 2 threads vs 2.4 min with 1, same runner); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ZOO = [
    "unet", "unetpp",
    "unet_resnet18", "unet_resnet34", "unet_resnet50", "unet_resnet152", "unetpp_resnet50", "unet_effb5",
    "unet_effb7", "unet_mit_b2", "segformer_b0", "segformer_b2", "segformer_b4",
    "transunet_r50_vit", "swin_unet", "upernet_deit_s", "upernet_deit_b", "upernet_beit_b", "upernet_beit_l",
    "mask2former_r50", "mask2former_swin_l", "maskrcnn_r101_fpn", "maskrcnn_x101_fpn", "transnext_base_standin",
]  # fmt: skip

# Fewer blocks for the functional test only (stated in the module doc); the full network is built in test_paper_*.
REDUCED = {
    "upernet_beit_l": {"depth": 6},  # 24 -> 6 ViT-L blocks
    "mask2former_swin_l": {"depths": (2, 2, 2, 2)},  # Swin-L stage 3: 18 -> 2 blocks
}

IN_CH, NUM_CLASSES, SIZE = 1, 9, 64
PARAM_TOLERANCE = 0.03  # papers round to 0.1M and count 150/1000-class heads; our heads have 9 classes


def test_zoo_is_registered():
    assert set(ZOO) <= set(available_models())
    for name in ZOO:
        info = get_model_info(name)
        assert info.family in {"cnn", "transformer", "hybrid"}, name
        assert info.description and info.paper, name


@pytest.mark.parametrize("name", ZOO)
def test_paper_size_build_and_param_count(name):
    info = get_model_info(name)
    params_m = count_params_of(name, IN_CH, NUM_CLASSES, (224, 224)) / 1e6
    assert params_m > 1.0
    if info.paper_params_m is not None:
        assert params_m == pytest.approx(info.paper_params_m, rel=PARAM_TOLERANCE), (
            f"{name}: {params_m:.2f}M parameters, paper reports {info.paper_params_m}M"
        )


@pytest.mark.parametrize("name", ZOO)
def test_forward_train_step_and_onnx_parity(name, tmp_path):
    info = get_model_info(name)
    torch.manual_seed(0)
    model = build_model(name, IN_CH, NUM_CLASSES, (SIZE, SIZE), **REDUCED.get(name, {}))
    x = torch.randn(2, IN_CH, SIZE, SIZE)
    y = torch.randint(0, NUM_CLASSES, (2, SIZE, SIZE))

    # One SGD step with the pipeline's kind of loss (per-pixel CE on the logits).
    model.train()
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES, SIZE, SIZE)
    loss = F.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
    nonzero = sum(bool(g.abs().sum() > 0) for g in grads)
    n_tensors = sum(1 for _ in model.parameters())
    # Mask R-CNN's RPN/box branch is not on the semantic path; everything else must get a gradient.
    assert nonzero >= 0.8 * n_tensors, f"{name}: only {nonzero}/{n_tensors} parameter tensors got a gradient"
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    # Export the eval-mode network and compare with onnxruntime (relative to the logit scale: untrained BatchNorm
    # statistics make some deep nets' eval logits large).
    model.eval()
    onnx_path = export_onnx(model, IN_CH, (SIZE, SIZE), tmp_path / f"{name}.onnx", dynamic_hw=info.dynamic_hw)
    session = ort_session(onnx_path)
    sizes = [(SIZE, SIZE)] + ([(SIZE + 32, SIZE)] if info.dynamic_hw else [])
    for h, w in sizes:
        probe = torch.randn(1, IN_CH, h, w)
        with torch.no_grad():
            scale = max(1.0, float(model(probe).abs().max()))
        diff = onnx_max_abs_diff(model, onnx_path, probe, session=session)
        assert math.isfinite(diff) and diff <= 1e-4 * scale, f"{name} at {h}x{w}: ONNX differs by {diff} (scale {scale})"


# Narrow widths and single blocks for the size contract only: every registered network, batch 1, the smallest sizes.
TINY = {
    "unet": {"base_channels": 4}, "unetpp": {"base_channels": 4},
    **{name: {"decoder_channels": (8, 8, 8, 8, 8)} for name in (
        "unet_resnet18", "unet_resnet34", "unet_resnet50", "unet_resnet152", "unetpp_resnet50", "unet_effb5",
        "unet_effb7", "unet_mit_b2")},
    **{name: {"decoder_segmentation_channels": 16} for name in ("segformer_b0", "segformer_b2", "segformer_b4")},
    "transunet_r50_vit": {"depth": 1, "decoder_channels": (8, 8, 8, 8)},
    "swin_unet": {"embed_dim": 24, "depths": (1, 1, 1, 1)},
    "upernet_deit_s": {"depth": 4, "head_channels": 16}, "upernet_deit_b": {"depth": 4, "head_channels": 16},
    "upernet_beit_b": {"depth": 3, "head_channels": 16}, "upernet_beit_l": {"depth": 3, "head_channels": 16},
    "mask2former_r50": {"depths": (1, 1, 1, 1), "num_queries": 8},
    "mask2former_swin_l": {"depths": (1, 1, 1, 1), "embed_dim": 48, "num_queries": 8},
    "maskrcnn_r101_fpn": {}, "maskrcnn_x101_fpn": {},
    "transnext_base_standin": {"backbone": "pvt_v2_b0", "head_channels": 16},
    "vm_unet": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 4},
    "mamba_unet": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 4},
    "swin_umamba": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 4},
    "msvm_unet": {"dims": 16, "depths": [1, 1, 1, 1], "d_state": 2},
    "umamba_bot": {"base_channels": 8, "max_channels": 32, "d_state": 4},
}  # fmt: skip
TINY.update({f"{name}_nomamba": TINY[name] for name in ("vm_unet", "mamba_unet", "swin_umamba", "msvm_unet",
                                                        "umamba_bot")})


def test_every_registered_model_has_tiny_size_options():
    assert set(TINY) == set(available_models()), "a new model needs an entry in TINY (its size contract is tested)"


@pytest.mark.parametrize("name", sorted(TINY))
def test_size_multiple_gives_same_hw(name):
    """At 2 x size_multiple the network returns the input's H, W; a dynamic-H/W network also at 3 x (odd factor:
    a stride that the declared multiple understates fails there)."""
    from medseg.models import size_multiple_of

    info = get_model_info(name)
    m = info.size_multiple
    torch.manual_seed(0)
    model = build_model(name, 1, 2, (2 * m, 2 * m), **TINY[name]).eval()
    assert (2 * m) % size_multiple_of(name, (2 * m, 2 * m), **TINY[name]) == 0
    sizes = [(2 * m, 2 * m)] + ([(3 * m, 2 * m)] if info.dynamic_hw else [])
    with torch.no_grad():
        for h, w in sizes:
            assert model(torch.randn(1, 1, h, w)).shape == (1, 2, h, w), f"{name} at {h}x{w}"


def test_size_multiple_follows_the_options_that_change_the_stride():
    from medseg.models import size_multiple_of

    assert size_multiple_of("unet", (64, 64)) == 16 and size_multiple_of("unet", (64, 64), depth=5) == 32
    assert size_multiple_of("unet_resnet18", (64, 64), encoder_depth=4) == 16
    assert size_multiple_of("swin_unet", (64, 64), depths=(2, 2, 2)) == 16
    assert size_multiple_of("umamba_bot", (224, 224)) == 32  # 6 stages
    with torch.no_grad():
        for name, options in (("vm_unet", {"patch_size": 2}), ("umamba_bot", {})):  # stride 16 at these sizes
            assert size_multiple_of(name, (64, 64), **options) == 16
            model = build_model(name, 1, 2, (64, 64), **{**TINY[name], **options}).eval()
            assert model(torch.randn(1, 1, 48, 48)).shape == (1, 2, 48, 48)
