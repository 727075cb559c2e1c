"""Issue 31: hostile inputs and races, as a hostile user would try them. Every case ends as `error: <file or model>:
<problem>` with exit 2 (or a documented code) and nothing of the user's touched: no file medseg did not write is
replaced, memory follows what a file really holds (not what its header claims), bad model cards and non-real voxel
types are refused, links out of a dataset folder are not followed unless asked, promotion is atomic, and a full
disk is one line. The cases that held before (truncated files, 5D input, outputs inside the input folder, ONNX
external data outside the model's folder) are kept here so they stay fixed.

A tiny unet is trained, evaluated and exported once for the module: every predict test runs a real model.onnx.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.cli import main
from medseg.data.nifti_header import ReadLimits, check_nifti_bytes, check_nifti_file
from medseg.errors import IngestError, PredictError, PredictTimeout
from medseg.io import read_json

from conftest import paths, seed_store, snapshot, trained_project

PEAK_BUDGET_BYTES = 1024**3  # the fixed budget for every bomb


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory) -> Path:
    return trained_project(tiny_project, tmp_path_factory.mktemp("hostile") / "project")[0]


@pytest.fixture(scope="module")
def model(project) -> Path:
    return paths(project).onnx("unet")


def _scan(project: Path) -> Path:
    """A raw phantom CT the model was trained for."""
    cases = read_json(paths(project).cases_json)["cases"]
    return project / "data" / "phantom" / cases[0]["source_image"]


def _predict(capsys, *args) -> tuple[int, str]:
    code = main(["predict", *map(str, args)])
    return code, capsys.readouterr().err


def _one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    for needle in needles:
        assert needle in line, line


def _header_only(shape, dtype=np.float32, version: int = 1) -> bytes:
    header = nib.Nifti1Header() if version == 1 else nib.Nifti2Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return header.binaryblock + b"\0" * 4  # + the empty extension flag: a .nii's first bytes


def _zero_bomb(path: Path, shape, dtype=np.uint8) -> Path:
    path.write_bytes(_zero_gzip(shape, dtype))
    return path


def _zero_gzip(shape, dtype=np.uint8) -> bytes:
    """A .nii.gz of zeros that really holds every byte its header declares (level 9: about 1000x), made in 16 MiB
    pieces."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflate.compress(_header_only(shape, dtype))]
    remaining = int(np.prod(shape)) * np.dtype(dtype).itemsize
    block = b"\0" * (1 << 24)
    while remaining:
        parts.append(deflate.compress(block[: min(remaining, len(block))]))
        remaining -= min(remaining, len(block))
    parts.append(deflate.flush())
    return b"".join(parts)


