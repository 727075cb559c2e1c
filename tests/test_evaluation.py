"""Evaluation: inference geometry (resize back, 2.5D context), the test split only, the output files."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medseg.errors import ConfigError, TrainingError
from medseg.evaluation.evaluate import evaluate_model
from medseg.evaluation.metrics import case_metrics
from medseg.inference.torch_backend import load_trained_model, predict_volume, prepare_slices
from medseg.io import read_json

from conftest import paths


class ThresholdNet(nn.Module):
    """Class 1 where input channel `channel` > 0.5, class 0 elsewhere: an oracle whose answer is known."""

    def __init__(self, channel: int = 0):
        super().__init__()
        self.channel = channel

    def forward(self, x):
        v = x[:, self.channel : self.channel + 1] - 0.5
        return torch.cat([torch.zeros_like(v), 100.0 * v], dim=1)


def _volume(depth=5, height=40, width=36, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((depth, 1, height, width), dtype=np.float32)
    for d in range(depth):  # one bright rectangle per slice, different on each slice
        y, x = rng.integers(2, height // 2), rng.integers(2, width // 2)
        image[d, 0, y : y + 12 + d, x : x + 10] = 1.0
    return image


def test_native_size_prediction_is_exact_and_resized_prediction_is_close():
    image = _volume()
    truth = (image[:, 0] > 0.5).astype(np.uint8)
    same = predict_volume(ThresholdNet(), image, (40, 36), batch_size=2)
    assert same.dtype == np.uint8 and same.shape == truth.shape
    np.testing.assert_array_equal(same, truth)
    # at another network size the logits are resized back to 40x36 before argmax
    resized = predict_volume(ThresholdNet(), image, (32, 32), batch_size=3)
    assert resized.shape == truth.shape
    assert (resized == truth).mean() > 0.97


def test_context_channels_match_training_slices(tiny_project):
    from medseg.data.cases import load_case, read_cases
    from medseg.data.loader import SliceDataset

    ingested = paths(tiny_project).ingested
    case_id = read_cases(ingested)["cases"][0]["id"]
    image, _, _ = load_case(ingested, case_id)
    dataset = SliceDataset(ingested, [case_id], (32, 32), context=1, augment=None)
    indices = [0, 3, image.shape[0] - 1]  # both volume ends (clamped neighbours) and the middle
    batch = prepare_slices(image, indices, 1, (32, 32))
    for row, index in enumerate(indices):
        torch.testing.assert_close(batch[row], dataset[index][0], rtol=0, atol=0)
    # the middle channel is the slice itself, the first its predecessor (clamped at slice 0)
    image = _volume()
    truth = (image[:, 0] > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(predict_volume(ThresholdNet(1), image, (40, 36), context=1), truth)
    previous = predict_volume(ThresholdNet(0), image, (40, 36), context=1)
    np.testing.assert_array_equal(previous[1:], truth[:-1])
    np.testing.assert_array_equal(previous[0], truth[0])


def _checkpoint(root, params, context=0):
    """A random-init U-Net checkpoint: evaluation is exercised without spending test time on training."""
    from medseg.data.cases import read_cases
    from medseg.models import build_model

    cases = read_cases(paths(root, params["dataset"]["name"]).ingested)
    in_channels = cases["in_channels"] * (2 * context + 1)
    torch.manual_seed(0)
    model = build_model("unet", in_channels, cases["num_classes"], params["data"]["image_size"], base_channels=4)
    paths(root).model_dir("unet").mkdir(parents=True, exist_ok=True)
    torch.save({
        "arch": "unet", "model_options": {"base_channels": 4}, "in_channels": in_channels,
        "num_classes": cases["num_classes"], "image_size": params["data"]["image_size"],
        "class_names": cases["class_names"], "context": context, "state_dict": model.state_dict(),
        "epoch": 3, "val_dice": 0.25, "config_hash": "h", "training_cases_hash": "s",
    }, paths(root).checkpoint("unet"))


def test_evaluate_model_writes_contract_files_from_the_test_split(project_copy, tiny_params, monkeypatch):
    import medseg.data.cases as cases

    _checkpoint(project_copy, tiny_params)
    split = read_json(paths(project_copy).split_file)
    loaded, predictions = [], {}
    original_load = cases.load_case
    original_predict = predict_volume

    def load_case(ingested, case_id):
        loaded.append(case_id)
        return original_load(ingested, case_id)

    def predict(model, image, *args, **kwargs):
        pred = original_predict(model, image, *args, **kwargs)
        predictions[loaded[-1]] = pred
        return pred

    monkeypatch.setattr(cases, "load_case", load_case)
    monkeypatch.setattr("medseg.evaluation.evaluate.predict_volume", predict)
    metrics = evaluate_model(tiny_params, "unet", project_copy)

    assert loaded == split["test"]  # the test split, every case once, nothing else
    reports = paths(project_copy).reports_dir("unet")
    assert read_json(reports / "metrics.json") == json.loads(json.dumps(metrics))
    for key in ("arch", "protocol", "test_cases_sha256", "mean_dsc", "mean_hd95", "per_class", "num_cases"):
        assert key in metrics
    assert metrics["test_cases_sha256"] == hashlib.sha256(json.dumps(sorted(split["test"])).encode()).hexdigest()
    assert metrics["num_cases"] == len(split["test"]) and metrics["protocol"] == "mm"
    # the test data's content too: a re-ingest that changes one test scan under the same id changes it
    from medseg.deployment.card import dataset_version, sha256_of_test_data

    cases_json = paths(project_copy).cases_json
    entries = {c["id"]: c for c in read_json(cases_json)["cases"]}
    assert metrics["dataset_version"] == dataset_version(cases_json)
    assert metrics["test_data_sha256"] == sha256_of_test_data(entries, split["test"])
    changed = {**entries, split["test"][0]: {**entries[split["test"][0]], "sha256": "0" * 64}}
    assert sha256_of_test_data(changed, split["test"]) != metrics["test_data_sha256"]
    assert sha256_of_test_data(entries, list(reversed(split["test"]))) == metrics["test_data_sha256"]
    class_names = tiny_params["dataset"]["class_names"]
    assert list(metrics["per_class"]) == class_names[1:]

    with open(reports / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case", "class", "dsc", "hd95", "nsd", "status"]
    assert len(rows) == len(split["test"]) * (len(class_names) - 1)
    # every row is the metric of the saved prediction against the ingested label, in millimetres
    for case_id in split["test"]:
        _, label, spacing = original_load(paths(project_copy).ingested, case_id)
        expected = case_metrics(predictions[case_id], np.asarray(label), class_names, spacing, "mm", 2.0)
        got = [r for r in rows if r["case"] == case_id]
        for want, row in zip(expected, got):
            assert row["class"] == want["class"] and row["status"] == want["status"]
            for key in ("dsc", "hd95", "nsd"):
                assert (math.isnan(want[key]) and row[key] == "nan") or float(row[key]) == pytest.approx(want[key])
    for name in class_names[1:]:  # per-class means are over the defined (non-NaN) rows
        values = [float(r["dsc"]) for r in rows if r["class"] == name and r["dsc"] != "nan"]
        summary = metrics["per_class"][name]
        assert summary["n"] == len(values) and summary["excluded"] == len(split["test"]) - len(values)
        assert summary["dsc"] == (pytest.approx(np.mean(values)) if values else None)
        surface = [float(r["nsd"]) for r in rows if r["class"] == name and r["nsd"] != "nan"]
        assert summary["nsd"] == (pytest.approx(np.mean(surface)) if surface else None)
    # NSD at the default tolerance (params.yaml gives none), recorded per class; DVC's flat metrics carry it
    assert metrics["nsd_tolerance"] == {name: 2.0 for name in class_names[1:]}
    defined = [v["nsd"] for v in metrics["per_class"].values() if v["nsd"] is not None]
    assert metrics["mean_nsd"] == pytest.approx(np.mean(defined))
    dvc_metric = read_json(paths(project_copy).test_scores("unet"))
    assert dvc_metric["unet.nsd"] == float(f"{metrics['mean_nsd']:.4g}")
    # and DSC / HD95 per class, as flat numbers (a class no case scored has no key, as DVC shows "-")
    expected = {f"unet.{score}_{name}": float(f"{per[score]:.4g}") for name, per in metrics["per_class"].items()
                for score in ("dsc", "hd95") if per[score] is not None}
    assert {k: v for k, v in dvc_metric.items() if "_" in k.split(".", 1)[1]} == expected and expected
    assert (reports / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transunet_protocol_and_context_checkpoint(project_copy, tiny_params):
    params = json.loads(json.dumps(tiny_params))
    params["evaluate"]["protocol"] = "transunet"
    params["data"]["context"] = 1
    _checkpoint(project_copy, params, context=1)
    metrics = evaluate_model(params, "unet", project_copy)
    assert metrics["protocol"] == "transunet" and metrics["hd95_unit"] == "voxels"
    assert metrics["excluded"] == 0  # TransUNet's rules define every value
    assert all(v["dsc"] is not None for v in metrics["per_class"].values())


def test_bad_inputs_are_named(project_copy, tiny_params, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="checkpoint.pt: cannot read checkpoint"):
        load_trained_model(bad)
    with pytest.raises(TrainingError, match="checkpoint not found"):
        evaluate_model(tiny_params, "unet", project_copy)
    _checkpoint(project_copy, tiny_params)
    params = json.loads(json.dumps(tiny_params))
    params["evaluate"]["protocol"] = "pixels"
    with pytest.raises(ConfigError, match="evaluate.protocol"):
        evaluate_model(params, "unet", project_copy)


def test_unknown_spacing_scores_every_distance_in_voxels(tmp_path, one_torch_thread):
    """One test case without a known spacing turns the whole evaluation to voxels: no mean mixes mm and voxels."""
    from test_ingest import synapse_params, volume_pair, write_nifti

    from medseg.data.cases import load_case
    from medseg.data.ingest import ingest_dataset

    raw, root = tmp_path / "raw", tmp_path / "project"
    for i, zooms in ((1, (0.8, 0.9, 2.5)), (2, (1.0, 1.0, 1.0))):  # case0002: unit zooms, no unit -> unknown
        image, label = volume_pair(i)
        write_nifti(raw / "img" / f"img{i:04d}.nii.gz", image, spacing=zooms)
        write_nifti(raw / "label" / f"label{i:04d}.nii.gz", label, spacing=zooms)
    ingested = paths(root, "syn").ingested
    manifest = ingest_dataset(synapse_params(), raw, ingested)
    assert [c["spacing_known"] for c in manifest["cases"]] == [True, False]
    params = {"dataset": {"name": "syn"}, "data": {"image_size": [16, 16], "context": 0},
              "evaluate": {"protocol": "mm", "overlay_cases": 0}, "train": {"device": "cpu"}}
    _checkpoint(root, params)
    split = paths(root, "syn").split_file
    split.parent.mkdir(parents=True)
    hd95 = {}
    for test_ids, unit in ((["case0001"], "mm"), (["case0001", "case0002"], "voxels")):
        split.write_text(json.dumps({"test": test_ids}))
        assert evaluate_model(params, "unet", root)["hd95_unit"] == unit
        with open(paths(root).per_case("unet"), newline="") as fh:
            hd95[unit] = [float(r["hd95"]) for r in csv.DictReader(fh) if r["case"] == "case0001"]

    model, meta = load_trained_model(paths(root).checkpoint("unet"))
    image, label, spacing = load_case(ingested, "case0001")
    pred = predict_volume(model, image, meta.image_size)
    names = manifest["class_names"]
    expected = {unit: [r["hd95"] for r in case_metrics(pred, np.asarray(label), names, s, "mm")]
                for unit, s in (("mm", spacing), ("voxels", None))}
    np.testing.assert_allclose(hd95["mm"], expected["mm"], equal_nan=True)
    np.testing.assert_allclose(hd95["voxels"], expected["voxels"], equal_nan=True)
    assert not np.allclose(hd95["mm"], hd95["voxels"], equal_nan=True)  # the unit changed the numbers


def test_nsd_tolerances_per_class_refuse_a_class_the_dataset_lacks():
    from medseg.evaluation.evaluate import nsd_tolerances

    names = ["background", "liver", "spleen"]
    assert nsd_tolerances(2.0, names) == {"liver": 2.0, "spleen": 2.0}
    assert nsd_tolerances({"liver": 3.0}, names) == {"liver": 3.0, "spleen": 2.0}
    with pytest.raises(ConfigError, match="names livr, not a foreground class"):
        nsd_tolerances({"livr": 3.0}, names)
    with pytest.raises(ConfigError, match="expected numbers >= 0"):
        nsd_tolerances({"liver": -1.0}, names)
