"""Patient-level train/val/test splits and k folds, seeded, with named presets.

Subsets are drawn over *patients*, never over cases or slices: all cases of a patient (ACDC's two frames,
several scans) land in the same subset, so nothing leaks from training into validation or test.
Lists are sorted, so the file's bytes (and `split_sha256`) depend only on the membership.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medseg.config import settings
from medseg.errors import ConfigError
from medseg.io import read_json, write_json
from medseg.layout import ProjectLayout

# TransUNet (Chen et al. 2021) Synapse list: lists/lists_Synapse/train.txt and test_vol.txt case numbers.
PRESETS: dict[str, dict[str, list[str]]] = {
    "transunet_synapse": {
        "train": "0005 0006 0007 0009 0010 0021 0023 0024 0026 0027 0028 0030 0031 0033 0034 0037 0039 0040".split(),
        "test": "0001 0002 0003 0004 0008 0022 0025 0029 0032 0035 0036 0038".split(),
    },
}


def _patients(cases: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """patient -> sorted case ids (a case without a patient is its own patient)."""
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(str(case.get("patient") or case["id"]), []).append(str(case["id"]))
    return {p: sorted(ids) for p, ids in sorted(groups.items())}


def _cases_of(patients: Iterable[str], groups: Mapping[str, list[str]]) -> list[str]:
    return sorted(c for p in patients for c in groups[p])


def _count(fraction: float, n: int, keep: int) -> int:
    """round(fraction * n), at least 1 when the fraction is positive, leaving `keep` items."""
    if fraction <= 0 or n <= keep:
        return 0
    return int(min(max(1, round(fraction * n)), n - keep))


def _check_fraction(name: str, value: Any) -> float:
    value = float(value or 0.0)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"split.{name}={value}; expected a fraction in [0, 1)")
    return value


def _case_number(case_id: str) -> int | None:
    found = re.findall(r"\d+", case_id)
    return int(found[-1]) if found else None


def _preset_subsets(preset: str, groups: Mapping[str, list[str]]) -> tuple[list[str], list[str], list[str]]:
    """(train patients, test patients, unused case ids) of a named preset."""
    if preset not in PRESETS:
        raise ConfigError(f"split.preset={preset!r} is unknown; available: {', '.join(sorted(PRESETS))}")
    patient_of = {c: p for p, ids in groups.items() for c in ids}
    by_number: dict[int, str] = {}
    for case_id in patient_of:
        number = _case_number(case_id)
        if number is not None:
            by_number.setdefault(number, case_id)
    subsets = {}
    for subset, ids in PRESETS[preset].items():
        missing = [i for i in ids if int(i) not in by_number]
        if missing:
            raise ConfigError(
                f"split.preset={preset}: {subset} case(s) {', '.join(missing)} are not in the dataset "
                f"({len(patient_of)} cases); this preset needs the Synapse/BTCV training cases"
            )
        subsets[subset] = sorted({patient_of[by_number[int(i)]] for i in ids})
    both = set(subsets["train"]) & set(subsets["test"])
    if both:
        raise ConfigError(f"split.preset={preset}: patients {sorted(both)} would be in both train and test")
    used = set(_cases_of(subsets["train"] + subsets["test"], groups))
    return subsets["train"], subsets["test"], sorted(set(patient_of) - used)


def make_split(cases: Sequence[Mapping[str, Any]] | Mapping[str, Any], split_params: Mapping[str, Any]) -> dict[str, Any]:
    """Split cases (dicts with `id` and `patient`, or a whole cases.json) by patient.

    split_params: seed, preset (None or a name in PRESETS), test_fraction (of all patients; ignored by presets),
    val_fraction (of the non-test patients), folds (k-fold over train+val patients; 0/1/None for none).
    """
    if isinstance(cases, Mapping):
        cases = cases["cases"]
    groups = _patients(cases)
    if not groups:
        raise ConfigError("cannot split an empty dataset")
    seed = int(split_params.get("seed", 0) or 0)
    preset = split_params.get("preset")
    val_fraction = _check_fraction("val_fraction", split_params.get("val_fraction"))
    rng = np.random.default_rng([seed, 0])
    unused: list[str] = []
    if preset:
        pool, test, unused = _preset_subsets(str(preset), groups)
        pool = list(rng.permutation(pool))
    else:
        test_fraction = _check_fraction("test_fraction", split_params.get("test_fraction"))
        order = list(rng.permutation(list(groups)))
        n_test = _count(test_fraction, len(order), keep=1)
        test, pool = order[:n_test], order[n_test:]
    n_val = _count(val_fraction, len(pool), keep=1)
    val, train = pool[:n_val], pool[n_val:]

    folds = []
    k = int(split_params.get("folds") or 0)
    if k > 1:
        development = sorted(train + val)
        if k > len(development):
            raise ConfigError(f"split.folds={k} but only {len(development)} train+val patients")
        shuffled = list(np.random.default_rng([seed, 1]).permutation(development))
        for part in np.array_split(np.asarray(shuffled, dtype=object), k):
            held = set(part.tolist())
            folds.append(
                {
                    "train": _cases_of([p for p in development if p not in held], groups),
                    "val": _cases_of(sorted(held), groups),
                }
            )
    return {
        "seed": seed,
        "preset": preset or None,
        "train": _cases_of(train, groups),
        "val": _cases_of(val, groups),
        "test": _cases_of(test, groups),
        "folds": folds,
        "unused": unused,
        "num_patients": {"train": len(train), "val": len(val), "test": len(test)},
    }


def fold_split(split: Mapping[str, Any], fold: int, source: str | Path = "split") -> dict[str, Any]:
    """The split as fold `fold` of its cross-validation sees it: train = the fold's training cases, val = its
    held-out cases (the development patients of the other folds / of this one); test unchanged."""
    folds = list(split.get("folds") or [])
    if not folds:
        raise ConfigError(f"{source}: the split has no folds; set split.folds (e.g. 3) and run the split stage")
    if not 0 <= int(fold) < len(folds):
        raise ConfigError(f"{source}: fold {fold} does not exist; the split has folds 0..{len(folds) - 1}")
    chosen = folds[int(fold)]
    return {**split, "train": list(chosen["train"]), "val": list(chosen["val"]), "fold": int(fold)}


def split_sha256(split: Mapping[str, Any]) -> str:
    """Hash of the subsets' membership (what metrics must be compared on), independent of key order."""
    core = {k: sorted(split.get(k) or []) for k in ("train", "val", "test")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def split_path(params: Mapping[str, Any], root: str | Path = ".") -> Path:
    return ProjectLayout.of(dict(params), root).split_file


def split_from_params(params: Mapping[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Read `data/ingested/<name>/cases.json`, split it per `params["split"]`, write `data/splits/<name>.json`."""
    project = settings(dict(params))
    cases_json = ProjectLayout.of(dict(params), root).cases_json
    if not cases_json.is_file():
        raise ConfigError(f"{cases_json}: not found; run the ingest stage first")
    split_params = dataclasses.asdict(project.split)
    if split_params["seed"] is None:  # split.seed unset: the project's seed
        split_params["seed"] = project.seed
    split = {"dataset": project.dataset_name, **make_split(read_json(cases_json), split_params)}
    write_json(split_path(params, root), split)
    return split