def _peak_of_predict(model: Path, scan: Path, out: Path, env: dict | None = None) -> tuple[int, int, str]:
    """(exit code, peak RSS in bytes, stderr) of `medseg predict` in a process of its own. The peak is VmHWM, the
    high-water mark of this program's own memory (ru_maxrss would keep the forking pytest's, across exec)."""
    code = ("import re, sys\nfrom medseg.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
            "print('PEAK', int(hwm) * 1024, file=sys.stderr)\nsys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "predict", "-m", str(model), "-i", str(scan), "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    peak = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK ")))
    return done.returncode, peak, done.stderr


# ------------------------------------------------------------------------------------------ no file is replaced
def test_predict_never_replaces_a_scan_beside_its_input(project, model, tmp_path, capsys):
    """The reported data loss: `-i dir/scan_0000.nii.gz -o dir` replaced the user's other scan dir/scan.nii.gz."""
    folder = tmp_path / "dir"
    folder.mkdir()
    shutil.copy(_scan(project), folder / "scan_0000.nii.gz")
    shutil.copy(_scan(project), folder / "scan.nii.gz")  # the user's other scan, the output's name
    before = snapshot(folder)
    code, err = _predict(capsys, "-m", model, "-i", folder / "scan_0000.nii.gz", "-o", folder)
    assert code == 2
    _one_line_error(err, str(folder / "scan.nii.gz"), "exists and is not medseg's prediction of scan_0000.nii.gz",
                    "--overwrite")
    assert snapshot(folder) == before
    # --continue keeps it and writes nothing; --overwrite is the user's explicit word
    code, _ = _predict(capsys, "-m", model, "-i", folder / "scan_0000.nii.gz", "-o", folder, "--continue")
    assert code == 0 and snapshot(folder) == before
    code, _ = _predict(capsys, "-m", model, "-i", folder / "scan_0000.nii.gz", "-o", folder, "--overwrite")
    assert code == 0 and snapshot(folder)["scan.nii.gz"] != before["scan.nii.gz"]
    assert snapshot(folder)["scan_0000.nii.gz"] == before["scan_0000.nii.gz"]


def test_predict_replaces_its_own_output_of_the_same_case_only(project, model, tmp_path, capsys):
    scans, other, out = tmp_path / "scans", tmp_path / "other", tmp_path / "out"
    scans.mkdir()
    other.mkdir()
    shutil.copy(_scan(project), scans / "case.nii.gz")
    inputs = snapshot(scans)
    assert _predict(capsys, "-m", model, "-i", scans, "-o", out, "--save-probabilities")[0] == 0
    first = snapshot(out)
    # the same scan again (a rerun): medseg's own outputs of this case are replaced, byte for byte the same
    assert _predict(capsys, "-m", model, "-i", scans, "-o", out, "--save-probabilities")[0] == 0
    assert snapshot(out) == first
    # another scan under the same name: its prediction would replace the first one's: refused, nothing written
    image = nib.load(_scan(project))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine, image.header), other / "case.nii.gz")
    code, err = _predict(capsys, "-m", model, "-i", other, "-o", out, "--save-probabilities")
    assert code == 2
    _one_line_error(err, "exists and is not medseg's prediction of case.nii.gz")
    assert snapshot(out) == first
    # a folder or a link in an output's place is not medseg's either
    link_out = tmp_path / "link_out"
    link_out.mkdir()
    (link_out / "case.nii.gz").symlink_to(out / "case.nii.gz")  # medseg's own file, but through a link
    (link_out / "case.npz").mkdir()
    code, err = _predict(capsys, "-m", model, "-i", scans, "-o", link_out, "--save-probabilities")
    assert code == 2 and "exists and is not medseg's prediction" in err
    assert (link_out / "case.nii.gz").is_symlink() and snapshot(scans) == inputs and snapshot(out) == first


def test_every_output_kind_carries_the_mark_of_its_case(tmp_path):
    from medseg.deployment.predict import Case, _write_nifti, _write_png, _write_probabilities, output_mark

    template = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), template)
    case = Case("in", [template], tmp_path / "o.nii.gz", tmp_path / "o.npz")
    key = case.key()
    _write_nifti(tmp_path / "o.nii.gz", np.zeros((4, 4, 2), np.uint8), template, key)
    _write_png(tmp_path / "o.png", np.zeros((4, 4), np.uint8), key)
    _write_probabilities(tmp_path / "o.npz", np.zeros((2, 4, 4, 2), np.float16), ["bg", "fg"], key)
    for name in ("o.nii.gz", "o.png", "o.npz"):
        assert output_mark(tmp_path / name) == key
    for foreign in (template, tmp_path / "missing.nii.gz", tmp_path):
        assert output_mark(foreign) is None
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    assert output_mark(tmp_path / "junk.png") is None


