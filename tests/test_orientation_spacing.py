"""Real-data ingest: one canonical orientation whatever the file's, unknown spacing never reported as mm."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re

import nibabel as nib
import numpy as np
import pytest
from test_ingest import SPACING, SYNAPSE_MAP, folder2d_params, make_kvasir, synapse_params, volume_pair, write_nifti

from medseg.data.cases import load_case
from medseg.data.ingest import ingest_dataset
from medseg.data.orientation import axcodes, from_canonical, to_canonical

RAS_AFFINE = np.array([[0.8, 0, 0, -4.0], [0, 0.9, 0, 7.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


def _affines_48():
    """Every axis permutation x flip (48) as an affine with distinct voxel sizes and an offset."""
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = 0
            for voxel_axis, (world_axis, sign) in enumerate(zip(perm, signs)):
                affine[world_axis, voxel_axis] = sign * (0.5 + voxel_axis)
            affine[:3, 3] = (12.0, -3.0, 40.0)
            yield affine


@pytest.mark.parametrize("channels", [None, 2])
def test_round_trip_is_exact_for_all_48_orientations(channels):
    rng = np.random.default_rng(0)
    shape = (3, 4, 5) + ((channels,) if channels else ())
    data = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    affines = list(_affines_48())
    assert len({axcodes(a) for a in affines}) == 48
    for affine in affines:
        canonical, canonical_affine, _ = to_canonical(data, affine)
        reference = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
        np.testing.assert_array_equal(canonical, np.asanyarray(reference.dataobj))
        np.testing.assert_allclose(canonical_affine, reference.affine)
        assert axcodes(canonical_affine) == "RAS"
        back = from_canonical(canonical, affine)
        assert back.dtype == data.dtype and back.shape == data.shape and np.array_equal(back, data), axcodes(affine)


def test_an_affine_without_orientation_is_refused():
    with pytest.raises(ValueError, match="no orientation"):
        to_canonical(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))


def _flip_xy(shape):
    """Voxel (i, j, k) of the flipped array is voxel (nx-1-i, ny-1-j, k) of the original."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = (shape[0] - 1, shape[1] - 1)
    return flip


def _zxy():
    """Voxel (k, i, j) of the array stored (z, x, y) is voxel (i, j, k) of the original."""
    permute = np.zeros((4, 4))
    permute[0, 1] = permute[1, 2] = permute[2, 0] = permute[3, 3] = 1.0
    return permute


def _write_case(root, image, label, affine, zooms):
    for folder, stem, data in (("img", "img", image), ("label", "label", label)):
        write_nifti(root / folder / f"{stem}0001.nii.gz", data, spacing=zooms, affine=affine)
    return root


def test_same_volume_in_ras_lps_and_permuted_axes_ingests_identically(tmp_path):
    image, label = volume_pair(1)  # (x, y, z) = (12, 10, 4)
    x, y, z = SPACING
    variants = {
        "RAS": (image, label, RAS_AFFINE, (x, y, z)),
        "LPS": (image[::-1, ::-1], label[::-1, ::-1], RAS_AFFINE @ _flip_xy(image.shape), (x, y, z)),
        "SRA": (image.transpose(2, 0, 1), label.transpose(2, 0, 1), RAS_AFFINE @ _zxy(), (z, x, y)),
    }
    lut = np.zeros(256, np.uint8)
    lut[list(SYNAPSE_MAP)] = list(SYNAPSE_MAP.values())
    results = {}
    for code, (img, lbl, affine, zooms) in variants.items():
        raw = _write_case(tmp_path / code, np.ascontiguousarray(img), np.ascontiguousarray(lbl), affine, zooms)
        case = ingest_dataset(synapse_params(), raw, tmp_path / f"out_{code}")["cases"][0]
        stored = nib.load(raw / "img" / "img0001.nii.gz")
        assert case["source_affine"] == stored.affine.tolist()  # the file's own, as nested lists
        assert case["source_shape"] == list(img.shape) and case["source_axcodes"] == code
        np.testing.assert_allclose(case["affine"], RAS_AFFINE, atol=1e-5)
        image_arr, label_arr, spacing = load_case(tmp_path / f"out_{code}", "case0001")
        results[code] = (np.array(image_arr), np.array(label_arr), spacing, case)
        # A prediction on the canonical arrays goes back into the file's voxel order exactly.
        mapped_source = from_canonical(np.asarray(label_arr).transpose(2, 1, 0), np.asarray(case["source_affine"]))
        assert mapped_source.shape == img.shape
        np.testing.assert_array_equal(mapped_source, lut[lbl])
    ras_image, ras_label, ras_spacing, _ = results["RAS"]
    for code in ("LPS", "SRA"):
        np.testing.assert_array_equal(results[code][0], ras_image)
        np.testing.assert_array_equal(results[code][1], ras_label)
        assert results[code][2] == ras_spacing == (z, y, x)


