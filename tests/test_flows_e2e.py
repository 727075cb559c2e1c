"""The Prefect flows against a real (temporary) Prefect server (the session-scoped `prefect_server` fixture of
conftest.py, started once for the whole test session); every other flows test calls tasks with `.fn()`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
from medseg.errors import PromotionRefused

from conftest import paths
from flows import artifacts, pipeline, tasks
from flows.dvc_runner import DvcCommandError

pytestmark = pytest.mark.prefect


def latest_artifact(key: str):
    from prefect.artifacts import Artifact

    artifact = Artifact.get(key)
    assert artifact is not None, f"no artifact with key {key}"
    data = artifact.data
    return json.loads(data) if isinstance(data, str) and artifact.type == "table" else data


def test_one_failing_architecture_does_not_sink_the_others(prefect_server, tmp_path, monkeypatch):
    """Real flow, real task runner, real retries; DVC and MLflow replaced to script the failures."""
    params = {
        "dataset": {"name": "phantom"},
        "models": ["unet", "segformer_b0", "vm_unet"],
        "register": {"model_prefix": "medseg"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    calls: dict[str, int] = {}
    guard = threading.Lock()
    stage_fail = "ERROR: failed to reproduce 'train@segformer_b0': failed to run: python stages/train.py, exited with 2"

    def fake_run_dvc(args, root, **kw):
        key = args[1]
        with guard:
            calls[key] = calls.get(key, 0) + 1
            n = calls[key]
        if key == "ingest":
            cases = paths(Path(root)).cases_json
            cases.parent.mkdir(parents=True, exist_ok=True)
            cases.write_text('{"cases": []}')
        elif key == "train@segformer_b0":
            raise DvcCommandError(args, 255, "error: model option 'x' unknown\n" + stage_fail, root,
                                  {key: {"status": "exited", "exit_code": 2}})
        elif key == "train@vm_unet" and n == 1:
            raise DvcCommandError(args, 1, "ERROR: Unable to acquire lock. Most likely another DVC process", root)
        elif key.startswith("train@"):
            arch = key.split("@")[1]
            (paths(Path(root)).reports_dir(arch)).mkdir(parents=True, exist_ok=True)
            (Path(root) / "registry").mkdir(exist_ok=True)
            dsc = {"unet": 0.8, "vm_unet": 0.6}[arch]
            (paths(Path(root)).metrics(arch)).write_text(
                json.dumps({"mean_dsc": dsc, "mean_hd95": 5.0, "protocol": "mm", "per_class": {}})
            )
            (paths(Path(root)).registry_record(arch)).write_text(
                json.dumps({"model_name": f"medseg-phantom-{arch}", "version": "1", "run_id": "r"})
            )
        else:
            raise AssertionError(f"unexpected dvc call {args}")  # e.g. report despite a failed architecture
        return ""

    def fake_promote(params, arch, root):
        if arch == "vm_unet":
            error = PromotionRefused("medseg-phantom-vm_unet: promotion refused: DSC 0.6000 does not beat 0.7000")
            error.result = {"decision": "refused", "reason": "DSC 0.6000 does not beat champion 0.7000"}
            raise error
        return {"decision": "promoted", "reason": "first champion", "champion_version": "1"}

    import medseg.tracking.promotion

    monkeypatch.setattr(tasks, "run_dvc", fake_run_dvc)
    monkeypatch.setattr(medseg.tracking.promotion, "promote_from_params", fake_promote)
    monkeypatch.setattr(pipeline, "train_arch", tasks.train_arch.with_options(retry_delay_seconds=0))

    state = pipeline.medseg_pipeline(root=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    assert summary["failed"] == ["segformer_b0"]
    assert calls["train@segformer_b0"] == 1  # exit 2 = a MedsegError in the stage: not retried
    assert calls["train@vm_unet"] == 2  # DVC lock held elsewhere: retried, then fine
    assert calls["train@unet"] == 1 and calls["ingest"] == 1
    archs = summary["architectures"]
    assert list(archs) == ["unet", "segformer_b0", "vm_unet"]
    assert archs["unet"]["status"] == "completed" and archs["unet"]["mean_dsc"] == 0.8
    assert archs["vm_unet"]["status"] == "completed"
    assert archs["segformer_b0"]["status"] == "failed" and "exited with 2" in archs["segformer_b0"]["error"]
    promos = summary["promotions"]
    assert promos["unet"]["decision"] == "promoted"
    assert promos["vm_unet"]["decision"] == "refused" and "does not beat" in promos["vm_unet"]["reason"]
    assert promos["segformer_b0"] == {"arch": "segformer_b0", "decision": "skipped", "reason": "training failed"}
    assert summary["report"]["status"] == "skipped" and "segformer_b0" in summary["report"]["reason"]

    rows = {row["architecture"]: row for row in latest_artifact(artifacts.METRICS_ARTIFACT_KEY)}
    assert rows["unet"]["test_dsc_percent"] == 80.0 and rows["segformer_b0"]["status"] == "failed"
    markdown = latest_artifact(artifacts.PROMOTION_ARTIFACT_KEY)
    assert "| vm_unet | medseg-phantom-vm_unet | **refused** |" in markdown

    # runs you can tell apart: the flow run named by dataset and version, task runs by architecture
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert flow_run.name == f"phantom-{summary['dataset_version']}" and summary["dataset_version"]
    names = {run.name for run in task_runs}
    assert {"train-unet", "train-segformer_b0", "train-vm_unet", "promote-unet", "promote-vm_unet"} <= names, names


def test_pipeline_end_to_end_on_the_phantom(prefect_server, dvc_project, monkeypatch):
    """`dvc repro` for real (phantom -> ingest -> split -> train/evaluate/export/register), then the gate.

    The report stage is left out to keep this under its time budget: tests/test_pipeline_e2e.py runs it through
    DVC, and test_flows.py checks the flow's report step with DVC stubbed.
    """
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    summary = pipeline.medseg_pipeline(root=str(dvc_project), report=False)

    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    (arch,) = params["models"]
    result = summary["architectures"][arch]
    assert summary["failed"] == []
    assert result["status"] == "completed" and 0.0 <= result["mean_dsc"] <= 1.0
    assert result["parity_passed"] is True
    registered = json.loads(paths(dvc_project).registry_record(arch).read_text())
    decision = summary["promotions"][arch]
    assert decision["decision"] == "promoted", decision

    client = MlflowClient(tracking_uri=f"sqlite:///{dvc_project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(registered["model_name"], "champion")
    assert str(champion.version) == str(registered["version"])

    rows = latest_artifact(artifacts.METRICS_ARTIFACT_KEY)
    assert [r["architecture"] for r in rows] == [arch]
    assert rows[0]["test_dsc_percent"] == round(result["mean_dsc"] * 100, 1)
    assert "**promoted**" in latest_artifact(artifacts.PROMOTION_ARTIFACT_KEY)
    assert summary["report"] == {"status": "skipped", "reason": "report disabled"}

    # DVC, not Prefect, decides what is stale: a second run re-runs no stage and keeps the same champion.
    checkpoint = paths(dvc_project).checkpoint(arch)
    trained_at = checkpoint.stat().st_mtime_ns
    again = pipeline.medseg_pipeline(root=str(dvc_project), report=False, promote=False)
    assert checkpoint.stat().st_mtime_ns == trained_at
    assert again["architectures"][arch]["version"] == registered["version"]
    assert again["promotions"][arch]["decision"] == "skipped"
    assert str(client.get_model_version_by_alias(registered["model_name"], "champion").version) == str(champion.version)
