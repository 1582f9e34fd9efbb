"""The state of run folders: one row per run (state, stage, step, loss, time, scores).

State, stage, step and loss come from the folder (`status.json`, `metrics.jsonl`, `eval/`), the job
from `job.json`, and the job's state from Slurm itself (`sacct`/`squeue`) when it can be asked: a
run that has not started yet is pending, one whose job died without a word is failed. A failed run
shows the last lines of its error.
"""

from __future__ import annotations

import datetime as dt
import pickle
from pathlib import Path
from typing import Any

from mipha_lab.cluster.slurm_state import RUN_STATE, job_states
from mipha_lab.errors import MiphaLabError
from mipha_lab.eval.benchmarks import headline_scores
from mipha_lab.runs.folder import RunFolder
from mipha_lab.runs.lock import RunLock

ERROR_LINES = 8


def run_folders(root: Path, sweep: str | None = None) -> list[Path]:
    """Every run folder under `root` (a sweep's cells sit one level down, in root/<sweep>/)."""
    base = root / sweep if sweep else root
    if not base.is_dir():
        raise MiphaLabError(f"{base}: no such runs folder")
    markers = [p.parent for name in ("status.json", "job.json") for p in base.rglob(name)]
    return sorted({p for p in markers if ".jobs" not in p.parts and "checkpoints" not in p.parts})


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)).total_seconds()


def job_outcome(job: dict[str, Any] | None) -> tuple[str | None, str]:
    """('success' | 'error', submitit's result or traceback) once the job's main task has ended."""
    result = Path(job["result"]) if job and job.get("result") else None
    if result is None or not result.is_file():
        return None, ""
    try:
        outcome, value = pickle.loads(result.read_bytes())
    except Exception:
        return None, ""
    return outcome, str(value)


def _error_tail(status: dict[str, Any], job: dict[str, Any] | None, traceback: str) -> list[str]:
    lines = [status["reason"]] if status.get("reason") else []
    if traceback:
        return lines + traceback.strip().splitlines()[-ERROR_LINES:]
    log = Path(job["stderr"]) if job and job.get("stderr") else None
    if log is not None and log.is_file():
        lines += log.read_text(errors="replace").splitlines()[-ERROR_LINES:]
    return lines


def run_row(path: Path, slurm: dict[str, str], root: Path | None = None) -> dict[str, Any]:
    folder = RunFolder(path)
    status, job = folder.read_status() or {}, folder.read_json("job.json")
    manifest = folder.read_json("manifest.json") or {}
    metrics = folder.metrics()
    state = status.get("state", "pending")
    slurm_state = slurm.get(job["job_id"]) if job else None
    from_slurm = RUN_STATE.get(slurm_state or "")
    if from_slurm in ("pending", "preempted") and state in ("running", "preempted"):
        state = "preempted"  # requeued, waiting to resume
    elif from_slurm in ("pending", "running", "failed"):
        state = from_slurm if state != "done" else state
    elif state in ("running", "evaluating") and slurm_state is None and not RunLock(path).held():
        state = "failed"  # no job and no process holds the folder: it died without writing its status
    outcome, traceback = job_outcome(job)
    if outcome == "error" and state != "done":
        state = "failed"
    last = metrics[-1] if metrics else {}
    total = status.get("total_steps") or (last.get("step") if state == "done" else None)
    elapsed = _seconds(manifest.get("created"), status.get("updated"))
    gpus = len((manifest.get("hardware") or {}).get("gpus") or [])
    step_seconds = sum(sum(row.get("time", {}).values()) for row in metrics)
    return {
        "run": str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name,
        "path": str(path),
        "state": state,
        "slurm_state": slurm_state,
        "job_id": job["job_id"] if job else None,
        "stage": status.get("stage") or last.get("stage"),
        "step": status.get("step") or last.get("step"),
        "total_steps": total,
        "loss": last.get("loss"),
        "elapsed_s": elapsed,
        "gpu_hours": step_seconds * manifest.get("world_size", 1) / 3600 if gpus else 0.0,
        "scores": headline_scores(path / "eval"),
        "error": _error_tail(status, job, traceback) if state == "failed" else [],
    }


def status_rows(paths: list[Path], root: Path | None = None) -> list[dict[str, Any]]:
    jobs = [RunFolder(p).read_json("job.json") for p in paths]
    slurm = job_states([j["job_id"] for j in jobs if j and j["executor"] == "slurm"])
    return [run_row(p, slurm, root) for p in paths]


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | state | stage | step | loss | elapsed | GPU-h | scores |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        step = f"{_cell(row['step'])}/{_cell(row['total_steps'])}" if row["total_steps"] else _cell(row["step"])
        elapsed = f"{row['elapsed_s'] / 60:.1f} min" if row["elapsed_s"] is not None else "-"
        scores = ", ".join(f"{k} {v:g}" for k, v in row["scores"].items()) or "-"
        lines.append(
            f"| {row['run']} | {row['state']} | {_cell(row['stage'])} | {step} | {_cell(row['loss'])} | {elapsed} "
            f"| {row['gpu_hours']:.2f} | {scores} |"
        )
    for row in rows:
        if row["error"]:
            lines += ["", f"{row['path']} failed:"] + [f"    {line}" for line in row["error"]]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines += ["", f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    return "\n".join(lines)


def print_status(paths: list[Path], root: Path | None = None) -> list[dict[str, Any]]:
    rows = status_rows(paths, root)
    print(format_rows(rows))
    return rows


def follow_hint(root: Path, cells: list[Any]) -> str:
    sweeps = sorted({c.run_name.split("/")[0] for c in cells if "/" in c.run_name})
    option = f" --sweep {sweeps[0]}" if len(sweeps) == 1 else ""
    return (
        f"follow: python -m mipha_lab.runs status {root}{option}\n"
        f"        squeue --me  |  tail -f {root}/.jobs/<job id>/<job id>_0_log.err"
    )
