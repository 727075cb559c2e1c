"""Comparison report: tables with direction-aware best marks, per_class.csv, charts, qualitative figure.

Checkpoints are real (tiny networks from the model registry, random weights) on the conftest phantom project;
metrics/export/train_summary files are fabricated so the expected table contents are known.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg.contracts import ClassScores, EvaluationMetrics, ExportReport, TrainSummary
from medseg.data.cases import load_case, read_cases
from medseg.io import read_json

from conftest import paths, seed_store

# arch -> (mean DSC, mean HD95, PyTorch ms, ONNX ms, training seconds); unetpp is better at DSC, unet at the rest.
FABRICATED = {"unet": (0.61, 12.0, 3.0, 1.0, 40.0), "unetpp": (0.72, 15.0, 9.0, 4.0, 150.0)}
OPTIONS = {"unet": {"base_channels": 4, "depth": 2}, "unetpp": {"base_channels": 4, "depth": 2}}


def write_checkpoint(root: Path, arch: str, params: dict, context: int = 0, seed: int = 0) -> torch.nn.Module:
    from medseg.models import build_model

    cases = read_cases(paths(root, params["dataset"]["name"]).ingested)
    in_channels = int(cases["in_channels"]) * (2 * context + 1)
    torch.manual_seed(seed)
    size = params["data"]["image_size"]
    model = build_model(arch, in_channels, len(cases["class_names"]), size, **OPTIONS[arch])
    path = paths(root).checkpoint(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": arch, "model_options": OPTIONS[arch], "in_channels": in_channels,
                "num_classes": len(cases["class_names"]), "image_size": list(size),
                "class_names": list(cases["class_names"]), "context": context, "state_dict": model.state_dict(),
                "epoch": 1, "val_dice": 0.5, "config_hash": "x", "training_cases_hash": "y"}, path)
    return model


def fabricate_arch(root: Path, arch: str, params: dict) -> None:
    dsc, hd95, torch_ms, onnx_ms, seconds = FABRICATED[arch]
    class_names = read_cases(paths(root, params["dataset"]["name"]).ingested)["class_names"][1:]
    reports = paths(root).reports_dir(arch)
    reports.mkdir(parents=True, exist_ok=True)
    # through the stages' own contracts (medseg.contracts), as the stages write them
    per_class = {name: ClassScores(dsc=dsc + 0.01 * i, hd95=hd95 - i) for i, name in enumerate(class_names)}
    EvaluationMetrics(arch=arch, protocol="mm", hd95_unit="mm", test_cases_sha256="s", mean_dsc=dsc, mean_hd95=hd95,
                      per_class=per_class, num_cases=2).write(paths(root).metrics(arch))
    ExportReport(arch=arch, max_abs_diff=1e-6, parity_passed=True, threshold=1e-3, torch_latency_ms=torch_ms,
                 onnx_latency_ms=onnx_ms, opset=17, dynamic_hw=True,
                 latency={"runs": 10, "warmup": 3, "threads": 2, "machine": "CPU A, 2 usable cores",
                          "load_per_core": 0.1}).write(paths(root).export_report(arch))
    TrainSummary(arch=arch, train_seconds=seconds, best_val_dice=0.5, seconds_per_epoch=seconds / 10,
                 peak_rss_mb=500 + seconds, device="cpu").write(paths(root).train_summary(arch))
    write_checkpoint(root, arch, params)


@pytest.fixture()
def report_project(project_copy, tiny_params):
    params = json.loads(json.dumps(tiny_params))
    params["models"] = ["unet", "unetpp", "segformer_b0"]  # segformer_b0 has no outputs: listed as missing
    for arch in FABRICATED:
        fabricate_arch(project_copy, arch, params)
    return project_copy, params


def _row(markdown: str, section: str, arch: str) -> list[str]:
    block = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in block.splitlines() if line.startswith(f"| `{arch}`"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _header(markdown: str, section: str) -> list[str]:
    block = markdown.split(f"## {section}", 1)[1]
    line = next(line for line in block.splitlines() if line.startswith("| Architecture"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_build_report_tables_charts_and_missing(report_project):
    from medseg.models import build_model
    from medseg.models.complexity import count_params
    from medseg.report import build_report

    root, params = report_project
    result = build_report(params, root)

    assert set(result["missing"]) == {"segformer_b0"}
    assert [row["arch"] for row in result["architectures"]] == ["unet", "unetpp"]
    for name in ("comparison.md", "comparison_dsc.png", "comparison_summary.png", "qualitative.png", "per_class.csv"):
        assert paths(root).reports_dir(name).is_file(), name

    md = (paths(root).comparison_dir / "comparison.md").read_text()
    assert "segformer_b0" in md.split("## Missing", 1)[1]
    header = _header(md, "Summary")
    unet, unetpp = _row(md, "Summary", "unet"), _row(md, "Summary", "unetpp")
    col = {title.split(" (")[0]: i for i, title in enumerate(header)}
    assert header[col["Mean HD95"]] == "Mean HD95 (mm)"
    # Direction-aware: higher DSC is best, lower HD95 / latency / training time is best.
    assert unetpp[col["Mean DSC"]] == "**72.00**" and unet[col["Mean DSC"]] == "61.00"
    assert unet[col["Mean HD95"]] == "**12.00**" and unetpp[col["Mean HD95"]] == "15.00"
    assert unet[col["ONNX Runtime CPU"]] == "**1.0**" and unetpp[col["PyTorch CPU"]] == "9.0"
    assert unet[col["Training time"]] == "**40 s**" and unetpp[col["Training time"]] == "2.5 min"
    assert unet[col["Family"]] == "cnn" and unet[col["ONNX parity"]] == "passed"
    # compute beside accuracy: seconds per epoch and peak training memory (CPU: resident set), lower is better
    assert unet[col["s / epoch"]] == "**4.0**" and unetpp[col["s / epoch"]] == "15.0"
    assert unet[col["Peak train memory"]] == "**540**" and unetpp[col["Peak train memory"]] == "650"
    assert "trained on: cpu" in md

    # Complexity comes from the checkpoint's network, counted at the training size.
    cases = read_cases(paths(root, params["dataset"]["name"]).ingested)
    net = build_model("unetpp", 1, len(cases["class_names"]), params["data"]["image_size"], **OPTIONS["unetpp"])
    by_arch = {row["arch"]: row for row in result["architectures"]}
    assert by_arch["unetpp"]["params_m"] == pytest.approx(count_params(net) / 1e6)
    assert by_arch["unetpp"]["gflops"] > by_arch["unet"]["gflops"] > 0
    assert result["best"]["mean_dsc"] == pytest.approx(0.72) and result["best"]["mean_hd95"] == pytest.approx(12.0)

    # Per-class DSC: organs as columns, best per organ in bold.
    organs = cases["class_names"][1:]
    assert _header(md, "Per-class DSC")[2:] == organs
    assert _row(md, "Per-class DSC", "unetpp")[2] == "**72.00**"
    assert _row(md, "Per-class HD95", "unet")[2] == "**12.00**"

    with open(paths(root).comparison_dir / "per_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(organs)
    liver = next(r for r in rows if r["arch"] == "unet" and r["class"] == organs[1])
    assert float(liver["dsc"]) == pytest.approx(0.62) and float(liver["hd95"]) == pytest.approx(11.0)
    # dvc.yaml's per-class plot puts one bar per (class, architecture): the label it plots on is unique per row
    assert liver["arch_class"] == f"{organs[1]} / unet" and len({r["arch_class"] for r in rows}) == len(rows)

    # Qualitative grid: image + ground truth + 2 models across, 3 test slices down (wider than tall).
    with Image.open(paths(root).comparison_dir / "qualitative.png") as img:
        width, height = img.size
    assert width > height
    assert re.search(r"3 test slices", md)


def test_latencies_from_another_machine_or_a_busy_one_are_marked_not_comparable(report_project):
    """unet exported on another machine: its latencies get †, are never bold, and the report says why; with
    every export on one idle machine the report states how latency was measured and marks nothing."""
    from medseg.report import build_report

    root, params = report_project
    build_report(params, root)
    md = (paths(root).comparison_dir / "comparison.md").read_text()
    assert "median of 10 calls after 3 warm-up calls, 2 threads, on CPU A, 2 usable cores" in md and "†" not in md

    export = paths(root).export_report("unet")
    record = json.loads(export.read_text())
    record["latency"]["machine"] = "CPU B, 16 usable cores"
    export.write_text(json.dumps(record))
    build_report(params, root)
    md = (paths(root).comparison_dir / "comparison.md").read_text()
    col = {title.split(" (")[0]: i for i, title in enumerate(_header(md, "Summary"))}
    unet, unetpp = _row(md, "Summary", "unet"), _row(md, "Summary", "unetpp")
    # two exports, two machines: no majority, so neither is comparable; DSC columns are untouched
    assert unet[col["ONNX Runtime CPU"]] == "1.0†" and unetpp[col["PyTorch CPU"]] == "9.0†"
    assert unetpp[col["Mean DSC"]] == "**72.00**"
    assert "not comparable" in md and "measured on another machine (CPU B, 16 usable cores)" in md

    record["latency"].update(machine="CPU A, 2 usable cores", load_per_core=3.5)  # same machine, but busy
    export.write_text(json.dumps(record))
    build_report(params, root)
    md = (paths(root).comparison_dir / "comparison.md").read_text()
    unet, unetpp = _row(md, "Summary", "unet"), _row(md, "Summary", "unetpp")
    assert unet[col["ONNX Runtime CPU"]] == "1.0†" and "busy (load 3.5 per core)" in md
    assert unetpp[col["ONNX Runtime CPU"]] == "**4.0**"  # the one comparable latency is the best one


def test_report_without_any_results_lists_all_missing(project_copy, tiny_params):
    from medseg.report import build_report

    params = json.loads(json.dumps(tiny_params))
    params["models"] = ["unet", "vm_unet"]
    result = build_report(params, project_copy)
    assert set(result["missing"]) == {"unet", "vm_unet"} and result["architectures"] == []
    md = (paths(project_copy).comparison_dir / "comparison.md").read_text()
    assert "No architecture has evaluation results" in md and "`vm_unet`" in md
    for name in ("comparison_dsc.png", "comparison_summary.png", "qualitative.png"):
        with Image.open(paths(project_copy).reports_dir(name)) as img:
            assert img.size[0] > 0
    assert (paths(project_copy).comparison_dir / "per_class.csv").read_text().splitlines() == [
        "arch,class,arch_class,dsc,hd95,nsd"]


def test_predict_slice_matches_full_volume_prediction_with_context(project_copy, tiny_params):
    """The qualitative figure predicts single slices; with 2.5D context they must equal evaluation's predictions."""
    from medseg.inference.torch_backend import load_trained_model, predict_volume
    from medseg.report.figures import predict_slice

    root, params = project_copy, tiny_params
    write_checkpoint(root, "unet", params, context=1, seed=3)
    model, meta = load_trained_model(paths(root).checkpoint("unet"))
    case_id = read_json(paths(root, params["dataset"]["name"]).split_file)["test"][0]
    image, _, _ = load_case(paths(root, params["dataset"]["name"]).ingested, case_id)
    full = predict_volume(model, np.asarray(image), meta.image_size, context=1)
    for index in (0, image.shape[0] // 2, image.shape[0] - 1):
        np.testing.assert_array_equal(predict_slice(model, meta, image, index), full[index])


def test_pick_slices_prefers_slices_with_most_organs(project_copy, tiny_params):
    from medseg.report.figures import pick_slices

    ingested = paths(project_copy, tiny_params["dataset"]["name"]).ingested
    test_ids = read_json(paths(project_copy, tiny_params["dataset"]["name"]).split_file)["test"]
    chosen = pick_slices(ingested, test_ids, 2)
    assert chosen == pick_slices(ingested, test_ids, 2), "deterministic"
    counts = {(c, i): len(np.unique(np.asarray(load_case(ingested, c)[1][i]))) - 1
              for c in test_ids for i in range(load_case(ingested, c)[1].shape[0])}
    assert counts[chosen[0]] == max(counts.values())
    assert len(set(chosen)) == len(chosen) == min(2, sum(v > 0 for v in counts.values()))


def test_real_pipeline_outputs_register_promote_and_report(project_copy, tiny_params, monkeypatch,
                                                          mlflow_db_template):
    """The files the real train/evaluate/export stages write fit register, promote and the report."""
    from medseg.deployment.export import export_model
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.report import build_report
    from medseg.tracking.promotion import promote_from_params
    from medseg.tracking.registry import register_model_version
    from medseg.training.trainer import train_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, params = project_copy, tiny_params
    seed_store(root, mlflow_db_template)
    train_model(params, "unet", root)
    metrics = evaluate_model(params, "unet", root)
    export = export_model(params, "unet", root)
    record = register_model_version(params, "unet", root)
    assert record["created"] and record["parity_passed"] == bool(export["parity_passed"])
    if export["parity_passed"]:
        assert promote_from_params(params, "unet", root)["champion_version"] == record["version"]

    result = build_report(params, root)
    row = result["architectures"][0]
    summary = read_json(paths(root).train_summary("unet"))
    assert row["mean_dsc"] == pytest.approx(metrics["mean_dsc"])
    assert row["onnx_latency_ms"] == pytest.approx(export["onnx_latency_ms"])
    assert row["params_m"] == pytest.approx(summary["params"] / 1e6)
    assert row["registry_version"] == record["version"]
    assert _row((paths(root).comparison_dir / "comparison.md").read_text(), "Summary", "unet")[-1] == record["version"]


def _write_per_case(root: Path, arch: str, dsc_by_case: dict[str, float], organs: list[str]) -> None:
    lines = ["case,class,dsc,hd95,nsd,status"]
    for case, dsc in dsc_by_case.items():
        lines += [f"{case},{organ},{dsc},{10 * (1 - dsc)},{dsc},ok" for organ in organs]
    paths(root).per_case(arch).write_text("\n".join(lines) + "\n")


def test_statistics_mark_a_winner_only_when_the_paired_test_says_so(report_project):
    """Eight patients, unetpp better on each: significant (exact p = 2/256), bold alone. The same numbers for both:
    a tie, both bold, though metrics.json's means differ."""
    from medseg.report import build_report

    root, params = report_project
    organs = read_cases(paths(root, params["dataset"]["name"]).ingested)["class_names"][1:]
    base = {f"s{i:02d}": 0.5 + 0.04 * i for i in range(8)}  # not in cases.json: each is its own patient
    _write_per_case(root, "unet", base, organs)
    _write_per_case(root, "unetpp", {c: v + 0.05 + 0.001 * i for i, (c, v) in enumerate(base.items())}, organs)
    result = build_report(params, root)
    stats = read_json(paths(root).comparison_dir / "statistics.json")
    assert stats == {"test": json.loads(json.dumps(result["statistics"])), "cross_validation": None}
    stats = stats["test"]
    assert stats["patients"] == 8 and stats["best"] == "unetpp" and stats["significant"]
    assert stats["paired"]["unet"]["p"] == pytest.approx(2 / 2**8)
    assert stats["paired"]["unet"]["median_difference"] == pytest.approx(-np.median([0.05 + 0.001 * i for i in range(8)]))
    low, high = stats["architectures"]["unet"]["dsc"]["ci"]
    assert low < np.mean(list(base.values())) < high
    md = (paths(root).comparison_dir / "comparison.md").read_text()
    assert "**`unetpp` is the best on DSC**" in md
    col = {t.split(" (")[0]: i for i, t in enumerate(_header(md, "Summary"))}
    assert _row(md, "Summary", "unetpp")[col["Mean DSC"]] == "**72.00**"
    assert _row(md, "Summary", "unet")[col["Mean DSC"]] == "61.00"
    stats_row = _row(md, "Statistics", "unet")
    assert stats_row[-3] == f"{2 / 2**8:.3g}" and stats_row[-1] == "0 %"

    _write_per_case(root, "unetpp", base, organs)  # identical per-patient scores
    build_report(params, root)
    stats = read_json(paths(root).comparison_dir / "statistics.json")["test"]
    assert not stats["significant"] and stats["tied_with_best"] and stats["paired"][stats["tied_with_best"][0]]["p"] == 1.0
    assert stats["rank_first"] == {"unet": 1.0, "unetpp": 1.0}
    md = (paths(root).comparison_dir / "comparison.md").read_text()
    assert "**No significant winner on DSC:**" in md
    assert _row(md, "Summary", "unet")[col["Mean DSC"]] == "**61.00**"  # tied: both bold
    assert _row(md, "Summary", "unetpp")[col["Mean DSC"]] == "**72.00**"


def test_statistics_resample_patients_not_their_cases(report_project):
    """Two cases of one patient count once: three patients with two scans each are three paired observations."""
    from medseg.report.statistics import compute_statistics

    root, params = report_project
    cases_json = paths(root, params["dataset"]["name"]).cases_json
    data = read_json(cases_json)
    organs = data["class_names"][1:]
    ids = [c["id"] for c in data["cases"]][:6]
    for i, case in enumerate(data["cases"]):
        if case["id"] in ids:
            case["patient"] = f"patient{ids.index(case['id']) // 2}"
    cases_json.write_text(json.dumps(data))
    _write_per_case(root, "unet", {c: 0.5 for c in ids}, organs)
    _write_per_case(root, "unetpp", {c: 0.6 + 0.01 * i for i, c in enumerate(ids)}, organs)
    from medseg.report.collect import collect_results

    rows, _ = collect_results(params, root, load_models=False)
    stats = compute_statistics(params, rows, root)
    assert stats["patients"] == 3 and stats["paired"]["unet"]["n"] == 3
    # patient0 = mean of cases 0 and 1 = 0.605
    assert stats["architectures"]["unetpp"]["dsc"]["mean"] == pytest.approx(np.mean([0.605, 0.625, 0.645]))


def test_each_mamba_network_is_paired_with_its_no_mamba_twin(project_copy, tiny_params):
    from medseg.report.collect import ArchRow
    from medseg.report.markdown import ablation_section
    from medseg.report.statistics import compute_statistics

    def rows_for(values):
        return [{"case": f"s{i}", "class": "organ", "dsc": str(v), "hd95": "1.0", "nsd": str(v), "status": "ok"}
                for i, v in enumerate(values)]

    base = [0.50 + 0.03 * i for i in range(8)]
    rows = [ArchRow("msvm_unet", per_case=rows_for([v + 0.1 for v in base])),
            ArchRow("msvm_unet_nomamba", per_case=rows_for(base)),
            ArchRow("vm_unet", per_case=rows_for(base)),
            ArchRow("vm_unet_nomamba", per_case=rows_for(base)),
            ArchRow("unet", per_case=rows_for(base))]  # no twin: not in the ablation
    stats = compute_statistics(tiny_params, rows, project_copy)
    pairs = {p["mamba"]: p for p in stats["ablation"]}
    assert set(pairs) == {"msvm_unet", "vm_unet"} and pairs["msvm_unet"]["twin"] == "msvm_unet_nomamba"
    assert pairs["msvm_unet"]["median_difference"] == pytest.approx(0.1)
    assert pairs["msvm_unet"]["p"] == pytest.approx(2 / 2**8)
    assert pairs["msvm_unet"]["p_holm"] == pytest.approx(2 * 2 / 2**8)  # Holm over the two pairs
    assert pairs["vm_unet"]["p"] == 1.0
    text = "\n".join(ablation_section(stats))
    assert "| `msvm_unet` vs `msvm_unet_nomamba` |" in text and "the scans help" in text
    assert "| `vm_unet` vs `vm_unet_nomamba` |" in text and "no significant difference" in text



def test_every_architecture_is_paired_with_the_nnunet_baseline(project_copy, tiny_params):
    from medseg.report.collect import ArchRow
    from medseg.report.markdown import baseline_section, summary_table
    from medseg.report.statistics import compute_statistics, statistics_metrics

    def rows_for(values):
        return [{"case": f"s{i}", "class": "organ", "dsc": str(v), "hd95": "1.0", "nsd": str(v), "status": "ok"}
                for i, v in enumerate(values)]

    base = [0.50 + 0.03 * i for i in range(8)]
    rows = [ArchRow("unet", per_case=rows_for([v - 0.1 for v in base]), epochs=40, steps=160),
            ArchRow("nnunet_2d", family="nnU-Net (baseline)", per_case=rows_for(base), epochs=2, steps=6),
            ArchRow("segformer_b0", per_case=rows_for(base))]
    stats = compute_statistics(tiny_params, rows, project_copy)
    baseline = stats["baseline"]
    assert baseline["arch"] == "nnunet_2d" and set(baseline["paired"]) == {"unet", "segformer_b0"}
    unet = baseline["paired"]["unet"]
    assert unet["median_difference"] == pytest.approx(-0.1) and unet["n"] == 8
    assert unet["p"] == pytest.approx(2 / 2**8) and unet["p_holm"] == pytest.approx(2 * 2 / 2**8)
    assert baseline["paired"]["segformer_b0"]["p"] == 1.0
    text = "\n".join(baseline_section(stats, budget=", with 2 epochs x 3 iterations"))
    assert "## Against the nnU-Net baseline (`nnunet_2d`, test)" in text and "2 epochs x 3 iterations" in text
    assert "| `unet` |" in text and "worse than nnU-Net" in text
    assert "| `segformer_b0` |" in text and "no significant difference" in text
    assert "| `nnunet_2d` |" not in text  # not against itself
    metrics = statistics_metrics(stats, "test.")
    assert metrics["test.vs_nnunet_median_diff.unet"] == pytest.approx(-0.1)
    # the compute each was given, in the summary
    table = summary_table(rows)
    assert "Epochs x steps" in table and "| 40 x 4 |" in table and "| 2 x 3 |" in table
    # without an nnU-Net row there is no such section
    assert compute_statistics(tiny_params, [rows[0], rows[2]], project_copy)["baseline"] is None


def test_the_comparison_is_logged_as_its_own_mlflow_run_only_into_an_existing_store(report_project, mlflow_db_template,
                                                                                     monkeypatch):
    import mlflow

    from medseg.report import build_report

    root, params = report_project
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    organs = read_cases(paths(root, params["dataset"]["name"]).ingested)["class_names"][1:]
    base = {f"s{i:02d}": 0.5 + 0.04 * i for i in range(8)}
    _write_per_case(root, "unet", base, organs)
    _write_per_case(root, "unetpp", {c: v + 0.05 for c, v in base.items()}, organs)
    assert build_report(params, root)["mlflow_run_id"] is None
    assert not (root / "mlflow.db").exists()  # the report never creates a store

    seed_store(root, mlflow_db_template)  # as the register stage leaves it
    run_id = build_report(params, root)["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "comparison-phantom" and run.data.tags["medseg.kind"] == "comparison"
    assert run.data.tags["best"] == "unetpp" and run.data.tags["significant"] == "True"
    stats = read_json(paths(root).comparison_dir / "statistics.json")["test"]
    assert run.data.metrics["test.dsc_mean.unet"] == pytest.approx(stats["architectures"]["unet"]["dsc"]["mean"])
    assert run.data.metrics["test.p_holm.unet"] == pytest.approx(2 / 2**8)
    assert run.data.metrics["test.p_first.unetpp"] == 1.0
    assert {a.path for a in client.list_artifacts(run_id)} == {"comparison.md", "statistics.json"}


def test_the_first_report_logs_the_comparison_it_has_just_written(report_project, mlflow_db_template, monkeypatch,
                                                                   tmp_path):
    """As in a fresh `dvc repro`: the register stage made the store, no comparison.md exists yet. The run gets the
    comparison.md this report wrote (it was logged before being written: a warning, no run, on every first run)."""
    import mlflow

    from medseg.report import build_report

    root, params = report_project
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    organs = read_cases(paths(root, params["dataset"]["name"]).ingested)["class_names"][1:]
    _write_per_case(root, "unet", {f"s{i:02d}": 0.5 + 0.04 * i for i in range(8)}, organs)
    _write_per_case(root, "unetpp", {f"s{i:02d}": 0.55 + 0.04 * i for i in range(8)}, organs)
    seed_store(root, mlflow_db_template)
    assert not (paths(root).comparison_dir / "comparison.md").exists()
    run_id = build_report(params, root)["mlflow_run_id"]
    assert run_id is not None
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    logged = Path(client.download_artifacts(run_id, "comparison.md", str(tmp_path)))
    assert logged.read_text() == (paths(root).comparison_dir / "comparison.md").read_text()
