"""Against a real single-node Slurm (munge, MariaDB + slurmdbd, slurmctld, slurmd; tests/local_slurm.py):
a sweep as one job array, skipped when launched again; a 2-task DeepSpeed job with its evaluation as a
dependent job; a requeued job and a signalled job resume to the weights of an uninterrupted run.
Where Slurm cannot be started these tests fail with the reason: they are never skipped (the `slurm`
fixture is in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mipha_lab.cluster.slurm_state import job_states

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "experiments" / "micro.yaml"
SWEEP = REPO / "experiments" / "micro_sweep.yaml"
PROFILE = REPO / "slurm" / "test-node.yaml"
pytestmark = pytest.mark.slow


def launch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mipha_lab.launch", *args, "--cluster", str(PROFILE)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def status(root: Path, *options: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.runs", "status", str(root), "--json", *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def job_id(run: Path) -> str:
    return json.loads((run / "job.json").read_text())["job_id"]


def wait_until(condition, what: str, timeout: float = 420.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_sweep_runs_as_one_job_array_and_relaunch_skips_it(slurm, data_root, tmp_path):
    paths = [f"runs_root={tmp_path / 'runs'}", f"data_root={data_root}"]
    out = launch(tmp_path, str(SWEEP), *paths, "--wait")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "submitted 3 run(s) as job array" in out.stdout
    rows = status(tmp_path / "runs", "--sweep", "micro_sweep")
    assert [r["run"].split("/")[1].split("-")[0] for r in rows] == ["lr=0.0005", "lr=0.001", "lr=0.002"]
    array = {r["job_id"].split("_")[0] for r in rows}
    assert len(array) == 1 and sorted(r["job_id"].split("_")[1] for r in rows) == ["0", "1", "2"]
    assert all(r["state"] == "done" and r["slurm_state"] == "COMPLETED" for r in rows), rows
    assert all(r["step"] == r["total_steps"] == 20 and "shapes-vqa" in r["scores"] for r in rows)
    assert len({round(r["loss"], 6) for r in rows}) == 3  # each cell trained with its own learning rate
    for row in rows:
        run = Path(row["path"])
        assert (run / "final" / "model.safetensors").is_file() and (run / "eval" / "summary.csv").is_file()
        lr = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
        assert max(lr.values()) <= float(row["run"].split("lr=")[1].split("-")[0])

    again = launch(tmp_path, str(SWEEP), *paths)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished") == 3 and "submitted" not in again.stdout
    assert [job_id(Path(r["path"])) for r in rows] == [r["job_id"] for r in rows]  # nothing resubmitted


def test_two_task_deepspeed_job_and_dependent_evaluation(slurm, data_root, tmp_path):
    out = launch(
        tmp_path,
        str(MICRO),
        f"runs_root={tmp_path / 'runs'}",
        f"data_root={data_root}",
        "run_name=ds",
        "resources.tasks_per_node=2",
        "engine.kind=deepspeed",
        "engine.zero_stage=2",
        "eval.separate_job=true",
        "checkpoint.every_steps=4",
        "--wait",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "ds"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    partitions = sorted(p.name for p in (run / "checkpoints" / "step-00000016").rglob("*optim_states.pt"))
    assert len(partitions) == 2 and any("rank_1" in p for p in partitions), partitions  # ZeRO-2 across 2 tasks
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and losses[-1] < losses[5] < losses[0]
    job = json.loads((run / "job.json").read_text())
    assert job["shape"]["tasks_per_node"] == 2 and job["eval_job_id"]
    states = job_states([job["job_id"], job["eval_job_id"]])
    assert states == {job["job_id"]: "COMPLETED", job["eval_job_id"]: "COMPLETED"}
    (row,) = status(tmp_path / "runs")
    assert row["state"] == "done" and 0 <= row["scores"]["shapes-vqa"] <= 100
    train_log = Path(job["stderr"]).read_text()
    assert "evaluating" not in train_log and "shapes-vqa" not in train_log  # the evaluation ran in its own job


def test_requeued_and_signalled_jobs_resume_to_the_same_weights(slurm, data_root, tmp_path):
    """`scontrol requeue` kills the job and puts it back in the queue (it resumes from the last periodic
    checkpoint); `scancel --signal=USR2` is the warning Slurm sends before a time limit or a preemption
    (the job saves a checkpoint at the next step and requeues itself through submitit)."""
    common = [
        str(MICRO),
        f"runs_root={tmp_path / 'runs'}",
        f"data_root={data_root}",
        "eval.benchmarks=[]",
        "stages.instruct.max_steps=80",
        "checkpoint.every_steps=5",
    ]
    for name in ("reference", "requeued", "signalled"):
        out = launch(tmp_path, *common, f"run_name={name}")
        assert out.returncode == 0, out.stderr[-3000:]
    runs = tmp_path / "runs"

    def steps(name: str) -> int:
        metrics = runs / name / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    for name, action in (("requeued", ["scontrol", "requeue"]), ("signalled", ["scancel", "--signal=USR2"])):
        wait_until(lambda name=name: steps(name) >= 12, f"{name} to reach step 12")
        assert steps(name) < 85, f"{name} finished before it could be interrupted"
        slurm.run(*action, job_id(runs / name))
        wait_until(
            lambda name=name: (
                json.loads((runs / name / "status.json").read_text())["state"] == "preempted"
                or job_states([job_id(runs / name)]).get(job_id(runs / name)) != "RUNNING"
            ),
            f"{name} to stop",
        )
    ids = [job_id(runs / name) for name in ("reference", "requeued", "signalled")]
    wait_until(lambda: set(job_states(ids).values()) == {"COMPLETED"}, "all three jobs to complete")

    reference = load_file(str(runs / "reference" / "final" / "model.safetensors"))
    for name in ("requeued", "signalled"):
        history = slurm.run("sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id(runs / name)).stdout
        assert "REQUEUED" in history, history  # Slurm itself requeued the job
        weights = load_file(str(runs / name / "final" / "model.safetensors"))
        assert all(torch.equal(reference[k], weights[k]) for k in reference), f"{name}: weights differ"
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 86))  # every step once, none lost, none doubled
    job = json.loads((runs / "signalled" / "job.json").read_text())
    log = Path(job["stderr"]).read_text() + Path(job["stdout"]).read_text()  # both incarnations: logs are appended
    assert (
        "resuming" in log
        and "a checkpoint will be saved after the current optimizer step" in log
        and "Requeued job" in log
    )
