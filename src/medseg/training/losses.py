"""Cross-entropy + soft Dice, the TransUNet training loss (0.5 CE + 0.5 Dice in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.config import TrainSettings


class SoftDiceLoss(nn.Module):
    """Multi-class soft Dice on softmax probabilities, as TransUNet's DiceLoss.

    Per class c: 1 - (2 sum(p_c y_c) + eps) / (sum(p_c^2) + sum(y_c^2) + eps), the sums running over the
    whole batch and all pixels; averaged over classes. All classes count, background included, like
    TransUNet (`include_background=False` averages over the foreground classes only).
    """

    def __init__(self, num_classes: int, include_background: bool = True, smooth: float = 1e-5):
        super().__init__()
        self.num_classes = num_classes
        self.include_background = include_background
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        onehot = F.one_hot(target.long(), self.num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        dims = (0, 2, 3)
        intersect = (probs * onehot).sum(dims)
        denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
        per_class = 1.0 - (2.0 * intersect + self.smooth) / (denominator + self.smooth)
        if not self.include_background:
            per_class = per_class[1:]
        return per_class.mean()


class CEDiceLoss(nn.Module):
    """ce_weight * CrossEntropy + dice_weight * SoftDice."""

    def __init__(self, num_classes: int, ce_weight: float = 0.5, dice_weight: float = 0.5, include_background: bool = True):
        super().__init__()
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.dice = SoftDiceLoss(num_classes, include_background=include_background)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), target)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss


def build_loss(train: TrainSettings, num_classes: int) -> CEDiceLoss:
    """The loss params.yaml's `train` section asks for (medseg.config fills in the defaults)."""
    return CEDiceLoss(num_classes, ce_weight=train.ce_weight, dice_weight=train.dice_weight,
                      include_background=train.dice_include_background)
