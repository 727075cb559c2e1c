"""The one slice inferer: a normalised (D, C, H, W) volume through any network, batch by batch, back to labels at
the native slice size. numpy only, so `medseg predict` (ONNX Runtime) and everything PyTorch runs (training's
validation, evaluation, cross-validation, export's parity, the report's figures) segment through the same code;
the network is a `Runner`: float32 (N, C, h, w) at the training size in, float32 logits (N, K, h, w) out
(`medseg.inference.torch_backend.torch_runner` for a torch module, `medseg.deployment.predict.Predictor` for an ONNX session).

Per batch of slices (`medseg.data.preprocessing`): the 2.5D stack resized to the training size, the network, the
logits resized back (bilinear), then argmax. Under a planned recipe (`plan`, medseg.data.plan) the stack is resized
to the slice's size at the plan's target spacing instead, and the network slides over it patch by patch with
Gaussian weighting (medseg.inference.sliding); with `mirror_axes` (test-time mirroring, as nnU-Net) the softmax of
every mirrored run, flipped back and averaged, then argmax.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from medseg.data.plan import SlicePlan
from medseg.data.preprocessing import argmax_classes, logits_to_labels, network_input, probabilities_at
from medseg.inference.sliding import sliding_window

Runner = Callable[[np.ndarray], np.ndarray]
NO_MIRRORING: tuple[tuple[int, ...], ...] = ((),)


def segment_slices(run: Runner, image: np.ndarray, image_size: Sequence[int], context: int = 0,
                   batch_size: int = 32, *, probabilities: Any = None,
                   mirror_axes: Sequence[tuple[int, ...]] = NO_MIRRORING, deadline: Any = None,
                   plan: SlicePlan | None = None, spacing: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """(class indices (D, H, W) uint8, probabilities (D, K, H, W) of dtype `probabilities`, or None when it is
    None) for a normalised `image` (D, C, H, W). `mirror_axes` lists the flips of (N, C, h, w) to average over
    (`NO_MIRRORING`: one plain run); `deadline.check(progress)` is called before each batch. A planned `plan`
    needs the volume's (sz, sy, sx) `spacing`; without a plan (or a resize plan) slices go to `image_size`."""
    depth, _, height, width = image.shape
    size = (height, width)
    if plan is not None and plan.planned:
        if spacing is None:
            raise ValueError("segment_slices: a planned recipe needs the volume's spacing")
        image_size = plan.slice_shape(size, tuple(spacing)[-2:])
        run = sliding_window(run, plan.image_size, plan.tile_step)
    classes = np.empty((depth, height, width), dtype=np.uint8)
    probs: np.ndarray | None = None
    mirrored = tuple(mirror_axes) != NO_MIRRORING
    for start in range(0, depth, batch_size):
        if deadline is not None:
            deadline.check(f"{start} of {depth} slices segmented")
        batch = slice(start, min(start + batch_size, depth))
        x = network_input(image, list(range(batch.start, batch.stop)), context, image_size)
        if mirrored:  # nnU-Net averages the softmax of every mirrored prediction, flipped back, then takes argmax
            p = sum(np.flip(probabilities_at(run(np.flip(x, axes)), size), axes) for axes in mirror_axes)
            p = p / len(mirror_axes)
            classes[batch] = argmax_classes(p)
        else:
            logits = run(x)
            classes[batch] = logits_to_labels(logits, size)
            p = probabilities_at(logits, size) if probabilities is not None else None
        if probabilities is not None:
            if probs is None:
                probs = np.empty((depth, p.shape[1], height, width), dtype=probabilities)
            probs[batch] = p
    return classes, probs
