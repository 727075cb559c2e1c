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
