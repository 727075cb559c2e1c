"""nnU-Net v2 as a params.yaml `models:` entry: its budget, its results pack, and `dvc repro` with it beside a network."""

from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest
import torch

from conftest import make_dvc_project, paths, snapshot
from test_nnunet import needs_nnunetv2

from medseg.errors import ConfigError
from medseg.nnunet.pack import NnunetBudget, unpacked_results


def test_the_budget_is_nnunets_own_unless_params_say_otherwise():
    assert NnunetBudget.of({}, "nnunet_2d") == NnunetBudget(epochs=1000, iterations_per_epoch=250,
                                                             val_iterations_per_epoch=50, fold=0, dataset_id=900,
                                                             tta=True)
    quick = {"model_options": {"nnunet_2d": {"epochs": 2, "iterations_per_epoch": 3}}}
    assert NnunetBudget.of(quick, "nnunet_2d").epochs == 2
    assert NnunetBudget.of(quick, "nnunet_resenc_m_2d").epochs == 1000  # each entry has its own options


@pytest.mark.parametrize("options, message", [
    ({"epoch": 2}, r"model_options.nnunet_2d has epoch; an nnU-Net entry takes .*epochs"),
    ({"epochs": 0}, r"model_options.nnunet_2d.epochs=0; expected an integer >= 1"),
    ({"iterations_per_epoch": 2.5}, r"iterations_per_epoch=2.5"),
    ({"fold": -1}, r"model_options.nnunet_2d.fold=-1"),
    ({"tta": "yes"}, r"model_options.nnunet_2d.tta='yes'"),
])
def test_a_bad_budget_is_named(options, message):
    with pytest.raises(ConfigError, match=message):
        NnunetBudget.of({"model_options": {"nnunet_2d": options}}, "nnunet_2d")


def test_a_checkpoint_that_is_no_results_pack_is_refused(tmp_path):
    network = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "meta": {"arch": "unet"}}, network)
    with pytest.raises(ConfigError, match=r"checkpoint\.pt: not an nnU-Net results pack"), unpacked_results(network):
        pass
    with pytest.raises(ConfigError, match=r"missing\.pt: not found; run the train stage"), \
            unpacked_results(tmp_path / "missing.pt"):
        pass


@pytest.mark.parametrize("name", ["../escaped.json", "/tmp/escaped.json"])
def test_a_results_pack_cannot_write_outside_its_folder(tmp_path, name):
    from medseg.nnunet.pack import PACK_FORMAT

    pack = tmp_path / "checkpoint.pt"
    torch.save({"format": PACK_FORMAT, "version": 1, "folder": "m", "fold": 0, "files": {name: b"{}"}}, pack)
    with pytest.raises(ConfigError, match="names a file outside its folder"), unpacked_results(pack):
        pass
    assert not (tmp_path / "escaped.json").exists()


def test_a_network_only_command_names_an_nnunet_entry_for_what_it_is():
    from medseg.models import get_model_info

    with pytest.raises(ConfigError, match=r"nnunet_2d is an nnU-Net entry, trained by nnunetv2 .* takes networks only"):
        get_model_info("nnunet_2d")


