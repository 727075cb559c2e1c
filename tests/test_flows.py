"""Unit tests of the Prefect flows' building blocks. No Prefect server here: tasks are called with `.fn()`,
DVC is replaced by a fake command or a recording stub. The flows themselves run in tests/test_flows_e2e.py."""

from __future__ import annotations

import hashlib
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
from medseg.errors import ConfigError, ExportError, PromotionRefused, TrainingError

from conftest import paths
from flows import artifacts, dvc_runner, pipeline, retrain, tasks
from flows.dvc_runner import DvcCommandError

PARAMS = {
    "dataset": {"name": "phantom"},
    "models": ["unet", "segformer_b0"],
    "register": {"model_prefix": "medseg", "tracking_uri": "sqlite:///mlflow.db"},
}


@pytest.fixture()
def project(tmp_path) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


def fake_dvc(script: str) -> list[str]:
    """A stand-in for `python -m dvc`: a tiny Python program (fast to start, no DVC import)."""
    return [sys.executable, "-c", script]


# --------------------------------------------------------------------------------------------------------- run_dvc


def test_run_dvc_streams_output_and_passes_args(project):
    tmp_path = project
    logged = []
    out = dvc_runner.run_dvc(
        ["repro", "train@unet"],
        tmp_path,
        dvc_cmd=fake_dvc("import os, sys; print('cwd', os.getcwd()); print('args', *sys.argv[1:])"),
        log=logged.append,
    )
    assert f"cwd {tmp_path}" in out
    assert "args --wait-for-lock repro train@unet" in out  # queue on DVC's lock instead of failing after 3 s
    assert logged[0].startswith("$ dvc repro train@unet")
    assert logged[1] == f"cwd {tmp_path}\nargs --wait-for-lock repro train@unet"  # one burst, one record


STAGES_WITH_A_PROGRESS_BAR = """
import sys, time
out = sys.stdout
out.write("Running stage 'train@unet':\\n> python stages/train.py unet\\n"); out.flush()
for i in range(200):  # tqdm's way on a pipe: the bar rewritten in place, then cleared (leave=False)
    out.write(f"\\runet epoch 1/1: {i // 2}%|###| {i}/200"); out.flush()
out.write("\\r" + " " * 40 + "\\r"); out.write("INFO medseg.training.trainer: unet epoch 1: loss 0.5\\n"); out.flush()
time.sleep(2.5)  # a quiet spell (validation): the block so far goes to the log
out.write("train@unet: arch=unet, epochs=1\\n")
out.write("Running stage 'evaluate@unet':\\n> python stages/evaluate.py unet\\nevaluate@unet: mean_dsc=0.8\\n")
"""


def test_run_dvc_logs_whole_blocks_and_progress_bars_once(project):
    """A training's output as a handful of records (per stage, per burst), not a record per line or per update of
    its progress bar; the output and the failure tail hold the lines a terminal would have shown."""
    logged = []
    out = dvc_runner.run_dvc(["repro"], project, dvc_cmd=fake_dvc(STAGES_WITH_A_PROGRESS_BAR), log=logged.append)
    assert logged[1:] == [
        "Running stage 'train@unet':\n> python stages/train.py unet\nINFO medseg.training.trainer: unet epoch 1: loss 0.5",
        "train@unet: arch=unet, epochs=1",
        "Running stage 'evaluate@unet':\n> python stages/evaluate.py unet\nevaluate@unet: mean_dsc=0.8",
    ]
    assert "%|" not in out and out.count("\n") == 6


def test_run_dvc_tells_parallel_stages_how_many_share_the_cores(project, monkeypatch):
    """Stages started with room for N at once (max_parallel) size their threads to 1/N of the cores."""
    monkeypatch.delenv("MEDSEG_PARALLEL_JOBS", raising=False)
    script = fake_dvc("import os; print('jobs', os.environ.get('MEDSEG_PARALLEL_JOBS'))")
    assert "jobs None" in dvc_runner.run_dvc(["repro"], project, dvc_cmd=script, log=lambda line: None)
    assert "jobs 2" in dvc_runner.run_dvc(["repro"], project, slots=2, exclusive=False, dvc_cmd=script,
                                     log=lambda line: None)
    monkeypatch.setenv("MEDSEG_PARALLEL_JOBS", "3")  # a caller's own count is never lowered
    assert "jobs 3" in dvc_runner.run_dvc(["repro"], project, slots=2, exclusive=False, dvc_cmd=script,
                                     log=lambda line: None)


