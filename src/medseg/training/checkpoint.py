"""checkpoint.pt and last.pt on disk: written atomically, read with weights_only and a clear error.

Below inference, training and evaluation, which all read or write checkpoints (the dict's keys: docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medseg.errors import TrainingError
from medseg.io import atomic_path


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file renamed into place: a kill never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path}: checkpoint not found (run the train stage first)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise TrainingError(f"{path}: cannot read checkpoint: {exc}") from exc
