"""Prefect tasks shared by the medseg flows, and the pure helpers behind them.

DVC stays the judge of what is stale: every task that produces artefacts runs `dvc repro <stages>` in the
project root. DVC (3.x) holds its repository lock while it plans and records a stage and releases it while the
stage's command runs, with read/write locks on the stage's paths; but a second DVC process that cannot get the
repository lock within ~3 s fails ("Unable to acquire lock"), also *after* a finished training. So every call
runs as `dvc --wait-for-lock ...`, and `checkout_lock` bounds how many run at once in one checkout (default 1:
one device to train on). Parallel training across GPUs comes from fanning architectures out to work-pool
workers, each with its own checkout (see docs/orchestration.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger

from medseg.card import dataset_version as cases_json_version
from medseg.config import disable_telemetry, load_params
from medseg.entry import EXIT_MEDSEG_ERROR, STATUS_DIR_ENV, read_stage_statuses
from medseg.errors import ConfigError, MedsegError
from medseg.layout import ProjectLayout
from medseg.threads import PARALLEL_JOBS_ENV

# `dvc repro` of these pulls in the `phantom` stage only when the dataset's raw_dir is phantom's output,
# so the built-in stand-in data is generated when (and only when) the pipeline uses it.
DATA_STAGES = ("ingest", "split")
ARCH_STAGES = ("train", "evaluate", "export", "register")
REPORT_STAGE = "report"
# Tag on every task that runs DVC (filter them in the UI; `checkout_lock` already serialises one checkout).
DVC_TAG = "dvc"
LOCK_DIR = Path(".dvc") / "tmp"
OUTPUT_TAIL_LINES = 40

# How a failed `dvc repro` is judged (see `is_transient`). DVC 3 exits 255 for any failed stage and keeps the
# stage's status only in the text of its error (StageCmdFailedError has no status attribute), so run_dvc gives every
# stage a folder (medseg.entry.STATUS_DIR_ENV) where medseg.entry records "running" when the stage starts and its
# exit code when it ends; a record left "running" means the process died without exiting (SIGKILL: the OOM killer,
# preemption). Those records decide:
#   exit 2 (a MedsegError: ConfigError, IngestError, TrainingError, ... or a bad argument) -> never retried;
#   died without exiting, or killed by a signal other than SIGINT -> retried;
#   any other exit (1: an uncaught exception) -> retried only when the output names a passing condition below.
_DETERMINISTIC_STAGE_EXITS = (EXIT_MEDSEG_ERROR,)
# Documented fallback, for a failed stage command that recorded nothing (not a medseg stage, or it died before
# medseg.entry ran): DVC's own last line for it, "ERROR: failed to reproduce 'S': failed to run: CMD, exited with N"
# (N negative for a signal when DVC's $SHELL execs the command, 128+signal when the shell reports it). Only that
# anchored line of DVC's is read, never a stage's log lines.
_DVC_STAGE_FAILED = re.compile(
    r"^ERROR: failed to reproduce '(?P<stage>[^']+)': failed to run: .*, exited with (?P<code>-?\d+)\s*$", re.M
)
# Passing conditions, read from the output only for DVC's own failures (no stage command failed) and for stage exits
# other than 2 and signals: another DVC process or stage holding a lock, a busy database, the network, a GPU fault.
_TRANSIENT_MARKERS = (
    "unable to acquire lock",
    "is busy, it is being blocked by",  # DVC's per-path lock: someone else's stage is using our inputs
    "database is locked",
    "connection refused",
    "connection reset",
    "connection aborted",
    "network is unreachable",
    "temporarily unavailable",
    "temporary failure",
    "timed out",
    "failed to upload",  # dvc push / pull against the remote
    "failed to download",
    "cuda error: unspecified launch failure",  # a GPU fault (Xid), not the code
    "cuda-capable device(s) is/are busy or unavailable",
    "uncorrectable ecc error",
    "dataloader worker (pid",  # "... is killed by signal: Killed" / "... exited unexpectedly": the OOM killer
)
# Python exceptions raised in-process that retrying can fix.
_TRANSIENT_EXCEPTIONS = (ConnectionError, TimeoutError)


def killed_by(code: int | None) -> int | None:
    """The signal that ended a process with exit status `code` (-N from Popen, 128+N from a shell), else None."""
    if code is None:
        return None
    if code < 0:
        return -code
    if 128 < code < 128 + signal.NSIG:
        return code - 128
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class DvcCommandError(MedsegError):
    """A `dvc` command failed: its exit code, the end of its output and the failed stages' own exit status."""

    def __init__(self, args: Sequence[str], returncode: int, output_tail: str, root: str | Path,
                 stage_statuses: dict[str, dict[str, Any]] | None = None):
        self.args_list = list(args)
        self.returncode = returncode
        self.output_tail = output_tail
        self.root = str(root)
        # stage -> its medseg.entry record: {"status": "running"} (died without exiting) or {"status": "exited",
        # "exit_code": n, "error": message}
        self.stage_statuses = dict(stage_statuses or {})
        command = f"`dvc {' '.join(self.args_list)}` exited with {returncode} in {self.root}"
        failures = [self._describe(stage, code) for stage, code in self.stage_exits().items()]
        # The stage's own error first: `failure_message`, the artifacts' table (its first 200 characters) and the
        # Prefect UI show the beginning.
        super().__init__("; ".join([*failures, command]) + f"\n{output_tail}")

    def __reduce__(self):  # picklable (Prefect stores a failed task's exception)
        return (type(self), (self.args_list, self.returncode, self.output_tail, self.root, self.stage_statuses))

    def stage_exits(self) -> dict[str, int | None]:
        """Failed stage -> its exit code, None where it died without exiting.

        From medseg.entry's records; when no stage recorded a failure, from DVC's own "failed to run: ..., exited
        with N" line (the documented fallback for commands that record nothing). {}: DVC failed by itself.
        """
        if self.stage_statuses:
            return {stage: record.get("exit_code") if record.get("status") == "exited" else None
                    for stage, record in self.stage_statuses.items()}
        found = list(_DVC_STAGE_FAILED.finditer(self.output_tail))
        return {found[-1]["stage"]: int(found[-1]["code"])} if found else {}

    def _describe(self, stage: str, code: int | None) -> str:
        if code is None:
            return f"stage {stage} died without exiting (killed: the OOM killer, preemption?)"
        sig = killed_by(code)
        if sig is not None:
            return f"stage {stage} was killed by {_signal_name(sig)}"
        error = (self.stage_statuses.get(stage) or {}).get("error")
        return f"stage {stage} exited with {code}" + (f": {error}" if error else "")