def test_run_dvc_failure_keeps_exit_code_and_output_tail(project):
    tmp_path = project
    script = "import sys\nfor i in range(100): print('line', i)\nprint('ERROR: failed to reproduce'); sys.exit(3)"
    with pytest.raises(DvcCommandError) as info:
        dvc_runner.run_dvc(["repro", "split"], tmp_path, dvc_cmd=fake_dvc(script), log=lambda line: None)
    err = info.value
    assert err.returncode == 3
    assert err.output_tail.splitlines()[-1] == "ERROR: failed to reproduce"
    assert len(err.output_tail.splitlines()) == dvc_runner.OUTPUT_TAIL_LINES
    assert "line 0\n" not in err.output_tail
    assert str(tmp_path) in str(err) and "dvc repro split" in str(err)


def test_run_dvc_outside_a_project_names_the_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope/dvc.yaml: not found"):
        dvc_runner.run_dvc(["repro"], tmp_path / "nope", dvc_cmd=fake_dvc("pass"))


def test_checkout_lock_serialises_threads(tmp_path):
    spans = []

    def hold(name):
        with dvc_runner.checkout_lock(tmp_path):
            start = time.monotonic()
            time.sleep(0.15)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end  # never two holders at once


def test_checkout_lock_runs_shared_calls_in_slots_and_exclusive_ones_alone(tmp_path, monkeypatch):
    pytest.importorskip("fcntl")
    monkeypatch.setattr(dvc_runner, "SLOT_POLL_S", 0.02)
    events = []
    guard = threading.Lock()

    def hold(kind, exclusive):
        with dvc_runner.checkout_lock(tmp_path, slots=2, exclusive=exclusive) as slot:
            with guard:
                events.append(("in", kind, slot, time.monotonic()))
            time.sleep(0.2)
            with guard:
                events.append(("out", kind, slot, time.monotonic()))

    threads = [threading.Thread(target=hold, args=(f"arch{i}", False)) for i in range(3)]
    threads.append(threading.Thread(target=hold, args=("report", True)))
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    inside, most, slots_seen = set(), 0, set()
    for what, kind, slot, _ in sorted(events, key=lambda e: e[3]):
        if what == "in":
            inside.add(kind)
            slots_seen.add(slot)
            most = max(most, len(inside))
            assert "report" not in inside or inside == {"report"}  # exclusive means alone
        else:
            inside.discard(kind)
    assert most == 2  # two shared calls side by side, never three
    assert slots_seen == {0, 1}


def test_checkout_lock_waits_for_another_process(tmp_path):
    pytest.importorskip("fcntl")
    lock = tmp_path / dvc_runner.LOCK_DIR / "medseg-flows.lock"
    lock.parent.mkdir(parents=True)
    released = tmp_path / "released"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"fh = open({str(lock)!r}, 'a+'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(0.6)\n"
            f"open({str(released)!r}, 'w').close(); fcntl.flock(fh, fcntl.LOCK_UN)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with dvc_runner.checkout_lock(tmp_path):
            waited = time.monotonic() - start
            assert released.exists()  # we only got in after the other process let go
    finally:
        holder.wait()
    assert waited > 0.2


# --------------------------------------------------------------------------------------------------------- retries


# what DVC 3 prints when a stage's command fails (checked by hand), up to the exit code
STAGE_FAILED = "ERROR: failed to reproduce 'train@unet': failed to run: python stages/train.py unet, exited with "


def dvc_error(tail: str, returncode: int = 1, **statuses) -> DvcCommandError:
    """statuses: stage -> exit code, or None for a stage that died without exiting (medseg.entry's records)."""
    records = {stage.replace("_at_", "@"): ({"status": "running"} if code is None
                                           else {"status": "exited", "exit_code": code})
               for stage, code in statuses.items()}
    return DvcCommandError(["repro", "train@unet"], returncode, tail, "/proj", records)


