"""`medseg dataset init`: layout detection, the proposed dataset section, params.yaml edited in place only in
its dataset block, and the raw data never touched (file list and every file's sha256 before == after)."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_ingest import make_acdc, make_kvasir, make_msd, make_synapse, make_transunet

from medseg.cli import main
from medseg.data.detect import (
    RECIPE_LINE,
    SYNAPSE_CLASSES,
    SYNAPSE_LABEL_MAP,
    dataset_block,
    detect_format,
    guess_patient_pattern,
    infer_dataset_section,
    replace_yaml_section,
    set_planned_recipe,
)
from medseg.data.formats import dataset_spec, discover
from medseg.data.split import make_split
from medseg.errors import ConfigError

from conftest import snapshot

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def make_isic(root: Path) -> Path:
    inputs, truth = root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth"
    inputs.mkdir(parents=True)
    truth.mkdir()
    for stem in ("ISIC_0000000", "ISIC_0000001"):
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(inputs / f"{stem}.jpg")
        mask = np.zeros((6, 8), np.uint8)
        mask[1:3, 1:5] = 255
        Image.fromarray(mask).save(truth / f"{stem}_segmentation.png")
    return root


def archive(folder: Path, kind: str) -> Path:
    out = folder.parent / f"{folder.name}.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(out, "w") as zf:
            for p in sorted(folder.rglob("*")):
                zf.write(p, p.relative_to(folder.parent).as_posix())
    else:
        with tarfile.open(out, "w:gz") as tf:
            tf.add(folder, arcname=folder.name)
    return out


# name -> (writer(tmp) returning the path a user would pass, expected format)
LAYOUTS = {
    "synapse": (lambda t: make_synapse(t / "Synapse"), "synapse"),
    "btcv": (lambda t: make_synapse(t / "BTCV" / "RawData" / "Training") and t / "BTCV", "synapse"),
    "btcv_imagesTr": (lambda t: make_synapse(t / "Abdomen", dirs=("imagesTr", "labelsTr")), "synapse"),
    "msd": (lambda t: make_msd(t / "Task09_Spleen", style="msd"), "msd"),
    "nnunet": (lambda t: make_msd(t / "Dataset002_Heart", channels=2), "msd"),
    "acdc": (lambda t: make_acdc(t / "ACDC"), "acdc"),
    "kvasir": (lambda t: make_kvasir(t / "Kvasir-SEG"), "folder2d"),
    "isic": (lambda t: make_isic(t / "ISIC2018"), "folder2d"),
    "transunet": (lambda t: make_transunet(t / "project_TransUNet" / "data" / "Synapse"), "transunet"),
    "zip": (lambda t: archive(make_synapse(t / "src" / "Synapse"), "zip"), "synapse"),
    "tar.gz": (lambda t: archive(make_msd(t / "src" / "Task09_Spleen", style="msd"), "tar.gz"), "msd"),
}


def project(tmp_path: Path, text: str | None = None) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(REPO_PARAMS.read_text() if text is None else text)
    return root


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_is_detected_and_written_without_touching_the_raw_data(tmp_path, layout, capsys):
    writer, expected = LAYOUTS[layout]
    raw = writer(tmp_path)
    before = snapshot(raw)
    root = project(tmp_path)
    assert detect_format(raw) == expected
    assert main(["--root", str(root), "dataset", "init", str(raw)]) == 0
    out = capsys.readouterr().out
    assert f"format: {expected} (detected)" in out and "check before training:" in out and "medseg doctor" in out
    section = yaml.safe_load((root / "params.yaml").read_text())["dataset"]
    assert section["format"] == expected and section["raw_dir"] == str(raw)  # absolute: kept as given
    spec = dataset_spec(section, raw)  # the written section is valid as it stands
    if not raw.is_file():
        cases, problems = discover(spec, raw)
        assert cases and not problems
    assert snapshot(raw) == before
    assert not list(root.glob(".params.yaml*"))  # no temp file left next to params.yaml


def test_dataset_json_gives_classes_modality_and_channels(tmp_path):
    section, notes = infer_dataset_section(make_msd(tmp_path / "Dataset001_Brain", channels=2))
    assert section["class_names"] == ["background", "organ", "tumour"] and section["modality"] == "mr"
    assert "hu_window" not in section and "modality: mr, 2 channel(s)" in notes
    assert any("classes: 3" in n and "dataset.json" in n for n in notes)
    section, notes = infer_dataset_section(make_msd(tmp_path / "Task09_Spleen", style="msd"))
    assert section["modality"] == "ct" and section["hu_window"] == [-125, 275]
    assert "spacing: 0.8 x 0.9 x 2.5 mm (x, y, z; header of imagesTr/spleen_1.nii.gz)" in notes


def test_format_conventions(tmp_path):
    synapse, _ = infer_dataset_section(make_synapse(tmp_path / "syn"))
    assert synapse["class_names"] == SYNAPSE_CLASSES and synapse["label_map"] == SYNAPSE_LABEL_MAP
    assert synapse["modality"] == "ct" and "patient_pattern" not in synapse
    assert dataset_block(synapse).splitlines()[1].endswith("; check class_names, hu_window, label_map")
    acdc, _ = infer_dataset_section(make_acdc(tmp_path / "acdc"))
    assert acdc["class_names"] == ["background", "rv", "myo", "lv"] and acdc["modality"] == "mr"
    tu, _ = infer_dataset_section(make_transunet(tmp_path / "tu"))
    assert tu["class_names"] == SYNAPSE_CLASSES and tu["modality"] == "ct" and "label_map" not in tu
    kvasir, notes = infer_dataset_section(make_kvasir(tmp_path / "Kvasir-SEG"))  # 0/255 masks (and a grey edge)
    assert kvasir["class_names"] == ["background", "foreground"] and kvasir["modality"] == "rgb"
    assert kvasir["name"] == "kvasir-seg" and "modality: rgb, 3 channel(s)" in notes

    multi = tmp_path / "multi"
    for folder in ("images", "masks"):
        (multi / folder).mkdir(parents=True)
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(multi / "images" / f"{stem}.png")
        Image.fromarray(np.array([[0, 1, 2, 2]] * 4, np.uint8)).save(multi / "masks" / f"{stem}.png")
    section, _ = infer_dataset_section(multi, name="organs")
    assert section["class_names"] == ["background", "class_1", "class_2"] and section["name"] == "organs"


def test_acdc_patient_pattern_keeps_frames_together(tmp_path):
    raw = make_acdc(tmp_path / "ACDC", patients=(1, 2, 3, 4))
    section, notes = infer_dataset_section(raw)
    assert section["patient_pattern"] == r"^(patient\d+)_"
    assert "patient pattern: ^(patient\\d+)_ (8 cases of 4 patients)" in notes
    cases, problems = discover(dataset_spec(section, raw), raw)
    assert not problems
    assert {c.id: c.patient for c in cases}["patient003_frame12"] == "patient003"
    split = make_split([{"id": c.id, "patient": c.patient} for c in cases], {"test_fraction": 0.25, "val_fraction": 0.0, "seed": 0})
    for subset in ("train", "test"):
        patients = {cid.split("_")[0] for cid in split[subset]}
        assert all(f"{p}_frame01" in split[subset] and f"{p}_frame12" in split[subset] for p in patients)


def test_patient_pattern_only_where_it_groups():
    assert guess_patient_pattern(["p01_a", "p01_b", "p02_a"]) == r"^(p\d+)_"
    assert guess_patient_pattern(["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"]) == r"^([^_]+)_"
    assert guess_patient_pattern(["0001_1", "0001_2", "0002_1"]) == r"^(\d+)_"
    assert guess_patient_pattern(["spleen_1", "spleen_2", "spleen_3"]) is None  # the dataset's name, not a patient
    assert guess_patient_pattern(["BraTS2021_00000", "BraTS2021_00001"]) is None  # one "patient": no grouping
    assert guess_patient_pattern(["p01_a", "p02_a"]) is None  # as many patients as cases
    assert guess_patient_pattern(["p01_a", "p01_b", "p02"]) is None  # an id the pattern would not match
    assert guess_patient_pattern(["case0001", "case0002"]) is None


def test_params_yaml_kept_byte_for_byte_outside_the_dataset_block(tmp_path):
    text = REPO_PARAMS.read_text().replace("\nphantom:", "\n# a user's note about the phantom\nphantom:", 1)
    root = project(tmp_path, text)
    raw = make_acdc(root / "data" / "raw" / "ACDC")
    assert main(["--root", str(root), "dataset", "init", str(raw)]) == 0
    new = (root / "params.yaml").read_text()
    start = text.index("\ndataset:") + 1
    end = text.index("\n\n# a user's note") + 1  # the blank line and the comment belong to what follows
    section = yaml.safe_load(new)["dataset"]
    # the one other line it changes: a new dataset gets the planned recipe (the repo's params say resize)
    planned = set_planned_recipe(text[:start] + dataset_block(section) + text[end:])
    assert new == planned and planned.count("\n") == text[:start].count("\n") + dataset_block(section).count(
        "\n") + text[end:].count("\n")
    assert yaml.safe_load(text)["data"]["recipe"] == "resize" and yaml.safe_load(new)["data"]["recipe"] == "planned"
    assert section["raw_dir"] == str(raw)
    assert yaml.safe_load(new)["phantom"] == yaml.safe_load(text)["phantom"]
    assert main(["--root", str(root), "dataset", "init", str(raw)]) == 0  # re-running replaces its own block
    assert (root / "params.yaml").read_text() == new


def test_set_planned_recipe_touches_one_line():
    text = "seed: 1\ndata:\n  # note\n  recipe: resize  # old\n  image_size: [64, 64]\ntrain:\n  recipe: x\n"
    new = set_planned_recipe(text)
    assert new == text.replace("  recipe: resize  # old\n", RECIPE_LINE)
    assert yaml.safe_load(new)["train"]["recipe"] == "x"  # only data's
    added = set_planned_recipe("data:\n  image_size: [64, 64]\n")
    assert yaml.safe_load(added)["data"] == {"recipe": "planned", "image_size": [64, 64]}
    assert yaml.safe_load(set_planned_recipe("seed: 1"))["data"] == {"recipe": "planned"}


def test_replace_yaml_section():
    block = "dataset:\n  name: x\n"
    assert replace_yaml_section("seed: 1\n", "dataset", block) == "seed: 1\n\ndataset:\n  name: x\n"
    assert replace_yaml_section("", "dataset", block) == block
    text = "# top\ndataset: {name: y}  # inline\n\n# models comment\nmodels: [unet]\n"
    assert replace_yaml_section(text, "dataset", block) == "# top\ndataset:\n  name: x\n\n# models comment\nmodels: [unet]\n"
    assert replace_yaml_section("a: 1\ndataset:\n  name: y", "dataset", block) == "a: 1\ndataset:\n  name: x\n"
    assert replace_yaml_section("datasets: 1\n", "dataset", block).startswith("datasets: 1\n\ndataset:")
    with pytest.raises(ConfigError, match="appears 2 times"):
        replace_yaml_section("dataset: 1\ndataset: 2\n", "dataset", block)


def test_relative_raw_dir_is_stored_relative_to_the_root(tmp_path, monkeypatch):
    root = project(tmp_path)
    make_acdc(root / "data" / "raw" / "ACDC")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the path is found under --root, not the working directory
    assert main(["--root", str(root), "dataset", "init", "data/raw/ACDC", "--name", "acdc"]) == 0
    section = yaml.safe_load((root / "params.yaml").read_text())["dataset"]
    assert section["raw_dir"] == "data/raw/ACDC" and section["name"] == "acdc"
    monkeypatch.chdir(root / "data")
    section, _ = infer_dataset_section("raw/ACDC", root="..")
    assert section["raw_dir"] == "data/raw/ACDC"


def test_unknown_and_ambiguous_layouts_write_nothing(tmp_path, capsys):
    root = project(tmp_path)
    before = (root / "params.yaml").read_bytes()
    raw = tmp_path / "notes"
    raw.mkdir()
    (raw / "readme.txt").write_text("not a dataset")
    with pytest.raises(ConfigError, match=rf"{raw}: no known dataset layout found \(looked for synapse: img/ \+ label/"):
        detect_format(raw)
    assert main(["--root", str(root), "dataset", "init", str(raw)]) == 2
    assert f"error: {raw}: no known dataset layout" in capsys.readouterr().err
    both = make_transunet(make_synapse(tmp_path / "both"))
    with pytest.raises(ConfigError, match=rf"{both}: ambiguous layout, cases found as synapse and transunet; pass --format"):
        infer_dataset_section(both)
    assert infer_dataset_section(both, fmt="transunet")[0]["format"] == "transunet"
    assert main(["--root", str(root), "dataset", "init", str(both), "--format", "acdc"]) == 2  # nothing of that layout
    assert main(["--root", str(root), "dataset", "init", str(both), "--name", "../up"]) == 2
    assert (root / "params.yaml").read_bytes() == before
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]


def test_dry_run_writes_nothing(tmp_path, capsys):
    root = project(tmp_path)
    before = (root / "params.yaml").read_bytes()
    raw = make_msd(tmp_path / "Task09_Spleen", style="msd")
    assert main(["--root", str(root), "dataset", "init", str(raw), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dataset:\n  # written by `medseg dataset init`; check class_names, hu_window\n  name: task09_spleen" in out
    assert (root / "params.yaml").read_bytes() == before and sorted(p.name for p in root.iterdir()) == ["params.yaml"]


def test_never_writes_params_inside_the_raw_folder(tmp_path):
    raw = make_acdc(tmp_path / "ACDC")
    (raw / "params.yaml").write_text(REPO_PARAMS.read_text())
    before = snapshot(raw)
    assert main(["--root", str(raw), "dataset", "init", str(raw)]) == 2
    assert snapshot(raw) == before


@pytest.mark.parametrize("layout", ["msd", "acdc", "tar.gz"])
def test_doctor_passes_on_the_written_params(tmp_path, layout, capsys):
    raw = LAYOUTS[layout][0](tmp_path)
    root = project(tmp_path)
    before = snapshot(raw)
    assert main(["--root", str(root), "dataset", "init", str(raw)]) == 0
    capsys.readouterr()
    assert main(["--root", str(root), "doctor"]) == 0
    out = capsys.readouterr().out
    assert "dataset described by params.yaml" in out and "0 error(s)" in out and "ready to ingest" in out
    assert snapshot(raw) == before


def test_archive_section_names_the_archive(tmp_path):
    raw = archive(make_kvasir(tmp_path / "src" / "Kvasir-SEG"), "zip")
    section, notes = infer_dataset_section(raw, root=tmp_path)
    assert section["name"] == "kvasir-seg" and section["raw_dir"] == str(raw) and "cases: 2" in notes
    shutil.rmtree(tmp_path / "src" / "Kvasir-SEG")  # the archive alone is enough
    assert detect_format(raw) == "folder2d"


ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012_em"


@pytest.mark.skipif(not ISBI.is_dir(), reason="../shared/data/isbi2012_em (the shared real data) is not here")
def test_greyscale_em_is_described_and_ingested_as_one_channel(tmp_path):
    """The shared ISBI 2012 EM PNGs are 8-bit grey: one channel, not three identical ones (issue 35)."""
    from medseg.data.ingest import ingest_dataset

    raw = tmp_path / "isbi"
    shutil.copytree(ISBI, raw)
    section, notes = infer_dataset_section(raw)
    assert section["modality"] == "grey" and "modality: grey, 1 channel(s)" in notes
    manifest = ingest_dataset(section, raw, tmp_path / "out")
    assert manifest["in_channels"] == 1 and manifest["normalisation"]["method"] == "percentile_clip_zscore"
    image = np.load(tmp_path / "out" / "cases" / "00_image.npy", mmap_mode="r")
    assert image.shape == (1, 1, 512, 512)


def test_16_bit_grey_images_keep_their_range_and_colour_is_refused_under_grey(tmp_path):
    from medseg.data.ingest import ingest_dataset
    from medseg.errors import IngestError

    raw = tmp_path / "xray"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 60000, (40, 40), dtype=np.uint16)
        Image.fromarray(pixels).save(raw / "images" / f"c{i}.png")
        Image.fromarray((pixels > 30000).astype(np.uint8) * 255).save(raw / "masks" / f"c{i}.png")
    section, _ = infer_dataset_section(raw)
    assert section["modality"] == "grey"
    manifest = ingest_dataset(section, raw, tmp_path / "out")
    assert manifest["in_channels"] == 1
    image = np.load(tmp_path / "out" / "cases" / "c0_image.npy")
    assert np.unique(image).size > 256  # 16 bits were not squeezed into 8
    colour = np.zeros((40, 40, 3), dtype=np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(raw / "images" / "c1.png")
    assert infer_dataset_section(raw)[0]["modality"] == "rgb"  # one colour image: the set is colour
    with pytest.raises(IngestError, match=r"c1.png: a colour image .* set dataset.modality: rgb"):
        ingest_dataset(section, raw, tmp_path / "out2")
