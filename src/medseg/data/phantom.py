"""Built-in stand-in dataset: synthetic abdominal CT-like volumes in the Synapse raw layout.

Each case is an axial stack through a body outline (air outside, subcutaneous fat ring, abdominal wall
muscle, intra-abdominal fat/bowel) holding ellipsoidal organs at anatomically plausible places with contrast-enhanced HU
values, a vertebra and psoas muscles (unlabelled), partial-volume blur and scanner noise. Organ centres, radii and the body size jitter per
case; everything is a pure function of the seed, so regenerating gives byte-identical files.

Files: `img/img0001.nii.gz` (int16 HU) and `label/label0001.nii.gz` (uint8, raw Synapse label values),
spacing written in the affine and header zooms. Image axes follow NIfTI (x, y, z); in an axial slice x runs
from the patient's right (image left) to the left, y from anterior to posterior.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.config import settings
from medseg.errors import ConfigError
from medseg.io import atomic_dir, write_json
from medseg.layout import PHANTOM_DIR
from medseg.runtime.progress import progress

# Raw Synapse label values (the BTCV abdomen challenge numbering).
SYNAPSE_LABELS = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_splenic_vein",
    11: "pancreas",
    12: "adrenal_right",
    13: "adrenal_left",
}

AIR_HU = -1000.0
FAT_HU = -100.0
ABDOMEN_HU = -60.0  # intra-abdominal fat mixed with bowel: darker than every labelled organ
MUSCLE_HU = 50.0  # abdominal wall and psoas: unlabelled soft tissue as bright as some organs
BONE_HU = 650.0
NOISE_HU = 14.0


@dataclass(frozen=True)
class Organ:
    label: int
    hu: float
    centre: tuple[float, float, float]  # (u, v, w): u, v in [-1, 1] across the slice, w in [0, 1] along z
    radii: tuple[float, float, float]
    angle_deg: float = 0.0  # in-plane rotation, for elongated organs (pancreas)


# Painted in this order; a later organ only takes voxels no earlier organ holds, so labels never overlap.
# Small organs go first so that the large ones (liver, stomach) wrap around them.
ORGANS: tuple[Organ, ...] = (
    Organ(8, 210.0, (0.06, 0.30, 0.50), (0.055, 0.055, 0.70)),  # aorta: bright tube along z
    Organ(9, 150.0, (-0.14, 0.27, 0.50), (0.065, 0.045, 0.70)),  # IVC (unmapped in the 8-organ protocol)
    Organ(5, 45.0, (0.08, 0.22, 0.92), (0.035, 0.035, 0.14)),  # esophagus (unmapped), top slices only
    Organ(4, 10.0, (-0.28, -0.30, 0.42), (0.085, 0.065, 0.16)),  # gallbladder: small, fluid-dense
    Organ(11, 95.0, (0.10, 0.10, 0.42), (0.26, 0.055, 0.16), angle_deg=-15.0),  # pancreas: thin, elongated
    Organ(2, 185.0, (-0.38, 0.36, 0.38), (0.10, 0.13, 0.24)),  # right kidney (image left)
    Organ(3, 185.0, (0.38, 0.36, 0.44), (0.10, 0.13, 0.24)),  # left kidney
    Organ(1, 125.0, (0.56, 0.16, 0.70), (0.14, 0.20, 0.24)),  # spleen
    Organ(7, 30.0, (0.30, -0.26, 0.70), (0.22, 0.15, 0.24)),  # stomach: water-dense contents
    Organ(6, 105.0, (-0.40, -0.04, 0.68), (0.32, 0.34, 0.36)),  # liver: largest
)

BODY_RADII = (0.88, 0.66)
FAT_RING = 0.10  # thickness of subcutaneous fat, as a fraction of the body radii
WALL_RING = 0.05  # abdominal wall muscle inside the fat


def _grid(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nx, ny, nz = shape
    u = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[:, None, None]
    v = np.linspace(-1.0, 1.0, ny, dtype=np.float32)[None, :, None]
    w = ((np.arange(nz, dtype=np.float32) + 0.5) / nz)[None, None, :]
    return u, v, w


def _ellipsoid(grid, centre, radii, angle_deg=0.0) -> np.ndarray:
    u, v, w = grid
    du, dv = u - centre[0], v - centre[1]
    if angle_deg:
        a = np.deg2rad(angle_deg)
        du, dv = du * np.cos(a) + dv * np.sin(a), -du * np.sin(a) + dv * np.cos(a)
    return (du / radii[0]) ** 2 + (dv / radii[1]) ** 2 + ((w - centre[2]) / radii[2]) ** 2 <= 1.0


def make_phantom_case(shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image int16 HU, label uint8 raw Synapse values) pair of the given (x, y, z) shape."""
    shape = tuple(int(s) for s in shape)
    grid = _grid(shape)
    u, v, w = grid
    body_scale = rng.uniform(0.92, 1.05)
    bx, by = BODY_RADII[0] * body_scale, BODY_RADII[1] * body_scale
    ones = np.ones(shape, dtype=bool)
    body = ((u / bx) ** 2 + (v / by) ** 2 <= 1.0) & ones
    wall = ((u / (bx * (1 - FAT_RING))) ** 2 + (v / (by * (1 - FAT_RING))) ** 2 <= 1.0) & ones
    shrink = 1 - FAT_RING - WALL_RING
    inner = ((u / (bx * shrink)) ** 2 + (v / (by * shrink)) ** 2 <= 1.0) & ones

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body] = FAT_HU
    image[wall] = MUSCLE_HU
    image[inner] = ABDOMEN_HU
    # Unlabelled structures no organ may take: vertebral body (bone) and the psoas muscles beside it.
    vertebra = _ellipsoid(grid, (0.0, 0.52 * body_scale, 0.5), (0.11, 0.09, 10.0)) & inner
    psoas = (
        _ellipsoid(grid, (-0.19 * body_scale, 0.50 * body_scale, 0.5), (0.07, 0.06, 10.0))
        | _ellipsoid(grid, (0.19 * body_scale, 0.50 * body_scale, 0.5), (0.07, 0.06, 10.0))
    ) & inner & ~vertebra
    image[psoas] = MUSCLE_HU
    image[vertebra] = BONE_HU
    reserved = vertebra | psoas

    label = np.zeros(shape, dtype=np.uint8)
    shift = rng.uniform(-0.04, 0.04, size=2)  # whole-abdomen shift, organs keep their neighbourhood
    for organ in ORGANS:
        centre = (
            organ.centre[0] * body_scale + shift[0] + rng.uniform(-0.03, 0.03),
            organ.centre[1] * body_scale + shift[1] + rng.uniform(-0.03, 0.03),
            organ.centre[2] + rng.uniform(-0.05, 0.05),
        )
        radii = tuple(r * rng.uniform(0.85, 1.15) for r in organ.radii)
        mask = _ellipsoid(grid, centre, radii, organ.angle_deg + rng.uniform(-8, 8)) & inner
        mask &= (label == 0) & ~reserved
        label[mask] = organ.label
        image[mask] = organ.hu + rng.uniform(-8, 8)

    # Partial-volume blur in-plane, then scanner noise; air stays air-like.
    image = ndimage.gaussian_filter(image, sigma=(0.7, 0.7, 0.0))
    image += rng.normal(0.0, NOISE_HU, size=shape).astype(np.float32)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    affine[:3, 3] = -0.5 * np.asarray(spacing, dtype=float) * (np.asarray(shape, dtype=float) - 1)
    return affine