@pytest.mark.parametrize(
    "exc, transient",
    [
        # no stage ran: DVC's own failure, read from what DVC printed
        (dvc_error("ERROR: Unable to acquire lock. Most likely another DVC process is running"), True),
        (dvc_error("ERROR: 'data/ingested/phantom' is busy, it is being blocked by:\n  (PID 12): dvc repro"), True),
        (dvc_error("ERROR: 'train@resnet' does not exist"), False),
        (dvc_error("ERROR: failed to reproduce 'report': [Errno 2] No such file or directory: 'src/x.py'", 255), False),
        (dvc_error("", returncode=-9), True),
        (dvc_error("ERROR: unexpected error - 'NoneType' object has no attribute 'x'", 255), False),
        (dvc_error("ERROR: failed to push data to the cloud - 2 files failed to upload", 255), True),
        # a stage ran: its own exit status decides, whatever the text says
        (dvc_error("error: params.yaml: bad\n" + STAGE_FAILED + "2", 255, train_at_unet=2), False),
        (dvc_error("a log line that says: exited with 137\n" + STAGE_FAILED + "2", 255, train_at_unet=2), False),
        (dvc_error("WARNING: database is locked, retrying\n" + STAGE_FAILED + "2", 255, train_at_unet=2), False),
        (dvc_error(STAGE_FAILED + "-9", 255, train_at_unet=None), True),  # SIGKILL: no exit recorded
        (dvc_error("ConfigError ... does not exist", 255, train_at_unet=None), True),  # text cannot overrule a kill
        (dvc_error("", -9, train_at_unet=2), False),  # exit 2 is never retried, even if dvc was killed afterwards
        # other exits (1: an uncaught exception) only with a passing condition in the output
        (dvc_error("TypeError: unsupported operand\n" + STAGE_FAILED + "1", 255, train_at_unet=1), False),
        (dvc_error("RuntimeError: CUDA error: unspecified launch failure\n" + STAGE_FAILED + "1", 255,
                   train_at_unet=1), True),
        (dvc_error("RuntimeError: DataLoader worker (pid 812) is killed by signal: Killed.\n" + STAGE_FAILED + "1",
                   255, train_at_unet=1), True),
        (dvc_error("mlflow: sqlite3.OperationalError: database is locked\n" + STAGE_FAILED + "1", 255,
                   train_at_unet=1), True),
        # fallback, for a command that records nothing: DVC's own "failed to run ..., exited with N" line only
        (dvc_error("error: params.yaml: bad\n" + STAGE_FAILED + "2", 255), False),
        (dvc_error("a log line that says: exited with 2\n" + STAGE_FAILED + "-9", 255), True),
        (dvc_error("a log line that says: exited with 137\n" + STAGE_FAILED + "2", 255), False),
        (dvc_error(STAGE_FAILED + "137", 255), True),  # /bin/sh reports its killed child as 128 + 9
        (dvc_error(STAGE_FAILED + "143", 255), True),  # SIGTERM
        (dvc_error(STAGE_FAILED + "130", 255), False),  # SIGINT: someone pressed Ctrl-C
        (dvc_error(STAGE_FAILED + "1", 255), False),
        (ConfigError("params.yaml: bad"), False),
        (TrainingError("loss is NaN"), False),
        (ExportError("parity 0.3 > 1e-3"), False),
        (PromotionRefused("worse than champion"), False),
        (ConnectionError("tracking server down"), True),
        (TimeoutError(), True),
        (ValueError("a bug"), False),
        (None, False),
    ],
)
def test_is_transient(exc, transient):
    assert dvc_runner.is_transient(exc) is transient


def test_killed_by_reads_popen_and_shell_statuses():
    assert dvc_runner.killed_by(-9) == signal.SIGKILL and dvc_runner.killed_by(137) == signal.SIGKILL
    assert dvc_runner.killed_by(-15) == dvc_runner.killed_by(143) == signal.SIGTERM
    assert dvc_runner.killed_by(0) is dvc_runner.killed_by(1) is dvc_runner.killed_by(2) is dvc_runner.killed_by(255) is None
    assert dvc_runner.killed_by(None) is None


def test_dvc_error_leads_with_the_stage_status_and_survives_pickling():
    import pickle

    err = DvcCommandError(["repro", "train@unet"], 255, "\n".join(f"epoch {i}" for i in range(40)), "/proj",
                          {"train@unet": {"status": "exited", "exit_code": 2, "error": "params.yaml: bad option"}})
    first = str(err).splitlines()[0]
    assert first == ("stage train@unet exited with 2: params.yaml: bad option; "
                     "`dvc repro train@unet` exited with 255 in /proj")
    again = pickle.loads(pickle.dumps(err))
    assert (again.returncode, again.stage_statuses, str(again)) == (255, err.stage_statuses, str(err))
    assert dvc_runner.is_transient(again) is False
    killed = dvc_error("...", 255, train_at_unet=None)
    assert "stage train@unet died without exiting" in str(killed).splitlines()[0]
    assert "stage train@unet was killed by SIGKILL" in str(dvc_error(STAGE_FAILED + "-9", 255)).splitlines()[0]


def test_retry_condition_reads_the_failed_state():
    from prefect.states import Completed, Failed

    assert dvc_runner.retry_if_transient(None, None, Failed(data=dvc_error("Unable to acquire lock"))) is True
    assert dvc_runner.retry_if_transient(None, None, Failed(data=ConfigError("bad"))) is False
    assert dvc_runner.retry_if_transient(None, None, Completed(data=1)) is False


def test_every_dvc_task_retries_only_transient_failures():
    for t in (tasks.prepare_data, tasks.train_arch, tasks.promote_arch, tasks.repro_report):
        assert t.retries == 2
        assert t.retry_condition_fn is dvc_runner.retry_if_transient


