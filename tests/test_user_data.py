"""A user's raw dataset is read-only to medseg.

Each raw format (and an archive) is written here into a folder OUTSIDE the project, as a user's download would be;
`medseg doctor`, `medseg ingest`, the whole `dvc repro` and the Prefect pipeline flow run on it, with the raw folder
mounted read-only where the test can (root with a private mount namespace; otherwise write bits removed), and
afterwards every file's sha256 and the folder's listing are what they were. The presets and the README's
"Using real data" steps are run the same way.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from test_ingest import (
    make_acdc,
    make_kvasir,
    make_msd,
    make_synapse,
    make_transunet,
    msd_params,
    synapse_params,
)

from conftest import ROOT, make_dvc_project, paths, snapshot

pytestmark = pytest.mark.slow

RAW_FORMATS = ["synapse", "msd", "acdc", "folder2d", "transunet", "archive", "itk", "dicom"]


# ------------------------------------------------------------------ helpers


def write_user_dataset(fmt: str, outside: Path) -> tuple[dict, Path]:
    """A small dataset of `fmt` in the user's own folder; returns (params.yaml `dataset:` section, raw path)."""
    shape = (16, 16, 4)
    if fmt == "synapse":
        raw = make_synapse(outside / "RawData" / "Training", n=6, shape=shape)
        return synapse_params(name="btcv", raw_dir=str(raw)), raw
    if fmt in ("msd", "archive"):
        raw = make_msd(outside / "Task09_Spleen", cases=[f"spleen_{i}" for i in range(1, 7)], shape=shape)
        if fmt == "msd":
            return msd_params(name="spleen", raw_dir=str(raw)), raw
        archive = outside / "Task09_Spleen.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(raw, arcname=raw.name)
        shutil.rmtree(raw)  # the archive is all the user has
        return msd_params(name="spleen_tar", raw_dir=str(archive)), archive
    if fmt == "acdc":
        raw = make_acdc(outside / "ACDC", patients=range(1, 6), frames=(1, 12), shape=shape)
        params = {"name": "acdc", "format": "acdc", "modality": "mr", "class_names": ["background", "rv", "myo", "lv"]}
        return {**params, "raw_dir": str(raw)}, raw
    if fmt == "folder2d":
        raw = make_kvasir(outside / "Kvasir-SEG", stems=[f"cju{i:04d}" for i in range(8)], size=(20, 24))
        params = {"name": "kvasir", "format": "folder2d", "modality": "rgb", "class_names": ["background", "polyp"]}
        return {**params, "raw_dir": str(raw)}, raw
    if fmt == "transunet":
        raw = make_transunet(outside / "Synapse", train_cases=(5, 6, 7, 9), slices=3, test_cases=(1, 2), size=(16, 16))
        params = {"name": "synapse_tu", "format": "transunet", "modality": "ct"}
        classes = synapse_params()["class_names"]
        return {**params, "class_names": classes, "raw_dir": str(raw)}, raw
    if fmt in ("itk", "dicom"):
        return write_clinical_dataset(fmt, outside / ("MHA" if fmt == "itk" else "DICOM"), cases=6), \
            outside / ("MHA" if fmt == "itk" else "DICOM")
    raise AssertionError(fmt)


def write_clinical_dataset(fmt: str, raw: Path, cases: int = 6) -> dict:
    """`cases` CT cases in the itk layout (<case>_image.mha + <case>_label.nrrd, LPS) or the dicom layout (<case>/
    DICOM series + labels/<case>.nii.gz in the series' own grid); returns the `dataset:` section."""
    import nibabel as nib
    import SimpleITK as sitk
    from dicom_series import phantom_hu, write_series

    from medseg.data.clinical import read_dicom_series

    for i in range(cases):
        hu, labels = phantom_hu(slices=4, rows=16, cols=16, seed=i)
        if fmt == "itk":
            raw.mkdir(parents=True, exist_ok=True)
            for array, name in ((hu, f"case{i}_image.mha"), (labels, f"case{i}_label.nrrd")):
                image = sitk.GetImageFromArray(array)
                image.SetSpacing((0.8, 0.8, 2.5))
                image.SetOrigin((-10.0, 20.0, 5.0))
                sitk.WriteImage(image, str(raw / name))
        else:
            write_series(raw / f"case{i}", hu)
            volume = read_dicom_series(raw / f"case{i}").volume  # the label map in the series' own grid
            (raw / "labels").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), volume.affine), raw / "labels" / f"case{i}.nii.gz")
    return {"name": f"{fmt}_ct", "format": fmt, "raw_dir": str(raw), "modality": "ct", "hu_window": [-125, 275],
            "class_names": ["background", "organ"]}


def _can_mount_readonly() -> bool:
    """Whether this process can give a child a private read-only view of a folder (root, mount namespaces)."""
    import tempfile

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && ! touch "$0/probe" 2>/dev/null'
        probe = subprocess.run(["unshare", "-m", "sh", "-c", script, folder], capture_output=True)
        return probe.returncode == 0 and not os.path.exists(os.path.join(folder, "probe"))


