"""How slices meet a network: the recipe a model is trained and applied with, planned from the dataset.

Two recipes (`data.recipe`):
- `resize` (TransUNet's, the seed's Synapse protocol): every slice resized to `data.image_size`; an epoch is one
  pass over the training slices; inference resizes each slice the same way and the logits back.
- `planned` (nnU-Net's 2D recipe, the default `medseg dataset init` writes): from the dataset fingerprint, a target
  in-plane spacing (the median; coarser only where the median slice would exceed `max_image_side`), a patch size
  (the median slice at that spacing, aspect ratio kept, shrunk to the `max_patch_pixels` budget, rounded to the
  network's size multiple) and a batch size (`batch_pixels` per optimizer step, at least 2, at most 5 % of the
  dataset's pixels as nnU-Net caps it). Training samples patches with foreground oversampling, `train.steps_per_epoch`
  optimizer steps per epoch; inference resamples each slice to the target spacing and slides the patch over it with
  Gaussian weighting (medseg.inference.sliding), then resamples the logits back to the slice.

A `SlicePlan` is what a checkpoint and the model card carry, so evaluation and `medseg predict` apply the recipe the
model was trained with. numpy only (the deployment path imports it without torch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medseg.errors import ConfigError

RECIPES = ("resize", "planned")


@dataclass(frozen=True)
class SlicePlan:
    recipe: str = "resize"
    # the network's input size: the size every slice is resized to (resize) or the patch size (planned)
    image_size: tuple[int, int] = (224, 224)
    target_spacing: tuple[float, float] | None = None  # planned: in-plane (row, column) spacing, mm
    batch_size: int | None = None  # planned: patches per optimizer step
    foreground_oversample: float = 0.0  # planned: fraction of patches centred on a foreground pixel
    tile_step: float = 0.5  # planned: sliding-window step as a fraction of the patch

    @property
    def planned(self) -> bool:
        return self.recipe == "planned"

    def slice_shape(self, native: Sequence[int], spacing: Sequence[float]) -> tuple[int, int]:
        """The size a (H, W) slice of in-plane spacing (sy, sx) is brought to before the network sees it: the
        network's size (resize), or the slice at the target spacing (planned; at least one pixel per axis)."""
        if not self.planned:
            return (int(self.image_size[0]), int(self.image_size[1]))
        return tuple(max(1, int(round(int(n) * float(s) / float(t))))  # type: ignore[return-value]
                     for n, s, t in zip(native, spacing, self.target_spacing))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["target_spacing"] = None if self.target_spacing is None else list(self.target_spacing)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, image_size: Sequence[int], source: str = "") -> "SlicePlan":
        """The plan a checkpoint or card records; none recorded (written before plans existed): resize at
        `image_size`."""
        if not data:
            return cls("resize", (int(image_size[0]), int(image_size[1])))
        recipe = str(data.get("recipe", "resize"))
        if recipe not in RECIPES:
            raise ConfigError(f"{source}: unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
        spacing = data.get("target_spacing")
        if recipe == "planned" and not (isinstance(spacing, (list, tuple)) and len(spacing) == 2
                                        and all(float(s) > 0 for s in spacing)):
            raise ConfigError(f"{source}: a planned recipe needs target_spacing [row, column] > 0, got {spacing!r}")
        size = data.get("image_size") or image_size
        return cls(recipe, (int(size[0]), int(size[1])),
                   None if spacing is None else (float(spacing[0]), float(spacing[1])),
                   None if data.get("batch_size") is None else int(data["batch_size"]),
                   float(data.get("foreground_oversample", 0.0)), float(data.get("tile_step", 0.5)))


def plan_slices(data: Any, fingerprint: Mapping[str, Any], multiple_of: Callable[[tuple[int, int]], int],
                source: str = "params.yaml") -> SlicePlan:
    """The plan for `data` (DataSettings: recipe, image_size, plan) on the dataset of `fingerprint`
    (medseg.data.fingerprint: per-case (sz, sy, sx) spacings and (D, H, W) shapes), for a network whose H and W
    must be multiples of `multiple_of(size)`."""
    if data.recipe == "resize":
        return SlicePlan("resize", (int(data.image_size[0]), int(data.image_size[1])))
    plan = data.plan
    spacings = np.asarray(fingerprint["spacing"]["all"], dtype=np.float64).reshape(-1, 3)[:, 1:]
    shapes = np.asarray(fingerprint["shape"]["all"], dtype=np.float64).reshape(-1, 3)
    if not len(spacings):
        raise ConfigError(f"{source}: data.recipe planned: the fingerprint holds no case to plan from")
    if plan.target_spacing is not None:
        if len(plan.target_spacing) != 2 or min(plan.target_spacing) <= 0:
            raise ConfigError(f"{source}: data.plan.target_spacing must be [row, column] mm > 0, "
                              f"got {plan.target_spacing}")
        target = np.asarray(plan.target_spacing, dtype=np.float64)
    else:
        target = np.median(spacings, axis=0)
        median = np.median(shapes[:, 1:] * spacings / target, axis=0)
        if median.max() > plan.max_image_side:  # too large for the budget: a coarser grid, aspect ratio kept
            target = target * (median.max() / plan.max_image_side)
    planned = shapes[:, 1:] * spacings / target  # every case's slice at the target spacing
    median = np.maximum(np.median(planned, axis=0), 1.0)
    patch = _patch_size(plan, median, multiple_of, source)
    pixels = patch[0] * patch[1]
    if plan.batch_size is not None:
        batch = int(plan.batch_size)
    else:  # nnU-Net: at most 5 % of the dataset's pixels per step, at least 2 patches
        dataset_pixels = float(np.sum(planned[:, 0] * planned[:, 1] * shapes[:, 0]))
        batch = max(2, min(plan.batch_pixels // pixels, int(0.05 * dataset_pixels / pixels)))
    if batch < 1:
        raise ConfigError(f"{source}: data.plan.batch_size must be >= 1, got {batch}")
    if not 0 <= plan.foreground_oversample <= 1:
        raise ConfigError(f"{source}: data.plan.foreground_oversample must be in [0, 1], "
                          f"got {plan.foreground_oversample}")
    if not 0 < plan.tile_step <= 1:
        raise ConfigError(f"{source}: data.plan.tile_step must be in (0, 1], got {plan.tile_step}")
    return SlicePlan("planned", patch, (round(float(target[0]), 6), round(float(target[1]), 6)), batch,
                     float(plan.foreground_oversample), float(plan.tile_step))


def _patch_size(plan: Any, median: np.ndarray, multiple_of: Callable[[tuple[int, int]], int],
                source: str) -> tuple[int, int]:
    if plan.patch_size is not None:
        if len(plan.patch_size) != 2 or min(plan.patch_size) < 1:
            raise ConfigError(f"{source}: data.plan.patch_size must be [rows, columns] >= 1, got {plan.patch_size}")
        patch = (int(plan.patch_size[0]), int(plan.patch_size[1]))
        m = multiple_of(patch)
        if patch[0] % m or patch[1] % m:
            raise ConfigError(f"{source}: data.plan.patch_size {patch[0]}x{patch[1]} is not a multiple of "
                              f"{m}, this network's size multiple")
        return patch
    want = median * min(1.0, math.sqrt(plan.max_patch_pixels / float(median[0] * median[1])))
    patch = (int(want[0]), int(want[1]))
    for _ in range(8):  # a size rule may change the multiple with the size: until it holds
        m = multiple_of((max(patch[0], 1), max(patch[1], 1)))
        rounded = tuple(max(m, int(round(p / m)) * m) for p in want)
        while rounded[0] * rounded[1] > max(plan.max_patch_pixels, m * m):  # round() went over: shrink the longer side
            i = 0 if rounded[0] >= rounded[1] else 1
            if rounded[i] <= m:
                break
            rounded = tuple(r - m if j == i else r for j, r in enumerate(rounded))
        if rounded == patch:
            break
        patch = rounded  # type: ignore[assignment]
    return patch  # type: ignore[return-value]


MIN_OPTIMIZER_STEPS = 250  # one nnU-Net epoch; fewer and a network has barely begun to learn


@dataclass(frozen=True)
class Budget:
    """A training run's budget in optimizer steps: what the stage log, `medseg doctor` and the report say."""

    recipe: str
    epochs: int
    steps_per_epoch: int
    batch_size: int
    input_size: tuple[int, int]

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def describe(self) -> str:
        items = "patches" if self.recipe == "planned" else "slices"
        return (f"{self.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps:,} optimizer steps of "
                f"{self.batch_size} {items} {self.input_size[0]}x{self.input_size[1]} ({self.recipe} recipe)")

    def warnings(self, training_pixels: float | None = None) -> list[str]:
        """Why this budget is too small for the dataset (`training_pixels`: its training slices' pixels at the
        network's resolution), as sentences."""
        found = []
        hint = ("raise train.steps_per_epoch or train.epochs" if self.recipe == "planned" else
                "raise train.epochs, or use data.recipe: planned (a fixed number of steps per epoch)")
        if self.total_steps < MIN_OPTIMIZER_STEPS:
            found.append(f"{self.total_steps:,} optimizer steps is too few to train a network (fewer than "
                         f"{MIN_OPTIMIZER_STEPS}, one nnU-Net epoch; nnU-Net trains 250,000): {hint}")
        seen = float(self.total_steps) * self.batch_size * self.input_size[0] * self.input_size[1]
        if training_pixels and seen < training_pixels:
            found.append(f"the {self.total_steps:,} steps show the network {seen / training_pixels:.0%} of the "
                         f"training pixels: part of the data is never seen; {hint}")
        return found


def budget_of(plan: SlicePlan, train: Any, training_slices: int, world: int = 1) -> Budget:
    """The budget of training under `plan` with `train` (TrainSettings) on `training_slices` slices: a planned
    epoch is train.steps_per_epoch steps; a resize epoch one pass (slices // batch per rank, at least 1, cut to
    train.max_steps_per_epoch)."""
    if plan.planned:
        return Budget("planned", int(train.epochs), int(train.steps_per_epoch), int(plan.batch_size or 2),
                      plan.image_size)
    per_rank = max(int(training_slices) // max(int(world), 1), 1)
    steps = max(1, per_rank // int(train.batch_size))
    if train.max_steps_per_epoch:
        steps = min(steps, int(train.max_steps_per_epoch))
    return Budget("resize", int(train.epochs), steps, int(train.batch_size), plan.image_size)