# --------------------------------------------------------------------------------------------------------- tasks


def write_arch_outputs(root: Path, arch: str, dsc: float = 0.71, version: str = "3") -> None:
    """What a finished train/evaluate/export/register leaves, written through the stages' contracts."""
    from medseg.contracts import ClassScores, EvaluationMetrics, ExportReport, RegistryRecord

    paths(root).reports_dir(arch).mkdir(parents=True, exist_ok=True)
    (root / "registry").mkdir(exist_ok=True)
    EvaluationMetrics(arch=arch, protocol="mm", mean_dsc=dsc, mean_hd95=12.5,
                      per_class={"liver": ClassScores(dsc=dsc, hd95=12.5)}, num_cases=2).write(paths(root).metrics(arch))
    ExportReport(arch=arch, parity_passed=True, max_abs_diff=2e-6).write(paths(root).export_report(arch))
    RegistryRecord(model_name=f"medseg-phantom-{arch}", version=version, run_id="abc").write(
        paths(root).registry_record(arch))


def test_train_arch_runs_the_four_stages_and_summarises(project, monkeypatch):
    calls = []

    def fake_run_dvc(args, root, **kw):
        calls.append((list(args), Path(root), kw))
        write_arch_outputs(Path(root), "unet")
        return ""

    monkeypatch.setattr(tasks, "run_dvc", fake_run_dvc)
    summary = tasks.train_arch.fn("unet", str(project), max_parallel=2)
    stages = ["repro", "train@unet", "evaluate@unet", "export@unet", "register@unet"]
    assert calls == [(stages, project, {"slots": 2, "exclusive": False})]
    assert summary["status"] == "completed"
    assert summary["mean_dsc"] == 0.71 and summary["mean_hd95"] == 12.5
    assert summary["version"] == "3" and summary["model_name"] == "medseg-phantom-unet"
    assert summary["parity_passed"] is True
    assert summary["per_class"]["liver"]["dsc"] == 0.71


def test_train_arch_refuses_an_architecture_missing_from_params(project, monkeypatch):
    monkeypatch.setattr(tasks, "run_dvc", lambda *a, **k: pytest.fail("dvc must not run"))
    with pytest.raises(ConfigError, match="'vm_unet' is not in `models`"):
        tasks.train_arch.fn("vm_unet", str(project))


def test_prepare_data_returns_content_version(project, monkeypatch):
    cases = paths(project).cases_json
    seen = []

    def fake_run_dvc(args, root, **kw):
        seen.append(list(args))
        cases.parent.mkdir(parents=True, exist_ok=True)
        cases.write_text('{"cases": [{"id": "case0001", "sha256": "ab"}]}')
        return ""

    monkeypatch.setattr(tasks, "run_dvc", fake_run_dvc)
    out = tasks.prepare_data.fn(str(project))
    assert seen == [["repro", "ingest", "split"]]
    assert out == {"dataset": "phantom", "version": hashlib.sha256(cases.read_bytes()).hexdigest()[:12]}
    cases.write_text('{"cases": [{"id": "case0001", "sha256": "cd"}]}')
    assert tasks.ingested_version(PARAMS, project) != out["version"]


def test_build_report_runs_the_report_stage(project, monkeypatch):
    seen = []
    monkeypatch.setattr(tasks, "run_dvc", lambda args, root, **k: seen.append(list(args)) or "")
    assert tasks.repro_report.fn(str(project)).endswith("reports/comparison.md")
    assert seen == [["repro", "report"]]


def test_promotion_records_promote_and_refusal(project):
    seen = []

    def promote_ok(params, arch, root):
        seen.append((arch, root))
        return {"model_name": "medseg-phantom-unet", "decision": "promoted", "reason": "first champion",
                "champion_version": "2"}

    def promote_refused(params, arch, root):
        error = PromotionRefused("medseg-phantom-unet: promotion refused: DSC 0.61 does not beat 0.70")
        error.result = {"decision": "refused", "reason": "DSC 0.61 does not beat 0.70", "challenger_dsc": 0.61}
        raise error

    def promote_refused_bare(params, arch, root):
        raise PromotionRefused("no challenger")

    ok = tasks.promote_model(PARAMS, "unet", project, promote_fn=promote_ok)
    assert ok["decision"] == "promoted" and ok["champion_version"] == "2" and ok["arch"] == "unet"
    assert seen == [("unet", project)]

    refused = tasks.promote_model(PARAMS, "unet", project, promote_fn=promote_refused)
    assert refused == {
        "arch": "unet",
        "model_name": "medseg-phantom-unet",
        "decision": "refused",
        "reason": "DSC 0.61 does not beat 0.70",
        "challenger_dsc": 0.61,
    }
    bare = tasks.promote_model(PARAMS, "unet", project, promote_fn=promote_refused_bare)
    assert bare["decision"] == "refused" and bare["reason"] == "no challenger"


