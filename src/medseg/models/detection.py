"""Query- and instance-based segmenters turned into dense semantic segmenters (B, K, H, W).

Both are trained here with the pipeline's per-pixel CE + Dice loss, NOT with their own set/instance losses
(docs/models.md, "Deviations"):

- Mask2Former (transformers, built from a config, no weights): the semantic map of its post-processing,
  softmax(class)[..., :K] x sigmoid(mask) summed over queries, upsampled to the input; forward returns its log
  so that softmax(output) is that map normalised per pixel and argmax is unchanged.
- Mask R-CNN (torchvision, ResNet-101 / ResNeXt-101 32x8d FPN, no weights): forward applies the Mask R-CNN mask
  head densely (fully convolutionally) to every FPN level and sums them, like a Panoptic-FPN semantic branch built
  from Mask R-CNN's own layers. The full detector (RPN + box head + ROI mask head) is kept and usable through
  `MaskRCNNSemantic.detect` (score-weighted instance masks merged per class) and `instance_losses`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.table import register_model

# Probability floor before the log; the log keeps CE finite where every query says "no object".
_EPS = 1e-6


# --------------------------------------------------------------------------------------------- Mask2Former
class Mask2FormerSemantic(nn.Module):
    def __init__(self, config: Any):
        from transformers import Mask2FormerForUniversalSegmentation

        super().__init__()
        self.net = Mask2FormerForUniversalSegmentation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=x)
        classes = out.class_queries_logits.softmax(-1)[..., :-1]  # drop the "no object" class
        masks = out.masks_queries_logits.sigmoid()  # B, Q, H/4, W/4
        semantic = torch.einsum("bqc,bqhw->bchw", classes, masks)
        semantic = F.interpolate(semantic, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return semantic.clamp_min(_EPS).log()


def _mask2former_config(backbone_config: Any, num_classes: int, num_queries: int) -> Any:
    from transformers import Mask2FormerConfig
    from transformers.utils import logging as hf_logging

    # transformers warns that only Swin backbones are "supported"; the ResNet one works (tested), so keep logs clean.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # Decoder sizes are Mask2Former's defaults (hidden 256, 6 pixel-decoder layers, 9 masked-attention layers).
        return Mask2FormerConfig(
            backbone_config=backbone_config, num_labels=num_classes, num_queries=num_queries,
            use_pretrained_backbone=False,
        )
    finally:
        hf_logging.set_verbosity(verbosity)


@register_model(
    "mask2former_r50",
    family="transformer",
    description="Mask2Former (transformers, from config) with ResNet-50; semantic map of its queries as output",
    paper="Cheng et al. Mask2Former, CVPR 2022 (ADE20K semantic, 512x512)",
    paper_params_m=44.0,
    paper_gflops=71.0,
    paper_input=(512, 512),
    dynamic_hw=False,  # sine position encodings and deformable-attention offsets are traced for one size
    size_multiple=32,
)
def build_mask2former_r50(
    in_channels: int, num_classes: int, image_size: tuple[int, int], num_queries: int = 100,
    depths: Sequence[int] = (3, 4, 6, 3),
) -> nn.Module:
    from transformers import ResNetConfig

    backbone = ResNetConfig(
        num_channels=in_channels, depths=list(depths), hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerSemantic(_mask2former_config(backbone, num_classes, num_queries))


@register_model(
    "mask2former_swin_l",
    family="transformer",
    description="Mask2Former (transformers, from config) with Swin-L (window 12); semantic map of its queries",
    paper="Cheng et al. Mask2Former, CVPR 2022 (ADE20K semantic, Swin-L, 640x640)",
    paper_params_m=216.0,
    paper_gflops=868.0,
    paper_input=(640, 640),
    dynamic_hw=False,
    size_multiple=32,
)
def build_mask2former_swin_l(
    in_channels: int, num_classes: int, image_size: tuple[int, int], num_queries: int = 100, embed_dim: int = 192,
    depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (6, 12, 24, 48), window_size: int = 12,
) -> nn.Module:
    from transformers import SwinConfig

    backbone = SwinConfig(
        num_channels=in_channels, image_size=max(image_size), embed_dim=embed_dim, depths=list(depths),
        num_heads=list(num_heads), window_size=window_size, drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerSemantic(_mask2former_config(backbone, num_classes, num_queries))


# --------------------------------------------------------------------------------------------- Mask R-CNN
class MaskRCNNSemantic(nn.Module):
    """torchvision Mask R-CNN whose forward is a dense semantic head made of its own mask head (see module doc).

    Class index 0 is background in both views (torchvision's convention and medseg's).
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.detector.backbone(x)  # FPN levels "0".."3" (1/4..1/32) and "pool" (1/64)
        levels = [feats[k] for k in ("0", "1", "2", "3")]
        mask_head = self.detector.roi_heads.mask_head
        fused = mask_head(levels[0])
        for f in levels[1:]:
            fused = fused + F.interpolate(mask_head(f), size=fused.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.detector.roi_heads.mask_predictor(fused)  # x2 deconv + 1x1 conv: K maps at 1/2
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """The instance path (eval): each detected instance's mask, times its score, merged per class by max.

        Returns (B, K, H, W) scores in [0, 1]; background = 1 - max over the other classes.
        """
        was_training = self.training
        self.detector.eval()
        try:
            detections = self.detector(list(x))
        finally:
            self.detector.train(was_training)
        b, _, h, w = x.shape
        num_classes = self.detector.roi_heads.box_predictor.cls_score.out_features
        scores = x.new_zeros(b, num_classes, h, w)
        for i, det in enumerate(detections):
            weighted = det["masks"][:, 0] * det["scores"][:, None, None]  # N, H, W
            for label, mask in zip(det["labels"].tolist(), weighted):
                scores[i, label] = torch.maximum(scores[i, label], mask)
        scores[:, 0] = 1 - scores[:, 1:].amax(dim=1)
        return scores

    def instance_losses(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """torchvision's own RPN/box/mask losses for instance targets (boxes, labels, masks per image)."""
        self.detector.train()
        return self.detector(list(x), targets)


def _maskrcnn(backbone_name: str, in_channels: int, num_classes: int, image_size: tuple[int, int],
              pretrained: bool) -> MaskRCNNSemantic:
    from torchvision.models import resnet
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if pretrained:
        # torchvision's fine-tuning setting: ImageNet weights, frozen BatchNorm, stem and layer1 frozen.
        backbone = resnet_fpn_backbone(backbone_name=backbone_name, weights="DEFAULT", trainable_layers=3)
        mask_head = None
    else:
        # From scratch: GroupNorm in the backbone, the FPN and the mask head, the recipe of He et al., "Rethinking
        # ImageNet Pre-training" (ICCV 2019) for Mask R-CNN without pretraining. (BatchNorm would leave the eval
        # network unnormalised until its running statistics settle: logits ~1e5 at init for R101.)
        group_norm = partial(nn.GroupNorm, 32)
        body = resnet.__dict__[backbone_name](weights=None, norm_layer=group_norm)
        backbone = BackboneWithFPN(
            body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, [256, 512, 1024, 2048], 256,
            extra_blocks=LastLevelMaxPool(), norm_layer=group_norm,
        )
        mask_head = MaskRCNNHeads(256, [256] * 4, 1, norm_layer=group_norm)
    if in_channels != 3:
        old = backbone.body.conv1
        backbone.body.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                                        bias=False)
    # Images come normalised by the pipeline and at their final size: the detector's own transform is a no-op.
    detector = MaskRCNN(
        backbone, num_classes=num_classes, min_size=min(image_size), max_size=max(image_size),
        image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels, mask_head=mask_head,
    )
    # Detectron2's mask predictor init (N(0, 0.001)): near-zero logits at the start of training.
    nn.init.normal_(detector.roi_heads.mask_predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(detector.roi_heads.mask_predictor.mask_fcn_logits.bias)
    return MaskRCNNSemantic(detector)


_MASKRCNN_DOC = ("He et al. Mask R-CNN, ICCV 2017; torchvision implementation; trained here with a dense "
                 "semantic loss through its mask head (see docs/models.md)")


@register_model(
    "maskrcnn_r101_fpn",
    family="cnn",
    description="Mask R-CNN R101-FPN (torchvision); forward = its mask head applied densely to the FPN levels",
    paper=_MASKRCNN_DOC,
    size_multiple=32,
)
def build_maskrcnn_r101_fpn(
    in_channels: int, num_classes: int, image_size: tuple[int, int], pretrained: bool = False
) -> nn.Module:
    return _maskrcnn("resnet101", in_channels, num_classes, image_size, pretrained)


@register_model(
    "maskrcnn_x101_fpn",
    family="cnn",
    description="Mask R-CNN X101-32x8d-FPN (torchvision); forward = its mask head applied densely to the FPN levels",
    paper=_MASKRCNN_DOC,
    size_multiple=32,
)
def build_maskrcnn_x101_fpn(
    in_channels: int, num_classes: int, image_size: tuple[int, int], pretrained: bool = False
) -> nn.Module:
    return _maskrcnn("resnext101_32x8d", in_channels, num_classes, image_size, pretrained)
