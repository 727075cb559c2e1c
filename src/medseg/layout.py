"""Where every file of a medseg project lives, in one place (dvc.yaml spells the same paths for DVC).

    layout = ProjectLayout.of(params, root)
    layout.checkpoint("unet")      # <root>/models/unet/checkpoint.pt
    layout.metrics("unet")         # <root>/reports/unet/metrics.json

Stage outputs live under OUTPUT_DIRS; DVC deletes a stage's outputs before running it, so a user's raw data must
never be inside one (medseg.data.ingest checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.config import settings
from medseg.errors import ConfigError

# Folders (relative to the project root) that hold stage outputs and stores medseg writes.
OUTPUT_DIRS = ("data/ingested", "data/splits", "data/nnunet", "models", "reports", "registry", "mlartifacts")
PHANTOM_DIR = Path("data") / "phantom"  # the built-in phantom's raw data (builtin/dvc.yaml's only output)


@dataclass(frozen=True)
class RunFiles:
    """What one training run reads and writes: the whole-split run's (models/<A>/, reports/<A>/) or a CV fold's
    (models/<A>/folds/<k>/, reports/<A>/folds/<k>/)."""

    root: Path
    ingested: Path
    split: Path
    checkpoint: Path
    last: Path
    reports: Path

    @property
    def summary(self) -> Path:
        return self.reports / "train_summary.json"

    @property
    def scores(self) -> Path:  # the DVC metric (train_scores.json)
        return self.reports / "train_scores.json"

    @property
    def log(self) -> Path:
        return self.reports / "train_log.csv"

    @property
    def curves(self) -> Path:
        return self.reports / "curves.png"


@dataclass(frozen=True)
class ProjectLayout:
    root: Path
    dataset: str

    @classmethod
    def of(cls, params: dict[str, Any], root: str | Path = ".") -> "ProjectLayout":
        name = settings(params).dataset_name
        if not name:
            raise ConfigError("params.yaml: dataset.name is missing; it names data/ingested/<name> and every output")
        return cls(Path(root), name)

    # data
    @property
    def ingested(self) -> Path:
        return self.root / "data" / "ingested" / self.dataset

    @property
    def cases_json(self) -> Path:
        return self.ingested / "cases.json"

    @property
    def fingerprint_json(self) -> Path:
        return self.ingested / "fingerprint.json"

    @property
    def split_file(self) -> Path:
        return self.root / "data" / "splits" / f"{self.dataset}.json"

    @property
    def nnunet_raw(self) -> Path:
        """nnU-Net v2's `nnUNet_raw` for this project (medseg.nnunet.dataset writes the dataset there)."""
        return self.root / "data" / "nnunet" / "raw"

    @property
    def phantom_dir(self) -> Path:
        return self.root / PHANTOM_DIR

    # one architecture's models and reports
    def model_dir(self, arch: str) -> Path:
        return self.root / "models" / arch

    def checkpoint(self, arch: str) -> Path:
        return self.run_files(arch).checkpoint

    def last_checkpoint(self, arch: str) -> Path:
        return self.run_files(arch).last

    def onnx(self, arch: str) -> Path:
        return self.model_dir(arch) / "model.onnx"

    def reports_dir(self, arch: str) -> Path:
        return self.root / "reports" / arch

    def run_files(self, arch: str, fold: int | None = None) -> RunFiles:
        """The training run's files: the whole split's, or fold `fold`'s (cross-validation)."""
        if fold is None:
            models, reports = self.model_dir(arch), self.reports_dir(arch)
        else:
            models, reports = self.fold_model_dir(arch, fold), self.fold_reports_dir(arch, fold)
        return RunFiles(root=self.root, ingested=self.ingested, split=self.split_file,
                        checkpoint=models / "checkpoint.pt", last=models / "last.pt", reports=reports)

    def train_summary(self, arch: str) -> Path:
        return self.run_files(arch).summary

    # DVC metrics (flat numbers, medseg.io.write_dvc_metrics), one per stage; the JSON reports hold the detail
    def train_scores(self, arch: str) -> Path:
        return self.run_files(arch).scores

    def test_scores(self, arch: str) -> Path:
        return self.reports_dir(arch) / "test_scores.json"

    def export_scores(self, arch: str) -> Path:
        return self.reports_dir(arch) / "export_scores.json"

    def train_log(self, arch: str) -> Path:
        return self.run_files(arch).log

    def curves(self, arch: str) -> Path:
        return self.run_files(arch).curves

    def metrics(self, arch: str) -> Path:
        return self.reports_dir(arch) / "metrics.json"

    def per_case(self, arch: str) -> Path:
        return self.reports_dir(arch) / "per_case.csv"

    def overlay(self, arch: str) -> Path:
        return self.reports_dir(arch) / "overlay.png"

    def export_report(self, arch: str) -> Path:
        return self.reports_dir(arch) / "export.json"

    def registry_record(self, arch: str) -> Path:
        return self.root / "registry" / f"{arch}.json"

    # cross-validation (params.yaml `cv`): fold k's model and reports, then the architecture's CV summary
    def fold_model_dir(self, arch: str, fold: int) -> Path:
        return self.model_dir(arch) / "folds" / str(int(fold))

    def fold_reports_dir(self, arch: str, fold: int) -> Path:
        return self.reports_dir(arch) / "folds" / str(int(fold))

    def oof_per_case(self, arch: str, fold: int) -> Path:
        """Fold k's model scored on fold k's held-out (development) patients."""
        return self.fold_reports_dir(arch, fold) / "oof_per_case.csv"

    def oof_metrics(self, arch: str, fold: int) -> Path:
        return self.fold_reports_dir(arch, fold) / "oof_metrics.json"

    @property
    def cv_root(self) -> Path:
        """Every architecture's CV summary (the report stage depends on this folder; git keeps it present)."""
        return self.root / "reports" / "cv"

    def cv_dir(self, arch: str) -> Path:
        return self.cv_root / arch

    def cv_metrics(self, arch: str) -> Path:
        return self.cv_dir(arch) / "cv_metrics.json"

    def cv_scores(self, arch: str) -> Path:  # the DVC metric
        return self.cv_dir(arch) / "cv_scores.json"

    def cv_oof_per_case(self, arch: str) -> Path:
        """Every development patient's out-of-fold scores (each by the one fold model that never saw it)."""
        return self.cv_dir(arch) / "oof_per_case.csv"

    def cv_ensemble_per_case(self, arch: str) -> Path:
        return self.cv_dir(arch) / "ensemble_per_case.csv"

    # the comparison
    @property
    def comparison_dir(self) -> Path:
        return self.root / "reports"
