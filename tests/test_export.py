"""ONNX export: names, dynamic axes, parity with PyTorch, the export stage's failure modes."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from medseg.deployment.export import export_model, export_onnx, onnx_max_abs_diff, ort_session
from medseg.errors import ExportError
from medseg.io import read_json

from conftest import paths


class TinyNet(nn.Module):
    """Conv-BN-pool-upsample: exercises the ops every segmentation net exports, in a fraction of a second."""

    def __init__(self, in_channels: int = 2, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = nn.functional.max_pool2d(y, 2)
        y = nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(y)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_export_onnx_dynamic_axes_and_parity(tmp_path):
    torch.manual_seed(0)
    model = TinyNet().train()  # export must switch to eval mode itself (BatchNorm running stats)
    path = export_onnx(model, 2, (32, 32), tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx"
    assert not model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp files left
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    assert _dims(graph.input[0]) == ["batch", 2, "height", "width"]
    for shape in [(1, 2, 32, 32), (3, 2, 48, 64)]:
        assert onnx_max_abs_diff(model, path, torch.randn(*shape)) < 1e-4


def test_export_onnx_static_hw_and_mismatch_detection(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    path = export_onnx(model, 2, (32, 32), tmp_path / "static.onnx", dynamic_hw=False)
    graph = onnx.load(str(path)).graph
    assert _dims(graph.input[0]) == ["batch", 2, 32, 32]
    x = torch.randn(2, 2, 32, 32)
    assert onnx_max_abs_diff(model, path, x) < 1e-4
    with pytest.raises(Exception):  # a static graph refuses another H/W
        ort_session(path).run(["logits"], {"image": np.zeros((1, 2, 48, 48), np.float32)})
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.bias += 1.0
    assert onnx_max_abs_diff(changed, path, x) == pytest.approx(1.0, abs=1e-4)


class Untraceable(TinyNet):
    def forward(self, x):
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch._dynamo.is_compiling():
            raise RuntimeError("this network cannot be traced")
        return super().forward(x)


def test_export_onnx_failure_names_the_file(tmp_path):
    with pytest.raises(ExportError, match="bad.onnx: ONNX export failed"):
        export_onnx(Untraceable(), 2, (16, 16), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


FAKE_METRICS = {"arch": "unet", "protocol": "mm", "hd95_unit": "mm", "test_cases_sha256": "split-a", "mean_dsc": 0.5,
                "mean_hd95": float("nan"), "per_class": {"aorta": {"dsc": 0.4, "hd95": 3.0, "excluded": 0},
                                                          "liver": {"dsc": 0.6, "hd95": float("nan"), "excluded": 1}}}


def _fake_project(tmp_path, threshold: float, rel_threshold: float = 1e-5, logit_gain: float = 1.0
                  ) -> tuple[dict, object]:
    """A project root holding only a trained-looking U-Net checkpoint with its model card, and its test metrics
    (parity then runs on random input)."""
    from test_registry import tiny_card

    from medseg.models import build_model

    params = {
        "seed": 0,
        "dataset": {"name": "none"},
        "export": {"opset": 17, "max_abs_diff": threshold, "max_rel_diff": rel_threshold, "latency_runs": 2},
    }
    torch.manual_seed(0)
    model = build_model("unet", 1, 3, (32, 32), base_channels=4)
    with torch.no_grad():
        model.head.weight.mul_(logit_gain)
    checkpoint = {
        "arch": "unet", "model_options": {"base_channels": 4}, "in_channels": 1, "num_classes": 3,
        "image_size": [32, 32], "class_names": ["background", "a", "b"], "context": 0,
        "state_dict": model.state_dict(), "epoch": 1, "val_dice": 0.5, "config_hash": "x", "training_cases_hash": "y",
        "card": tiny_card("unet").to_dict(),
    }
    paths(tmp_path).model_dir("unet").mkdir(parents=True)
    torch.save(checkpoint, paths(tmp_path).checkpoint("unet"))
    paths(tmp_path).reports_dir("unet").mkdir(parents=True)
    paths(tmp_path).metrics("unet").write_text(json.dumps(FAKE_METRICS))
    return params, model


def test_export_model_writes_onnx_and_report(tmp_path):
    params, model = _fake_project(tmp_path, threshold=1e-3)
    report = export_model(params, "unet", tmp_path)
    onnx_path = paths(tmp_path).onnx("unet")
    assert onnx_path.is_file()
    saved = read_json(paths(tmp_path).export_report("unet"))
    assert saved == json.loads(json.dumps(report))
    for key in ("max_abs_diff", "parity_passed", "threshold", "torch_latency_ms", "onnx_latency_ms", "opset", "dynamic_hw"):
        assert key in saved
    assert saved["parity_passed"] is True and saved["max_abs_diff"] < 1e-3
    assert saved["label_agreement"] == 1.0 and saved["logit_scale"] > 0
    assert saved["allowed_diff"] == pytest.approx(1e-3 + 1e-5 * saved["logit_scale"])
    assert saved["dynamic_hw"] is True and len(saved["checked_shapes"]) == 2
    assert saved["checked_shapes"][1][2:] != [32, 32]
    assert saved["torch_latency_ms"] > 0 and saved["onnx_latency_ms"] > 0
    # how the latencies were measured: 2 timed runs after warm-up, the spread, threads and machine
    assert saved["torch_latency_iqr_ms"] >= 0 and saved["onnx_latency_iqr_ms"] >= 0
    from medseg.deployment.export import machine_description

    latency = saved["latency"]
    assert (latency["runs"], latency["warmup"], latency["threads"]) == (2, 3, torch.get_num_threads())
    assert latency["machine"] == machine_description() and "usable cores" in latency["machine"]
    # the exported graph reproduces the checkpoint's network (not just itself)
    assert onnx_max_abs_diff(model.eval(), onnx_path, torch.rand(1, 1, 32, 32)) < 1e-3


def test_parity_allows_rounding_differences_that_grow_with_the_logits(tmp_path):
    """Logits of ~1e6 (untrained deep BatchNorm networks have them) differ by more than 1e-3 between PyTorch and
    ONNX Runtime from float32 rounding alone: the relative part of the rule passes them, the absolute alone not."""
    params, _ = _fake_project(tmp_path, threshold=1e-3, logit_gain=1e6)
    report = export_model(params, "unet", tmp_path)
    assert report["parity_passed"] and report["logit_scale"] > 1e5
    assert 1e-3 < report["max_abs_diff"] < 1e-5 * report["logit_scale"]
    assert report["label_agreement"] == 1.0

    params["export"]["max_rel_diff"] = 0.0
    with pytest.raises(ExportError, match="max_rel_diff 0 x logit scale"):
        export_model(params, "unet", tmp_path)


def test_export_model_parity_failure_leaves_no_onnx(tmp_path):
    params, _ = _fake_project(tmp_path, threshold=-1.0)  # nothing can pass a negative threshold
    paths(tmp_path).onnx("unet").write_bytes(b"stale graph from an earlier run")
    with pytest.raises(ExportError, match="model.onnx: ONNX Runtime output differs"):
        export_model(params, "unet", tmp_path)
    assert not paths(tmp_path).onnx("unet").exists()
    assert sorted(p.name for p in paths(tmp_path).model_dir("unet").iterdir()) == ["checkpoint.pt"]
    saved = read_json(paths(tmp_path).export_report("unet"))
    assert saved["parity_passed"] is False and saved["max_abs_diff"] is not None


def test_export_writes_the_card_with_the_test_evaluation_into_the_final_file(tmp_path):
    import onnxruntime as ort
    from test_registry import tiny_card

    from medseg.deployment.card import ONNX_METADATA_KEY, card_from_onnx
    from medseg.io import sha256_file

    params, _ = _fake_project(tmp_path, threshold=1e-3)
    report = export_model(params, "unet", tmp_path)
    onnx_path = paths(tmp_path).onnx("unet")
    card = card_from_onnx(onnx_path)
    # NaN is not JSON: undefined metrics travel as null; per-class entries keep only the numbers
    # (this metrics.json predates NSD: its NSD entries are null, not made up)
    assert card == tiny_card("unet").with_evaluation({
        "protocol": "mm", "hd95_unit": "mm", "mean_dsc": 0.5, "mean_hd95": None, "mean_nsd": None, "nsd_tolerance": {},
        "per_class": {"aorta": {"dsc": 0.4, "hd95": 3.0, "nsd": None}, "liver": {"dsc": 0.6, "hd95": None, "nsd": None}}})
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert set(props) == {ONNX_METADATA_KEY, "medseg.version", "medseg.arch"}
    assert (props["medseg.version"], props["medseg.arch"]) == (card.medseg_version, "unet")
    meta = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["medseg.arch"] == "unet"
    # parity and latency describe this very file: export.json's sha256 is the final file's
    assert report["onnx_sha256"] == sha256_file(onnx_path) and report["parity_passed"]
    # the second parity size follows the card's size multiple (16): 32 + 16 by 32 + 32
    assert report["checked_shapes"][1][2:] == [48, 64]


def test_export_needs_the_card_and_the_test_metrics(tmp_path):
    params, _ = _fake_project(tmp_path, threshold=1e-3)
    paths(tmp_path).metrics("unet").unlink()
    with pytest.raises(ExportError, match=r"metrics\.json: missing; run the evaluate stage"):
        export_model(params, "unet", tmp_path)
    checkpoint_path = paths(tmp_path).checkpoint("unet")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    del checkpoint["card"]
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(ExportError, match=r"checkpoint\.pt: no model card .* re-run the train stage"):
        export_model(params, "unet", tmp_path)
    assert not paths(tmp_path).onnx("unet").exists()


def _segformer_with_trained_norm():
    """segformer_b0 with BatchNorm statistics and affine values far from their defaults, so a wrong fold shows."""
    from medseg.models import build_model

    torch.manual_seed(0)
    model = build_model("segformer_b0", 1, 4, (64, 64))
    norm = model.decoder.fuse_stage[1]
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    return model.eval()


def test_segformer_decoder_fold_computes_the_same_function_and_leaves_the_model_alone():
    from medseg.models.deploy import inference_form
    from medseg.models.smp_models import FoldedSegformerDecoder

    model = _segformer_with_trained_norm()
    before = copy.deepcopy(model.state_dict())
    folded = inference_form(model)
    assert isinstance(folded.decoder, FoldedSegformerDecoder)
    assert type(model.decoder).__name__ == "SegformerDecoder"  # the trained module keeps its layout and weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for size in ((64, 64), (96, 160)):  # the fold is size-independent: a second, non-square size
        x = torch.randn(2, 1, *size)
        with torch.no_grad():
            want, got = model(x), folded(x)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_export_traces_the_folded_segformer_decoder(tmp_path):
    """The exported graph has no 1x1 conv over the concatenated 4 x 256 decoder channels, and ONNX Runtime gives
    PyTorch's output for the trained (unfolded) module."""
    model = _segformer_with_trained_norm()
    path = export_onnx(model, 1, (64, 64), tmp_path / "segformer.onnx")
    graph = onnx.load(str(path)).graph
    weights = {t.name: t.dims for t in graph.initializer}
    conv_inputs = [list(weights[n.input[1]])[1] for n in graph.node if n.op_type == "Conv" and n.input[1] in weights]
    assert conv_inputs and 1024 not in conv_inputs
    x = torch.randn(3, 1, 64, 96)
    assert onnx_max_abs_diff(model, path, x) < 1e-4
