"""Progress of long loops: a tqdm bar on a terminal, a few log lines anywhere else.

A bar redraws itself with carriage returns at every step; written to a file (a DVC stage's log under Prefect, CI,
`dvc repro > log`) that is hundreds of partial lines per epoch. Off a terminal `progress` logs one INFO line at
each `LOG_EVERY` fraction of the work done (25 %, 50 %, 75 %, 100 %), with the postfix the bar would show.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, Iterator

_log = logging.getLogger("medseg.runtime.progress")
LOG_EVERY = 0.25


def on_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, enabled: bool = True, log_every: float | None = LOG_EVERY):
    """A tqdm bar on a terminal, else a `LogProgress` with the same calls (update, set_postfix[_str], close,
    iteration, `with`). `enabled=False` shows nothing (a DDP rank other than 0); `log_every=None` logs nothing off
    a terminal (a loop that logs its own summary line, as a training epoch does)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if enabled and on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, unit=unit,
                       enabled=enabled and log_every is not None, every=log_every or 1.0)


class LogProgress:
    """tqdm's calls, logging a line per `every` fraction of `total` (and none without a total)."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, initial: int, desc: str, unit: str,
                 enabled: bool = True, every: float = LOG_EVERY):
        self.iterable, self.total, self.n = iterable, total, initial
        self.desc, self.unit, self.enabled, self.every = desc, unit, enabled, every
        self.postfix = ""
        self._logged = self._step(initial)

    def _step(self, n: int) -> int:
        return int(n / self.total / self.every + 1e-9) if self.total else 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        step = self._step(self.n)
        if self.enabled and self.total and step > self._logged:
            self._logged = step
            postfix = f" ({self.postfix})" if self.postfix else ""
            _log.info("%s: %d/%d %s, %d%%%s", self.desc, self.n, self.total, self.unit,
                      round(100 * self.n / self.total), postfix)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