def test_outputs_inside_or_equal_to_the_input_stay_refused(project, model, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(_scan(project), scans / "a.nii.gz")
    (tmp_path / "into").symlink_to(scans)
    before = snapshot(scans)
    for out in (scans, scans / "sub", tmp_path / "into"):
        code, err = _predict(capsys, "-m", model, "-i", scans, "-o", out)
        assert code == 2 and "inside the input folder" in err, err
    code, err = _predict(capsys, "-m", model, "-i", scans / "a.nii.gz", "-o", scans)
    assert code == 2 and "would overwrite an input" in err
    assert snapshot(scans) == before


# ------------------------------------------------------------------------------------- memory follows the file
def test_a_header_declaring_more_than_the_file_holds_is_refused_before_allocation(project, model, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "big.nii").write_bytes(_header_only((1024, 1024, 768)))  # 3 GiB declared in 352 bytes
    (scans / "short.nii").write_bytes(_header_only((1024, 1024, 256)))  # 1 GiB, under the size limit
    (scans / "short2.nii").write_bytes(_header_only((512, 512, 256), version=2))
    for name, message in (("big.nii", "3.0 GiB of voxels, over MEDSEG_MAX_VOLUME_BYTES=2147483648"),
                          ("short.nii", "1.0 GiB of voxels, but the file holds 0 bytes after its header"),
                          ("short2.nii", "but the file holds 0 bytes after its header")):
        code, peak, err = _peak_of_predict(model, scans / name, tmp_path / "out")
        print(name, f"peak {peak / 2**20:.0f} MiB")
        assert code == 2 and f"error: {scans / name}: " in err and message in err, err
        assert "Traceback" not in err
        assert peak < PEAK_BUDGET_BYTES, f"{name}: peak {peak / 2**20:.0f} MiB"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_decompression_bombs_stay_under_the_memory_budget(project, model, tmp_path):
    bomb = _zero_bomb(tmp_path / "zeros.nii.gz", (1024, 1024, 1024))  # 1 GiB of zeros in about 1 MB
    assert bomb.stat().st_size < 2 * 1024**2
    code, peak, err = _peak_of_predict(model, bomb, tmp_path / "out")
    assert code == 2 and "over MEDSEG_MAX_COMPRESSION_RATIO=100" in err and "raise MEDSEG_MAX_COMPRESSION_RATIO" in err
    assert peak < PEAK_BUDGET_BYTES, f"peak {peak / 2**20:.0f} MiB"
    # a header that lies about a gzip's length: 4 GiB declared over 1 GiB of zeros
    liar = tmp_path / "liar.nii.gz"
    liar.write_bytes(gzip.compress(_header_only((2048, 2048, 1024), np.uint8) + b"\0" * (1 << 20), compresslevel=1))
    code, peak, err = _peak_of_predict(model, liar, tmp_path / "out")
    assert code == 2 and "4.0 GiB of voxels" in err and peak < PEAK_BUDGET_BYTES
    # raising the ratio for a genuinely so compressible scan lets it past that rule; the size limit still holds
    code, peak, err = _peak_of_predict(model, bomb, tmp_path / "out", {"MEDSEG_MAX_COMPRESSION_RATIO": "2000",
                                                                       "MEDSEG_MAX_VOLUME_BYTES": "100"})
    assert code == 2 and "over MEDSEG_MAX_VOLUME_BYTES=100" in err


def test_a_gzip_stream_shorter_than_its_header_is_refused_without_reading_it_whole(tmp_path):
    image = np.random.default_rng(0).integers(-1000, 1000, (64, 64, 64)).astype(np.int16)
    full = tmp_path / "full.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), full)
    data = full.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    with pytest.raises(IngestError, match=r"cut\.nii\.gz: cannot read NIfTI \(.*gzip stream ends after \d+ bytes"):
        check_nifti_file(tmp_path / "cut.nii.gz")
    # several gzip members (bgzip, pigz --independent) are one stream: read in full, accepted
    raw = gzip.decompress(data)
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert check_nifti_file(tmp_path / "members.nii.gz").shape == (64, 64, 64)
    from medseg.data.formats import read_nifti

    assert np.array_equal(read_nifti(tmp_path / "members.nii.gz").data, image)


@pytest.mark.parametrize("dtype, name", [(np.complex64, "complex64"), (np.complex128, "complex128")])
def test_complex_voxels_are_refused_not_cut_to_their_real_part(project, model, tmp_path, capsys, dtype, name):
    scan = nib.load(_scan(project))
    data = np.asarray(scan.dataobj).astype(dtype) * (1 + 1j)
    nib.save(nib.Nifti1Image(data, scan.affine), tmp_path / "complex.nii.gz")
    code, err = _predict(capsys, "-m", model, "-i", tmp_path / "complex.nii.gz", "-o", tmp_path / "out")
    assert code == 2
    _one_line_error(err, str(tmp_path / "complex.nii.gz"), f"voxel type {name} is not a real-valued type")
    assert not (tmp_path / "out").exists()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(version=st.sampled_from([1, 2]), shape=st.lists(st.integers(-3, 5000), min_size=1, max_size=7),
       code=st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 999]),
       offset=st.integers(-10, 10**6), body=st.integers(0, 4096), gz=st.booleans(),
       cut=st.one_of(st.none(), st.integers(0, 600)))
