"""Training end to end on the micro experiment: run folder, metrics, engines and process counts agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mipha_lab.config import load_experiment
from mipha_lab.model import MultimodalModel

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "experiments" / "micro.yaml"
METRIC_KEYS = {
    "stage",
    "step",
    "stage_step",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "samples_per_s",
    "images_per_s",
    "time",
    "peak_memory_mb",
    "flops",
    "recompute_flops",
    "mfu",
    "supervised_tokens",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


def launch(workspace: Path, run_name: str, *overrides: str, nproc: int = 1) -> Path:
    """The real command line, in a subprocess (torchrun for several processes)."""
    command = [
        sys.executable,
        "-m",
        "mipha_lab.launch",
        str(MICRO),
        f"data_root={workspace / 'data'}",
        f"runs_root={workspace / 'runs'}",
        f"run_name={run_name}",
        "tracking.wandb_mode=disabled",
        *overrides,
    ]
    if nproc > 1:
        command.append(f"--nproc={nproc}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return workspace / "runs" / run_name


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(workspace) -> Path:
    return launch(workspace, "one-process")


def test_run_folder_layout_and_metrics(reference_run):
    run = reference_run
    for name in (
        "config.yaml",
        "manifest.json",
        "status.json",
        "metrics.jsonl",
        "params-align.json",
        "params-align.md",
        "params-instruct.md",
        "final/config.json",
        "final/model.safetensors",
        "stages/align/model.safetensors",
        "eval/summary.md",
        "eval/summary.csv",
        "eval/shapes-vqa/answers.jsonl",
        "eval/shapes-vqa/scores.json",
    ):
        assert (run / name).exists(), name
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 20
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and manifest["seed"] == 0 and manifest["git"]["commit"]
    assert {f["path"].rsplit("/", 1)[-1] for f in manifest["data_files"]} == {"captions.json", "instruct.json"}
    assert all(f["sha256"] and f["bytes"] > 0 for f in manifest["data_files"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21)) and {r["stage"] for r in rows} == {"align", "instruct"}
    assert set(rows[0]) >= METRIC_KEYS and set(rows[0]["time"]) == {"data", "forward_backward", "optimizer"}
    assert set(rows[-1]["lr"]) >= {"vision", "projector", "lm_body", "lm_embeddings", "lm_head"}
    instruct = [r["loss"] for r in rows if r["stage"] == "instruct"]
    assert instruct[-1] < instruct[0] - 1.0  # learning
    resolved = load_experiment(run / "config.yaml")
    assert resolved.stage("instruct").max_steps == 15 and resolved.extends_chain[-1].endswith("micro.yaml")
    params = json.loads((run / "params-align.json").read_text())
    assert {p["module"]: p["trainable"] > 0 for p in params} == {
        "vision": False,
        "projector": True,
        "lm_body": False,
        "lm_embeddings": False,
        "lm_head": False,
    }


def test_final_model_loads_and_answers(reference_run):
    model = MultimodalModel.from_pretrained(reference_run / "final")
    answers = (reference_run / "eval/shapes-vqa/answers.jsonl").read_text().splitlines()
    assert len(answers) == 1000 and model.config.template == "phi"


def test_deepspeed_single_process_follows_the_torch_loss_curve(workspace, reference_run):
    run = launch(workspace, "deepspeed-one", "engine.kind=deepspeed", "eval.benchmarks=[]")
    assert losses(run) == pytest.approx(losses(reference_run), abs=1e-5)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_follow_the_one_process_loss_curve(workspace, reference_run, zero):
    """Same global batch (8 = 4 per micro-batch x 2 processes vs x 2 accumulation steps): every step's
    loss agrees to 1e-5 and the final weights give the same logits."""
    run = launch(workspace, f"zero{zero}", f"engine.zero_stage={zero}", "eval.benchmarks=[]", nproc=2)
    assert losses(run) == pytest.approx(losses(reference_run), abs=1e-5)
    one, two = (MultimodalModel.from_pretrained(r / "final") for r in (reference_run, run))
    ids = torch.tensor([[-200, 5, 6, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            two(ids, torch.ones_like(ids), pixels).logits,
            one(ids, torch.ones_like(ids), pixels).logits,
            rtol=1e-4,
            atol=1e-4,
        )