def _logger():
    try:
        return get_run_logger()
    except Exception:  # outside a flow/task run (unit tests, plain calls)
        return get_logger("medseg.flows")


# ---------------------------------------------------------------------------------------------------------
# Running DVC


_fallback_lock = threading.Lock()
SLOT_POLL_S = 0.5


@contextlib.contextmanager
def checkout_lock(root: str | Path, slots: int = 1, exclusive: bool = True) -> Iterator[int]:
    """Wait for this checkout to be free for one DVC call; yields the run slot index.

    `exclusive` calls (data prep, report, push) have the checkout to themselves. Shared calls (one
    architecture's stages: they write only their own outputs) run side by side, at most `slots` at a time.
    The locks are `fcntl.flock`s under `.dvc/tmp/`: a flock belongs to an open file, so it excludes other threads
    of this process (each call opens the files anew) and other processes (a served deployment, a second pipeline
    run) alike. Waiting callers queue instead of failing like DVC's own lock.
    """
    root = Path(root).resolve()
    try:
        import fcntl
    except ImportError:  # Windows: one DVC call at a time within this process
        with _fallback_lock:
            yield 0
        return
    lock_dir = root / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "medseg-flows.lock", "a+") as checkout:
        fcntl.flock(checkout.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            if exclusive:
                yield 0
            else:
                with _run_slot(fcntl, lock_dir, max(1, int(slots))) as index:
                    yield index
        finally:
            fcntl.flock(checkout.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _run_slot(fcntl: Any, lock_dir: Path, slots: int) -> Iterator[int]:
    handles = [open(lock_dir / f"medseg-flows.slot{i}.lock", "a+") for i in range(slots)]
    held = None
    try:
        if slots == 1:
            fcntl.flock(handles[0].fileno(), fcntl.LOCK_EX)
            held = 0
        while held is None:
            for i, fh in enumerate(handles):
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held = i
                break
            else:
                time.sleep(SLOT_POLL_S)
        yield held
    finally:
        if held is not None:
            fcntl.flock(handles[held].fileno(), fcntl.LOCK_UN)
        for fh in handles:
            fh.close()


def dvc_env() -> dict[str, str]:
    disable_telemetry()
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_dvc(
    args: Sequence[str],
    root: str | Path,
    *,
    slots: int = 1,
    exclusive: bool = True,
    dvc_cmd: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Run `dvc --wait-for-lock <args>` in `root` under `checkout_lock`, streaming its output to the run log.

    Returns the output; raises DvcCommandError on a non-zero exit, with the last lines of output and the records of
    the stages that failed (each stage writes its exit status to a temporary folder named in its environment,
    outside the project and its stage outputs; see medseg.entry). `dvc_cmd` replaces `python -m dvc` (tests use a
    fake).
    """
    root = Path(root)
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"{root / 'dvc.yaml'}: not found; pass the project root (the folder with dvc.yaml)")
    cmd = [*(dvc_cmd or (sys.executable, "-m", "dvc")), "--wait-for-lock", *args]
    log = log or _logger().info
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    with checkout_lock(root, slots, exclusive), tempfile.TemporaryDirectory(prefix="medseg-stage-status-") as status:
        log(f"$ dvc {' '.join(args)}  (in {root})")
        env = {**dvc_env(), STATUS_DIR_ENV: status}  # each stage records its real exit status here
        if slots > 1:  # up to `slots` stages run at once here: each sizes its threads to its share of the cores
            outer = env.get(PARALLEL_JOBS_ENV, "")
            env[PARALLEL_JOBS_ENV] = str(max(slots, int(outer) if outer.isdigit() else 1))
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        blocks = LogBlocks(log)
        for line in blocks.follow(terminal_lines(proc.stdout)):
            lines.append(line)
            tail.append(line)
        returncode = proc.wait()
        statuses = read_stage_statuses(status)
    if returncode != 0:
        failed = {stage: r for stage, r in statuses.items() if r.get("status") != "exited" or r.get("exit_code")}
        raise DvcCommandError(args, returncode, "\n".join(tail), root, failed)
    return "\n".join(lines)


def terminal_lines(stream: Any) -> Iterator[str]:
    """The lines of a byte stream as a terminal leaves them: a line rewritten in place with carriage returns (a
    tqdm progress bar) counts once, in its final state, instead of once per update."""
    import io

    shown = ""
    for piece in io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=""):
        if piece.endswith("\r"):  # the cursor goes back: what follows overwrites this
            shown = piece[:-1]
            continue
        text = piece.rstrip("\r\n")
        yield text or shown  # "bar\r" then "\n": the bar stays on that line
        shown = ""
    if shown.strip():
        yield shown


class LogBlocks:
    """Output lines to a log as whole blocks: one record per DVC stage's burst of output (a record ends at the next
    "Running stage", after BLOCK_IDLE_S without output or BLOCK_MAX_S after it began), not one per line."""

    BLOCK_IDLE_S, BLOCK_MAX_S = 1.0, 10.0
    STAGE_START = re.compile(r"^Running stage '")

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.block, self.started = log, [], 0.0

    def flush(self) -> None:
        text = "\n".join(self.block).strip("\n")
        if text.strip():
            self.log(text)
        self.block = []

    def add(self, line: str) -> None:
        if self.STAGE_START.match(line):
            self.flush()
        if not self.block:
            self.started = time.monotonic()
        self.block.append(line)
        if time.monotonic() - self.started >= self.BLOCK_MAX_S:
            self.flush()

    def follow(self, lines: Iterator[str]) -> Iterator[str]:
        """Pass `lines` through, logging them in blocks; a reader thread lets a quiet pause end a block."""
        import queue

        pending: queue.Queue = queue.Queue()
        done = object()

        def read() -> None:
            try:
                for line in lines:
                    pending.put(line)
            finally:
                pending.put(done)

        threading.Thread(target=read, daemon=True).start()
        while True:
            try:
                line = pending.get(timeout=self.BLOCK_IDLE_S if self.block else None)
            except queue.Empty:
                self.flush()
                continue
            if line is done:
                break
            self.add(line)
            yield line
        self.flush()


def repro_args(stages: Sequence[str]) -> list[str]:
    return ["repro", *stages]


def arch_stages(arch: str) -> list[str]:
    return [f"{stage}@{arch}" for stage in ARCH_STAGES]


# ---------------------------------------------------------------------------------------------------------
# Retry policy


def _names_passing_condition(text: str) -> bool:
    text = text.lower()
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def _retryable_signal(code: int | None) -> bool:
    sig = killed_by(code)
    return sig is not None and sig != signal.SIGINT  # Ctrl-C: someone stopped it on purpose


def is_transient(exc: BaseException | None) -> bool:
    """True when running the same thing again may succeed (lock held, network, killed process).

    A DvcCommandError is judged by the failed stages' exit status (see the notes above _DETERMINISTIC_STAGE_EXITS):
    exit 2 never, died without exiting / killed by a signal always, other exits only with a passing condition in
    the output. With no failed stage it is DVC's own failure: retried only for a passing condition (a lock).
    """
    if exc is None:
        return False
    if isinstance(exc, DvcCommandError):
        codes = list(exc.stage_exits().values())
        if any(code in _DETERMINISTIC_STAGE_EXITS for code in codes):
            return False  # a MedsegError: the same inputs give the same error, whatever the log says
        if any(code is None or _retryable_signal(code) for code in codes) or _retryable_signal(exc.returncode):
            return True  # died without exiting (the OOM killer, preemption, an evicted pod), or dvc itself was killed
        # Another exit code of a stage (an uncaught exception), or DVC's own error (a held lock, a bad dvc.yaml, a
        # missing output): the output is the only evidence left.
        return _names_passing_condition(exc.output_tail)
    if isinstance(exc, MedsegError):
        return False  # ConfigError, IngestError, TrainingError, ExportError, PromotionRefused: same input, same error
    return isinstance(exc, _TRANSIENT_EXCEPTIONS)


def retry_if_transient(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only failures that `is_transient` accepts."""
    try:
        state.result()
    except BaseException as exc:  # the failure we are judging
        return is_transient(exc)
    return False


# ---------------------------------------------------------------------------------------------------------
# Reading what the stages wrote


def ingested_version(params: dict[str, Any], root: str | Path) -> str | None:
    """Content version of the ingested dataset (the one model cards record), None before ingest."""
    cases = ProjectLayout.of(params, root).cases_json
    return cases_json_version(cases) if cases.is_file() else None


def mlflow_links(tracking_uri: str | None, experiment_id: str | None, run_id: str | None, model: str,
                 version: str | None) -> dict[str, str | None]:
    """Where to look in MLflow: the model version's URI always, and UI links when the store is a tracking server
    (an http(s) URI; a sqlite store has no UI address until `mlflow ui` serves it)."""
    base = tracking_uri.rstrip("/") if tracking_uri and tracking_uri.startswith(("http://", "https://")) else None
    return {
        "model_uri": f"models:/{model}/{version}" if version else None,
        "mlflow_run_url": f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        if base and experiment_id and run_id else None,
        "model_version_url": f"{base}/#/models/{model}/versions/{version}" if base and version else None,
    }


def arch_summary(params: dict[str, Any], arch: str, root: str | Path) -> dict[str, Any]:
    """What one architecture's stages produced: metrics, export parity and the registered version."""
    from medseg.registry import model_name
    from medseg.report import read_arch_outputs  # the report's reading, so both show the same numbers

    outputs = read_arch_outputs(params, arch, root)
    metrics, export, registry = outputs.metrics, outputs.export, outputs.registry
    name = registry.model_name if registry else model_name(params, arch)
    version, run_id = (registry.version, registry.run_id) if registry else (None, None)
    return {
        "arch": arch,
        "status": "completed",
        "model_name": name,
        "version": version,
        "run_id": run_id,
        **mlflow_links(registry.tracking_uri if registry else None, registry.experiment_id if registry else None,
                       run_id, name, version),
        "mean_dsc": metrics.mean_dsc if metrics else None,
        "mean_hd95": metrics.mean_hd95 if metrics else None,
        "mean_nsd": metrics.mean_nsd if metrics else None,
        "hd95_unit": metrics.hd95_unit if metrics else None,
        "protocol": metrics.protocol if metrics else None,
        "per_class": {cls: s.to_dict() for cls, s in metrics.per_class.items()} if metrics else {},
        "parity_passed": export.parity_passed if export else None,
        "max_abs_diff": export.max_abs_diff if export else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Tasks

# Two retries for transient failures only; no Prefect result cache (DVC alone decides what is stale).
TASK_POLICY: dict[str, Any] = {"retries": 2, "retry_condition_fn": retry_if_transient, "cache_policy": NO_CACHE}
RETRY_DELAY_ENV = "MEDSEG_RETRY_DELAY_S"


def retry_delay(default_s: float) -> float:
    """A task's wait before a retry: `default_s`, or MEDSEG_RETRY_DELAY_S for every task of the process (read when
    flows/ is imported: set it in the worker's or the deployment's environment; e.g. longer on a preemptible pool)."""
    value = os.environ.get(RETRY_DELAY_ENV)
    if value is None or not value.strip():
        return default_s
    try:
        delay = float(value)
    except ValueError:
        raise ConfigError(f"{RETRY_DELAY_ENV}={value!r}: expected seconds (a number >= 0)") from None
    if delay < 0:
        raise ConfigError(f"{RETRY_DELAY_ENV}={value!r}: expected seconds (a number >= 0)")
    return delay


@task(name="prepare-data", tags=[DVC_TAG], retry_delay_seconds=retry_delay(10), **TASK_POLICY)
def prepare_data(root: str = ".") -> dict[str, Any]:
    """`dvc repro ingest split` (and `phantom` when the dataset is the built-in one)."""
    run_dvc(repro_args(DATA_STAGES), root)
    params = load_params(Path(root) / "params.yaml")
    return {"dataset": params["dataset"]["name"], "version": ingested_version(params, root)}


@task(name="train-evaluate-export-register", task_run_name="train-{arch}", tags=[DVC_TAG],
      retry_delay_seconds=retry_delay(30), **TASK_POLICY)
def train_arch(arch: str, root: str = ".", max_parallel: int = 1) -> dict[str, Any]:
    """One architecture's `train@A evaluate@A export@A register@A`, then what they produced.

    At most `max_parallel` of these run at once in one checkout (see `checkout_lock`).
    """
    params = load_params(Path(root) / "params.yaml")
    if arch not in (params.get("models") or []):
        raise ConfigError(
            f"{Path(root) / 'params.yaml'}: architecture {arch!r} is not in `models` "
            f"({', '.join(params.get('models') or [])}); dvc.yaml has no stages for it"
        )
    run_dvc(repro_args(arch_stages(arch)), root, slots=max_parallel, exclusive=False)
    return arch_summary(params, arch, root)


@task(name="dvc-push", tags=[DVC_TAG], retry_delay_seconds=retry_delay(30), **TASK_POLICY)
def push_outputs(stages: list[str], root: str = ".") -> None:
    """`dvc push` these stages' outputs to the DVC remote (a worker's results for the orchestrating checkout)."""
    run_dvc(["push", *stages], root)


def name_flow_run(name: str) -> None:
    """Rename the running flow run: Prefect names runs at random ("quick-otter"); the dataset version tells
    runs apart in the UI. Best effort: a failure is logged, never fatal; outside a flow run nothing happens."""
    from prefect import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name)
    except Exception as exc:  # noqa: BLE001 - a name is not worth failing a pipeline for
        get_logger(__name__).warning("could not rename flow run %s to %r: %s", run_id, name, exc)


def promote_model(params: dict[str, Any], arch: str, root: str | Path, promote_fn: Callable | None = None) -> dict:
    """Apply the champion gate (medseg.promotion) to one architecture; a refusal is a decision, not a failure.

    The decision is "promoted", "unchanged" (already the champion) or "refused", with the gate's reason.
    """
    from medseg.errors import PromotionRefused
    from medseg.promotion import promote_from_params
    from medseg.registry import model_name

    promote_fn = promote_fn or promote_from_params
    try:
        result = dict(promote_fn(params, arch, root) or {})
    except PromotionRefused as exc:
        result = dict(getattr(exc, "result", None) or {})
        result["decision"] = "refused"
        result["reason"] = result.get("reason") or str(exc)
    return {"arch": arch, "model_name": model_name(params, arch), **result}


# The tag lets a Prefect tag concurrency limit (`prefect concurrency-limit create medseg-promote 1`) serialise
# promotions started on several machines; on one machine medseg.promotion's lock already does.
@task(name="promote", task_run_name="promote-{arch}", retry_delay_seconds=retry_delay(10), tags=["medseg-promote"],
      **TASK_POLICY)
def promote_arch(arch: str, root: str = ".") -> dict[str, Any]:
    params = load_params(Path(root) / "params.yaml")
    return promote_model(params, arch, root)


@task(name="report", tags=[DVC_TAG], retry_delay_seconds=retry_delay(10), **TASK_POLICY)
def repro_report(root: str = ".") -> str:
    run_dvc(repro_args([REPORT_STAGE]), root)
    return str(ProjectLayout.of(load_params(Path(root) / "params.yaml"), root).comparison_dir / "comparison.md")


# ---------------------------------------------------------------------------------------------------------
# Artifacts (pure builders, then the task that publishes them)


def _fmt(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def metrics_table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per architecture (failed ones included, with their error) for a Prefect table artifact; DSC in %
    to one decimal and HD95 to two with its unit, as reports/comparison.md shows them."""
    rows = []
    for arch, res in results.items():
        dsc = res.get("mean_dsc")
        rows.append(
            {
                "architecture": arch,
                "status": res.get("status", "unknown"),
                "test_dsc_percent": round(dsc * 100, 1) if isinstance(dsc, float) else None,
                "test_hd95": _fmt(res.get("mean_hd95"), 2),
                "test_nsd_percent": _fmt(100 * res["mean_nsd"], 1) if isinstance(res.get("mean_nsd"), float) else None,
                "hd95_unit": res.get("hd95_unit"),
                "protocol": res.get("protocol"),
                "onnx_parity": res.get("parity_passed"),
                "model_version": res.get("version"),
                "model_uri": res.get("model_uri"),
                "mlflow": res.get("model_version_url") or res.get("mlflow_run_url") or res.get("run_id"),
                "error": (res.get("error") or "")[:200],
            }
        )
    return rows


def promotion_markdown(decisions: dict[str, dict[str, Any]], dataset_version_id: str | None = None) -> str:
    """The promotion decisions as markdown (one line per architecture, with the gate's reason)."""
    lines = ["# medseg promotion decisions", ""]
    if dataset_version_id:
        lines += [f"Dataset version: `{dataset_version_id}`", ""]
    lines += ["| architecture | model | decision | reason |", "|---|---|---|---|"]
    for arch, dec in decisions.items():
        reason = str(dec.get("reason", "")).replace("\n", " ").replace("|", "\\|")
        model = dec.get("model_name", "")
        if dec.get("model_version_url"):  # a link to the version in MLflow's UI (tracking server stores)
            model = f"[{model}]({dec['model_version_url']})"
        lines.append(f"| {arch} | {model} | **{dec.get('decision', '')}** | {reason} |")
    promoted = [a for a, d in decisions.items() if d.get("decision") == "promoted"]
    lines += ["", f"Promoted to `champion`: {', '.join(promoted) if promoted else 'none'}."]
    return "\n".join(lines) + "\n"


METRICS_ARTIFACT_KEY = "medseg-metrics"
PROMOTION_ARTIFACT_KEY = "medseg-promotion"


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(
    results: dict[str, dict[str, Any]], decisions: dict[str, dict[str, Any]], dataset_version_id: str | None
) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        table=metrics_table(results),
        key=METRICS_ARTIFACT_KEY,
        description="Test-set DSC / HD95 per architecture (medseg evaluate stage)",
    )
    create_markdown_artifact(
        markdown=promotion_markdown(decisions, dataset_version_id),
        key=PROMOTION_ARTIFACT_KEY,
        description="Champion gate decisions (medseg.promotion.promote)",
    )