@pytest.mark.slow
def test_dvc_repro_trains_evaluates_exports_registers_and_cross_validates_nnunet_beside_a_network(tmp_path,
                                                                                                  tiny_params):
    """The quick budget (2 epochs x 3 iterations): the plumbing, not a good nnU-Net."""
    needs_nnunetv2()
    from medseg.data.split import split_sha256
    from medseg.deployment.card import card_from_onnx

    params = copy.deepcopy(tiny_params)
    params["models"] = ["unet", "nnunet_2d"]
    params["model_options"]["nnunet_2d"] = {"epochs": 2, "iterations_per_epoch": 3, "val_iterations_per_epoch": 2}
    params["cv"] = {"models": ["unet", "nnunet_2d"], "folds": [0, 1]}  # and both cross-validated
    project = make_dvc_project(tmp_path / "project", params)
    scratch = tmp_path / "tmp"  # the stages' temporary folders (nnU-Net's raw, preprocessed, results) go here
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TMPDIR": str(scratch)}

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    dvc("repro", "split")
    raw_before = snapshot(project / "data" / "phantom")
    dvc("repro")
    layout = paths(project)
    assert snapshot(project / "data" / "phantom") == raw_before
    assert [p.name for p in scratch.iterdir() if p.name.startswith("medseg-")] == []  # nnU-Net's work folders are gone
    assert not (project / "data" / "nnunet").exists()  # and never were the project's

    # trained by nnunetv2 on medseg's split, with the budget params.yaml gives
    summary = json.loads(layout.train_summary("nnunet_2d").read_text())
    assert (summary["epochs"], summary["steps"], summary["world_size"]) == (2, 6, 1)
    assert summary["params"] > 10_000 and summary["seconds_per_epoch"] > 0
    assert "pseudo-Dice" in summary["val_dice_definition"]
    log = layout.train_log("nnunet_2d").read_text().splitlines()
    assert log[0].startswith("epoch,step,train_loss,val_loss,val_dice") and len(log) == 3
    split = json.loads(layout.split_file.read_text())
    with unpacked_results(layout.checkpoint("nnunet_2d")) as (folder, fold):
        dataset_json = json.loads((folder / "dataset.json").read_text())
        assert fold == 0 and (folder / "fold_0" / "checkpoint_final.pth").is_file()
    assert dataset_json["medseg"]["split_sha256"] == split_sha256(split)

    # scored on the same test patients and classes as the network, exported with parity, registered
    ours, theirs = (json.loads(layout.metrics(a).read_text()) for a in ("nnunet_2d", "unet"))
    assert ours["test_cases_sha256"] == theirs["test_cases_sha256"]
    assert ours["test_data_sha256"] == theirs["test_data_sha256"]
    assert set(ours["per_class"]) == set(theirs["per_class"]) == set(params["dataset"]["class_names"][1:])
    assert ours["num_cases"] == len(split["test"]) and 0.0 <= ours["mean_dsc"] <= 1.0
    rows = layout.per_case("nnunet_2d").read_text().splitlines()
    assert {row.split(",")[0] for row in rows[1:]} == set(split["test"])
    export = json.loads(layout.export_report("nnunet_2d").read_text())
    assert export["parity_passed"] is True and export["label_agreement"] == 1.0
    card = card_from_onnx(layout.onnx("nnunet_2d"))
    assert card.arch == "nnunet_2d" and card.nnunet["patch_size"] and card.orientation == "native"
    assert card.split == {"split_sha256": split_sha256(split), "test_cases_sha256": ours["test_cases_sha256"]}
    assert card.evaluation["mean_dsc"] == pytest.approx(ours["mean_dsc"])
    record = json.loads(layout.registry_record("nnunet_2d").read_text())
    assert record["model_name"].endswith("nnunet_2d") and record["parity_passed"] is True
    scores = json.loads(layout.train_scores("nnunet_2d").read_text())
    assert set(scores) == {"nnunet_2d.val_dice", "nnunet_2d.train_s"}  # keys unique across DVC's metric files

    comparison = (layout.comparison_dir / "comparison.md").read_text()
    assert "nnunet_2d" in comparison and "nnU-Net (baseline)" in comparison
    assert "## Against the nnU-Net baseline (`nnunet_2d`, test)" in comparison
    assert "with 2 epochs x 3 iterations" in comparison
    against = comparison.split("## Against the nnU-Net baseline")[1].split("\n## ")[0]
    assert "| `unet` |" in against and "| `nnunet_2d` |" not in against

    # cross-validated: nnU-Net's fold 1 + k is medseg's CV fold k; out of fold, then each fold and the ensemble on test
    from medseg.data.split import fold_split

    for k in (0, 1):
        with unpacked_results(layout.run_files("nnunet_2d", k).checkpoint) as (folder, fold):
            assert fold == 1 + k
            splits = json.loads((folder / "dataset.json").read_text())["medseg"]
        assert splits["split_sha256"] == split_sha256(split)
        assert json.loads(layout.run_files("nnunet_2d", k).summary.read_text())["fold"] == k
        held = {row.split(",")[0] for row in layout.oof_per_case("nnunet_2d", k).read_text().splitlines()[1:]}
        assert held == set(fold_split(split, k, layout.split_file)["val"])
    cv = json.loads(layout.cv_metrics("nnunet_2d").read_text())
    assert cv["coverage"]["complete"] is True and cv["folds"] == [0, 1]
    assert set(cv["test_by_fold"]) == {"0", "1"} and 0.0 <= cv["test_ensemble"]["mean_dsc"] <= 1.0
    assert cv["test_ensemble"]["test_cases_sha256"] == ours["test_cases_sha256"]
    cross = comparison[comparison.index("## Cross-validation"):]
    assert "## Against the nnU-Net baseline (`nnunet_2d`, out of fold)" in cross
    assert "| `unet` |" in cross.split("## Against the nnU-Net baseline")[1]

    assert "up to date" in dvc("status").lower()
