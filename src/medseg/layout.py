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

# Folders (relative to the project root) that hold stage outputs and stores medseg writes.
OUTPUT_DIRS = ("data/ingested", "data/splits", "models", "reports", "registry", "mlartifacts")
PHANTOM_DIR = Path("data") / "phantom"  # the built-in phantom's raw data (builtin/dvc.yaml's only output)


@dataclass(frozen=True)
class ProjectLayout:
    root: Path
    dataset: str

    @classmethod
    def of(cls, params: dict[str, Any], root: str | Path = ".") -> "ProjectLayout":
        return cls(Path(root), str(params["dataset"]["name"]))

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
    def phantom_dir(self) -> Path:
        return self.root / PHANTOM_DIR

    # one architecture's models and reports
    def model_dir(self, arch: str) -> Path:
        return self.root / "models" / arch

    def checkpoint(self, arch: str) -> Path:
        return self.model_dir(arch) / "checkpoint.pt"

    def last_checkpoint(self, arch: str) -> Path:
        return self.model_dir(arch) / "last.pt"

    def onnx(self, arch: str) -> Path:
        return self.model_dir(arch) / "model.onnx"

    def reports_dir(self, arch: str) -> Path:
        return self.root / "reports" / arch

    def train_summary(self, arch: str) -> Path:
        return self.reports_dir(arch) / "train_summary.json"

    # DVC metrics (flat numbers, medseg.io.write_dvc_metrics), one per stage; the JSON reports hold the detail
    def train_scores(self, arch: str) -> Path:
        return self.reports_dir(arch) / "train_scores.json"

    def test_scores(self, arch: str) -> Path:
        return self.reports_dir(arch) / "test_scores.json"

    def export_scores(self, arch: str) -> Path:
        return self.reports_dir(arch) / "export_scores.json"

    def train_log(self, arch: str) -> Path:
        return self.reports_dir(arch) / "train_log.csv"

    def curves(self, arch: str) -> Path:
        return self.reports_dir(arch) / "curves.png"

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

    # the comparison
    @property
    def comparison_dir(self) -> Path:
        return self.root / "reports"
