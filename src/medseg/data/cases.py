"""An ingested dataset's cases: its cases.json and each case's memory-mapped arrays (numpy only).

Everything that scores or shows a case reads it here: evaluation, cross-validation, the champion's ONNX
re-evaluation, export's parity inputs, the report's figures and the training loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medseg.errors import ConfigError, IngestError
from medseg.io import read_json


def read_cases(ingested_dir: str | Path) -> dict[str, Any]:
    """The parsed `cases.json` of an ingested dataset."""
    path = Path(ingested_dir) / "cases.json"
    if not path.is_file():
        raise IngestError(path, "not found; run the ingest stage first")
    return read_json(path)


def case_entry(manifest: Mapping[str, Any], case_id: str, ingested_dir: Path) -> Mapping[str, Any]:
    for case in manifest["cases"]:
        if case["id"] == case_id:
            return case
    raise ConfigError(f"case {case_id!r} is not in {ingested_dir / 'cases.json'}")


def open_case(ingested_dir: Path, case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = np.load(ingested_dir / case["image"], mmap_mode="r")
        label = np.load(ingested_dir / case["label"], mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise IngestError(ingested_dir / case["image"], f"cannot memory-map ingested case ({exc}); re-run ingest") from exc
    return image, label


def load_case(ingested_dir: str | Path, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image (D, C, H, W) float32 memmap, label (D, H, W) uint8 memmap, spacing (sz, sy, sx) mm)."""
    ingested_dir = Path(ingested_dir)
    case = case_entry(read_cases(ingested_dir), case_id, ingested_dir)
    image, label = open_case(ingested_dir, case)
    return image, label, tuple(float(s) for s in case["spacing"])
