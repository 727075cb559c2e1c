"""MLflow registration: run contents, ONNX model version, alias, idempotency, unreachable server.

The stage outputs (model.onnx, metrics.json, export.json, ...) are fabricated here from a real tiny torch model,
so these tests do not depend on training. `fabricate_outputs` is reused by test_promotion.py and test_report.py.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medseg.errors import MedsegError

from conftest import paths, seed_store
from services import free_port

CLASS_NAMES = ["background", "aorta", "liver"]
IMAGE_SIZE = (32, 32)


class TinySegNet(nn.Module):
    """Two convolutions: (B, C, H, W) -> logits (B, K, H, W) for any H, W."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, num_classes, 1))

    def forward(self, x):
        return self.body(x)


def export_tiny_onnx(model: nn.Module, path: Path, in_channels: int = 1) -> None:
    try:  # engineer H4's exporter once it exists, torch's legacy exporter until then
        from medseg.deployment.export import export_onnx
    except ImportError:
        export_onnx = None
    path.parent.mkdir(parents=True, exist_ok=True)
    if export_onnx is not None:
        export_onnx(model, in_channels, IMAGE_SIZE, path, opset=17, dynamic_hw=True)
        return
    dummy = torch.zeros(1, in_channels, *IMAGE_SIZE)
    torch.onnx.export(
        model.eval(), dummy, str(path), input_names=["image"], output_names=["logits"], opset_version=17,
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
        dynamo=False,
    )


def registry_params(tmp_path: Path, arch: str = "unet") -> dict:
    return {
        "preset": "test",
        "seed": 0,
        "dataset": {"name": "phantom", "format": "synapse", "modality": "ct", "class_names": CLASS_NAMES},
        "data": {"image_size": list(IMAGE_SIZE), "context": 0},
        "models": [arch],
        "model_options": {arch: {"base_channels": 4}},
        "train": {"epochs": 2, "lr": 0.01, "optimizer": "sgd"},
        "evaluate": {"protocol": "mm"},
        "export": {"opset": 17},
        "register": {"experiment": "medseg-test", "model_prefix": "medseg",
                     "tracking_uri": "sqlite:///mlflow.db", "retries": 0, "backoff_s": 0.01},
    }


def tiny_card(arch: str = "unet", **fields):
    """A model card for TinySegNet-like models (1 channel, CLASS_NAMES, IMAGE_SIZE, dynamic H/W)."""
    from medseg.deployment.card import ModelCard

    return ModelCard(**{
        "arch": arch, "model_options": {"base_channels": 4}, "image_channels": 1, "context": 0,
        "class_names": list(CLASS_NAMES), "label_values": [0, 8, 6], "image_size": list(IMAGE_SIZE),
        "size_multiple": 16, "dynamic_hw": True, "modality": "ct",
        "normalisation": {"method": "hu_window", "window": [-125, 275]}, "input_kind": "volume",
        "spacing": [3.0, 0.7, 0.7], "dataset": {"name": "phantom", "format": "synapse", "version": "0123456789ab"},
        "split": {"split_sha256": "whole-split", "test_cases_sha256": "split-a"}, "medseg_version": "0.1.0",
        **fields,
    })