def test_promotion_lets_infrastructure_errors_through_for_retry(project):
    def promote_down(params, arch, root):
        raise ConnectionError("tracking server unreachable")

    with pytest.raises(ConnectionError):
        tasks.promote_model(PARAMS, "unet", project, promote_fn=promote_down)


# --------------------------------------------------------------------------------------------------------- artifacts


def test_metrics_table_has_one_row_per_architecture_failed_included():
    results = {
        "unet": {"status": "completed", "mean_dsc": 0.712345678, "mean_hd95": 10.123456, "hd95_unit": "mm",
                 "protocol": "mm", "parity_passed": True, "version": "4"},
        "vm_unet": {"status": "failed", "error": "train@vm_unet exited with 2: " + "x" * 500},
    }
    rows = artifacts.metrics_table(results)
    assert [r["architecture"] for r in rows] == ["unet", "vm_unet"]
    # as the report shows them: DSC in %, HD95 with its unit
    assert rows[0]["test_dsc_percent"] == 71.2 and rows[0]["test_hd95"] == 10.12 and rows[0]["hd95_unit"] == "mm"
    assert rows[0]["model_version"] == "4" and rows[0]["error"] == ""
    assert rows[1]["status"] == "failed" and rows[1]["test_dsc_percent"] is None
    assert rows[1]["error"].startswith("train@vm_unet exited with 2") and len(rows[1]["error"]) == 200


def test_artifacts_link_to_the_mlflow_run_and_model_version():
    """A tracking server gets UI links; a sqlite store (no UI address) the model URI and the run id."""
    server = tasks.mlflow_links("http://mlflow.lab:5000/", "3", "abc", "medseg-phantom-unet", "7")
    assert server == {"model_uri": "models:/medseg-phantom-unet/7",
                      "mlflow_run_url": "http://mlflow.lab:5000/#/experiments/3/runs/abc",
                      "model_version_url": "http://mlflow.lab:5000/#/models/medseg-phantom-unet/versions/7"}
    local = tasks.mlflow_links("sqlite:////p/mlflow.db", "3", "abc", "medseg-phantom-unet", "7")
    assert local == {"model_uri": "models:/medseg-phantom-unet/7", "mlflow_run_url": None, "model_version_url": None}
    (row,) = artifacts.metrics_table({"unet": {"status": "completed", "version": "7", "run_id": "abc", **server}})
    assert row["model_uri"] == "models:/medseg-phantom-unet/7" and row["mlflow"] == server["model_version_url"]
    (row,) = artifacts.metrics_table({"unet": {"status": "completed", "version": "7", "run_id": "abc", **local}})
    assert row["mlflow"] == "abc"


def test_promotion_markdown_lists_decisions_and_reasons():
    md = artifacts.promotion_markdown(
        {
            "unet": {"model_name": "medseg-phantom-unet", "decision": "promoted", "reason": "first champion"},
            "segformer_b0": {"model_name": "medseg-phantom-segformer_b0", "decision": "refused",
                             "reason": "DSC 0.5 | worse\nthan 0.6"},
            "vm_unet": {"decision": "skipped", "reason": "training failed"},
        },
        dataset_version_id="abc123",
    )
    assert "`abc123`" in md
    assert "| unet | medseg-phantom-unet | **promoted** | first champion |" in md
    assert "| segformer_b0 | medseg-phantom-segformer_b0 | **refused** | DSC 0.5 \\| worse than 0.6 |" in md
    assert "| vm_unet |  | **skipped** | training failed |" in md
    assert md.rstrip().endswith("Promoted to `champion`: unet.")
    linked = artifacts.promotion_markdown({"unet": {"model_name": "medseg-phantom-unet", "decision": "promoted",
                                                "reason": "first", "model_version_url": "http://m:5000/#/models/x/versions/2"}})
    assert "| unet | [medseg-phantom-unet](http://m:5000/#/models/x/versions/2) | **promoted** | first |" in linked
    assert artifacts.promotion_markdown({}).rstrip().endswith("Promoted to `champion`: none.")


# --------------------------------------------------------------------------------------------------------- pipeline