def test_header_fuzz_never_crashes_and_never_passes_what_the_file_lacks(version, shape, code, offset, body, gz, cut):
    """Whatever a header says, the check returns a header the bytes can back, or an IngestError: nothing else."""
    header = nib.Nifti1Header() if version == 1 else nib.Nifti2Header()
    head = bytearray(header.binaryblock)
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    if version == 1:
        head[40:56] = np.asarray(dims, "<i2").tobytes() if max(map(abs, dims)) < 2**15 else head[40:56]
        head[70:72] = np.asarray([code], "<i2").tobytes()
        head[108:112] = np.asarray([offset], "<f4").tobytes()
    else:
        head[16:80] = np.asarray(dims, "<i8").tobytes()
        head[12:14] = np.asarray([code], "<i2").tobytes()
        head[168:176] = np.asarray([offset], "<i8").tobytes()
    data = bytes(head) + b"\0" * 4 + b"\1" * body
    if gz:
        data = gzip.compress(data)
    if cut is not None:
        data = data[:cut]
    limits = ReadLimits(max_bytes=64 * 1024**2, max_ratio=100)
    try:
        found = check_nifti_bytes(data, "fuzz", limits)
    except IngestError as exc:
        assert exc.path == "fuzz" and exc.problem
        return
    assert found.data_bytes <= limits.max_bytes and found.dtype.kind in "iuf"
    held = len(gzip.decompress(data)) if gz else len(data)
    assert held >= found.vox_offset + found.data_bytes


# ---------------------------------------------------------------------------------------------- bad model cards
def _with_card(model: Path, dest: Path, **changes) -> Path:
    import onnx

    from medseg.deployment.card import ONNX_METADATA_KEY

    proto = onnx.load(str(model))
    entry = next(p for p in proto.metadata_props if p.key == ONNX_METADATA_KEY)
    card = json.loads(entry.value)
    card.update(changes)
    entry.value = json.dumps(card)
    onnx.save(proto, str(dest))
    return dest


