"""Job states from Slurm itself: `sacct` (accounting) first, `squeue` for jobs it does not know."""

from __future__ import annotations

import shutil
import subprocess

# Slurm's job states -> the states a run shows (`runs status`)
RUN_STATE = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "RUNNING": "running",
    "COMPLETING": "running",
    "RESIZING": "running",
    "SUSPENDED": "running",
    "REQUEUED": "preempted",
    "PREEMPTED": "preempted",
    "STOPPED": "preempted",
    "COMPLETED": "done",
    "FAILED": "failed",
    "CANCELLED": "failed",
    "TIMEOUT": "failed",
    "OUT_OF_MEMORY": "failed",
    "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
}
ACTIVE = {"pending", "running", "preempted"}


def _query(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job id (`123`, `123_4` for an array task); ids Slurm cannot be asked
    about (no Slurm here, a local job) are left out."""
    ids = sorted({i for i in job_ids if i.replace("_", "").isdigit()})
    if not ids:
        return {}
    states: dict[str, str] = {}
    listing = _query(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)])
    for line in (listing or "").splitlines():
        job, _, state = line.partition("|")
        for task in array_tasks(job):  # pending tasks of an array are one line: 12_[3-8%2]
            if task in ids:
                states[task] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    missing = [i for i in ids if i not in states]
    if missing:
        queue = _query(
            ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(sorted({i.split("_")[0] for i in missing}))]
        )
        for line in (queue or "").splitlines():
            job, _, state = line.partition("|")
            if job in missing:
                states[job] = state
    return states


def array_tasks(job: str) -> list[str]:
    """`12_[3-5,7%2]` -> 12_3, 12_4, 12_5, 12_7; any other id as it is."""
    if "_[" not in job:
        return [job]
    array, ranges = job.split("_[", 1)
    tasks = []
    for part in ranges.rstrip("]").split("%")[0].split(","):
        first, _, last = part.partition("-")
        tasks += [f"{array}_{n}" for n in range(int(first), int(last or first) + 1)]
    return tasks
