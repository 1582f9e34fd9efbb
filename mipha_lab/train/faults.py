"""Crash injection for the crash-safety tests: `MIPHA_LAB_KILL_AT=<point>:<global step>` makes the
process SIGKILL itself there (`step`: right after that optimizer step; `checkpoint`: half-way
through writing that step's checkpoint). Unset in normal use; a kill is the real event being tested."""

from __future__ import annotations

import os
import signal

ENV = "MIPHA_LAB_KILL_AT"


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get(ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