@pytest.mark.parametrize("changes, message", [
    ({"schema": "abc"}, "model card schema 'abc' is not a whole number"),
    ({"label_values": [0, 1e20, 2, 3, 4, 5, 6, 7, 8]}, "label_values must be whole numbers"),
    ({"label_values": [-1, 1, 2, 3, 4, 5, 6, 7, 8]}, "label_values must be whole numbers"),
    ({"label_values": [5, 1, 2, 3, 4, 6, 7, 8, 9]}, "label_values[0] (background) must be 0"),
    ({"image_size": [40000, 40000]}, "image_size [40000, 40000] is over 8192 pixels a side"),
    ({"class_names": ["background", "liver"], "label_values": [0, 1], "num_classes": 2,
      "class_colours": [[0, 0, 0], [255, 0, 0]]}, "is not (batch, 2 classes, H, W)"),
    ({"class_colours": [[0, 0, 0], [300, 0, 0]]}, "class_colours must be one [r, g, b] (0..255) per class"),
    ({"context": 500}, "network input of 1001 channels"),
])
def test_bad_model_cards_are_one_line_errors(project, model, tmp_path, capsys, changes, message):
    bad = _with_card(model, tmp_path / "bad.onnx", **changes)
    shutil.copy(_scan(project), tmp_path / "scan.nii.gz")
    code, err = _predict(capsys, "-m", bad, "-i", tmp_path / "scan.nii.gz", "-o", tmp_path / "out")
    assert code == 2, err
    _one_line_error(err, str(bad), message)
    assert not (tmp_path / "out").exists()


def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path, capsys):
    """ONNX Runtime >= 1.24.1 (the floor pyproject.toml pins) refuses it; predict says so in one line."""
    import onnx
    from onnx import TensorProto, helper

    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    code, err = _predict(capsys, "-m", folder / "model.onnx", "-i", tmp_path / "secret.bin", "-o", tmp_path / "out")
    assert code == 2
    _one_line_error(err, str(folder / "model.onnx"), "not a readable ONNX model", "External data path")


# ----------------------------------------------------------------------------------- links out of a dataset
def test_a_label_linked_from_outside_the_dataset_is_refused_unless_allowed(tmp_path, capsys):
    from test_ingest import make_synapse, synapse_params

    from medseg.data.doctor import check_dataset
    from medseg.data.ingest import ingest_dataset

    raw = make_synapse(tmp_path / "raw", n=2)
    outside = tmp_path / "elsewhere" / "someone_else.nii.gz"
    outside.parent.mkdir()
    shutil.move(raw / "label" / "label0002.nii.gz", outside)
    (raw / "label" / "label0002.nii.gz").symlink_to(outside)
    before = snapshot(raw)
    problems = check_dataset(synapse_params(), raw)
    linked = [p for p in problems if p.file == str(raw / "label" / "label0002.nii.gz")]
    assert [p.severity for p in linked] == ["error"]
    assert f"is a link to {outside}, outside the dataset folder" in linked[0].problem
    assert "dataset.allow_external_links: true" in linked[0].problem
    with pytest.raises(IngestError, match=r"label0002\.nii\.gz: is a link to .* outside the dataset folder"):
        ingest_dataset(synapse_params(), raw, tmp_path / "ingested")
    assert not (tmp_path / "ingested").exists()
    # opted in: ingest reads it, doctor still points at it
    allowed = synapse_params(allow_external_links=True)
    assert [p.severity for p in check_dataset(allowed, raw) if p.file.endswith("label0002.nii.gz")] == ["warning"]
    assert len(ingest_dataset(allowed, raw, tmp_path / "ingested")["cases"]) == 2
    # a link that stays inside the dataset is just a file
    inside = make_synapse(tmp_path / "raw2", n=2)
    (inside / "label" / "label0002.nii.gz").unlink()
    (inside / "label" / "label0002.nii.gz").symlink_to(inside / "label" / "label0001.nii.gz")
    assert not [p for p in check_dataset(synapse_params(), inside) if "link" in p.problem]
    assert snapshot(raw) == before


# ------------------------------------------------------------------------------------------ filesystem errors
def test_a_full_disk_while_writing_predictions_is_one_line_and_leaves_nothing(project, model, tmp_path, capsys,
                                                                             monkeypatch):
    import medseg.io

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    shutil.copy(_scan(project), tmp_path / "scan.nii.gz")
    monkeypatch.setattr(medseg.io.os, "fsync", full)
    code, err = _predict(capsys, "-m", model, "-i", tmp_path / "scan.nii.gz", "-o", tmp_path / "out")
    assert code == 2
    _one_line_error(err, f"error: {tmp_path / 'out' / 'scan.nii.gz'}: No space left on device")
    assert list((tmp_path / "out").iterdir()) == []  # no temp file left behind


