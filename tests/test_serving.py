"""`mlflow models serve` of a registered model (medseg.deployment.serving): NIfTI/PNG payloads in, the mask `medseg predict`
writes out; limits refused with 400 before any voxel is decoded; the onnx flavor still gives the ModelProto.

A tiny unet is trained, evaluated, exported and registered (sqlite store) once for the module.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.io import read_json

from conftest import paths, trained_project
from services import free_port

SERVER_START_S = 120  # mlflow CLI import + model download + uvicorn + model load, on a busy 2-core machine


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory, mlflow_db_template) -> tuple[Path, dict]:
    """(project root, registry record) of a registered tiny unet, alias challenger."""
    from medseg.io import read_json
    from medseg.layout import ProjectLayout

    root, params = trained_project(tiny_project, tmp_path_factory.mktemp("serving") / "project",
                                   store_template=mlflow_db_template, register=True)
    return root, read_json(ProjectLayout.of(params, root).registry_record("unet"))


def _raw_file(root: Path) -> Path:
    """A test case's raw phantom NIfTI (the file ingest read)."""
    cases = {c["id"]: c for c in read_json(paths(root).cases_json)["cases"]}
    case_id = read_json(paths(root).split_file)["test"][0]
    return root / "data" / "phantom" / cases[case_id]["source_image"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _medseg_predict(model: Path, raw: Path, out: Path) -> bytes:
    assert main(["predict", "-m", str(model), "-i", str(raw), "-o", str(out)]) == 0
    return (out / raw.name).read_bytes()


def _assert_same_mask(got: bytes, expected: bytes, tmp_path: Path) -> None:
    (tmp_path / "got.nii.gz").write_bytes(got)
    (tmp_path / "expected.nii.gz").write_bytes(expected)
    got_img, expected_img = nib.load(tmp_path / "got.nii.gz"), nib.load(tmp_path / "expected.nii.gz")
    got_labels, expected_labels = np.asarray(got_img.dataobj), np.asarray(expected_img.dataobj)
    assert got_labels.dtype == expected_labels.dtype and got_labels.tobytes() == expected_labels.tobytes()
    assert np.array_equal(got_img.affine, expected_img.affine)
    assert got == expected  # the whole file: header, qform/sform, gzip


def _bomb_header() -> bytes:
    """A .nii.gz of a few hundred bytes whose header declares 2048^3 float32 (32 GiB)."""
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.float32)
    return gzip.compress(header.binaryblock + b"\0" * 4)  # + the empty extension flag: a .nii's first 352 bytes


def _segmenter(onnx_path: Path, monkeypatch, **limits):
    """MedsegSegmenter loaded as the server loads it, with MEDSEG_SERVE_* limits set."""
    from mlflow.pyfunc import PythonModelContext

    from medseg.deployment.serving import ONNX_ARTIFACT, MedsegSegmenter

    for name, value in limits.items():
        monkeypatch.setenv(f"MEDSEG_SERVE_{name.upper()}", str(value))
    segmenter = MedsegSegmenter()
    segmenter.load_context(PythonModelContext(artifacts={ONNX_ARTIFACT: str(onnx_path)}, model_config={}))
    return segmenter


