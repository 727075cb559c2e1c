"""The model card: dict/JSON round trip, errors that name the source, the raw label values, the builder from the
project's files, and the card's way through training (checkpoint.pt), export (ONNX metadata_props) and
registration (MLflow model metadata and version tags)."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from test_registry import tiny_card

from medseg.deployment.card import (
    CardError,
    ModelCard,
    build_card,
    card_from_onnx,
    dataset_version,
    evaluation_of,
    inverse_label_map,
    sha256_of_test_cases,
)
from medseg.io import read_json

from conftest import paths, seed_store

SYNAPSE_MAP = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}


def test_card_round_trips_through_dict_and_json():
    card = tiny_card(intensity=[{"mean": 40.5, "std": 12.25}]).with_evaluation(
        {"protocol": "mm", "hd95_unit": "mm", "mean_dsc": 0.8, "mean_hd95": None, "per_class": {}})
    data = card.to_dict()
    assert (data["in_channels"], data["num_classes"]) == (1, 3)
    assert ModelCard.from_dict(data) == card
    assert ModelCard.from_dict(json.loads(card.to_json())) == card
    assert card.to_json() == ModelCard.from_dict(json.loads(card.to_json())).to_json()  # sorted keys: stable bytes


def test_from_dict_errors_name_the_source_and_the_problem():
    data = tiny_card().to_dict()
    with pytest.raises(CardError, match=r"^models/x/model\.onnx: model card lacks normalisation$"):
        ModelCard.from_dict({k: v for k, v in data.items() if k != "normalisation"}, "models/x/model.onnx")
    with pytest.raises(CardError, match=r"^ckpt\.pt: model card lacks class_names, image_size$"):
        ModelCard.from_dict({k: v for k, v in data.items() if k not in ("class_names", "image_size")}, "ckpt.pt")
    with pytest.raises(CardError, match=r"^m\.onnx: model card image_size must be \[h, w\] of whole numbers"):
        ModelCard.from_dict({**data, "image_size": None}, "m.onnx")
    with pytest.raises(CardError, match=r"^m\.onnx: model card is malformed"):
        ModelCard.from_dict({**data, "model_options": None, "spacing": 3}, "m.onnx")
    with pytest.raises(CardError, match=r"^m\.onnx: model card in_channels 3 != 1"):
        ModelCard.from_dict({**data, "in_channels": 3}, "m.onnx")
    with pytest.raises(CardError, match=r"^m\.onnx: model card normalisation method 'zscore'"):
        ModelCard.from_dict({**data, "normalisation": {"method": "zscore"}}, "m.onnx")
    with pytest.raises(CardError, match=r"^m\.onnx: model card schema 99 is newer"):
        ModelCard.from_dict({**data, "schema": 99}, "m.onnx")


def test_inverse_label_map():
    assert inverse_label_map(SYNAPSE_MAP, 9) == [0, 8, 4, 3, 2, 6, 11, 1, 7]
    assert inverse_label_map(None, 4) == [0, 1, 2, 3]
    assert inverse_label_map({}, 3) == [0, 1, 2]
    # several raw values to one class: the smallest is written back; raw values mapped to background are not
    assert inverse_label_map({"5": 1, "3": 1, "9": 2, "7": 0}, 3) == [0, 3, 9]


def test_evaluation_keeps_flat_finite_numbers():
    metrics = {"protocol": "transunet", "hd95_unit": "voxels", "mean_dsc": 0.7, "mean_hd95": float("nan"),
               "mean_nsd": 0.8, "nsd_tolerance": {"liver": 2}, "test_cases_sha256": "s", "num_cases": 2,
               "per_class": {"liver": {"dsc": 0.9, "hd95": float("inf"), "nsd": 0.8, "excluded": 1, "status": "ok"}}}
    assert evaluation_of(metrics) == {"protocol": "transunet", "hd95_unit": "voxels", "mean_dsc": 0.7,
                                      "mean_hd95": None, "mean_nsd": 0.8, "nsd_tolerance": {"liver": 2.0},
                                      "per_class": {"liver": {"dsc": 0.9, "hd95": None, "nsd": 0.8}}}
    # metrics.json written before medseg measured NSD: the card says None, not a made-up number
    old = evaluation_of({"protocol": "mm", "per_class": {"liver": {"dsc": 0.9, "hd95": 3.0}}})
    assert old["mean_nsd"] is None and old["per_class"]["liver"]["nsd"] is None


def _project_inputs(root, params):
    ingested = paths(root, params["dataset"]["name"]).ingested
    return (read_json(ingested / "cases.json"), read_json(ingested / "fingerprint.json"),
            read_json(paths(root, params["dataset"]["name"]).split_file), ingested / "cases.json")


def test_build_card_from_the_project_files(tiny_project, tiny_params):
    from medseg.data.split import split_sha256

    manifest, fingerprint, split, cases_json = _project_inputs(tiny_project, tiny_params)
    version = dataset_version(cases_json)
    card = build_card(tiny_params, "unet", manifest, fingerprint, split, dataset_version=version, size_multiple=16,
                      dynamic_hw=True, medseg_version="9.9")
    assert version == hashlib.sha256(cases_json.read_bytes()).hexdigest()[:12]
    assert card.arch == "unet" and card.model_options == {"base_channels": 4}
    assert (card.image_channels, card.context, card.in_channels) == (1, 0, 1)
    assert card.class_names == tiny_params["dataset"]["class_names"]
    assert card.label_values == [0, 8, 4, 3, 2, 6, 11, 1, 7]
    assert card.image_size == [32, 32] and (card.size_multiple, card.dynamic_hw) == (16, True)
    assert card.modality == "ct" and card.normalisation == manifest["normalisation"] == {
        "method": "hu_window", "window": [-125, 275]}
    assert card.input_kind == "volume"
    assert fingerprint["spacing_known"] and card.spacing == fingerprint["spacing"]["median"]
    assert card.intensity == fingerprint["foreground_intensity"] and len(card.intensity) == 1
    assert card.dataset == {"name": "phantom", "format": "synapse", "version": version}
    assert card.split == {"split_sha256": split_sha256(split), "test_cases_sha256": sha256_of_test_cases(split["test"])}
    assert card.medseg_version == "9.9" and card.evaluation is None

    def variant(**manifest_changes):
        return build_card({**tiny_params, "data": {**tiny_params["data"], "context": 2}}, "unet",
                          {**manifest, **manifest_changes}, {**fingerprint, "spacing_known": False}, split,
                          dataset_version=version, size_multiple=16, dynamic_hw=True)

    transunet = variant(format="transunet")  # labels are class indices already: written back as they are
    assert transunet.label_values == list(range(9)) and transunet.spacing is None and transunet.in_channels == 5
    folder = variant(format="folder2d", modality="rgb", in_channels=3, normalisation={"method": "divide_255"})
    assert (folder.input_kind, folder.image_channels, folder.in_channels) == ("image2d", 3, 15)


def test_card_travels_from_training_to_onnx_and_the_registry(project_copy, tiny_params, monkeypatch,
                                                            mlflow_db_template):
    import mlflow
    import torch
    from mlflow import MlflowClient

    from medseg.deployment.export import export_model
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.tracking.registry import register_model_version
    from medseg.tracking.store import mlflow_store
    from medseg.training.trainer import train_model

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    root, params = project_copy, copy.deepcopy(tiny_params)
    seed_store(root, mlflow_db_template)
    train_model(params, "unet", root)
    checkpoint = torch.load(paths(root).checkpoint("unet"), weights_only=False)
    assert {"arch", "model_options", "in_channels", "num_classes", "image_size", "class_names", "context",
            "state_dict", "epoch", "val_dice", "config_hash", "training_cases_hash", "card"} <= set(checkpoint)
    manifest, fingerprint, split, cases_json = _project_inputs(root, params)
    expected = build_card(params, "unet", manifest, fingerprint, split, dataset_version=dataset_version(cases_json),
                          size_multiple=16, dynamic_hw=True)
    trained = ModelCard.from_dict(checkpoint["card"], "checkpoint.pt")
    assert trained == expected

    metrics = evaluate_model(params, "unet", root)
    export_model(params, "unet", root)
    card = card_from_onnx(paths(root).onnx("unet"))
    assert card == trained.with_evaluation(evaluation_of(metrics))
    assert card.evaluation["protocol"] == "mm" and set(card.evaluation["per_class"]) == set(metrics["per_class"])

    record = register_model_version(params, "unet", root)
    with mlflow_store(record["tracking_uri"]):
        info = mlflow.models.get_model_info(record["model_uri"])
    assert ModelCard.from_dict(info.metadata["medseg_card"], "MLmodel") == card
    assert info.metadata["medseg_input"]["size_multiple"] == 16 and info.metadata["medseg_input"]["dynamic_hw"]
    # the pyfunc's signature is the serving payload; the graph's tensor signature travels in the metadata
    onnx_signature = mlflow.models.ModelSignature.from_dict(info.metadata["medseg_input"]["onnx_signature"])
    spec = onnx_signature.inputs.inputs[0]
    assert (spec.name, spec.type.name, tuple(spec.shape)) == ("image", "float32", (-1, 1, -1, -1))
    assert tuple(onnx_signature.outputs.inputs[0].shape) == (-1, 9, -1, -1)

    client = MlflowClient(tracking_uri=record["tracking_uri"], registry_uri=record["tracking_uri"])
    tags = client.get_model_version(record["model_name"], record["version"]).tags
    assert {key: tags[key] for key in ("medseg.arch", "medseg.dataset", "medseg.dataset_version", "medseg.protocol",
                                       "medseg.modality")} == {
        "medseg.arch": "unet", "medseg.dataset": "phantom", "medseg.dataset_version": card.dataset["version"],
        "medseg.protocol": "mm", "medseg.modality": "ct"}
    assert tags["medseg.test_cases_sha256"] == metrics["test_cases_sha256"] == tags["test_cases_sha256"]
    # every version carries the test data's content fingerprint and the dataset version
    assert tags["test_data_sha256"] == metrics["test_data_sha256"] and len(tags["test_data_sha256"]) == 64
    assert tags["dataset_version"] == metrics["dataset_version"] == card.dataset["version"]
    assert tags["medseg.split_sha256"] == card.split["split_sha256"]
    assert json.loads(tags["medseg.image_size"]) == [32, 32]
    assert json.loads(tags["medseg.class_names"]) == params["dataset"]["class_names"]
    assert ModelCard.from_dict(json.loads(tags["medseg.card"]), "tag") == card
    run_params = client.get_run(record["run_id"]).data.params
    assert json.loads(run_params["dataset.hu_window"]) == [-125, 275]
    assert json.loads(run_params["dataset.class_names"]) == params["dataset"]["class_names"]
