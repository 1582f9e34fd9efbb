"""Cells -> submitit jobs: finished cells skipped, queued ones left alone, the rest grouped by
resource shape into job arrays; each run folder records its job in `job.json`."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from tqdm import tqdm

from mipha_lab.cluster.jobs import CommandJob, EvaluateRunJob, TrainJob
from mipha_lab.cluster.profile import ClusterProfile, Shape
from mipha_lab.cluster.slurm_state import ACTIVE, RUN_STATE, job_states
from mipha_lab.config import ResourcesConfig
from mipha_lab.runs.folder import RunFolder
from mipha_lab.sweep import Cell


@dataclass
class Submission:
    """The jobs submitted for one group of cells (one job array per resource shape)."""

    cell: Cell
    job: Any  # submitit.Job
    eval_job: Any = None


def executor_for(
    profile: ClusterProfile, shape: Shape, logs: Path, name: str, max_concurrent: int | None = None
) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(
        folder=logs / "%j", cluster=profile.executor, slurm_max_num_timeout=profile.max_requeues
    )
    gpus = {"gpus_per_node": shape.gpus_per_node} if shape.gpus_per_node else {}
    executor.update_parameters(
        name=name,
        nodes=shape.nodes,
        tasks_per_node=shape.tasks_per_node,
        timeout_min=shape.time_min,
        **gpus,
        **({"mem_gb": shape.mem_gb} if shape.mem_gb else {}),
        **({"cpus_per_task": profile.cpus_per_task} if profile.cpus_per_task else {}),
    )
    if profile.executor == "slurm":
        optional = {
            "partition": profile.partition,
            "account": profile.account,
            "qos": profile.qos,
            "constraint": profile.constraint,
            "exclusive": profile.exclusive or None,
        }
        # the job's variables (caches: HF_HOME...) in its script, before Python starts: unpickling a job
        # imports its modules, and transformers / huggingface_hub read HF_HOME when first imported
        exports = [f"export {key}={shlex.quote(value)}" for key, value in profile.job_environment().items()]
        executor.update_parameters(
            slurm_setup=[*profile.setup, *exports],
            slurm_signal_delay_s=profile.signal_delay_s,
            slurm_additional_parameters={
                "requeue": True,
                "open-mode": "append",
                **profile.sbatch,
            },  # one log across requeues
            slurm_array_parallelism=max_concurrent or profile.max_concurrent or 256,
            **{f"slurm_{k}": v for k, v in optional.items() if v is not None},
        )
    return executor


def queued_jobs(cells: list[Cell]) -> dict[str, str]:
    """Run name -> job id of the cells already waiting or running on the cluster (one Slurm query)."""
    records = {c.run_name: RunFolder(c.run_path).read_json("job.json") for c in cells}
    records = {name: r for name, r in records.items() if r and r.get("executor") == "slurm"}
    states = job_states([r["job_id"] for r in records.values()])
    return {name: r["job_id"] for name, r in records.items() if RUN_STATE.get(states.get(r["job_id"], "")) in ACTIVE}


def record_job(cell: Cell, job: Any, profile: ClusterProfile, shape: Shape, eval_job: Any = None) -> None:
    RunFolder(cell.run_path).write_json(
        "job.json",
        {
            "job_id": str(job.job_id),
            "executor": profile.executor,
            "profile": profile.name,
            "submitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "shape": shape.model_dump(),
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
            "result": str(job.paths.result_pickle),
            "eval_job_id": str(eval_job.job_id) if eval_job is not None else None,
        },
    )


def submit_cells(cells: list[Cell], profile: ClusterProfile, out: Callable[[str], None] = print) -> list[Submission]:
    """Submit every cell that is neither finished nor queued; one job array per resource shape."""
    pending: dict[Shape, list[Cell]] = {}
    queued_by_name = queued_jobs(cells)
    for cell in cells:
        state = (RunFolder(cell.run_path).read_status() or {}).get("state")
        queued = queued_by_name.get(cell.run_name)
        if state == "done":
            out(f"skip {cell.run_name}: finished ({cell.run_path})")
        elif queued:
            out(f"skip {cell.run_name}: already queued as job {queued}")
        else:
            pending.setdefault(profile.shape(cell.experiment.resources), []).append(cell)
    submissions = []
    for shape, group in pending.items():
        logs = Path(group[0].experiment.runs_root) / ".jobs"
        limit = next((c.experiment.sweep.max_concurrent for c in group if c.experiment.sweep), None)
        executor = executor_for(profile, shape, logs, _job_name(group), limit)
        separate = [
            profile.executor == "slurm" and c.experiment.eval.separate_job and bool(c.experiment.eval.benchmarks)
            for c in group
        ]
        environment = profile.job_environment()
        with executor.batch():
            jobs = [
                executor.submit(TrainJob(c.experiment, environment, evaluate=not s))
                for c, s in zip(group, separate, strict=True)
            ]
        for cell, job, separate_eval in zip(group, jobs, separate, strict=True):
            eval_job = submit_evaluation(cell, job, profile, logs) if separate_eval else None
            record_job(cell, job, profile, shape, eval_job)
            submissions.append(Submission(cell, job, eval_job))
        as_array = len(jobs) > 1 and profile.executor == "slurm"
        what = f"job array {jobs[0].job_id.split('_')[0]}" if as_array else f"{len(jobs)} job(s)"
        out(f"submitted {len(jobs)} run(s) as {what} ({profile.executor}, {shape.describe()}):")
        for cell, job in zip(group, jobs, strict=True):
            out(f"  {job.job_id}  {cell.run_path}")
    return submissions


def _job_name(cells: list[Cell]) -> str:
    return cells[0].run_name.split("/")[0] if len(cells) > 1 else cells[0].run_name.replace("/", "-")


def submit_evaluation(cell: Cell, train_job: Any, profile: ClusterProfile, logs: Path) -> Any:
    """`eval.separate_job`: evaluate final/ in a job that starts once training has succeeded."""
    shape = Shape(
        nodes=1,
        gpus_per_node=min(profile.gpus_per_node, 1),
        tasks_per_node=1,
        time_min=profile.time_min,
        mem_gb=profile.mem_gb,
    )
    executor = executor_for(profile, shape, logs, f"eval-{_job_name([cell])}")
    executor.update_parameters(slurm_dependency=f"afterok:{train_job.job_id}")
    return executor.submit(EvaluateRunJob(str(cell.run_path.resolve()), profile.job_environment()))


def submit_command(
    main: Callable[[list[str]], int], argv: list[str], profile: ClusterProfile, logs: Path, name: str, tasks: int = 1
) -> Any:
    """One command-line call (the evaluation CLI) as a job; returns the submitit job."""
    shape = profile.shape(ResourcesConfig(tasks_per_node=tasks))
    executor = executor_for(profile, shape, logs, name)
    job = executor.submit(CommandJob(main, argv, profile.job_environment()))
    print(f"submitted job {job.job_id} ({profile.executor}, {shape.describe()}); log: {job.paths.stdout}")
    return job


def wait_for(submissions: list[Submission], poll_s: float = 2.0) -> None:
    """Block until every job (and dependent evaluation job) has ended, with a progress bar."""
    jobs = [j for s in submissions for j in (s.job, s.eval_job) if j is not None]
    slurm_ids = [job.job_id for job in jobs if isinstance(job, submitit.SlurmJob)]

    def ended() -> int:  # submitit's result file, and Slurm's accounting for its jobs
        active = {i for i, state in job_states(slurm_ids).items() if RUN_STATE.get(state) in ACTIVE}
        return sum(job.done() and job.job_id not in active for job in jobs)

    with tqdm(total=len(jobs), desc="jobs", unit="job", file=sys.stderr) as bar:
        while bar.n < len(jobs):
            time.sleep(poll_s)
            bar.update(ended() - bar.n)
