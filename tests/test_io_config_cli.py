"""Atomic writes, params loading and the CLI's own commands (preset switch, errors)."""

from __future__ import annotations

import shutil

import pytest

from medseg import io
from medseg.cli import main
from medseg.config import config_hash, load_params
from medseg.errors import ConfigError, OutputConflictError

from conftest import ROOT, snapshot


def test_atomic_open_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_open(target, "w") as fh:
            fh.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert io.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def _listing(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != io.OWNED_MARKER)


def test_atomic_dir_swaps_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "dataset"
    with io.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert io.is_medseg_output(out)
    with pytest.raises(ValueError):
        with io.atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("second, half done")
            raise ValueError("bad case")
    assert _listing(out) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
    with io.atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("replaced")
    assert _listing(out) == ["c.txt"]


def test_atomic_dir_refuses_to_replace_a_folder_it_did_not_create(tmp_path):
    users = tmp_path / "my_dataset"
    (users / "imagesTr").mkdir(parents=True)
    (users / "imagesTr" / "case_0000.nii.gz").write_bytes(b"only copy")
    (users / "dataset.json").write_text("{}")
    before = snapshot(users)
    with pytest.raises(OutputConflictError, match=r"my_dataset: folder was not written by medseg .*refusing to replace"):
        with io.atomic_dir(users) as tmp:
            (tmp / "img").mkdir()
    assert snapshot(users) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_dataset"]  # no temp folder left either


def test_atomic_dir_refuses_a_file_a_symlink_and_a_folder_taken_during_the_build(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(OutputConflictError, match="notes.txt: exists and is not a folder medseg wrote"):
        with io.atomic_dir(a_file):
            pass
    (tmp_path / "data").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "data")
    with pytest.raises(OutputConflictError):
        with io.atomic_dir(link):
            pass
    late = tmp_path / "late"
    with pytest.raises(OutputConflictError):
        with io.atomic_dir(late) as tmp:
            (tmp / "x").write_text("built")
            late.mkdir()  # someone put a folder there while medseg was building
            (late / "theirs.txt").write_text("keep")
    assert (late / "theirs.txt").read_text() == "keep" and a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "late", "link", "notes.txt"]


def test_save_npy_is_memory_mappable(tmp_path):
    import numpy as np

    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    io.save_npy(tmp_path / "a.npy", arr)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and np.array_equal(mm, arr)


def test_load_params_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: parameters file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)


def test_config_hash_is_order_independent_and_sensitive():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_repo_params_is_the_quick_preset():
    assert load_params(ROOT / "params.yaml") == load_params(ROOT / "presets" / "quick.yaml")


def test_preset_switches_params_and_refuses_unknown(tmp_path, capsys):
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert main(["--root", str(tmp_path), "preset", "paper"]) == 0
    params = load_params(tmp_path / "params.yaml")
    assert params["preset"] == "paper"
    assert params["data"]["image_size"] == [224, 224]
    assert params["train"]["epochs"] == 150 and params["train"]["batch_size"] == 24
    assert params["split"]["preset"] == "transunet_synapse"

    assert main(["--root", str(tmp_path), "preset", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "nonexistent.yaml: no such preset" in err and "quick" in err
    assert load_params(tmp_path / "params.yaml")["preset"] == "paper"  # untouched after the refusal


def test_paper_preset_models_are_all_registered():
    from medseg.models import available_models

    paper = load_params(ROOT / "presets" / "paper.yaml")
    quick = load_params(ROOT / "params.yaml")
    from medseg.nnunet.train import is_nnunet_entry

    missing = {m for m in paper["models"] + quick["models"] if not is_nnunet_entry(m)} - set(available_models())
    assert not missing, f"presets name unregistered models: {sorted(missing)}"
    assert "nnunet_2d" in paper["models"]  # the paper comparison is measured against nnU-Net


def test_a_dvc_stage_prints_one_summary_line_and_the_cli_the_whole_json(tmp_path, monkeypatch, capsys):
    """Stage stdout is one line (DVC's log and each Prefect log record stay readable: a stage used to print its
    whole result as indented JSON, 80+ lines for evaluate); `medseg <stage>` keeps the JSON for scripts."""
    import json
    import sys

    from medseg.entry import STATUS_DIR_ENV, call_stage, run_stage, summary_line

    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = {"arch": "unet", "mean_dsc": 0.876123456, "mean_hd95": 3.5, "num_cases": 3, "parity_passed": True,
              "per_class": {f"organ{i}": {"dsc": 0.5, "hd95": 1.0} for i in range(8)},
              "val_dice_definition": "a sentence " * 30}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path / "status"))
    monkeypatch.setattr(sys, "argv", ["stages/evaluate.py", "unet"])
    assert run_stage(lambda params, arch, root: result, ["unet"], with_arch=True) == 0
    out = capsys.readouterr().out
    assert out == ("evaluate@unet: arch=unet, mean_dsc=0.8761, mean_hd95=3.5, num_cases=3, parity_passed=True, "
                   "per_class: 8\n")
    call_stage(lambda params, arch, root: result, "unet", root=tmp_path)
    assert json.loads(capsys.readouterr().out) == result
    assert len(summary_line({"k": "x" * 39, "n": list(range(500))} | {f"v{i}": 1.0 for i in range(100)})) == 200

    # a fold stage (`train_fold.py ARCH FOLD`): the fold reaches the function as a keyword, the label is DVC's name
    calls = []
    monkeypatch.setattr(sys, "argv", ["stages/train_fold.py", "unet", "2"])
    assert run_stage(lambda params, arch, root, fold=None: calls.append((arch, fold)) or {"fold": fold},
                     ["unet", "2"], with_arch=True, with_fold=True) == 0
    assert calls == [("unet", 2)] and capsys.readouterr().out == "train_fold@unet-2: fold=2\n"
    assert run_stage(lambda *a, **k: None, ["unet", "two"], with_arch=True, with_fold=True) == 2
    assert "usage: train_fold.py ARCH FOLD" in capsys.readouterr().err


def test_dvc_metrics_files_hold_rounded_numbers_only(tmp_path):
    path = tmp_path / "scores.json"
    written = io.write_dvc_metrics(path, {"dsc": 0.876123456, "hd95": None, "steps": 120, "nsd": float("nan")},
                                   "unet")
    assert written == {"unet.dsc": 0.8761, "unet.steps": 120} and io.read_json(path) == written
    with pytest.raises(TypeError, match="scores.json: DVC metric 'arch' must be a number, not str"):
        io.write_dvc_metrics(path, {"arch": "unet"})
    with pytest.raises(TypeError, match="not bool"):
        io.write_dvc_metrics(path, {"parity_passed": True})
    assert io.read_json(path) == written  # a refused write leaves the file as it was


def test_medseg_models_off_a_terminal_prints_every_name_whole_and_json_for_scripts():
    """Issue 32: piped, rich cut the table to 80 columns (`mamba_u…`)."""
    import json
    import subprocess

    from medseg.models import available_models

    piped = subprocess.run(["medseg", "models"], capture_output=True, text=True, check=True, timeout=120).stdout
    first_words = [line.split()[0] for line in piped.splitlines()[1:]]
    assert first_words == available_models() and "…" not in piped
    rows = json.loads(subprocess.run(["medseg", "models", "--json"], capture_output=True, text=True, check=True,
                                     timeout=120).stdout)
    assert [r["name"] for r in rows] == available_models()
    assert {"family", "size_multiple", "dynamic_hw", "description"} <= set(rows[0])
    # a reader that stops early (`| head -1`) gets its line and no error message
    done = subprocess.run("medseg models | head -1", shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("name") and "error" not in done.stderr
