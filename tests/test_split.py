"""Patient-level splits: no patient in two subsets, deterministic, presets, k folds."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.data.split import PRESETS, make_split, split_from_params, split_sha256
from medseg.errors import ConfigError

from conftest import paths


def acdc_like(frames_per_patient: list[int]) -> list[dict]:
    return [
        {"id": f"patient{p:03d}_frame{f:02d}", "patient": f"patient{p:03d}"}
        for p, n in enumerate(frames_per_patient, start=1)
        for f in range(1, n + 1)
    ]


def synapse_like(numbers) -> list[dict]:
    return [{"id": f"case{n:04d}", "patient": f"case{n:04d}"} for n in numbers]


@settings(max_examples=60, deadline=None)
@given(
    frames=st.lists(st.integers(1, 4), min_size=1, max_size=25),
    test_fraction=st.floats(0, 0.6),
    val_fraction=st.floats(0, 0.6),
    folds=st.integers(0, 5),
    seed=st.integers(0, 2**31),
)
def test_no_patient_in_two_subsets(frames, test_fraction, val_fraction, folds, seed):
    cases = acdc_like(frames)
    params = {"seed": seed, "test_fraction": test_fraction, "val_fraction": val_fraction, "folds": folds}
    development_patients = sum(make_split(cases, {**params, "folds": 0})["num_patients"][k] for k in ("train", "val"))
    if 1 < folds and development_patients < folds:
        with pytest.raises(ConfigError, match="folds"):
            make_split(cases, params)
        return
    split = make_split(cases, params)
    patient = {c["id"]: c["patient"] for c in cases}
    subsets = {name: {patient[c] for c in split[name]} for name in ("train", "val", "test")}
    assert not subsets["train"] & subsets["val"]
    assert not subsets["train"] & subsets["test"]
    assert not subsets["val"] & subsets["test"]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(patient)  # every case, once
    assert split["train"], "training never ends up empty"
    for name in ("train", "val", "test"):
        assert split[name] == sorted(split[name])
    if folds > 1:
        development = set(split["train"]) | set(split["val"])
        assert len(split["folds"]) == folds
        held_out = [c for fold in split["folds"] for c in fold["val"]]
        assert sorted(held_out) == sorted(development)  # each development case is validated exactly once
        for fold in split["folds"]:
            assert not {patient[c] for c in fold["train"]} & {patient[c] for c in fold["val"]}
            assert sorted(fold["train"] + fold["val"]) == sorted(development)
    assert make_split(list(reversed(cases)), params) == split  # deterministic, independent of input order


def test_fractions_and_seed():
    cases = synapse_like(range(1, 21))
    a = make_split(cases, {"seed": 1, "test_fraction": 0.25, "val_fraction": 0.2, "folds": 0})
    assert (len(a["test"]), len(a["val"]), len(a["train"])) == (5, 3, 12)
    b = make_split(cases, {"seed": 2, "test_fraction": 0.25, "val_fraction": 0.2, "folds": 0})
    assert a["test"] != b["test"]
    assert split_sha256(a) == split_sha256(json.loads(json.dumps(a)))
    assert split_sha256(a) != split_sha256(b)


def test_transunet_synapse_preset():
    cases = synapse_like(range(1, 41))  # the 30 BTCV training cases are numbered up to 0040
    split = make_split(cases, {"preset": "transunet_synapse", "seed": 0, "val_fraction": 0.15, "folds": 3})
    assert split["test"] == [f"case{n}" for n in PRESETS["transunet_synapse"]["test"]]
    assert sorted(split["train"] + split["val"]) == [f"case{n}" for n in PRESETS["transunet_synapse"]["train"]]
    assert len(split["train"]) == 15 and len(split["val"]) == 3  # validation carved from the 18 train patients
    assert "case0011" in split["unused"] and len(split["unused"]) == 10
    assert len(split["folds"]) == 3 and not set(split["test"]) & {c for f in split["folds"] for c in f["val"]}


def test_preset_needs_its_cases_and_must_exist():
    with pytest.raises(ConfigError, match=r"test case\(s\) 0001, 0002"):
        make_split(synapse_like(range(3, 41)), {"preset": "transunet_synapse"})
    with pytest.raises(ConfigError, match="unknown; available: transunet_synapse"):
        make_split(synapse_like(range(1, 5)), {"preset": "nope"})


@pytest.mark.parametrize("params, message", [({"test_fraction": 1.0}, "test_fraction"), ({"val_fraction": -0.1}, "val_fraction")])
def test_bad_fractions(params, message):
    with pytest.raises(ConfigError, match=message):
        make_split(synapse_like(range(1, 5)), params)


def test_split_from_params_writes_the_split(tmp_path):
    from medseg.io import write_json

    write_json(paths(tmp_path, "ds").cases_json, {"cases": acdc_like([2, 2, 2, 2, 2])})
    params = {"seed": 3, "dataset": {"name": "ds"}, "split": {"test_fraction": 0.2, "val_fraction": 0.25, "folds": 2}}
    split = split_from_params(params, tmp_path)
    on_disk = json.loads(paths(tmp_path, "ds").split_file.read_text())
    assert on_disk == split and split["dataset"] == "ds" and split["seed"] == 3
    assert split["num_patients"] == {"train": 3, "val": 1, "test": 1}
    with pytest.raises(ConfigError, match="run the ingest stage first"):
        split_from_params({"dataset": {"name": "other"}, "split": {}}, tmp_path)