def test_ras_input_keeps_the_array_order_d_z_h_y_w_x(tmp_path):
    """A RAS volume is stored exactly as before reorientation existed: (z, c, y, x), same float32 bytes."""
    from medseg.data.phantom import generate_phantom_dataset

    raw = tmp_path / "phantom"
    generate_phantom_dataset(raw, 1, [20, 16, 6], [0.7, 0.8, 3.0], seed=0)
    case = ingest_dataset(synapse_params(), raw, tmp_path / "out")["cases"][0]
    assert case["source_axcodes"] == "RAS" and case["shape"] == [6, 16, 20] and case["spacing"] == [3.0, 0.8, 0.7]
    source = np.asanyarray(nib.load(raw / "img" / "img0001.nii.gz").dataobj).astype(np.float32)
    expected = ((np.clip(source, -125.0, 275.0) - -125.0) / 400.0).transpose(2, 1, 0)[:, None]
    image, _, _ = load_case(tmp_path / "out", "case0001")
    digest = hashlib.sha256(np.ascontiguousarray(expected).tobytes()).hexdigest()
    assert hashlib.sha256(np.asarray(image).tobytes()).hexdigest() == digest


# ------------------------------------------------------------------ spacing


def _write_unit_zooms(path, data, codes: bool, unit: str | None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.eye(4) if codes else None)
    if codes:
        img.set_sform(np.eye(4), code=1)
        img.set_qform(np.eye(4), code=1)
    else:
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
    if unit:
        img.header.set_xyzt_units(unit)
    nib.save(img, path)


@pytest.mark.parametrize(
    "codes, unit, known",
    [(False, None, False), (False, "mm", False), (True, None, False), (True, "mm", True)],
    ids=["no-sform-no-unit", "no-sform", "sform-no-unit", "sform-and-mm"],
)
def test_unit_zooms_are_unknown_spacing_unless_sform_and_unit(tmp_path, caplog, codes, unit, known):
    image, label = volume_pair(1)
    raw = tmp_path / "raw"
    for i in (1, 2):
        _write_unit_zooms(raw / "img" / f"img{i:04d}.nii.gz", image, codes, unit)
        _write_unit_zooms(raw / "label" / f"label{i:04d}.nii.gz", label, codes, unit)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        manifest = ingest_dataset(synapse_params(), raw, tmp_path / "out")
    assert [c["spacing_known"] for c in manifest["cases"]] == [known, known]
    assert all(c["spacing"] == [1.0, 1.0, 1.0] for c in manifest["cases"])
    assert json.loads((tmp_path / "out" / "fingerprint.json").read_text())["spacing_known"] is known
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if known:
        assert not warnings
    else:
        assert len(warnings) == 1 and str(raw) in warnings[0] and "2 of 2 cases" in warnings[0]


def test_formats_without_spacing_warn_once(tmp_path, caplog):
    raw = make_kvasir(tmp_path / "kvasir", stems=("a", "b", "c"))
    with caplog.at_level(logging.WARNING, logger="medseg"):
        ingest_dataset(folder2d_params(), raw, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "kvasir" in warnings[0] and "3 of 3 cases" in warnings[0]


def test_report_labels_voxels_and_warns_on_mixed_units():
    from medseg.report.collect import ArchRow
    from medseg.report.markdown import render_markdown

    def row(arch, unit):
        return ArchRow(arch=arch, family="cnn", mean_dsc=0.5, mean_hd95=7.0, protocol="mm", hd95_unit=unit,
                       test_cases_sha256="s", per_class={"organ": {"dsc": 0.5, "hd95": 7.0}})

    params = {"dataset": {"name": "unknown_spacing"}, "data": {"image_size": [16, 16]}}
    md = render_markdown(params, [row("unet", "voxels")], {}, "n/a")
    assert "Mean HD95 (voxels)" in md and "## Per-class HD95 (voxels)" in md
    assert not re.search(r"\bmm\b", md.replace("protocol `mm`", ""))  # the protocol's name, never a unit
    mixed = render_markdown(params, [row("unet", "voxels"), row("unetpp", "mm")], {}, "n/a")
    assert "not comparable" in mixed
