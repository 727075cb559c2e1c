"""Progress off a terminal is a few log lines, not a carriage-return stream (issue 32: DVC logs under Prefect)."""

from __future__ import annotations

import logging
import subprocess
import sys

from medseg.runtime import progress as progress_module
from medseg.runtime.progress import LogProgress, progress


def test_off_a_terminal_a_loop_logs_a_line_per_quarter(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="medseg.runtime.progress"):
        seen = list(progress(range(10), desc="evaluate unet", unit="case"))
    assert seen == list(range(10))
    assert [r.getMessage() for r in caplog.records] == [
        "evaluate unet: 3/10 case, 30%", "evaluate unet: 5/10 case, 50%", "evaluate unet: 8/10 case, 80%",
        "evaluate unet: 10/10 case, 100%"]


def test_postfix_resume_and_silent_loops(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="medseg.runtime.progress"):
        with progress(total=8, initial=4, desc="train", unit="step") as bar:  # resumed half-way: 50 % already shown
            for _ in range(4):
                bar.update(1)
                bar.set_postfix(loss="0.5000")
        bar = progress(total=8, desc="epoch", log_every=None)  # the epoch logs its own line
        for _ in range(8):
            bar.update(1)
        for _ in progress(range(8), desc="rank 1", enabled=False):
            pass
    assert [r.getMessage() for r in caplog.records] == ["train: 6/8 step, 75% (loss=0.5000)",
                                                         "train: 8/8 step, 100% (loss=0.5000)"]


def test_on_a_terminal_it_is_a_tqdm_bar(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    bar = progress(range(3), desc="x")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    assert isinstance(progress(range(3), enabled=False), LogProgress)


def test_a_stage_writing_to_a_file_has_no_carriage_returns(tmp_path):
    code = ("import logging\nlogging.basicConfig(level=logging.INFO)\nfrom medseg.runtime.progress import progress\n"
            "for _ in progress(range(200), desc='ingest', unit='case'): pass\n")
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, check=True, timeout=60)
    text = (tmp_path / "log").read_text()
    assert "\r" not in text and text.count("ingest: ") == 4, text
