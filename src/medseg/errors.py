"""Exceptions that name the file and the problem, so a user can fix their data."""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class of every error medseg raises on purpose."""


class IngestError(MedsegError):
    """A dataset file cannot be used; the message starts with the file's path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MedsegError):
    """params.yaml (or a CLI argument) asks for something that does not exist or does not fit."""


class TrainingError(MedsegError):
    """Training cannot go on (e.g. the loss became NaN)."""


class ExportError(MedsegError):
    """ONNX export failed or the exported graph disagrees with PyTorch."""


class PromotionRefused(MedsegError):
    """The challenger did not earn the champion alias; the message says why."""


class OutputConflictError(MedsegError):
    """An output path is taken by something medseg did not write (e.g. a user's folder); nothing was touched."""


class PredictError(MedsegError):
    """An input cannot be segmented by this model, or an output would clash with an input; nothing was written."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class PredictTimeout(PredictError):
    """A case took longer than its time budget (serving's request timeout); the work was stopped, nothing written."""

    def __init__(self, problem: str):
        super().__init__("predict", problem)


def error_message(exc: BaseException) -> str | None:
    """The `<file or model>: <problem>` line for an error the user can act on (medseg's own, a filesystem error,
    an MLflow store error), printed as `error: ...` with exit 2 by the CLI and the stages; None for a bug, which
    keeps its traceback."""
    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, OSError):
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{where}: {exc.strerror or exc}" if where else f"{type(exc).__name__}: {exc.strerror or exc}"
    if type(exc).__module__.split(".")[0] in ("mlflow", "sqlalchemy"):  # not imported here: the lean install lacks it
        text = str(getattr(exc, "message", None) or exc).strip().splitlines()
        return f"MLflow store: {type(exc).__name__}: {text[0] if text else ''}"
    return None
