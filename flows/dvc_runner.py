"""Running `dvc` for the flows: one checkout's DVC calls queued on a lock, their output streamed into the task logs
as whole blocks, and the policy that says which failures a retry can fix.

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

from prefect import get_run_logger
from prefect.logging import get_logger

from medseg.config import disable_telemetry
from medseg.entry import EXIT_MEDSEG_ERROR, STATUS_DIR_ENV, read_stage_statuses
from medseg.errors import ConfigError, MedsegError
from medseg.runtime.threads import PARALLEL_JOBS_ENV

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