def test_resolve_architectures():
    params = {"models": ["unet", "vm_unet"]}
    path = Path("params.yaml")
    assert pipeline.resolve_architectures(params, None, path) == ["unet", "vm_unet"]
    assert pipeline.resolve_architectures(params, ["vm_unet", "vm_unet"], path) == ["vm_unet"]
    with pytest.raises(ConfigError, match="params.yaml: swin not in `models`"):
        pipeline.resolve_architectures(params, ["swin"], path)
    with pytest.raises(ConfigError, match="`models` is empty"):
        pipeline.resolve_architectures({"models": []}, None, path)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"report": False, "failed": [], "fanned_out": False}, "report disabled"),
        ({"report": True, "failed": ["vm_unet"], "fanned_out": False}, "failed architectures: vm_unet"),
        ({"report": True, "failed": [], "fanned_out": True}, "dvc pull && dvc repro report"),
    ],
)
def test_report_is_skipped_with_a_reason(kwargs, reason, monkeypatch):
    monkeypatch.setattr(pipeline, "repro_report", None)  # must not be called
    out = pipeline.run_report("/proj", **kwargs)
    assert out["status"] == "skipped" and reason in out["reason"]


def test_failure_message_takes_the_exception_text():
    from prefect.states import Failed

    state = Failed(data=dvc_error("line1\nline2"))
    msg = pipeline.failure_message(state)
    assert "exited with 1" in msg and "line1" in msg


def test_failure_message_of_a_worker_run_whose_exception_cannot_be_rebuilt():
    """A worker's flow run keeps its exception as JSON (type + text); DvcCommandError(text) cannot be rebuilt from
    that, so the message Prefect wrote on the worker is what the user gets, not the rebuilding's TypeError."""
    from prefect.serializers import JSONSerializer
    from prefect.states import Failed

    error = dvc_error("the stage's last lines")
    stored = JSONSerializer().dumps(error)
    with pytest.raises(TypeError):
        JSONSerializer().loads(stored)  # what reading the remote result does

    class RemoteState:
        message = f"Flow run encountered an exception: DvcCommandError: {error}"
        name = "Failed"

        def result(self, raise_on_failure=False):
            return JSONSerializer().loads(stored)

    msg = pipeline.failure_message(RemoteState())
    assert "exited with 1" in msg and "missing" not in msg
    assert pipeline.failure_message(Failed(message="no data")) == "no data"


def test_find_train_deployment_needs_exactly_one(monkeypatch):
    class FakeClient:
        def __init__(self, found):
            self.found = found

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_deployments(self, **filters):
            self.filters = filters
            return self.found

    class Dep:
        def __init__(self, name, id):
            self.name, self.id = name, id

    import prefect

    monkeypatch.setattr(prefect, "get_client", lambda sync_client: FakeClient([Dep("medseg-train-arch", "42")]))
    assert pipeline.find_train_deployment("gpu-pool") == "42"
    monkeypatch.setattr(prefect, "get_client", lambda sync_client: FakeClient([]))
    with pytest.raises(ConfigError, match="'gpu-pool': expected one train-architecture deployment, found none"):
        pipeline.find_train_deployment("gpu-pool")


# --------------------------------------------------------------------------------------------------------- retrain


def test_emit_dataset_updated_builds_the_event(monkeypatch):
    sent = {}
    monkeypatch.setattr(retrain, "emit_event", lambda **kw: sent.update(kw) or "event")
    assert retrain.emit_dataset_updated("synapse", "abc123", root="/data/proj") == "event"
    assert sent["event"] == "medseg.dataset.updated"
    assert sent["resource"]["prefect.resource.id"] == "medseg.dataset.synapse"
    assert sent["resource"]["medseg.dataset.version"] == "abc123"
    assert sent["payload"] == {"dataset": "synapse", "version": "abc123", "root": "/data/proj"}


def test_trigger_matches_the_emitted_event_and_passes_it_on():
    trigger = retrain.dataset_updated_trigger()
    assert trigger.expect == {retrain.DATASET_UPDATED_EVENT}
    assert trigger.match.root["prefect.resource.id"] == "medseg.dataset.*"
    assert trigger.parameters == {
        "dataset": "{{ event.payload.dataset }}",
        "dataset_version": "{{ event.payload.version }}",
    }
    assert retrain.dataset_updated_trigger("acdc").match.root["prefect.resource.id"] == "medseg.dataset.acdc"
    # the templated parameters exist on the flow they start
    assert {"dataset", "dataset_version"} <= set(retrain.retrain.parameters.properties)


