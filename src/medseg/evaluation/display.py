"""How an image slice is shown in overlays and reports (one rule for every figure medseg draws)."""

from __future__ import annotations

import numpy as np


def display_slice(image_chw: np.ndarray) -> np.ndarray:
    """(C, H, W) network-input slice -> (H, W) grey or (H, W, 3) RGB, scaled to [0, 1].

    Three channels show as colour; any other count (multi-sequence MR, 2.5D stacks) as its first channel.
    """
    image_chw = np.asarray(image_chw, dtype=np.float32)
    img = np.moveaxis(image_chw, 0, -1) if image_chw.shape[0] == 3 else image_chw[0]
    lo, hi = float(np.min(img)), float(np.max(img))
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