READONLY_MOUNT = _can_mount_readonly()


class ReadOnly:
    """Runs commands with `folder` read-only: a private read-only bind mount for root (root ignores write bits),
    write bits removed otherwise. Either way a write into it fails loudly instead of passing unnoticed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._modes: dict[Path, int] = {}
        if not READONLY_MOUNT:
            for p in [self.folder, *self.folder.rglob("*")]:
                if not p.is_symlink():
                    self._modes[p] = p.stat().st_mode
                    p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    def argv(self, cmd: list[str]) -> list[str]:
        if not READONLY_MOUNT:
            return cmd
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, str(self.folder), *cmd]

    def restore(self) -> None:
        for p, mode in sorted(self._modes.items(), key=lambda kv: len(kv[0].parts)):
            p.chmod(mode)


def run(cmd: list[str], cwd: Path, readonly: ReadOnly | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own sqlite store
    argv = readonly.argv(cmd) if readonly else cmd
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def tiny_user_params(tiny_params: dict, dataset: dict) -> dict:
    params = copy.deepcopy(tiny_params)
    params["dataset"] = dataset
    return params


def assert_no_phantom(project: Path) -> None:
    assert not (project / "data" / "phantom").exists(), "the phantom was generated for a user's dataset"
    assert not (project / "builtin" / "dvc.lock").exists()


# ------------------------------------------------------------------ every stage, every format


@pytest.mark.parametrize("fmt", RAW_FORMATS)
def test_doctor_ingest_dvc_repro_and_flow_leave_the_users_data_untouched(fmt, tmp_path, tiny_params, prefect_server, monkeypatch):
    from flows import pipeline

    section, raw = write_user_dataset(fmt, tmp_path / "outside")
    before_raw, before_outside = snapshot(raw), snapshot(tmp_path / "outside")
    project = make_dvc_project(tmp_path / "project", tiny_user_params(tiny_params, section))
    readonly = ReadOnly(raw if raw.is_dir() else raw.parent)
    try:
        run(["medseg", "doctor"], project, readonly)
        run(["medseg", "ingest"], project, readonly)
        cases = json.loads(paths(project, section["name"]).cases_json.read_text())
        assert len(cases["cases"]) >= 4
        run(["dvc", "repro"], project, readonly)
    finally:
        readonly.restore()
    assert (paths(project).comparison_dir / "comparison.md").is_file()
    assert json.loads(paths(project).registry_record("unet").read_text())["model_name"].endswith(f"{section['name']}-unet")
    assert_no_phantom(project)

    # The flow reads the raw data again: it re-ingests (DVC sees the ingested folder gone), the rest is up to date.
    shutil.rmtree(project / "data" / "ingested")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = pipeline.medseg_pipeline(root=str(project))
    assert summary["failed"] == [] and summary["report"]["status"] == "completed"
    assert paths(project, section["name"]).cases_json.is_file()
    assert_no_phantom(project)

    assert snapshot(raw) == before_raw
    assert snapshot(tmp_path / "outside") == before_outside  # nothing added beside it either
    if fmt == "dicom":  # the series carry made-up patient identifiers: none may reach a file the pipeline wrote
        assert_no_patient_identifier(project)


def assert_no_patient_identifier(project: Path) -> None:
    """No file under the project (MLflow's store and artifacts, reports, cases.json, DVC's lock and cache, logs)
    holds a patient name, ID or birth date of the DICOM headers it ingested."""
    from dicom_series import BIRTH_DATE, PATIENT_ID, PATIENT_NAME

    needles = [v.encode() for v in (PATIENT_NAME, PATIENT_NAME.split("^")[0], PATIENT_ID, BIRTH_DATE)]
    leaked = []
    for path in project.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            leaked += [f"{path.relative_to(project)}: {n.decode()}" for n in needles if n in data]
    assert not leaked, f"patient identifiers in the project's files: {leaked}"


def test_ingest_refuses_raw_data_that_holds_or_lies_in_its_outputs(tmp_path):
    from medseg.data.ingest import ingest_from_params
    from medseg.errors import ConfigError

    inside = make_msd(paths(tmp_path, "spleen").ingested, shape=(8, 8, 3))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="raw data inside data/ingested/"):
        ingest_from_params({"dataset": msd_params(name="spleen", raw_dir="data/ingested/spleen")}, tmp_path)
    # raw_dir "." is the whole project: the ingested folder would be written inside the user's data
    with pytest.raises(ConfigError, match="output overlaps the raw dataset"):
        ingest_from_params({"dataset": msd_params(name="other", raw_dir=".")}, inside)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["data/ingested/spleen_raw", "models/downloads", "data/phantom"])
def test_dataset_init_refuses_raw_data_inside_a_folder_stages_replace(where, tmp_path):
    """DVC deletes a stage's outputs before running it: raw data there would be gone on the next `dvc repro`."""
    from medseg.cli import main

    raw = make_msd(tmp_path / where, shape=(8, 8, 3))
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    before = snapshot(raw)
    assert main(["--root", str(tmp_path), "dataset", "init", str(raw)]) == 2
    assert (tmp_path / "params.yaml").read_text() == "seed: 1\n"
    assert snapshot(raw) == before


