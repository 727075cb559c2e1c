"""params.yaml is validated once, into typed sections with one set of defaults (medseg.config)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg.config import SECTIONS, load_params, settings, validate_params
from medseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("name", ["params.yaml", "presets/quick.yaml", "presets/paper.yaml", "presets/benchmark.yaml"])
def test_the_shipped_files_validate_and_keep_their_values(name):
    raw = yaml.safe_load((ROOT / name).read_text())
    loaded = load_params(ROOT / name)
    for section in SECTIONS:
        for key, value in (raw.get(section) or {}).items():
            assert loaded[section][key] == value, f"{section}.{key}"


@pytest.mark.parametrize("change,message", [
    ({"trian": {}}, r"unknown key trian \(did you mean train\?\)"),
    ({"train": {"epoch": 3}}, r"unknown key train\.epoch \(did you mean train\.epochs\?\)"),
    ({"data": {"augment": {"rotate": 10}}}, r"unknown key data\.augment\.rotate"),
    ({"train": {"lr": "fast"}}, r"train\.lr must be a number, got 'fast'"),
    ({"train": {"epochs": 1.5}}, r"train\.epochs must be an integer"),
    ({"train": {"amp": "yes"}}, r"train\.amp must be true or false"),
    ({"data": {"image_size": [64, "a"]}}, r"data\.image_size\[1\] must be an integer"),
    ({"evaluate": {"protocol": "cm"}}, r"evaluate\.protocol='cm'; expected one of 'mm', 'transunet'"),
    ({"train": {"optimizer": "adam"}}, r"train\.optimizer='adam'; expected one of 'sgd', 'adamw'"),
    ({"register": ["medseg"]}, r"register must be a mapping"),
    ({"models": "unet"}, r"models must be a list"),
    ({"evaluate": {"nsd_tolerance": {"liver": "wide"}}}, r"evaluate\.nsd_tolerance\.liver must be a number, got 'wide'"),
    ({"evaluate": {"nsd_tolerance": "2 mm"}}, r"evaluate\.nsd_tolerance: '2 mm' fits none of"),
])
def test_an_unknown_key_or_a_wrong_type_names_the_file_and_the_key(tmp_path, change, message):
    params = repo_params()
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(params.get(section), dict):
            for key, inner in value.items():
                if isinstance(inner, dict):
                    params[section][key] = {**(params[section].get(key) or {}), **inner}
                else:
                    params[section][key] = inner
        else:
            params[section] = value
    path = write(tmp_path, params)
    with pytest.raises(ConfigError, match=message) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_defaults_come_from_one_place_and_are_filled_in(tmp_path):
    path = write(tmp_path, {"dataset": {"name": "d", "format": "folder2d", "raw_dir": "/x"}, "models": ["unet"],
                            "train": {"epochs": 2}})
    loaded = load_params(path)
    typed = settings(loaded)
    assert typed.train.epochs == 2 and typed.train.optimizer == "sgd" and typed.train.checkpoint_every_steps == 50
    assert loaded["train"]["optimizer"] == "sgd" and loaded["data"]["image_size"] == [224, 224]
    assert typed.data.augment is None  # no augment section: no augmentation (as before)
    assert typed.register.experiment == "medseg" and typed.split.seed is None
    assert validate_params(loaded) == loaded  # idempotent


def test_the_training_config_hash_does_not_depend_on_spelling_out_the_defaults():
    from medseg.training.trainer import run_config_hash

    params = repo_params()
    full = validate_params(params)
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    assert run_config_hash(params, "unet", split) == run_config_hash(full, "unet", split)
    changed = {**params, "train": {**params["train"], "lr": 0.1}}
    assert run_config_hash(changed, "unet", split) != run_config_hash(params, "unet", split)


def test_a_stage_refuses_a_typo_before_any_work(tmp_path):
    params = repo_params()
    params["train"]["epcohs"] = params["train"].pop("epochs")
    write(tmp_path, params)
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py"), "unet"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "unknown key train.epcohs (did you mean train.epochs?)" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written
