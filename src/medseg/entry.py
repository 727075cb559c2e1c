"""What every DVC stage script does around its one library call: params.yaml in, JSON summary out, exit 2 on a
MedsegError (a deterministic error: a retry gives the same answer; flows read that exit code).

stages/<name>.py imports its library function itself and passes it here, so that the stage's imports, read by
tests/import_graph.py, are exactly the code the stage runs, and dvc.yaml's deps can be derived from them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from medseg.config import PARAMS_FILE, disable_telemetry, load_params
from medseg.errors import MedsegError, error_message

EXIT_MEDSEG_ERROR = 2
EXIT_ENVIRONMENT_ERROR = 1  # a filesystem or MLflow store error: one line, no traceback; flows judge it retryable
# Set by whoever runs `dvc repro` and wants each stage's real exit status (DVC reports its own 255 for any failed
# stage): every stage then writes <dir>/<stage>.json, "running" when it starts and its exit code when it ends. A
# record left "running" means the process died without exiting (a signal, the OOM killer). Unset: nothing is written.
STATUS_DIR_ENV = "MEDSEG_STAGE_STATUS_DIR"


def write_stage_status(stage: str, **record: Any) -> None:
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return
    from medseg.io import write_json

    write_json(Path(folder) / f"{stage}.json", {"stage": stage, "pid": os.getpid(), **record})


def read_stage_statuses(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The records stages wrote under `folder`, by stage name (`train@unet`)."""
    records = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a record is written atomically; an unreadable one is not ours
        records[str(record.get("stage", path.stem))] = record
    return records


def call_stage(func: Callable[..., Any], arch: str | None, root: str | Path = ".", params_file: str = PARAMS_FILE,
               output: str = "json", label: str = "", fold: int | None = None) -> Any:
    """Load params.yaml under `root`, call func(params, [arch, [fold,]] root=root), print its result: as JSON
    (`medseg <stage>`, for scripts) or, for `output="summary"`, as one line (a DVC stage: the files it wrote hold
    the rest)."""
    params = load_params(Path(root) / params_file)
    if fold is not None:
        result = func(params, arch, fold=fold, root=root)
    else:
        result = func(params, arch, root=root) if arch is not None else func(params, root=root)
    if result is not None:
        print(json.dumps(result, indent=2, default=str) if output == "json"
              else f"{label}: {summary_line(result)}" if label else summary_line(result))
    return result


def summary_line(result: Any, limit: int = 200) -> str:
    """A stage result as one line: its top-level numbers (4 significant digits), booleans and short strings, a
    count for lists and mappings, cut at `limit` characters. DVC and Prefect logs get one record, not 180."""
    if not isinstance(result, Mapping):
        return _cut(str(result), limit)
    parts = []
    for key, value in result.items():
        if isinstance(value, bool) or value is None:
            parts.append(f"{key}={value}")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}")
        elif isinstance(value, str):
            if len(value) <= 40:
                parts.append(f"{key}={value}")
        elif isinstance(value, (list, tuple, Mapping)):
            parts.append(f"{key}: {len(value)}")
    return _cut(", ".join(parts), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_stage(func: Callable[..., Any], argv: Sequence[str], with_arch: bool, with_fold: bool = False) -> int:
    """A stage script's main: `python stages/train.py ARCH` (`train_fold.py ARCH FOLD`) -> 0, or `error: ...` and
    2 on a MedsegError, 1 on a filesystem or MLflow store error."""
    disable_telemetry()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = Path(sys.argv[0]).stem
    expected = ["ARCH"] * with_arch + ["FOLD"] * with_fold
    if len(argv) != len(expected) or (with_fold and not argv[1].isdigit()):
        print(f"usage: {name}.py {' '.join(expected)}".rstrip(), file=sys.stderr)
        return EXIT_MEDSEG_ERROR
    stage = f"{name}@{'-'.join(argv)}" if with_arch else name  # DVC's matrix names: train_fold@unet-0
    write_stage_status(stage, status="running")
    code, error = 1, None
    try:
        call_stage(func, argv[0] if with_arch else None, output="summary", label=stage,
                   fold=int(argv[1]) if with_fold else None)
        code = 0
    except Exception as exc:  # noqa: BLE001 - a user's error (medseg's, filesystem, MLflow store) is one line
        message = error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        # a disk that fills or a store that drops may pass on a retry: only a MedsegError is final (exit 2)
        code, error = EXIT_MEDSEG_ERROR if isinstance(exc, MedsegError) else EXIT_ENVIRONMENT_ERROR, message
    finally:  # an unexpected exception propagates (exit 1) but is recorded too
        write_stage_status(stage, status="exited", exit_code=code, error=error)
    return code