def fabricate_outputs(root: Path, arch: str = "unet", *, seed: int = 0, mean_dsc: float = 0.7,
                      parity_passed: bool = True, split_sha256: str = "split-a",
                      model: nn.Module | None = None) -> Path:
    """Write the files train/evaluate/export leave for `arch` under `root` (model.onnx with its model card);
    returns the ONNX path."""
    from medseg.contracts import ClassScores, EvaluationMetrics, ExportReport, TrainSummary, write_per_case
    from medseg.deployment.card import evaluation_of
    from medseg.deployment.export import write_card_metadata

    torch.manual_seed(seed)
    model = model or TinySegNet(1, len(CLASS_NAMES))
    onnx_path = paths(root).onnx(arch)
    export_tiny_onnx(model, onnx_path)
    reports = paths(root).reports_dir(arch)
    reports.mkdir(parents=True, exist_ok=True)
    # Written through the stages' own contracts (medseg.contracts): a field added there reaches these files too.
    rows = [{"case": "case0001", "class": name, "dsc": mean_dsc + 0.05 * i, "hd95": 10.0 - i, "nsd": 0.9 - 0.05 * i,
             "status": "scored"} for i, name in enumerate(CLASS_NAMES[1:])]
    per_class = {r["class"]: ClassScores(dsc=r["dsc"], hd95=r["hd95"], nsd=r["nsd"], n=1, excluded=0,
                                         statuses={"scored": 1}) for r in rows}
    metrics = EvaluationMetrics(arch=arch, protocol="mm", hd95_unit="mm", test_cases_sha256=split_sha256,
                                test_data_sha256=f"content-{split_sha256}", dataset_version="0123456789ab",
                                mean_dsc=mean_dsc, mean_hd95=9.5, mean_nsd=0.85, nsd_tolerance={n: 2.0 for n in per_class},
                                per_class=per_class, num_cases=2, excluded=0)
    metrics.write(reports / "metrics.json")
    card = tiny_card(arch, split={"split_sha256": "whole-split", "test_cases_sha256": split_sha256})
    write_card_metadata(onnx_path, card.with_evaluation(evaluation_of(metrics.to_dict())))
    ExportReport(arch=arch, max_abs_diff=2e-6 if parity_passed else 0.5, parity_passed=parity_passed, threshold=1e-3,
                 torch_latency_ms=3.0, onnx_latency_ms=1.5, opset=17, dynamic_hw=True).write(reports / "export.json")
    TrainSummary(arch=arch, best_val_dice=0.66, epochs=2, train_seconds=12.5).write(reports / "train_summary.json")
    with open(reports / "train_log.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "step", "train_loss", "val_dice", "lr", "seconds"])
        writer.writerow([1, 3, 1.2, 0.5, 0.01, 6.0])
        writer.writerow([2, 6, 0.9, 0.66, 0.005, 12.5])
    write_per_case(reports / "per_case.csv", rows)
    from PIL import Image

    for png in ("curves.png", "overlay.png"):
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(reports / png)
    return onnx_path


@pytest.fixture()
def no_env_uri(monkeypatch):
    """No tracking URI from the environment, so params.register.tracking_uri decides."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)


def test_resolve_tracking_uri_is_absolute_from_root(tmp_path, monkeypatch, no_env_uri):
    from medseg.tracking.store import resolve_tracking_uri

    params = registry_params(tmp_path)
    assert resolve_tracking_uri(params, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    params["register"]["tracking_uri"] = "sqlite:////abs/store.db"
    assert resolve_tracking_uri(params, tmp_path) == "sqlite:////abs/store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(params, tmp_path) == "http://127.0.0.1:5000"


def test_register_logs_run_and_version_then_is_idempotent(tmp_path, no_env_uri):
    from mlflow import MlflowClient

    from medseg.io import read_json, sha256_file
    from medseg.tracking.registry import register_model_version

    params = registry_params(tmp_path)
    onnx_path = fabricate_outputs(tmp_path, "unet", mean_dsc=0.7)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    with pytest.MonkeyPatch.context() as mp:  # as `dvc exp run -n lr1e-3` runs the stage
        mp.setenv("DVC_EXP_NAME", "lr1e-3")
        record = register_model_version(params, "unet", tmp_path)

    assert record["created"] is True
    assert record["model_name"] == "medseg-phantom-unet"
    assert record["artifact_sha256"] == sha256_file(onnx_path)
    assert read_json(paths(tmp_path).registry_record("unet")) == record
    assert (tmp_path / "mlflow.db").is_file()
    assert "MLFLOW_TRACKING_URI" not in os.environ, "registration must not leak its store into the environment"
    assert any((tmp_path / "mlartifacts").rglob("model.onnx")), "artifacts must go to root/mlartifacts"

    client = MlflowClient(tracking_uri=record["tracking_uri"], registry_uri=record["tracking_uri"])
    version = client.get_model_version_by_alias(record["model_name"], "challenger")
    assert str(version.version) == record["version"]
    assert version.tags["artifact_sha256"] == record["artifact_sha256"]
    assert version.tags["test_cases_sha256"] == "split-a"
    assert float(version.tags["test_dsc"]) == pytest.approx(0.7)
    assert version.tags["parity_passed"] == "true"
    assert version.tags["protocol"] == "mm"

    run = client.get_run(record["run_id"])
    assert run.data.params["arch"] == "unet"
    assert run.data.params["model.base_channels"] == "4"
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.metrics["mean_dsc"] == pytest.approx(0.7)
    assert run.data.metrics["dsc_liver"] == pytest.approx(0.75)
    assert run.data.metrics["hd95_aorta"] == pytest.approx(10.0)
    assert run.data.metrics["export_max_abs_diff"] == pytest.approx(2e-6)
    assert run.data.metrics["onnx_latency_ms"] == pytest.approx(1.5)
    history = client.get_metric_history(record["run_id"], "val_dice")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.66)]
    logged = {a.path for a in client.list_artifacts(record["run_id"], "reports")}
    assert {"reports/metrics.json", "reports/export.json", "reports/per_case.csv", "reports/curves.png",
            "reports/overlay.png", "reports/per_class.json"} <= logged

    # A run that explains itself in MLflow 3's UI: a model-training experiment, a run name with the dataset
    # version and where it came from, the dataset as the run's input, a logged model named after the
    # architecture, and a registered model with a description and tags.
    version_of_data = version.tags["medseg.dataset_version"]  # the card's (the fabricated cases.json's hash)
    assert version_of_data
    experiment = client.get_experiment(run.info.experiment_id)
    assert record["experiment_id"] == run.info.experiment_id  # for the Prefect artifacts' links to the run
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == f"unet-phantom-{version_of_data}-lr1e-3"
    assert run.data.tags["dataset_version"] == version_of_data and run.data.tags["dvc_exp_name"] == "lr1e-3"
    assert run.data.tags["dvc_lock_sha256"] == sha256_file(tmp_path / "dvc.lock")
    (data_input,) = run.inputs.dataset_inputs
    assert (data_input.dataset.name, data_input.dataset.digest) == ("phantom", version_of_data)
    assert json.loads(data_input.dataset.source)["uri"] == str(paths(tmp_path).ingested)
    assert {m.name for m in client.search_logged_models([run.info.experiment_id])} == {"unet"}
    registered = client.get_registered_model("medseg-phantom-unet")
    assert registered.description.startswith("medseg unet (cnn): 2D segmentation of phantom (ct)")
    assert "medseg predict -m models:/medseg-phantom-unet@champion" in registered.description
    assert {k: registered.tags[k] for k in ("arch", "family", "dataset", "protocol")} == {
        "arch": "unet", "family": "cnn", "dataset": "phantom", "protocol": "mm"}

    # Same ONNX file again: no new run, no new version.
    again = register_model_version(params, "unet", tmp_path)
    assert again["created"] is False
    assert (again["version"], again["run_id"]) == (record["version"], record["run_id"])
    assert len(client.search_model_versions("name = 'medseg-phantom-unet'")) == 1

    # Re-evaluated (other protocol) but the same model.onnx: still no new version; its tags follow the evaluation.
    metrics_path = paths(tmp_path).metrics("unet")
    metrics = json.loads(metrics_path.read_text())
    metrics.update(protocol="transunet", mean_dsc=0.69)
    metrics_path.write_text(json.dumps(metrics))
    assert register_model_version(params, "unet", tmp_path)["created"] is False
    tags = client.get_model_version("medseg-phantom-unet", record["version"]).tags
    assert (tags["protocol"], float(tags["test_dsc"])) == ("transunet", 0.69)
    assert len(client.search_model_versions("name = 'medseg-phantom-unet'")) == 1

    # A changed model is a new version and takes the challenger alias.
    fabricate_outputs(tmp_path, "unet", seed=1, mean_dsc=0.8)
    newer = register_model_version(params, "unet", tmp_path)
    assert newer["created"] is True and newer["version"] != record["version"]
    assert str(client.get_model_version_by_alias("medseg-phantom-unet", "challenger").version) == newer["version"]


def test_challenger_loads_with_onnx_flavor_and_predicts(tmp_path, no_env_uri, mlflow_db_template):
    import mlflow
    import mlflow.onnx
    import onnxruntime as ort
    from mlflow.models import ModelSignature

    from medseg.tracking.registry import register_model_version
    from medseg.tracking.store import mlflow_store

    seed_store(tmp_path, mlflow_db_template)
    params = registry_params(tmp_path)
    torch.manual_seed(0)
    model = TinySegNet(1, len(CLASS_NAMES)).eval()
    fabricate_outputs(tmp_path, "unet", model=model)
    record = register_model_version(params, "unet", tmp_path)

    with mlflow_store(record["tracking_uri"]):  # a fresh load through the registry, by alias
        uri = f"models:/{record['model_name']}@challenger"
        proto = mlflow.onnx.load_model(uri)  # the pyfunc serves NIfTI/PNG payloads (tests/test_serving.py)
        info = mlflow.models.get_model_info(uri)
    spec = ModelSignature.from_dict(info.metadata["medseg_input"]["onnx_signature"]).inputs.inputs[0]
    assert spec.name == "image" and tuple(spec.shape) == (-1, 1, -1, -1)
    batch = np.random.default_rng(0).random((2, 1, 48, 40), dtype=np.float32)  # a size other than image_size
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": batch})
    assert logits.shape == (2, len(CLASS_NAMES), 48, 40)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_unreachable_server_retries_with_backoff_then_names_uri(tmp_path, monkeypatch, no_env_uri):
    import medseg.tracking.registry as registry

    params = registry_params(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    params["register"].update(tracking_uri=uri, retries=2, backoff_s=0.05)
    fabricate_outputs(tmp_path, "unet")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    delays = []
    monkeypatch.setattr(registry.time, "sleep", delays.append)

    with pytest.raises(MedsegError, match=uri.replace(".", r"\.")) as info:
        registry.register_model_version(params, "unet", tmp_path)
    assert "3 attempt" in str(info.value)
    assert delays == pytest.approx([0.05, 0.1])  # exponential backoff between the three attempts
    assert not (tmp_path / "registry").exists()
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a failed registration must not touch local artefacts"


def test_with_retries_backs_off_then_gives_up_and_never_retries_a_medseg_check(monkeypatch):
    import medseg.tracking.store as tracking

    delays, calls = [], []
    monkeypatch.setattr(tracking.time, "sleep", delays.append)

    def flaky():  # the store answers at the third call
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("lost")
        return "answer"

    give_up = lambda attempts, exc: MedsegError(f"gave up after {attempts}: {exc}")  # noqa: E731
    assert tracking.with_retries(flaky, 3, 0.5, "probe", give_up) == "answer"
    assert delays == [0.5, 1.0] and len(calls) == 3
    delays.clear()
    with pytest.raises(MedsegError, match="gave up after 2: lost"):
        tracking.with_retries(lambda: (_ for _ in ()).throw(ConnectionError("lost")), 1, 0.5, "probe", give_up)
    assert delays == [0.5]
    delays.clear()
    with pytest.raises(MedsegError, match="a check"):  # a medseg check that failed is not the store going away
        tracking.with_retries(lambda: (_ for _ in ()).throw(MedsegError("a check")), 3, 0.5, "probe", give_up)
    assert delays == []


def test_missing_input_names_the_file(tmp_path, no_env_uri):
    from medseg.tracking.registry import register_model_version

    params = registry_params(tmp_path)
    fabricate_outputs(tmp_path, "unet")
    paths(tmp_path).export_report("unet").unlink()
    with pytest.raises(MedsegError, match=r"export\.json: missing"):
        register_model_version(params, "unet", tmp_path)
    assert not (tmp_path / "mlflow.db").exists(), "inputs are checked before touching the store"


def test_export_json_of_another_onnx_is_refused(tmp_path, no_env_uri):
    from medseg.tracking.registry import register_model_version

    params = registry_params(tmp_path)
    fabricate_outputs(tmp_path, "unet")
    export_path = paths(tmp_path).export_report("unet")
    export = json.loads(export_path.read_text())
    export_path.write_text(json.dumps({**export, "onnx_sha256": "0" * 64}))
    with pytest.raises(MedsegError, match=r"export\.json: describes an ONNX file"):
        register_model_version(params, "unet", tmp_path)
    assert not (tmp_path / "mlflow.db").exists(), "inputs are checked before touching the store"


def test_run_params_flatten_nested_options(tmp_path):
    from medseg.tracking.registry import run_params

    params = copy.deepcopy(registry_params(tmp_path))
    params["model_options"]["unet"] = {"depths": [1, 1], "block": {"kind": "res"}}
    flat = run_params(params, "unet")
    assert flat["model.depths"] == "[1, 1]"
    assert flat["model.block.kind"] == "res"
    assert flat["dataset.name"] == "phantom"
    assert flat["data.image_size"] == "[32, 32]"


def test_model_without_a_card_is_refused_before_the_store(tmp_path, no_env_uri):
    from medseg.tracking.registry import register_model_version

    params = registry_params(tmp_path)
    onnx_path = fabricate_outputs(tmp_path, "unet")
    export_tiny_onnx(TinySegNet(1, len(CLASS_NAMES)), onnx_path)  # a graph without metadata_props
    with pytest.raises(MedsegError, match=r"model\.onnx: no medseg\.model_card in the model's metadata"):
        register_model_version(params, "unet", tmp_path)
    assert not (tmp_path / "mlflow.db").exists(), "inputs are checked before touching the store"


def test_signature_states_what_the_model_accepts(tmp_path):
    from medseg.tracking.registry import _onnx_signature

    onnx_path = fabricate_outputs(tmp_path, "unet")  # a graph with dynamic H and W
    signature = _onnx_signature(onnx_path, tiny_card(dynamic_hw=False))
    assert tuple(signature.inputs.inputs[0].shape) == (-1, 1, 32, 32)  # the card says: image_size only
    assert tuple(signature.outputs.inputs[0].shape) == (-1, 3, 32, 32)
    with pytest.raises(MedsegError, match=r"model\.onnx: input shape \[-1, 1, -1, -1\] does not fit its model card"):
        _onnx_signature(onnx_path, tiny_card(image_channels=2))


def test_card_tags_leave_out_a_card_longer_than_a_tag():
    from medseg.tracking.registry import MAX_TAG_VALUE, card_tags

    card = tiny_card()
    assert json.loads(card_tags(card)["medseg.card"]) == card.to_dict()
    names = ["background"] + [f"structure_{i:03d}_long" for i in range(200)]
    big = tiny_card(class_names=names, label_values=list(range(len(names))))
    tags = card_tags(big)
    assert len(big.to_json()) > MAX_TAG_VALUE and "medseg.card" not in tags  # the model's metadata carries it
    assert json.loads(tags["medseg.class_names"]) == names and tags["medseg.arch"] == "unet"
    many = tiny_card(class_names=names * 2, label_values=list(range(2 * len(names))))
    assert "medseg.class_names" not in card_tags(many) and card_tags(many)["medseg.modality"] == "ct"


def test_version_description_reads_as_a_sentence():
    """The model version page says 'test DSC 4.1 %', not 'test DSC 0.04094609121311299'."""
    from medseg.contracts import EvaluationMetrics, ExportReport
    from medseg.tracking.registry import version_description

    scored = EvaluationMetrics(protocol="mm", mean_dsc=0.04094609121311299, mean_hd95=12.3456, hd95_unit="mm")
    text = version_description("unet", "cnn", "phantom", scored, "mm", True,
                               ExportReport(arch="unet", max_abs_diff=3.2e-6))
    assert text == ("unet (cnn) on phantom: test DSC 4.1 %, HD95 12.35 mm (mm protocol), ONNX parity passed "
                    "(max |diff| 3.2e-06)")
    missing = version_description("unet", "cnn", "phantom", EvaluationMetrics(protocol="transunet", mean_dsc=float("nan")),
                                  "transunet", False, ExportReport(arch="unet"))
    assert "test DSC n/a," in missing and "HD95 n/a (transunet protocol)" in missing and "FAILED" in missing


def test_provenance_names_the_commit_the_dvc_experiment_and_the_lock(tmp_path, monkeypatch):
    import subprocess

    from medseg.io import sha256_file
    from medseg.tracking.registry import provenance

    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    assert provenance(tmp_path) == {}  # not a Git checkout, no DVC experiment, no lock: nothing made up
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    subprocess.run([*git, "add", "dvc.lock"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "baseline"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("DVC_EXP_NAME", "wide-lr")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", head)
    assert provenance(tmp_path) == {"git_commit": head, "dvc_exp_name": "wide-lr", "dvc_exp_baseline": head,
                                    "dvc_lock_sha256": sha256_file(tmp_path / "dvc.lock")}
