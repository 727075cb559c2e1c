"""Shared fixtures. Telemetry is off for every test; a tiny phantom project is built once per session."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.update(
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
    DVC_NO_ANALYTICS="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
)
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.pop("PREFECT_API_URL", None)  # never talk to a user's Prefect server; the harness brings its own

ROOT = Path(__file__).resolve().parents[1]


def load_repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    """params.yaml shrunk so the whole pipeline runs in seconds on CPU."""
    params = copy.deepcopy(load_repo_params())
    params["phantom"].update(num_cases=6, shape=[48, 48, 8], seed=0)
    params["split"].update(test_fraction=0.34, val_fraction=0.2, folds=2)
    params["data"].update(image_size=[32, 32])
    params["models"] = ["unet"]
    params["model_options"] = {"unet": {"base_channels": 4}}
    params["train"].update(epochs=1, batch_size=8, max_steps_per_epoch=3)
    params["evaluate"].update(overlay_cases=1)
    params["export"].update(latency_runs=2)
    return params


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_params) -> Path:
    """A project root with params.yaml, the phantom raw data, the ingested arrays and the split.

    Read-only for tests: copy it (`shutil.copytree`) before writing models or reports into it.
    """
    from medseg.data.ingest import ingest_from_params
    from medseg.data.phantom import generate_from_params
    from medseg.data.split import split_from_params

    root = tmp_path_factory.mktemp("tiny_project")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    generate_from_params(tiny_params, root)
    ingest_from_params(tiny_params, root)
    split_from_params(tiny_params, root)
    return root


@pytest.fixture()
def project_copy(tiny_project, tmp_path) -> Path:
    """A writable copy of the tiny project."""
    dst = tmp_path / "project"
    shutil.copytree(tiny_project, dst)
    return dst


def paths(root: str | Path, dataset: str = "phantom"):
    """The project's paths (medseg.layout.ProjectLayout), as every module uses them; the tiny project is "phantom"."""
    from medseg.layout import ProjectLayout

    return ProjectLayout(Path(root), dataset)


def make_dvc_project(dst: Path, params: dict, git: bool = False) -> Path:
    """A runnable project copy: dvc.yaml, builtin/ (the phantom stage), stages/, src/ (stage deps), reports/cv/README.md,
    tiny params.yaml, `dvc init --no-scm`."""
    import subprocess

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "builtin", "stages", "src"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "dvc.lock"))
        else:
            shutil.copy2(src, dst / name)
    (dst / "reports" / "cv").mkdir(parents=True, exist_ok=True)  # tracked in git: the report stage's dependency
    shutil.copy2(ROOT / "reports" / "cv" / "README.md", dst / "reports" / "cv" / "README.md")
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if git:  # a Git repository, as a user's clone of medseg is (`git clone` then sees what a teammate gets)
        shutil.copy2(ROOT / ".gitignore", dst / ".gitignore")
        subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
        for key, value in (("user.name", "medseg tests"), ("user.email", "tests@medseg.invalid")):
            subprocess.run(["git", "config", key, value], cwd=dst, check=True)
        subprocess.run(["dvc", "init", "-q"], cwd=dst, check=True)
    else:
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=dst, check=True)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=dst, check=True)
    return dst


@pytest.fixture()
def dvc_project(tmp_path, tiny_params) -> Path:
    """A fresh DVC project (nothing run yet) with the tiny params; MLflow store is sqlite inside it."""
    return make_dvc_project(tmp_path / "dvc_project", tiny_params)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite store: creating one costs seconds, copying it milliseconds."""
    from medseg.tracking.store import connect

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    connect(f"sqlite:///{path}", retries=0)
    return path


def seed_store(root: Path, template: Path) -> None:
    """Give `root` the empty store that register_model_version would otherwise create (and migrate) itself."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "mlflow.db")


def trained_project(tiny_project: Path, root: Path, archs: dict[str, dict] | tuple[str, ...] = ("unet",),
                    store_template: Path | None = None, register: bool = False) -> tuple[Path, dict]:
    """A copy of the tiny project at `root` with each architecture trained (2 steps an epoch), evaluated and exported
    through the library's stage functions; with `store_template`, the project's own sqlite MLflow store, and with
    `register`, each registered there. `archs` may map names to their model_options. Returns (root, params)."""
    from medseg.deployment.export import export_model
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.tracking.registry import register_model_version
    from medseg.training.trainer import train_model

    shutil.copytree(tiny_project, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(max_steps_per_epoch=2)
    if isinstance(archs, dict):
        params.update(models=list(archs), model_options=archs)
    if store_template is not None:
        seed_store(root, store_template)
        params["register"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"  # whatever MLFLOW_TRACKING_URI says
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
        for arch in archs:
            train_model(params, arch, root)
            evaluate_model(params, arch, root)
            export_model(params, arch, root)
            if register:
                register_model_version(params, arch, root)
    return root, params


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's temporary server, started once per test session (15-35 s) for every test that runs a real flow."""
    from prefect.testing.utilities import prefect_test_harness

    from medseg.runtime.environment import check_prefect_server_can_start

    check_prefect_server_can_start()  # names the stray backport instead of a 120 s timeout per test
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def one_torch_thread():
    """torch single-threaded for one test, restored after it: a leaked thread count changes later tests' float
    reductions (the bitwise-resume tests compare runs made in this process and in subprocesses)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(path: Path) -> dict[str, str]:
    """Every entry under `path` (or the file itself): relative name -> sha256 (files), 'dir', or 'link -> target'."""
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    entries = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            entries[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            entries[rel] = "dir"
        else:
            entries[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return entries


def augment_slice(image, label, options, rng):
    """One random augmentation of image (C, H, W) / label (H, W): the per-item reference the loader's batched
    augmentation (medseg.data.augment.draw_augmentation + apply_augmentation) is tested against."""
    import torch

    from medseg.data.augment import apply_augmentation, draw_augmentation

    row = draw_augmentation(options, rng, image.shape[-1] == image.shape[-2])
    images, labels = apply_augmentation(image[None].clone(), label[None].clone(), torch.from_numpy(row[None]))
    return images[0], labels[0]


def dataset_from_params(params: dict, root: str | Path, case_ids, train: bool = False):
    """SliceDataset configured from params.yaml `data:` (augmentation only when `train`), as training builds it."""
    import dataclasses

    from medseg.config import settings
    from medseg.data.loader import SliceDataset
    from medseg.layout import ProjectLayout

    config = settings(dict(params))
    data = config.data
    return SliceDataset(ProjectLayout.of(dict(params), root).ingested, case_ids, data.image_size,
                        context=data.context,
                        augment=dataclasses.asdict(data.augment) if (train and data.augment) else None,
                        seed=config.seed, cache_resized=data.cache_resized)
