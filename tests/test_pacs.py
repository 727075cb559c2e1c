"""A real PACS round trip: Orthanc with its DICOMweb plugin on 127.0.0.1 (tests/services.py), the shared CT series
uploaded (given UIDs and made-up identifiers), segmented by `medseg pacs segment` and by the Prefect flow, the SEG
stored back into the same study and patient, idempotent on rerun; a refused store is an error; no patient
identifier reaches the output, the logs or the flow's artifact."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from dicom_series import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, identified_copy, phantom_hu, write_series
from services import Orthanc

from medseg.cli import main

from conftest import trained_project

SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_ct_dicom" / "series"
IDENTIFIERS = (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, BIRTH_DATE)


@pytest.fixture(scope="module")
def model(tiny_project, tmp_path_factory) -> Path:
    root, _ = trained_project(tiny_project, tmp_path_factory.mktemp("pacs") / "project")
    return root / "models" / "unet" / "model.onnx"


@pytest.fixture()
def orthanc():
    server = Orthanc().start()
    yield server
    server.stop()


def upload_study(server: Orthanc, tmp_path: Path) -> str:
    """The shared CT (or, without ../shared, a synthetic series) in the PACS; returns its StudyInstanceUID."""
    import pydicom

    if SHARED_CT.is_dir():
        files = identified_copy(SHARED_CT, tmp_path / "upload")
    else:
        hu, _ = phantom_hu(slices=6, rows=48, cols=40)
        files = write_series(tmp_path / "upload", hu)
    server.upload(files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def stored_files(server: Orthanc) -> dict[str, str]:
    """{Orthanc instance id: sha256 of the stored file}."""
    out = {}
    for instance in server.get("/instances"):
        with __import__("urllib.request").request.urlopen(f"{server.rest}/instances/{instance}/file") as response:
            out[instance] = hashlib.sha256(response.read()).hexdigest()
    return out


def series_of(server: Orthanc, study_uid: str) -> list[dict]:
    (study,) = [s for s in server.get("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]
    return [server.get(f"/series/{s}") for s in study["Series"]]


def no_identifier_in(text: str) -> None:
    leaked = [value for value in IDENTIFIERS if value in text]
    assert not leaked, f"patient identifiers in the output: {leaked}"


def test_medseg_pacs_segment_stores_a_seg_in_the_study_once(model, orthanc, tmp_path, capsys, caplog):
    study_uid = upload_study(orthanc, tmp_path)
    before = stored_files(orthanc)
    caplog.set_level(logging.DEBUG)
    argv = ["pacs", "segment", "--url", orthanc.dicomweb, "--study", study_uid, "-m", str(model)]
    assert main(argv) == 0
    out = capsys.readouterr()
    (row,) = json.loads(out.out)
    assert row["status"] == "stored" and row["frames"] > 0
    series = series_of(orthanc, study_uid)
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["CT", "SEG"]
    assert len(orthanc.get("/patients")) == 1 and len(orthanc.get("/studies")) == 1  # the same patient and study
    seg_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "SEG")
    assert seg_series["MainDicomTags"]["SeriesInstanceUID"] == row["seg_series_uid"]
    after = stored_files(orthanc)
    assert {k: v for k, v in after.items() if k in before} == before  # the source images are unchanged
    # a rerun (an event firing twice) stores nothing more
    assert main(argv) == 0
    (again,) = json.loads(capsys.readouterr().out)
    assert again["status"] == "already there" and again["seg_series_uid"] == row["seg_series_uid"]
    assert len(series_of(orthanc, study_uid)) == 2
    no_identifier_in(out.out + out.err + caplog.text)


def test_a_store_the_pacs_refuses_is_an_error(model, tmp_path, capsys):
    server = Orthanc(refuse_seg=True).start()
    try:
        study_uid = upload_study(server, tmp_path)
        code = main(["pacs", "segment", "--url", server.dicomweb, "--study", study_uid, "-m", str(model)])
        err = capsys.readouterr().err
        assert code == 2 and "STOW-RS" in err and "SEG" in err, err
        assert [s["MainDicomTags"]["Modality"] for s in series_of(server, study_uid)] == ["CT"]
        no_identifier_in(err)
    finally:
        server.stop()


def test_a_study_without_image_series_says_so(model, orthanc, tmp_path, capsys):
    code = main(["pacs", "segment", "--url", orthanc.dicomweb, "--study", "1.2.3.4.5", "-m", str(model)])
    assert code == 2 and "no CT/MR series to segment" in capsys.readouterr().err


@pytest.mark.prefect
def test_the_flow_segments_a_study_and_its_artifact_names_no_patient(prefect_server, model, orthanc, tmp_path,
                                                                      monkeypatch, caplog):
    from prefect.artifacts import Artifact

    from flows import pacs as flow_pacs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_uid = upload_study(orthanc, tmp_path)
    caplog.set_level(logging.INFO)
    result = flow_pacs.pacs_segment(url=orthanc.dicomweb, study_uid=study_uid, model=str(model))
    assert len(result["stored"]) == 1 and result["model_version"].startswith("sha256:")
    artifact = Artifact.get(flow_pacs.PACS_ARTIFACT_KEY)
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [r["status"] for r in data] == ["stored"]
    again = flow_pacs.pacs_segment(url=orthanc.dicomweb, study_uid=study_uid, model=str(model))
    assert again["stored"] == [] and len(again["already_there"]) == 1
    no_identifier_in(json.dumps(result) + json.dumps(data) + caplog.text + str(artifact.description))


def test_credentials_come_from_the_environment_and_a_refusal_says_so(model, tmp_path, capsys, monkeypatch):
    server = Orthanc(users={"radiology": "s3cret-pw"}).start()
    try:
        study_uid = upload_study(server, tmp_path)
        argv = ["pacs", "segment", "--url", server.dicomweb, "--study", study_uid, "-m", str(model)]
        for key in ("DICOMWEB_TOKEN", "DICOMWEB_USER", "DICOMWEB_PASSWORD"):
            monkeypatch.delenv(key, raising=False)
        assert main(argv) == 2
        assert "401" in capsys.readouterr().err  # the PACS's answer, not a traceback
        monkeypatch.setenv("DICOMWEB_USER", "radiology")
        monkeypatch.setenv("DICOMWEB_PASSWORD", "s3cret-pw")
        assert main(argv) == 0
        out = capsys.readouterr()
        assert json.loads(out.out)[0]["status"] == "stored" and "s3cret-pw" not in out.out + out.err
    finally:
        server.stop()