# ------------------------------------------------------------------ presets


def _preset_dataset_at(project: Path, preset: dict) -> tuple[Path, dict]:
    """Put a dataset of the preset's format at the preset's own raw_dir (as its comments tell the user to)."""
    from medseg.data.split import PRESETS

    ds = preset["dataset"]
    raw = project / ds["raw_dir"]
    if ds["format"] == "transunet":
        wanted = PRESETS[preset["split"]["preset"]] if preset["split"].get("preset") else {"train": ["0005", "0006", "0007"], "test": ["0001", "0002"]}
        make_transunet(raw, train_cases=[int(c) for c in wanted["train"]], slices=2, test_cases=[int(c) for c in wanted["test"]], size=(8, 8))
    else:
        raise AssertionError(f"no writer for a {ds['format']} preset dataset; add one here")
    return raw, ds


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")))
def test_every_preset_reads_its_raw_dir_and_never_writes_it(preset, tmp_path, tiny_params):
    project = make_dvc_project(tmp_path / "project", tiny_params)
    shutil.copytree(ROOT / "presets", project / "presets")
    settings = yaml.safe_load((ROOT / "presets" / f"{preset}.yaml").read_text())
    builtin = settings["dataset"]["raw_dir"] == "data/phantom"
    if builtin:  # the built-in dataset: the phantom stage owns that folder
        raw = None
    else:
        raw, _ = _preset_dataset_at(project, settings)
        before = snapshot(raw)
    run(["medseg", "preset", preset], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    # The data stages at the preset's own settings (training at paper scale needs a GPU and the real data).
    run(["dvc", "repro", "split"], project, ReadOnly(raw) if raw is not None and READONLY_MOUNT else None)
    cases = json.loads(paths(project, params["dataset"]["name"]).cases_json.read_text())
    assert cases["cases"]
    if builtin:
        assert (project / "data" / "phantom" / "img").is_dir()
    else:
        assert snapshot(raw) == before
        assert_no_phantom(project)


# ------------------------------------------------------------------ the README's steps


def _git_project(dst: Path, tiny_params: dict) -> Path:
    """What a user has after cloning: the repository's pipeline files, in git, with DVC initialised."""
    make_dvc_project(dst, tiny_params)
    shutil.copytree(ROOT / "presets", dst / "presets")
    shutil.copy2(ROOT / ".gitignore", dst / ".gitignore")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "config", "core.no_scm", "false"],
        ["git", "config", "user.email", "test@example.org"],
        ["git", "config", "user.name", "medseg test"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "project"],
    ):
        subprocess.run(cmd, cwd=dst, check=True)
    return dst


def test_readme_using_real_data_steps_on_an_msd_dataset_outside_the_project(tmp_path, tiny_params):
    """README "Using real data", literally: `medseg dataset init RAW`, `medseg doctor`, `dvc repro`; then
    `dvc exp run -S dataset.raw_dir=...` on a second dataset. Both datasets are byte-identical afterwards."""
    from mlflow import MlflowClient

    readme = (ROOT / "README.md").read_text()
    for step in ("medseg dataset init", "medseg doctor", "dvc repro", "dvc exp run -S dataset.raw_dir="):
        assert step in readme, f"README no longer shows `{step}`: keep this test and the README in step"

    first = make_msd(tmp_path / "outside" / "Task05_Prostate", cases=[f"prostate_{i:02d}" for i in range(6)], channels=2, shape=(16, 16, 4))
    second = make_msd(tmp_path / "outside" / "Task05_Prostate_b", cases=[f"prostate_{i:02d}" for i in range(10, 16)], channels=2, shape=(16, 16, 4))
    before = snapshot(tmp_path / "outside")
    project = _git_project(tmp_path / "project", tiny_params)

    run(["medseg", "dataset", "init", str(first)], project)
    dataset = yaml.safe_load((project / "params.yaml").read_text())["dataset"]
    assert dataset["format"] == "msd" and Path(dataset["raw_dir"]) == first
    run(["medseg", "doctor"], project)
    run(["dvc", "repro"], project)
    assert "unet" in (paths(project).comparison_dir / "comparison.md").read_text()
    registered = json.loads(paths(project).registry_record("unet").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version(registered["model_name"], registered["version"])
    assert version.current_stage is not None and "challenger" in client.get_registered_model(registered["model_name"]).aliases
    assert_no_phantom(project)

    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "first dataset"], cwd=project, check=True)
    run(["dvc", "exp", "run", "-S", f"dataset.raw_dir={second}", "-S", "dataset.name=prostate_b"], project)
    cases = json.loads(paths(project, "prostate_b").cases_json.read_text())
    assert sorted(c["id"] for c in cases["cases"]) == [f"prostate_{i:02d}" for i in range(10, 16)]
    assert json.loads(paths(project).registry_record("unet").read_text())["model_name"].endswith("prostate_b-unet")
    assert_no_phantom(project)
    assert snapshot(tmp_path / "outside") == before
