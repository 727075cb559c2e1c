"""Unit tests of the model building blocks written here and of the complexity counters (fast, tiny tensors).

Every registry entry's build / training step / ONNX parity is in test_model_zoo.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model_zoo import _one_torch_thread  # noqa: F401  (autouse fixture: one torch thread)
from torch import nn

from medseg.errors import ConfigError
from medseg.models import build_model
from medseg.models.complexity import count_gflops, count_params, count_params_of
from medseg.models.timm_models import (
    PatchExpand,
    UperHead,
    _pixel_shuffle_nhwc,
    adaptive_avg_pool,
    beit_indices,
    deit_indices,
)
from medseg.models.unet import UNet, UNetPlusPlus


# ------------------------------------------------------------------------------------------------ complexity
def test_count_params_counts_shared_parameters_once():
    conv = nn.Conv2d(3, 4, 3)  # 3*4*9 weights + 4 biases
    shared = nn.Sequential(conv, nn.ReLU(), conv)
    assert count_params(conv) == 3 * 4 * 9 + 4
    assert count_params(shared) == count_params(conv)
    conv.bias.requires_grad_(False)
    assert count_params(conv, trainable_only=True) == 3 * 4 * 9


def test_count_gflops_is_multiply_adds_and_restores_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    model.train()
    macs = 8 * 3 * 9 * 16 * 16 + 8 * 16 * 16 * 10  # one multiply-add per weight per output position
    assert count_gflops(model, (1, 3, 16, 16)) == pytest.approx(macs / 1e9)
    assert count_gflops(model, (2, 3, 16, 16)) == pytest.approx(2 * macs / 1e9)  # whole batch
    assert model.training


def test_count_params_of_matches_a_real_build():
    # Meta-device counting must agree with an allocated network (here a small U-Net).
    real = build_model("unet", 1, 3, (32, 32), base_channels=8)
    assert count_params_of("unet", 1, 3, (32, 32), base_channels=8) == count_params(real)


# ------------------------------------------------------------------------------------------------ U-Net family
def test_unet_keeps_input_size_and_scales_with_base_channels():
    net = UNet(2, 5, base_channels=4)
    assert net(torch.randn(1, 2, 48, 80)).shape == (1, 5, 48, 80)
    # Conv weights grow with the square of the width: doubling base channels ~ quadruples the count.
    ratio = count_params(UNet(2, 5, base_channels=8)) / count_params(net)
    assert 3.5 < ratio < 4.1


def test_unet_batch_norm_option_and_paper_widths():
    plain = UNet(1, 2, base_channels=64, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert max(c.out_channels for c in convs) == 1024  # 64 -> 1024 over 4 poolings, as in the paper's figure 1
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in plain.modules()) == 4
    assert any(isinstance(m, nn.BatchNorm2d) for m in UNet(1, 2, base_channels=4).modules())


def test_unetpp_nodes_and_deep_supervision():
    net = UNetPlusPlus(1, 3, base_channels=4)
    assert [len(level) for level in net.nodes] == [5, 4, 3, 2, 1]  # X[i][j] for i + j <= 4
    # X[0][4] concatenates X[0][0..3] and the upsampled X[1][3]: 5 * base channels in
    assert net.nodes[0][4][0].in_channels == 5 * 4
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)

    deep = UNetPlusPlus(1, 3, base_channels=4, deep_supervision=True)
    assert len(deep.heads) == 4
    deep(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in deep.heads)  # every head is in the output


def test_size_multiple_is_enforced():
    with pytest.raises(ConfigError, match="multiples of 16"):
        build_model("unet", 1, 2, (40, 40), base_channels=4)
    with pytest.raises(ConfigError, match="depth 5 needs image_size multiples of 32"):
        build_model("unetpp", 1, 2, (48, 48), base_channels=4, depth=5)
    assert build_model("unet", 1, 2, (32, 32), base_channels=2, depth=5)(torch.randn(2, 1, 32, 32)).shape[-2:] == (32, 32)


def test_smp_errors_become_config_errors():
    with pytest.raises(ConfigError, match="resnet18.*Wrong pretrained weights"):
        build_model("unet_resnet18", 1, 2, (32, 32), encoder_weights="no-such-weights")
    with pytest.raises(ConfigError, match="decoder_channels"):
        build_model("unet_resnet18", 1, 2, (32, 32), decoder_channels=(8,))


# ------------------------------------------------------------------------------------------------ zoo blocks
@pytest.mark.parametrize("hw", [(7, 7), (7, 5), (2, 2), (14, 9), (6, 12)])
@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_pytorch(hw, size):
    x = torch.randn(2, 3, *hw)
    torch.testing.assert_close(adaptive_avg_pool(x, size), F.adaptive_avg_pool2d(x, size))


def test_pixel_shuffle_nhwc_is_the_swin_unet_rearrange():
    b, h, w, s, c = 2, 3, 4, 2, 5
    x = torch.randn(b, h, w, s * s * c)
    out = _pixel_shuffle_nhwc(x, s)
    assert out.shape == (b, h * s, w * s, c)
    # einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c'
    for i in range(s):
        for j in range(s):
            torch.testing.assert_close(out[:, i::s, j::s, :], x[..., (i * s + j) * c: (i * s + j + 1) * c])


def test_patch_expand_doubles_the_grid():
    assert PatchExpand(16, 8, 2)(torch.randn(1, 3, 5, 16)).shape == (1, 6, 10, 8)
    assert PatchExpand(8, 8, 4)(torch.randn(1, 3, 5, 8)).shape == (1, 12, 20, 8)


def test_uper_head_output_is_at_the_finest_level():
    feats = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((8, 16, 32, 64))]
    head = UperHead([8, 16, 32, 64], num_classes=4, channels=16)
    assert head(feats).shape == (2, 4, 32, 32)


def test_vit_feature_block_indices_follow_mmseg_and_beit():
    assert deit_indices(12) == [2, 5, 8, 11]
    assert beit_indices(12) == [3, 5, 7, 11]
    assert beit_indices(24) == [7, 11, 15, 23]


def test_transunet_decoder_uses_three_cnn_skips():
    net = build_model("transunet_r50_vit", 1, 2, (32, 32), depth=1)
    in_chs = [block.conv1[0].in_channels for block in net.blocks]
    # upsampled channels + skip channels: 512+512 (1/8), 256+256 (1/4), 128+64 (1/2), 64+0 (full resolution)
    assert in_chs == [1024, 512, 192, 64]


def test_options_reach_the_timm_backbone():
    net = build_model("upernet_deit_s", 1, 2, (32, 32), depth=4)
    assert len(net.backbone.vit.blocks) == 4
    assert net.backbone.indices == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ detection
def test_mask2former_output_is_log_of_the_semantic_map():
    torch.manual_seed(0)
    net = build_model("mask2former_r50", 1, 3, (64, 64), depths=(1, 1, 1, 1), num_queries=8).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        out = net(x)
        raw = net.net(pixel_values=x)
    semantic = torch.einsum(
        "bqc,bqhw->bchw", raw.class_queries_logits.softmax(-1)[..., :-1], raw.masks_queries_logits.sigmoid()
    )
    expected = F.interpolate(semantic, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.exp(), expected.clamp_min(1e-6), rtol=1e-4, atol=1e-6)


def test_maskrcnn_detect_and_instance_losses():
    torch.manual_seed(0)
    net = build_model("maskrcnn_r101_fpn", 1, 3, (64, 64))
    x = torch.rand(2, 1, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 20:40] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2]), "masks": masks}
    losses = net.instance_losses(x, [target, target])
    assert {"loss_mask", "loss_classifier", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())

    net.eval()
    scores = net.detect(x)
    assert scores.shape == (2, 3, 64, 64)
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    # background is the complement of the strongest class
    torch.testing.assert_close(scores[:, 0], 1 - scores[:, 1:].amax(1))