def generate_phantom_dataset(
    out_dir: str | Path,
    num_cases: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    seed: int,
) -> list[str]:
    """Write `num_cases` phantom cases into `out_dir` (built in a temp folder, swapped in whole).

    An existing `out_dir` is replaced only if medseg wrote it (`medseg.io.atomic_dir`'s marker); anything else
    raises OutputConflictError and is left as it is.

    Returns the case file stems (`0001`, ...). The same arguments always give byte-identical files.
    """
    if int(num_cases) < 1:
        raise ConfigError(f"phantom.num_cases must be >= 1, got {num_cases}")
    if len(shape) != 3 or min(int(s) for s in shape) < 2:
        raise ConfigError(f"phantom.shape must be [x, y, z] with every size >= 2, got {list(shape)}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ConfigError(f"phantom.spacing must be three positive numbers (mm), got {list(spacing)}")
    affine = _affine(spacing, shape)
    stems = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "img").mkdir()
        (tmp / "label").mkdir()
        for index in progress(range(1, int(num_cases) + 1), desc="phantom", unit="case"):
            # One stream per case: case k is the same whatever num_cases is.
            rng = np.random.default_rng([int(seed), index])
            image, label = make_phantom_case(shape, rng)
            stem = f"{index:04d}"
            for array, path in ((image, tmp / "img" / f"img{stem}.nii.gz"), (label, tmp / "label" / f"label{stem}.nii.gz")):
                nifti = nib.Nifti1Image(array, affine)
                nifti.header.set_zooms(tuple(float(s) for s in spacing))
                nifti.header.set_xyzt_units("mm")
                nifti.set_qform(affine, code=1)
                nifti.set_sform(affine, code=1)
                nib.save(nifti, path)
            stems.append(stem)
        write_json(
            tmp / "phantom.json",
            {
                "generator": "medseg.data.phantom",
                "num_cases": int(num_cases),
                "shape_xyz": [int(s) for s in shape],
                "spacing_mm": [float(s) for s in spacing],
                "seed": int(seed),
                "labels": {str(k): name for k, name in SYNAPSE_LABELS.items() if k in {o.label for o in ORGANS}},
            },
        )
    return stems


# PHANTOM_DIR, the phantom's one output, is fixed: the only raw folder medseg ever writes (see builtin/dvc.yaml).
# A user's dataset lives wherever `dataset.raw_dir` says and is only ever read.


def generate_from_params(params: dict[str, Any], root: str | Path = ".") -> Path:
    """Generate the phantom described by `params["phantom"]` into `<root>/data/phantom` (PHANTOM_DIR).

    `dataset.raw_dir` is not consulted: pointing it at a user's dataset must never make this write there.
    """
    phantom = settings(params).phantom
    out = Path(root) / PHANTOM_DIR
    generate_phantom_dataset(out, phantom.num_cases, phantom.shape, phantom.spacing, phantom.seed)
    return out