def test_a_folder_that_cannot_be_written_is_one_line(project, model, tmp_path, capsys, monkeypatch):
    import medseg.io

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    shutil.copy(_scan(project), tmp_path / "scan.nii.gz")
    monkeypatch.setattr(medseg.io.tempfile, "mkstemp", denied)
    code, err = _predict(capsys, "-m", model, "-i", tmp_path / "scan.nii.gz", "-o", tmp_path / "out")
    assert code == 2
    _one_line_error(err, f"error: {tmp_path / 'out'}: Permission denied")


def test_a_stage_that_hits_a_filesystem_error_prints_one_line(tmp_path):
    """Stages print the same line; exit 1 (not 2) tells the flows a retry may pass."""
    script = tmp_path / "stage.py"
    script.write_text("import sys\nfrom medseg.entry import run_stage\n"
                      "def work(params, root='.'):\n    open('/nonexistent-dir/x', 'w')\n"
                      "raise SystemExit(run_stage(work, [], with_arch=False))\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: /nonexistent-dir/x: No such file or directory" in done.stderr


# --------------------------------------------------------------------------------------------------- deadlines
def test_a_deadline_stops_the_work_and_writes_nothing(project, model, tmp_path):
    from medseg.deployment.predict import Deadline, load_predictor, predict_files

    shutil.copy(_scan(project), tmp_path / "scan.nii.gz")
    predictor = load_predictor(model)
    with pytest.raises(PredictTimeout, match=r"stopped after 0 s \(0 of \d+ slices segmented\).*raise SETTING"):
        predict_files(predictor, tmp_path / "scan.nii.gz", tmp_path / "out", deadline=Deadline.after(0, "SETTING"))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert isinstance(PredictTimeout("x"), PredictError)


# ----------------------------------------------------------------------------------------------- promotion race
def test_two_promotions_at_once_give_one_promoted_and_one_unchanged(tmp_path, mlflow_db_template):
    from medseg.tracking.registry import alias_version
    from medseg.tracking.store import connect

    seed_store(tmp_path, mlflow_db_template)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = connect(uri, retries=0)
    env = {**os.environ, "MEDSEG_LOCK_DIR": str(tmp_path / "locks")}
    for trial in range(3):
        name = f"medseg-race-{trial}"
        client.create_registered_model(name)
        tags = {"test_dsc": "0.8", "parity_passed": "true", "test_cases_sha256": "split", "protocol": "mm"}
        version = client.create_model_version(name, source=(tmp_path / "m").as_uri(), tags=tags).version
        client.set_registered_model_alias(name, "challenger", version)
        runs = [subprocess.Popen([sys.executable, "-m", "medseg.cli", "--root", str(tmp_path), "promote", name,
                                  "--tracking-uri", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env, cwd=tmp_path) for _ in range(2)]
        outputs = [run.communicate(timeout=300) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], outputs
        decisions = sorted(json.loads(out)["decision"] for out, _ in outputs)
        assert decisions == ["promoted", "unchanged"], outputs
        assert alias_version(client, name, "champion") == str(version)
        assert alias_version(client, name, "challenger") is None
        tags = client.get_model_version(name, version).tags
        assert tags["promoted_from_champion"] == "none"


def test_an_mlflow_store_error_during_promotion_names_the_model(tmp_path, capsys):
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    code = main(["--root", str(tmp_path), "promote", "medseg-x", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    _one_line_error(err, "error: ")
    assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------------- serving
def _segmenter(onnx_path: Path, monkeypatch, **env):
    from mlflow.pyfunc import PythonModelContext

    from medseg.deployment.serving import ONNX_ARTIFACT, MedsegSegmenter

    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    segmenter = MedsegSegmenter()
    segmenter.load_context(PythonModelContext(artifacts={ONNX_ARTIFACT: str(onnx_path)}, model_config={}))
    return segmenter


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def test_serving_counts_bytes_of_the_declared_type_and_refuses_non_real_types(model, monkeypatch):
    from medseg.deployment.serving import PayloadRefused

    segmenter = _segmenter(model, monkeypatch, MEDSEG_SERVE_MAX_VOLUME_BYTES=4 * 64 * 64 * 16)
    small = np.zeros((64, 64, 16), np.int16)
    wide = small.astype(np.float64)  # the same voxels, 4x the bytes: over the limit
    for data, ok in ((small, True), (wide, False)):
        payload = {"nifti_base64": _b64(nib.Nifti1Image(data, np.eye(4)).to_bytes())}
        if ok:
            assert sum(segmenter.predict(None, payload)["voxels"].values()) == data.size
        else:
            with pytest.raises(PayloadRefused, match=r"of float64: 512.0 KiB of voxels, over MEDSEG_SERVE_MAX_VOLUME"):
                segmenter.predict(None, payload)
    for dtype in (np.complex64, np.complex128):
        payload = {"nifti_base64": _b64(nib.Nifti1Image(np.zeros((8, 8, 2), dtype), np.eye(4)).to_bytes())}
        with pytest.raises(PayloadRefused, match="is not a real-valued type") as info:
            segmenter.predict(None, payload)
        assert info.value.get_http_status_code() == 400
    bomb = _b64(_zero_gzip((512, 512, 1024), np.int16))  # the reported 0.7 MB payload of 512 MiB
    assert len(bomb) < 2 * 1024**2
    segmenter = _segmenter(model, monkeypatch, MEDSEG_SERVE_MAX_VOLUME_BYTES=2 * 1024**3)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadRefused, match="over MEDSEG_MAX_COMPRESSION_RATIO"):
            segmenter.predict(None, {"nifti_base64": bomb})
        assert tracemalloc.get_traced_memory()[1] < 16 * 1024**2  # the payload decoded, nothing of the 512 MiB
    finally:
        tracemalloc.stop()


def test_a_busy_worker_answers_503_at_once_and_a_slow_case_504_with_the_work_stopped(model, monkeypatch):
    import time

    from medseg.deployment.serving import CaseTooSlow, ServerBusy

    segmenter = _segmenter(model, monkeypatch, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT=30, MEDSEG_SERVE_MAX_QUEUED=0)
    assert segmenter.max_seconds == 27  # the server's timeout less 10 %: the model answers first
    payload = {"nifti_base64": _b64(nib.Nifti1Image(np.zeros((32, 32, 4), np.int16), np.eye(4)).to_bytes())}
    assert segmenter.admitted.acquire(blocking=False)  # another request is being segmented, none may wait
    try:
        start = time.monotonic()
        with pytest.raises(ServerBusy, match=r"busy: this worker is segmenting 1 case\(s\)") as info:
            segmenter.predict(None, payload)
        assert time.monotonic() - start < 1.0 and info.value.get_http_status_code() == 503
    finally:
        segmenter.admitted.release()
    assert segmenter.predict(None, payload)["voxels"]  # the slot is free again
    segmenter.max_seconds = 0.0
    with pytest.raises(CaseTooSlow, match=r"stopped after 0 s .*MEDSEG_SERVE_MAX_SECONDS") as info:
        segmenter.predict(None, payload)
    assert info.value.get_http_status_code() == 504
    assert segmenter.slots.acquire(blocking=False), "a failed case gives its slot back"
    segmenter.slots.release()


def test_concurrent_requests_wait_their_turn_within_their_time(model, monkeypatch):
    """20 valid requests at once are all answered (they queue for the one slot); one that cannot get a slot within
    its time is answered 503, not left to the server's 504."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from medseg.deployment.serving import ServerBusy

    segmenter = _segmenter(model, monkeypatch)
    payload = {"nifti_base64": _b64(nib.Nifti1Image(np.zeros((32, 32, 4), np.int16), np.eye(4)).to_bytes())}
    running, most = [0], [0]
    segment, guard = segmenter._segment, threading.Lock()

    def counted(*args):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return segment(*args)
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(segmenter, "_segment", counted)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: segmenter.predict(None, payload), range(20)))
    assert len(answers) == 20 and all(sum(a["voxels"].values()) == 32 * 32 * 4 for a in answers)
    assert most[0] == 1, "one case at a time per worker"
    segmenter.max_seconds = 0.5
    assert segmenter.slots.acquire(blocking=False)  # a long case holds the slot
    try:
        start = time.monotonic()
        with pytest.raises(ServerBusy, match=r"no slot within 0.5 s \(MEDSEG_SERVE_MAX_SECONDS\)"):
            segmenter.predict(None, payload)
        assert 0.4 < time.monotonic() - start < 2.0
    finally:
        segmenter.slots.release()


# ------------------------------------------------------------------------------------------ what held, kept so
def _five_d(path: Path, scan) -> None:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2, 2), np.int16), np.eye(4)), path)


def _bad_affine(value: float):
    def write(path: Path, scan) -> None:  # nibabel refuses to write such an affine: the sform's bytes are patched
        raw = nib.Nifti1Image(np.asarray(scan.dataobj), scan.affine)
        raw.header.set_qform(None, code=0)
        data = bytearray(gzip.decompress(gzip.compress(raw.to_bytes())))
        data[280:284] = np.asarray([value], "<f4").tobytes()  # srow_x[0]
        path.write_bytes(gzip.compress(bytes(data)))

    return write


def _truncated(path: Path, scan) -> None:
    nib.save(scan, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("make, message", [
    (_five_d, "expected a 3D volume"), (_bad_affine(np.nan), ""), (_bad_affine(np.inf), ""),
    (_truncated, "cannot read NIfTI"),
])
def test_inputs_that_held_stay_one_line_refusals(project, model, tmp_path, capsys, make, message):
    make(tmp_path / "bad.nii.gz", nib.load(_scan(project)))
    code, err = _predict(capsys, "-m", model, "-i", tmp_path / "bad.nii.gz", "-o", tmp_path / "out")
    assert code == 2
    _one_line_error(err, f"error: {tmp_path / 'bad.nii.gz'}: ", message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_odd_file_names_are_just_names(project, model, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    names = ["scan with spaces.nii.gz", "-dash.nii.gz", "ümlaut 患者.nii.gz", "a;b$(c).nii.gz"]
    for name in names:
        shutil.copy(_scan(project), scans / name)
    before = snapshot(scans)
    code, err = _predict(capsys, "-m", model, "-i", scans, "-o", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    assert snapshot(scans) == before


def test_dataset_json_entries_pointing_outside_are_never_read(tmp_path):
    """The MSD/nnU-Net layout is read from imagesTr/ and labelsTr/; dataset.json's file lists are not followed."""
    from test_ingest import make_msd, msd_params

    from medseg.data.ingest import ingest_dataset

    raw = make_msd(tmp_path / "raw")
    meta = json.loads((raw / "dataset.json").read_text())
    outside = tmp_path / "elsewhere.nii.gz"
    shutil.copy(raw / "labelsTr" / "spleen_1.nii.gz", outside)
    meta["training"] = [{"image": str(outside), "label": "../../elsewhere.nii.gz"}]
    (raw / "dataset.json").write_text(json.dumps(meta))
    manifest = ingest_dataset(msd_params(), raw, tmp_path / "ingested")
    sources = json.dumps(manifest["cases"])
    assert [c["id"] for c in manifest["cases"]] == ["spleen_1", "spleen_2"] and "elsewhere" not in sources
