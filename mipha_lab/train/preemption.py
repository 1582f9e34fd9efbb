"""Preemption and time limits on a cluster: the signal Slurm sends before it stops a job (USR2,
`--signal=USR2@N`, sent by the scheduler or by `scancel --signal=USR2`) becomes a checkpoint.

Inside the training loop the signal only raises a flag; every rank sees it at the next optimizer
step (the ranks agree through one all-reduce), the stage saves a checkpoint and raises `Preempted`,
and the job hands over to submitit, which requeues it; the requeued job resumes from that checkpoint.
Outside the loop (model build, evaluation, whose answers are resumable too) the signal is handed to
submitit at once. Without `install()` (a run not started by a cluster job) nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from mipha_lab.errors import MiphaLabError

log = logging.getLogger(__name__)


class Preempted(MiphaLabError):
    """The job was signalled; a checkpoint has been saved and the job should be requeued."""


class Interrupted(MiphaLabError):
    """Ctrl-C (SIGINT) during training: a checkpoint was saved at the step boundary; launching again resumes."""

    exit_code = 130
    label = "stopped"


class _State:
    signum: int | None = None
    requested = False
    interrupted = False
    deferring = False
    fallback: Callable[[int, FrameType | None], Any] | None = None  # submitit's own handler


def install(signum: int) -> None:
    """Take over `signum` (submitit's handler stays the fallback that checkpoints and requeues)."""
    previous = signal.getsignal(signum)
    _State.signum, _State.requested = signum, False
    _State.fallback = previous if callable(previous) else None
    signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _State.requested = True
    if _State.deferring:
        log.warning(
            "caught %s: a checkpoint will be saved after the current optimizer step, then the job is requeued",
            signal.Signals(signum).name,
        )
    else:
        requeue(frame)


def requested() -> bool:
    return _State.requested


def install_interrupt() -> None:
    """Ctrl-C in the training loop saves a checkpoint at the next step boundary and stops (a second Ctrl-C,
    or one outside the loop, stops at once); nothing trained since the last checkpoint is lost."""

    _State.interrupted = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    if _State.deferring and not _State.interrupted:
        _State.interrupted = True
        log.warning(
            "Ctrl-C: a checkpoint is saved after the current optimizer step, then the run stops "
            "(Ctrl-C again stops at once, losing the steps since the last checkpoint)"
        )
        return
    raise KeyboardInterrupt


def interrupted() -> bool:
    return _State.interrupted


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The training loop: a signal waits for the next step boundary instead of stopping the process."""
    _State.deferring = True
    try:
        yield
    finally:
        _State.deferring = False


def requeue(frame: FrameType | None = None) -> None:
    """Hand over to submitit: on the main task it requeues the job and exits; elsewhere it returns."""
    if _State.fallback is not None and _State.signum is not None:
        _State.fallback(_State.signum, frame)
