"""The planned recipe (medseg.data.plan): a plan from the dataset's fingerprint, patches with foreground
oversampling, epochs of a fixed number of steps, sliding-window inference, the plan carried by the card to predict."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import yaml
from test_model_zoo import TINY

from medseg.config import DataSettings, PlanSettings, TrainSettings, settings
from medseg.data.plan import SlicePlan, budget_of, plan_slices
from medseg.errors import ConfigError
from medseg.inference.inferer import segment_slices
from medseg.inference.sliding import gaussian_weights, sliding_window


def fingerprint(shapes, spacings):
    return {"spacing": {"all": [list(s) for s in spacings]}, "shape": {"all": [list(s) for s in shapes]}}


def planned(**plan) -> DataSettings:
    return DataSettings(recipe="planned", plan=PlanSettings(**plan))


def test_plan_from_the_fingerprint_median_spacing_patch_budget_and_multiple():
    fp = fingerprint([(10, 400, 300), (12, 500, 360), (8, 420, 320)], [(3, 0.8, 0.8), (3, 0.6, 0.6), (3, 0.8, 0.8)])
    plan = plan_slices(planned(max_patch_pixels=128 * 128, batch_pixels=8 * 128 * 128), fp, lambda size: 32)
    assert plan.planned and plan.target_spacing == (0.8, 0.8)  # the median in-plane spacing
    h, w = plan.image_size
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 128 * 128
    assert h > w  # the median slice's aspect (400 x 300) kept
    assert plan.batch_size == 8 * 128 * 128 // (h * w)
    # the slices the inferer sees: native x spacing / target
    assert plan.slice_shape((500, 360), (0.6, 0.6)) == (375, 270)
    # a patch budget larger than the slices: the median slice itself, rounded to the multiple
    big = plan_slices(planned(max_patch_pixels=10**6), fp, lambda size: 16)
    assert big.image_size == (400, 304)  # median of 400 x 300, 375 x 270, 420 x 320


def test_plan_coarsens_only_slices_over_the_budget_and_caps_the_batch():
    huge = fingerprint([(1, 3000, 2000)] * 4, [(1, 0.1, 0.1)] * 4)
    plan = plan_slices(planned(max_image_side=1000), huge, lambda size: 32)
    assert plan.target_spacing == pytest.approx((0.3, 0.3))  # 3000 px -> 1000 px along the longer side
    assert plan.slice_shape((3000, 2000), (0.1, 0.1)) == (1000, 667)
    small = fingerprint([(1, 64, 64)] * 3, [(1, 1.0, 1.0)] * 3)
    tiny = plan_slices(planned(), small, lambda size: 16)
    assert tiny.target_spacing == (1.0, 1.0) and tiny.image_size == (64, 64)
    assert tiny.batch_size == 2  # 5 % of 3 x 64 x 64 pixels is under one patch: nnU-Net's floor of 2


def test_plan_overrides_and_their_errors():
    fp = fingerprint([(4, 100, 100)], [(2, 0.5, 0.5)])
    plan = plan_slices(planned(target_spacing=[1.0, 1.0], patch_size=[64, 32], batch_size=3), fp, lambda s: 16)
    assert (plan.target_spacing, plan.image_size, plan.batch_size) == ((1.0, 1.0), (64, 32), 3)
    with pytest.raises(ConfigError, match=r"patch_size 40x32 is not a multiple of 16"):
        plan_slices(planned(patch_size=[40, 32]), fp, lambda s: 16)
    with pytest.raises(ConfigError, match="tile_step"):
        plan_slices(planned(tile_step=0.0), fp, lambda s: 16)
    resize = plan_slices(DataSettings(image_size=[96, 80]), {}, lambda s: 16)
    assert not resize.planned and resize.slice_shape((300, 200), (1, 1)) == (96, 80)
    assert SlicePlan.from_dict(plan.to_dict(), [1, 1]) == plan
    assert SlicePlan.from_dict(None, [64, 48]) == SlicePlan("resize", (64, 48))


def pointwise(x: np.ndarray) -> np.ndarray:
    """A fully convolutional stand-in with a 1x1 receptive field: what it gives does not depend on the tiling."""
    return np.concatenate([x[:, :1] * 2.0 - 1.0, np.sin(x[:, :1] * 5)], axis=1).astype(np.float32)


@pytest.mark.parametrize("size", [(16, 16), (37, 23), (9, 40), (5, 5)])
def test_sliding_window_covers_every_pixel_and_its_weights_cancel(size):
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, *size), dtype=np.float32)
    seen = []

    def run(tiles):
        seen.append(tiles.shape)
        return pointwise(tiles)

    out = sliding_window(run, (16, 16), step=0.5, tiles_per_call=4)(x)
    assert out.shape == (3, 2, *size)
    np.testing.assert_allclose(out, pointwise(x), atol=1e-5)
    assert all(s[-2:] == (16, 16) and s[0] <= 4 for s in seen)  # the network only ever sees whole patches


def test_sliding_window_weights_the_tile_centres_most():
    w = gaussian_weights((32, 32)).astype(np.float32)
    assert w[16, 16] == w.max() and w[0, 0] < w[16, 16] / 5
    # two overlapping tiles that disagree: each pixel leans to the tile whose centre is nearer
    calls = iter([np.zeros((1, 1, 32, 32)), np.ones((1, 1, 32, 32))])
    out = sliding_window(lambda t: next(calls).astype(np.float32), (32, 32), 0.5, tiles_per_call=1)(
        np.zeros((1, 1, 32, 48), np.float32))
    assert out[0, 0, 16, 8] < 0.2 and out[0, 0, 16, 40] > 0.8


def test_segment_slices_resamples_to_the_plans_spacing_and_back():
    plan = SlicePlan("planned", (16, 16), (1.0, 1.0), 2, 0.33, 0.5)
    inputs = []

    def run(tiles):
        inputs.append(tiles.shape)
        return pointwise(tiles)

    image = np.random.default_rng(1).random((2, 1, 40, 30)).astype(np.float32)
    classes, _ = segment_slices(run, image, plan.image_size, plan=plan, spacing=(2.0, 0.5, 0.5))
    assert classes.shape == (2, 40, 30)
    assert all(s[-2:] == (16, 16) for s in inputs)
    # 40 x 30 at 0.5 mm is 20 x 15 at 1 mm: 2 x 1 tiles of 16 per slice (padded to 20 x 16)
    assert sum(s[0] for s in inputs) == 2 * 2
    with pytest.raises(ValueError, match="spacing"):
        segment_slices(run, image, plan.image_size, plan=plan)


@pytest.fixture(scope="module")
def planned_project(tmp_path_factory):
    """The tiny phantom, ingested, split, with params for the planned recipe."""
    from conftest import load_repo_params

    from medseg.data.ingest import ingest_from_params
    from medseg.data.phantom import generate_from_params
    from medseg.data.split import split_from_params

    root = tmp_path_factory.mktemp("planned")
    params = copy.deepcopy(load_repo_params())
    params["phantom"].update(num_cases=6, shape=[48, 40, 8], seed=0)
    params["split"].update(test_fraction=0.34, val_fraction=0.2, folds=2)
    params["data"].update(recipe="planned", plan={"max_patch_pixels": 32 * 32, "batch_pixels": 4 * 32 * 32})
    params["models"] = ["unet"]
    params["model_options"] = {"unet": {"base_channels": 4}}
    params["train"].update(epochs=2, steps_per_epoch=3)
    params["export"].update(latency_runs=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate_from_params(params, root)
    ingest_from_params(params, root)
    split_from_params(params, root)
    return root, params


def _dataset(root, params, oversample):
    from medseg.data.loader import PatchDataset
    from medseg.io import read_json

    split = read_json(root / "data" / "splits" / "phantom.json")
    plan = SlicePlan("planned", (8, 8), (0.7, 0.7), 4, oversample, 0.5)  # small patches: background is common
    return PatchDataset(root / "data" / "ingested" / "phantom", split["train"], plan, seed=3)


def test_patches_oversample_foreground_and_are_a_pure_function_of_the_item(planned_project):
    root, params = planned_project
    always, never = _dataset(root, params, 1.0), _dataset(root, params, 0.0)
    items = list(range(200))
    fg_always = [bool(lab.any()) for _, lab in always.__getitems__(items)]
    fg_never = [bool(lab.any()) for _, lab in never.__getitems__(items)]
    has_fg = [i for i in items if always.foreground[always.draw(i)[0]]]
    assert all(fg_always[i] for i in has_fg)  # oversampled: every patch of a case with foreground holds some
    assert sum(fg_never) < sum(fg_always)
    # item i is the same patch whatever the batch it is in, or the order
    a = always.__getitems__([5, 6, 7])
    b = always.__getitems__([7, 5])
    assert np.array_equal(a[0][0], b[1][0]) and np.array_equal(a[2][1], b[0][1])


def test_patches_larger_than_the_slice_are_padded(planned_project):
    from medseg.data.loader import PatchDataset
    from medseg.io import read_json

    root, _ = planned_project
    split = read_json(root / "data" / "splits" / "phantom.json")
    plan = SlicePlan("planned", (64, 64), (0.7, 0.7), 2, 0.0, 0.5)  # slices are 48 x 40
    ds = PatchDataset(root / "data" / "ingested" / "phantom", split["train"], plan, seed=0)
    image, label = ds[0]
    case, z, top, left = ds.draw(0)
    volume, labels = ds.volumes[case]
    h, w = labels.shape[1:]
    assert image.shape == (1, 64, 64) and top <= 0 and left <= 0 and (h, w) == (40, 48)
    np.testing.assert_array_equal(image[0, -top:-top + h, -left:-left + w].numpy(), volume[z, 0].numpy())
    np.testing.assert_array_equal(label[-top:-top + h, -left:-left + w].numpy(), labels[z].numpy())
    assert float(image[0, :, :-left].abs().sum() + image[0, :, -left + w:].abs().sum()) == 0.0
    assert int(label[:-top].sum() + label[-top + h:].sum()) == 0


def test_a_planned_epoch_is_a_fixed_number_of_steps_and_the_log_says_the_budget(planned_project, tmp_path, caplog):
    from medseg.training.trainer import train_model

    root, params = planned_project
    project = tmp_path / "p"
    shutil.copytree(root, project)
    with caplog.at_level(logging.INFO, logger="medseg.training.trainer"):
        summary = train_model(params, "unet", project)
    assert summary["recipe"] == "planned" and summary["steps"] == 2 * 3
    assert summary["input_size"] == [32, 32] and summary["batch_size"] == 4
    assert "2 epochs x 3 steps = 6 optimizer steps of 4 patches 32x32 (planned recipe)" in caplog.text
    assert "6 optimizer steps is too few to train a network" in caplog.text
    # the same number of steps with fewer training cases: an epoch no longer depends on the dataset's size
    fewer = copy.deepcopy(params)
    split = json.loads((project / "data" / "splits" / "phantom.json").read_text())
    split["train"] = split["train"][:1]
    (project / "data" / "splits" / "phantom.json").write_text(json.dumps(split))
    assert train_model(fewer, "unet", project)["steps"] == 6


def test_the_card_carries_the_plan_and_onnx_predict_applies_it(planned_project, tmp_path):
    from medseg.data.cases import load_case
    from medseg.deployment.card import card_from_onnx
    from medseg.deployment.export import export_model
    from medseg.deployment.predict import Predictor, load_predictor
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.inference.torch_backend import checkpoint_plan, load_trained_model, predict_volume
    from medseg.io import read_json
    from medseg.training.trainer import train_model

    root, params = planned_project
    project = tmp_path / "p"
    shutil.copytree(root, project)
    train_model(params, "unet", project)
    evaluate_model(params, "unet", project)
    export_model(params, "unet", project)
    card = card_from_onnx(project / "models" / "unet" / "model.onnx")
    assert card.schema == 3 and card.plan.planned and card.plan.target_spacing == (0.7, 0.7)
    assert card.image_size == [32, 32]
    model, meta = load_trained_model(project / "models" / "unet" / "checkpoint.pt")
    predictor = load_predictor(project / "models" / "unet" / "model.onnx")
    assert isinstance(predictor, Predictor)
    test_id = read_json(project / "data" / "splits" / "phantom.json")["test"][0]
    image, _, spacing = load_case(project / "data" / "ingested" / "phantom", test_id)
    # at half the resolution the plan resamples the slice; predict must do it as evaluation does
    torch_labels = predict_volume(model, np.asarray(image), meta.image_size, plan=checkpoint_plan(meta),
                                  spacing=spacing)
    onnx_labels, _ = predictor.segment_normalised(np.asarray(image), spacing=spacing)
    assert (onnx_labels == torch_labels).mean() > 0.999
    resized = predict_volume(model, np.asarray(image), meta.image_size)  # the resize recipe at the patch size
    assert (onnx_labels != resized).any()


def test_an_older_card_reader_is_told_a_planned_card_is_newer():
    from medseg.deployment.card import PLANNED_CARD_SCHEMA, CardError, ModelCard

    with pytest.raises(CardError, match="must be schema 3"):
        ModelCard.from_dict({**_card_dict(), "recipe": SlicePlan("planned", (32, 32), (1.0, 1.0), 2).to_dict()})
    card = ModelCard.from_dict({**_card_dict(), "schema": PLANNED_CARD_SCHEMA,
                                "recipe": SlicePlan("planned", (32, 32), (1.0, 1.0), 2).to_dict()})
    assert card.plan.planned
    with pytest.raises(CardError, match="recipe image_size"):
        ModelCard.from_dict({**_card_dict(), "schema": 3,
                             "recipe": SlicePlan("planned", (64, 32), (1.0, 1.0), 2).to_dict()})


def _card_dict():
    return {"arch": "unet", "model_options": {}, "image_channels": 1, "context": 0, "class_names": ["bg", "fg"],
            "label_values": [0, 1], "image_size": [32, 32], "size_multiple": 16, "dynamic_hw": True,
            "modality": "ct", "normalisation": {"method": "none"},
            "input_kind": "volume", "spacing": None, "dataset": {}, "split": {}}


def test_budget_of_both_recipes_and_its_warnings():
    train = TrainSettings(epochs=40, batch_size=16, steps_per_epoch=250)
    resize = budget_of(SlicePlan("resize", (128, 128)), train, training_slices=16)
    assert (resize.steps_per_epoch, resize.total_steps) == (1, 40)  # the polyp set of issue 34: 40 steps
    assert any("40 optimizer steps is too few" in w for w in resize.warnings())
    plan = SlicePlan("planned", (256, 256), (1.0, 1.0), 8)
    good = budget_of(plan, train, training_slices=16)
    assert good.total_steps == 10_000 and good.warnings(training_pixels=16 * 512 * 512) == []
    assert budget_of(plan, TrainSettings(epochs=1, steps_per_epoch=1), 16).warnings(10**9)[1].startswith("the 1 steps")


def test_doctor_says_the_budget_and_warns_when_it_is_too_small(tmp_path, capsys):
    from test_ingest import make_kvasir

    from medseg.data.doctor import run_doctor

    raw = make_kvasir(tmp_path / "kvasir")
    params = {"dataset": {"name": "k", "format": "folder2d", "raw_dir": str(raw), "modality": "rgb",
                          "class_names": ["background", "polyp"]},
              "models": ["unet"], "data": {"recipe": "resize", "image_size": [64, 64]},
              "train": {"epochs": 40, "batch_size": 16}}
    assert run_doctor(params, tmp_path) == 0
    out = capsys.readouterr().out
    assert "40 epochs x 1 steps = 40 optimizer steps" in " ".join(out.split())
    assert "too few to train" in " ".join(out.split())
    params["data"]["recipe"] = "planned"
    params["train"].update(epochs=10, steps_per_epoch=250)
    assert run_doctor(params, tmp_path) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2,500 optimizer steps" in out and "planned recipe" in out and "too few" not in out


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_architecture_trains_under_the_planned_recipe(arch, planned_project, tmp_path):
    from medseg.models import get_model_info, size_multiple_of
    from medseg.training.trainer import train_model

    root, params = planned_project
    params = copy.deepcopy(params)
    params["models"] = [arch]
    params["model_options"] = {arch: TINY[arch]}
    params["train"].update(epochs=1, steps_per_epoch=1)
    project = tmp_path / "p"
    shutil.copytree(root, project)
    summary = train_model(params, arch, project)
    h, w = summary["input_size"]
    multiple = size_multiple_of(arch, (h, w), **{**get_model_info(arch).defaults, **TINY[arch]})
    assert summary["steps"] == 1 and h % multiple == 0 and w % multiple == 0
    assert summary["best_val_dice"] is not None  # validated by sliding windows over the planned slices
    assert settings(params).data.recipe == "planned"


def test_the_report_gives_each_architecture_its_steps_and_input():
    from medseg.report.collect import ArchRow
    from medseg.report.markdown import summary_table

    rows = [ArchRow("unet", mean_dsc=0.8, epochs=40, steps=1000, recipe="planned", input_size=[256, 192],
                    batch_size=8),
            ArchRow("segformer_b0", mean_dsc=0.7, epochs=40, steps=40, recipe="resize", input_size=[128, 128],
                    batch_size=16),
            ArchRow("nnunet_2d", mean_dsc=0.9, epochs=4, steps=1000, recipe="nnunet", input_size=[512, 512],
                    batch_size=12)]
    table = summary_table(rows)
    assert "Batch x input" in table and "Epochs x steps" in table
    assert "| 40 x 25 | 8 x 256x192 patches |" in table
    assert "| 40 x 1 | 16 x 128x128 resized |" in table
    assert "| 4 x 250 | 12 x 512x512 patches |" in table
