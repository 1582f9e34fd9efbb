"""Crash safety with `experiments/micro.yaml`: SIGKILL mid-stage and mid-checkpoint-write, then resume to
the same weights bit for bit; the run lock; a non-finite loss stops the stage and keeps the last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mipha_lab.runs.lock import RunLock
from mipha_lab.train.faults import ENV as KILL_AT

MICRO = Path(__file__).resolve().parents[1] / "experiments" / "micro.yaml"
LORA = ["stages.instruct.trainable.lm_body={mode: lora, r: 4, alpha: 8, dropout: 0.1}"]


def launch(
    cwd: Path, data_root: Path, *overrides: str, kill_at: str | None = None, nproc: int = 1
) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop(KILL_AT, None)
    if kill_at:
        env[KILL_AT] = kill_at
    command = [
        sys.executable,
        "-m",
        "mipha_lab.launch",
        str(MICRO),
        f"data_root={data_root}",
        "eval.benchmarks=[]",
        "checkpoint.every_steps=4",
        *overrides,
        "--nproc",
        str(nproc),
    ]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    out = launch(cwd, data_root)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "runs" / "micro"


def kill_and_resume(tmp_path: Path, data_root: Path, kill_at: str, *overrides: str) -> tuple[Path, str]:
    killed = launch(tmp_path, data_root, *overrides, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = tmp_path / "runs" / "micro"
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    assert not (run / "final").exists()
    resumed = launch(tmp_path, data_root, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    return run, resumed.stderr


def test_kill_during_stage_two_resumes_to_the_same_weights(tmp_path, data_root, reference):
    run, log = kill_and_resume(tmp_path, data_root, "step:14")  # align has 5 steps: instruct step 9
    assert "resuming" in log and "step-00000012" in log
    assert "taking over a stale lock" in log  # the killed process left its lock file behind
    assert losses(run) == losses(reference)  # steps 13, 14 trained again, each row once
    assert [s for s, _ in losses(run)] == list(range(1, 21))
    assert_bitwise_equal(weights(run), weights(reference))


def test_kill_during_a_checkpoint_write_falls_back_to_the_previous_one(tmp_path, data_root, reference):
    run, log = kill_and_resume(tmp_path, data_root, "checkpoint:12")
    assert "step-00000008" in log  # the half-written step-12 was never taken as the latest
    assert not list((run / "checkpoints").glob(".partial-*"))  # removed by the next save
    assert_bitwise_equal(weights(run), weights(reference))


def test_kill_during_stage_one_resumes(tmp_path, data_root, reference):
    run, _ = kill_and_resume(tmp_path, data_root, "step:3")
    assert losses(run) == losses(reference)
    assert_bitwise_equal(weights(run), weights(reference))


def test_lora_run_resumes_to_the_same_weights(tmp_path, data_root):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    uninterrupted = launch(tmp_path / "a", data_root, *LORA)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    run, _ = kill_and_resume(tmp_path / "b", data_root, "step:10", *LORA)
    checkpoint = json.loads((run / "checkpoints" / "step-00000020" / "state.json").read_text())
    assert checkpoint["stage_index"] == 2
    assert_bitwise_equal(weights(run), weights(tmp_path / "a" / "runs" / "micro"))


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_deepspeed_run_resumes_to_the_same_weights(tmp_path, data_root, zero):
    """Every rank's RNG and DeepSpeed's partitioned optimizer states come back (torchrun kills both ranks)."""
    overrides = ["engine.kind=deepspeed", f"engine.zero_stage={zero}"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    uninterrupted = launch(tmp_path / "a", data_root, *overrides, nproc=2)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed = launch(tmp_path / "b", data_root, *overrides, kill_at="step:14", nproc=2)
    assert killed.returncode != 0
    run = tmp_path / "b" / "runs" / "micro"
    assert {"rng-rank0.pt", "rng-rank1.pt", "deepspeed"} <= {
        p.name for p in (run / "checkpoints" / "step-00000012").iterdir()
    }
    resumed = launch(tmp_path / "b", data_root, *overrides, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(weights(run), weights(tmp_path / "a" / "runs" / "micro"))


def test_retention_keeps_the_last_checkpoints(reference):
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step-00000016", "step-00000020"]
    files = {p.name for p in (reference / "checkpoints" / "step-00000016").iterdir()}
    assert {"state.json", "model.safetensors", "optimizer.pt", "rng-rank0.pt"} <= files


def test_a_finished_run_is_not_trained_again(tmp_path, data_root, reference):
    before = (reference / "metrics.jsonl").read_text()
    out = launch(reference.parents[1], data_root)
    assert out.returncode == 0 and "finished run" in out.stderr
    assert (reference / "metrics.jsonl").read_text() == before


def test_a_changed_configuration_is_refused(tmp_path, data_root, reference):
    out = launch(reference.parents[1], data_root, "stages.instruct.optimizer.lr=0.5")
    assert out.returncode == 2
    assert "stages.instruct.optimizer.lr" in out.stderr


def test_a_second_launch_into_a_locked_run_is_refused(tmp_path, data_root):
    lock = RunLock(tmp_path / "runs" / "micro").acquire()
    try:
        out = launch(tmp_path, data_root)
    finally:
        lock.release()
    assert out.returncode == 2
    assert f"pid {os.getpid()}" in out.stderr and "host" in out.stderr and "since" in out.stderr


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_root):
    out = launch(tmp_path, data_root, "stages.align.optimizer.lr=1.0e+30", "checkpoint.every_steps=1")
    assert out.returncode == 2, out.stderr[-3000:]
    run = tmp_path / "runs" / "micro"
    record = json.loads((run / "nonfinite.json").read_text())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "NonFiniteLoss" in status["reason"]
    assert len(record["sample_ids"]) == 8 and all(
        i.startswith("ins-") or i.startswith("cap-") for i in record["sample_ids"]
    )
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert steps and steps[-1] == record["step"] - 1  # nothing written after the last good step
    last = load_file(str(run / "checkpoints" / f"step-{steps[-1]:08d}" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in last.values())
    assert "stages.align.optimizer.lr" in out.stderr and "--allow-changed-data" in out.stderr


def test_the_advice_after_a_non_finite_stop_can_be_followed(tmp_path, data_root):
    """The instruct stage's first step applies a huge learning rate; the next loss is NaN. Its advice (lower
    the learning rate, launch again) resumes from the last good checkpoint (the stage boundary) and finishes;
    a key the advice does not name is still refused."""
    out = launch(tmp_path, data_root, "stages.instruct.optimizer.lr=1.0e+30", "checkpoint.every_steps=100")
    assert out.returncode == 2 and "stages.instruct.optimizer.lr" in out.stderr, out.stderr[-3000:]
    run = tmp_path / "runs" / "micro"
    other = launch(tmp_path, data_root, "stages.instruct.optimizer.lr=1.0e-3", "checkpoint.every_steps=100", "seed=5")
    assert other.returncode == 2 and "differs in: seed" in other.stderr, other.stderr[-2000:]
    fixed = launch(tmp_path, data_root, "stages.instruct.optimizer.lr=1.0e-3", "checkpoint.every_steps=100")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "changed stages.instruct.optimizer.lr" in fixed.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "done"
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21)) and all(v < 1e-2 for r in rows[5:] for v in r["lr"].values())


def test_changed_hyperparameters_win_over_a_loaded_optimizer_state(tmp_path):
    """What the resume relies on: after loading a checkpoint's optimizer and schedule, the experiment's
    learning rate is applied exactly as the schedule computes it."""
    from mipha_lab.config import OptimizerConfig, ScheduleConfig
    from mipha_lab.train.engine import configured, lr_lambda, reapply

    def engine(lr: float):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([{"params": [param], "name": "p"}], lr=OptimizerConfig(lr=lr).lr)
        return param, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(ScheduleConfig(), 10))

    param, optimizer, scheduler = engine(1.0)
    for _ in range(3):
        param.sum().backward()
        optimizer.step()
        scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    for lr in (1.0, 0.25):
        _, fresh, schedule = engine(lr)
        wanted = configured(fresh)
        fresh.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        reapply(fresh, schedule, wanted)
        assert fresh.param_groups[0]["lr"] == lr * lr_lambda(ScheduleConfig(), 10)(3)
        if lr == 1.0:  # unchanged: exactly what the uninterrupted schedule holds
            assert fresh.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
