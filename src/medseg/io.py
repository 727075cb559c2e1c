"""Atomic file output: every artefact is written to a temp file in the same folder, then renamed.

A killed process therefore leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from medseg.errors import OutputConflictError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is renamed onto `path`, on error removed.

    Use it for writers that want a file name (torch.save, np.save, onnx export, savefig).
    The temp name keeps the suffix so libraries that look at it (e.g. `.png`) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artefacts get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write() (disk full) names no file: name the one being written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file for writing; it replaces `path` only if the block finishes."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def write_dvc_metrics(path: str | Path, values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A DVC metrics file: flat, numbers only, 4 significant digits, so `dvc exp show` and `dvc metrics show`
    get one short column per number (the detail stays in the stage's JSON report, which is not a DVC metric).
    Keys are `<prefix>.<name>` (the architecture): DVC names a column by its key alone when no other metrics
    file has that key, and by `path:key` otherwise (`reports/unet/test_scores.json:dsc`, 34 characters).
    None and non-finite values are left out (DVC shows "-"). Returns what was written."""
    import math

    flat: dict[str, float] = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if value is None:
                continue
            raise TypeError(f"{path}: DVC metric {key!r} must be a number, not {type(value).__name__}")
        if math.isfinite(value):
            flat[key] = value if isinstance(value, int) else float(f"{value:.4g}")
    write_json(path, flat)
    return flat


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save through a temp file; the result is memory-mappable with np.load(mmap_mode='r')."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))


# Written into every folder `atomic_dir` builds. `atomic_dir` replaces only folders that hold it, so a path
# that happens to name a user's folder (a dataset, a home directory) is refused instead of swapped away.
OWNED_MARKER = ".medseg-output"
_MARKER_TEXT = "This folder was written by medseg and is replaced whole when its stage runs again.\n"


def is_medseg_output(path: str | Path) -> bool:
    return (Path(path) / OWNED_MARKER).is_file()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a whole output folder in a temp sibling, then swap it in (old one removed only on success).

    The folder gets an `OWNED_MARKER` file. An existing `path` is replaced only if it carries that marker (medseg
    made it); any other existing path raises `OutputConflictError` before anything is written.
    """
    path = Path(path)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; outputs get the usual permissions
    try:
        (tmp / OWNED_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
        yield tmp
        _check_replaceable(path)  # the block may have run for hours: look again just before the swap
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputConflictError(f"{path}: exists and is not a folder medseg wrote; refusing to replace it")
    if path.is_dir() and not is_medseg_output(path):
        entries = sum(1 for _ in path.iterdir())
        raise OutputConflictError(
            f"{path}: folder was not written by medseg (no {OWNED_MARKER} file, {entries} entries); refusing to "
            "replace it. Move it away or point the output elsewhere: medseg never deletes folders it did not create"
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