# --------------------------------------------------------------------------------------------------- in process
def test_pyfunc_gives_the_mask_medseg_predict_writes(project, tmp_path):
    import mlflow.pyfunc

    from medseg.deployment.card import card_from_onnx
    from medseg.tracking.store import mlflow_store

    root, record = project
    raw = _raw_file(root)
    with mlflow_store(record["tracking_uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{record['model_name']}@challenger")
    answer = model.predict({"nifti_base64": _b64(raw.read_bytes())})

    expected = _medseg_predict(paths(root).model_dir("unet"), raw, tmp_path / "out")
    _assert_same_mask(base64.b64decode(answer["mask_nifti_base64"]), expected, tmp_path)
    card = card_from_onnx(paths(root).onnx("unet"))
    assert (answer["class_names"], answer["label_values"]) == (card.class_names, card.label_values)
    assert sum(answer["voxels"].values()) == np.prod(nib.load(raw).shape)
    assert len([n for n, count in answer["voxels"].items() if count]) > 2  # several classes: the check has teeth


def test_onnx_flavor_loads_the_registered_file_with_its_card(project, tmp_path):
    import mlflow
    import mlflow.onnx
    import onnx

    from medseg.deployment.card import ONNX_METADATA_KEY
    from medseg.io import sha256_file
    from medseg.tracking.store import mlflow_store

    root, record = project
    uri = f"models:/{record['model_name']}@challenger"
    with mlflow_store(record["tracking_uri"]):
        proto = mlflow.onnx.load_model(uri)
        info = mlflow.models.get_model_info(uri)
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    assert isinstance(proto, onnx.ModelProto)
    exported = onnx.load(str(paths(root).onnx("unet")))
    loaded, written = ({p.key: p.value for p in m.metadata_props} for m in (proto, exported))
    assert json.loads(loaded[ONNX_METADATA_KEY]) == json.loads(written[ONNX_METADATA_KEY])
    assert {"python_function", "onnx"} <= set(info.flavors)
    (onnx_file,) = local.rglob("*.onnx")  # one copy, shared by both flavors, byte for byte the exported one
    assert sha256_file(onnx_file) == record["artifact_sha256"]
    assert info.flavors["onnx"]["data"] == info.flavors["python_function"]["artifacts"]["model_onnx"]["path"]
    assert info.signature.inputs.input_names() == ["nifti_base64", "png_base64"]
    tensor = mlflow.models.ModelSignature.from_dict(info.metadata["medseg_input"]["onnx_signature"]).inputs.inputs[0]
    assert (tensor.name, tuple(tensor.shape)) == ("image", (-1, 1, -1, -1))


def test_png_payload_of_a_2d_model_gives_its_png_mask(project, tmp_path, monkeypatch):
    from PIL import Image

    from medseg.deployment.card import ModelCard, card_from_onnx
    from medseg.deployment.export import write_card_metadata

    root, _ = project
    onnx_2d = tmp_path / "model2d.onnx"  # the unet's graph with a card that says image2d (greyscale, /255)
    shutil.copy2(paths(root).onnx("unet"), onnx_2d)
    card = card_from_onnx(onnx_2d)
    write_card_metadata(onnx_2d, ModelCard.from_dict({**card.to_dict(), "input_kind": "image2d", "modality": "mr",
                                                     "normalisation": {"method": "divide_255"}, "spacing": None}))
    (tmp_path / "in").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint8)).save(tmp_path / "in" / "s.png")

    png = (tmp_path / "in" / "s.png").read_bytes()
    answer = _segmenter(onnx_2d, monkeypatch).predict(None, {"png_base64": _b64(png)})
    assert main(["predict", "-m", str(onnx_2d), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 0
    assert base64.b64decode(answer["mask_png_base64"]) == (tmp_path / "out" / "s.png").read_bytes()
    assert sum(answer["voxels"].values()) == 40 * 56


def test_limits_and_bad_payloads_are_refused_before_decoding(project, monkeypatch):
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
    from PIL import Image

    from medseg.deployment.serving import PayloadRefused

    root, _ = project
    segmenter = _segmenter(paths(root).onnx("unet"), monkeypatch, max_bytes=4096)
    bomb = _bomb_header()
    assert len(bomb) < 1024
    tracemalloc.start()
    try:
        with pytest.raises(PayloadRefused, match=r"shape \[2048, 2048, 2048\] of float32: 32.0 GiB of voxels, over "
                                                 r"MEDSEG_SERVE_MAX_VOLUME_BYTES=536870912") as info:
            segmenter.predict(None, {"nifti_base64": _b64(bomb)})
        assert tracemalloc.get_traced_memory()[1] < 2 * 1024**2
    finally:
        tracemalloc.stop()
    assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and info.value.get_http_status_code() == 400
    refusals = [
        ({"nifti_base64": "A" * 4097}, r"4097 base64 characters, over MEDSEG_SERVE_MAX_BYTES=4096"),
        ({"nifti_base64": _b64(b"\x1f\x8b" + b"\0" * 20)}, "gzip data is corrupt"),
        ({"nifti_base64": _b64(b"not a nifti" * 40)}, "no NIfTI-1 or NIfTI-2 header"),
        ({"png_base64": _b64(_bomb_header())}, "png_base64: cannot read image"),
        ({"png_base64": "QUJD", "nifti_base64": "QUJD"}, "exactly one of"),
        ({"image": "QUJD"}, "exactly one of"),
    ]
    for payload, message in refusals:
        with pytest.raises(PayloadRefused, match=message):
            segmenter.predict(None, payload)
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, format="PNG")
    with pytest.raises(PayloadRefused, match=r"png_base64: is a 2D image, but .* segments 3D NIfTI volumes"):
        segmenter.predict(None, {"png_base64": _b64(png.getvalue())})


# --------------------------------------------------------------------------------------------------- the real server
def _post(port: int, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tree_rss(pid: int) -> int:
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


@pytest.mark.slow
def test_mlflow_models_serve_answers_payloads_and_refuses_limits(project, tmp_path):
    root, record = project
    raw = _raw_file(root)
    payload = _b64(raw.read_bytes())
    max_bytes = len(payload) + 1000
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": record["tracking_uri"], "OMP_NUM_THREADS": "1",
           "MEDSEG_SERVE_MAX_BYTES": str(max_bytes)}
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{record['model_name']}@challenger",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not answer /ping:\n" + (tmp_path / "server.log").read_text()
            time.sleep(1)

        status, body = _post(port, {"inputs": {"nifti_base64": payload}})
        assert status == 200, body[:2000]
        answer = json.loads(body)["predictions"]
        expected = _medseg_predict(paths(root).model_dir("unet"), raw, tmp_path / "out")
        _assert_same_mask(base64.b64decode(answer["mask_nifti_base64"]), expected, tmp_path)
        status, body = _post(port, {"dataframe_split": {"columns": ["nifti_base64"], "data": [[payload]]}})
        assert status == 200 and json.loads(body)["predictions"]["mask_nifti_base64"] == answer["mask_nifti_base64"]

        before = _tree_rss(server.pid)
        status, body = _post(port, {"inputs": {"nifti_base64": _b64(_bomb_header())}})
        assert status == 400, body[:2000]
        error = json.loads(body)
        assert error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "shape [2048, 2048, 2048] of float32: 32.0 GiB of voxels, over MEDSEG_SERVE_MAX_VOLUME_BYTES" \
            in error["message"]
        assert _tree_rss(server.pid) < before + 200 * 1024**2  # 32 GiB declared, nothing of it allocated

        status, body = _post(port, {"inputs": {"nifti_base64": "A" * (max_bytes + 1)}})
        assert status == 400
        message = json.loads(body)["message"]
        assert f"{max_bytes + 1} base64 characters, over MEDSEG_SERVE_MAX_BYTES={max_bytes}" in message
        assert len(body) < 2000, "a refused payload is not echoed back"
    finally:  # the whole process group: `mlflow models serve` runs uvicorn as a child
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
            log.close()


def test_a_version_registered_before_the_package_regroup_still_unpickles():
    # MLflow pickled the pyfunc class by its module path; versions registered before 2026-12 name medseg.serving
    import pickle

    from medseg.deployment.serving import MedsegSegmenter

    assert pickle.loads(b"cmedseg.serving\nMedsegSegmenter\n.") is MedsegSegmenter