def test_serve_deployments_have_schedule_and_trigger(tmp_path, monkeypatch):
    monkeypatch.setenv(retrain.CRON_ENV, "15 4 * * 1")
    cron = retrain.retrain_cron(None)
    assert cron == "15 4 * * 1"
    assert retrain.retrain_cron("0 1 * * *") == "0 1 * * *"
    deployments = retrain.build_deployments(str(tmp_path), cron)
    by_name = {d.name: d for d in deployments}
    rd = by_name["medseg-retrain-served"]
    assert rd.entrypoint.endswith("flows/retrain.py:retrain")
    assert [s.schedule.cron for s in rd.schedules] == ["15 4 * * 1"]
    assert rd.triggers[0].expect == {"medseg.dataset.updated"}
    assert rd.parameters == {"root": str(tmp_path.resolve())}
    assert by_name["medseg-ingest-served"].entrypoint.endswith("flows/retrain.py:ingest_new_data")
    bare = retrain.build_deployments(str(tmp_path), cron, with_trigger=False, with_schedule=False)[0]
    assert not bare.schedules and not bare.triggers
    monkeypatch.delenv(retrain.CRON_ENV)
    assert retrain.retrain_cron(None) == retrain.DEFAULT_CRON


def test_retrain_skips_events_for_another_dataset(project, monkeypatch):
    monkeypatch.setattr(retrain, "medseg_pipeline", lambda **kw: pytest.fail("must not train"))
    out = retrain.retrain.fn(root=str(project), dataset="acdc", dataset_version="v9")
    assert out["status"] == "skipped" and "'acdc'" in out["reason"] and "'phantom'" in out["reason"]


def test_ingest_emits_only_when_the_dataset_changed(project, monkeypatch):
    cases = paths(project).cases_json
    emitted = []
    monkeypatch.setattr(retrain, "emit_dataset_updated", lambda d, v, root=None: emitted.append((d, v)) or "event")

    def prepare(root, content):
        cases.parent.mkdir(parents=True, exist_ok=True)
        cases.write_text(content)
        return {"dataset": "phantom", "version": tasks.ingested_version(PARAMS, root)}

    monkeypatch.setattr(retrain, "prepare_data", lambda root: prepare(root, '{"v": 1}'))
    first = retrain.ingest_new_data.fn(root=str(project))
    assert first["changed"] and first["event_emitted"] and first["previous_version"] is None
    again = retrain.ingest_new_data.fn(root=str(project))
    assert not again["changed"] and not again["event_emitted"]
    forced = retrain.ingest_new_data.fn(root=str(project), always_emit=True)
    assert forced["event_emitted"]
    monkeypatch.setattr(retrain, "prepare_data", lambda root: prepare(root, '{"v": 2}'))
    newer = retrain.ingest_new_data.fn(root=str(project))
    assert newer["changed"] and newer["previous_version"] == first["version"] != newer["version"]
    assert emitted == [("phantom", first["version"]), ("phantom", first["version"]), ("phantom", newer["version"])]


# --------------------------------------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_deployments_point_at_real_flows():
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"medseg-pipeline", "medseg-train-arch", "medseg-train-arch-k8s", "medseg-retrain"} <= set(deployments)
    for dep in deployments.values():
        path, func = dep["entrypoint"].split(":")
        loaded = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
        assert set(dep.get("parameters", {})) <= set(loaded.parameters.properties), dep["name"]
    train_flows = [d for d in deployments.values() if d["entrypoint"].endswith(":train_architecture")]
    assert {d["work_pool"]["name"] for d in train_flows} == {"medseg-process", "medseg-gpu-k8s", "medseg-gpu-docker"}

    retrain_dep = deployments["medseg-retrain"]
    assert retrain_dep["schedules"][0]["cron"] == retrain.DEFAULT_CRON
    trigger = DeploymentEventTrigger(**retrain_dep["triggers"][0])
    code_trigger = retrain.dataset_updated_trigger()
    assert (trigger.expect, trigger.match, trigger.parameters) == (
        code_trigger.expect, code_trigger.match, code_trigger.parameters)


