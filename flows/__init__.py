"""Prefect 3 orchestration of the medseg pipeline (see docs/orchestration.md). The library never imports this."""

from __future__ import annotations

import sys


def environment_ready() -> bool:
    """For the flows' command lines: False, with the reason and the repair on stderr, where this environment
    cannot start the Prefect server a flow run would start (medseg.runtime.environment)."""
    from medseg.runtime.environment import EnvironmentSetupError, check_before_local_prefect_server

    try:
        check_before_local_prefect_server()
    except EnvironmentSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True