def test_kubernetes_gpu_template_declares_every_variable_it_uses():
    from prefect.utilities.templating import find_placeholders

    template = json.loads((ROOT / "flows" / "work_pools" / "kubernetes-gpu.json").read_text())
    declared = set(template["variables"]["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    k8s = next(d for d in spec["deployments"] if d["name"] == "medseg-train-arch-k8s")
    assert set(k8s["work_pool"]["job_variables"]) <= declared
    assert "MLFLOW_TRACKING_URI" in k8s["work_pool"]["job_variables"]["env"]


STAGE_SCRIPT = """
import os, signal, sys
from medseg.entry import run_stage
from medseg.errors import ConfigError

def boom(params, root='.'):
    for i in range(60):  # a long log: the error must still reach the user
        print(f'epoch {i}: loss 0.5', flush=True)
    print('a log line that says: exited with 137', flush=True)
    raise ConfigError('params.yaml: model option x is unknown')

def killed(params, root='.'):
    os.kill(os.getpid(), signal.SIGKILL)

def fine(params, root='.'):
    open('out.txt', 'w').write('done')

name = os.path.splitext(os.path.basename(sys.argv[0]))[0]  # the record is named after the script, as stages/*.py
raise SystemExit(run_stage({'boom': boom, 'killed': killed, 'fine': fine}[name], [], with_arch=False))
"""
PY_EXE = shlex.quote(sys.executable)
# Commands that are not medseg stages (they record nothing): judged by DVC's own "failed to run" line.
RAW_STAGES = {
    "raw_exit2": f"{PY_EXE} -c \"import sys; print('a log line that says: exited with 137'); sys.exit(2)\"",
    "raw_killed": f"{PY_EXE} -c \"import os; print('exited with 2', flush=True); os.kill(os.getpid(), 9)\"",
    # `&& ...`: the shell cannot exec the command, so it reports the kill as 137
    "raw_killed_in_shell": f"{PY_EXE} -c \"import os; os.kill(os.getpid(), 9)\" && echo never",
    "raw_exit1": f"{PY_EXE} -c \"raise RuntimeError('a bug')\"",
}


@pytest.fixture()
def real_dvc_project(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text("seed: 0\n")
    for name in ("boom", "killed", "fine"):
        (root / f"{name}.py").write_text(STAGE_SCRIPT)
    stages = {name: {"cmd": f"{PY_EXE} {name}.py", "deps": [f"{name}.py"]} for name in ("boom", "killed")}
    stages["fine"] = {"cmd": f"{PY_EXE} fine.py", "deps": ["fine.py"], "outs": ["out.txt"]}
    stages.update({name: {"cmd": cmd} for name, cmd in RAW_STAGES.items()})
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


def repro_failure(root: Path, stage: str) -> DvcCommandError:
    with pytest.raises(DvcCommandError) as failed:
        dvc_runner.run_dvc(["repro", stage], root, log=lambda line: None)
    assert failed.value.returncode == 255  # DVC's own code for any failed stage: it says nothing by itself
    return failed.value


def retried(exc: BaseException) -> bool:
    """What Prefect decides for a task that raised `exc` (the tasks' retry_condition_fn on the Failed state)."""
    from prefect.states import Failed

    return dvc_runner.retry_if_transient(None, None, Failed(data=exc))


def test_retries_follow_the_stages_real_exit_status_with_real_dvc(real_dvc_project):
    """DVC exits 255 for any failed stage; the stage's own record says 2 (a MedsegError: never retried, even though
    its log mentions 137) or that it died without exiting (SIGKILL: retried)."""
    boom = repro_failure(real_dvc_project, "boom")
    assert boom.stage_statuses["boom"]["exit_code"] == 2
    assert "model option x is unknown" in boom.stage_statuses["boom"]["error"]
    assert dvc_runner.is_transient(boom) is False and retried(boom) is False

    killed = repro_failure(real_dvc_project, "killed")
    assert killed.stage_statuses["killed"]["status"] == "running"
    assert dvc_runner.is_transient(killed) is True and retried(killed) is True

    dvc_runner.run_dvc(["repro", "fine"], real_dvc_project, log=lambda line: None)
    assert (real_dvc_project / "out.txt").read_text() == "done"
    left = sorted(p.name for p in real_dvc_project.iterdir() if not p.name.startswith("."))
    assert left == ["boom.py", "dvc.lock", "dvc.yaml", "fine.py", "killed.py", "out.txt", "params.yaml"]  # no records


def test_a_deterministic_failure_reaches_the_user_with_real_dvc(real_dvc_project):
    """The stage's error leads the message the flow shows (failure_message: first lines), not 40 lines of log."""
    from prefect.states import Failed

    boom = repro_failure(real_dvc_project, "boom")
    shown = pipeline.failure_message(Failed(data=boom))
    assert "stage boom exited with 2: params.yaml: model option x is unknown" in shown.splitlines()[0]
    assert "error: params.yaml: model option x is unknown" in boom.output_tail  # and the stage's own stderr line


@pytest.mark.parametrize(
    "stage, codes, transient",
    [
        ("raw_exit2", {2}, False),  # its log says "exited with 137": the old text matching retried it
        ("raw_killed", {-9, 137}, True),  # its log says "exited with 2"; -9 where DVC's $SHELL execs the command
        ("raw_killed_in_shell", {137}, True),
        ("raw_exit1", {1}, False),  # an uncaught exception and no passing condition: not retried
    ],
)
def test_commands_that_record_nothing_fall_back_to_dvcs_own_line(real_dvc_project, stage, codes, transient):
    exc = repro_failure(real_dvc_project, stage)
    assert exc.stage_statuses == {} and list(exc.stage_exits()) == [stage]
    assert exc.stage_exits()[stage] in codes
    assert retried(exc) is transient
