"""`python -m mipha_lab.eval run`: batched answers equal batch-1 answers, a restart skips answered
questions, missing benchmark data is named, the summary follows the paper's column order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mipha_lab.errors import ConfigError
from mipha_lab.eval.benchmarks import BENCHMARKS
from mipha_lab.eval.runner import PARTIAL, run_benchmark
from mipha_lab.model import load_model

MICRO = Path(__file__).resolve().parents[1] / "experiments" / "micro.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder of the micro experiment (its data root holds the synthetic benchmarks)."""
    cwd = tmp_path_factory.mktemp("eval-run")
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.launch", str(MICRO), "eval.benchmarks=[]"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd


def eval_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mipha_lab.eval", "run", "runs/micro", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_batched_answers_equal_batch_one_answers(trained, tmp_path):
    model = load_model(trained / "runs" / "micro")
    bench = BENCHMARKS.get("shapes-vqa")
    one = run_benchmark(model, bench, trained / "data", tmp_path / "one", batch_size=1, limit=40)
    many = run_benchmark(model, bench, trained / "data", tmp_path / "many", batch_size=16, limit=40)
    texts = lambda d: [json.loads(line)["text"] for line in (d / "answers.jsonl").read_text().splitlines()]  # noqa: E731
    assert texts(tmp_path / "one") == texts(tmp_path / "many")
    assert one == many == {}  # a 40-question subset is not scored (the scorer wants every question)


def test_cli_run_scores_and_summarises_in_the_run_folder(trained):
    out = eval_cli(trained, "--benchmarks", "shapes-pope,shapes-vqa", "--data-root", "data", "--batch-size", "64")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = trained / "runs" / "micro" / "eval"
    vqa = json.loads((folder / "shapes-vqa" / "scores.json").read_text())
    pope = json.loads((folder / "shapes-pope" / "scores.json").read_text())
    assert set(pope) == {"adversarial", "popular", "random", "mean_f1"}
    assert (
        0 <= vqa["accuracy"] <= 100 and len((folder / "shapes-vqa" / "answers.jsonl").read_text().splitlines()) == 1000
    )
    records = [json.loads(line) for line in (folder / "shapes-vqa" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 1000 and round(100 * sum(r["correct"] for r in records) / 1000, 2) == vqa["accuracy"]
    summary = (folder / "summary.md").read_text().splitlines()
    assert summary[0] == "| shapes-pope (mean_f1) | shapes-vqa (accuracy) |"
    assert summary[2] == f"| {pope['mean_f1']} | {vqa['accuracy']} |"


def test_a_restarted_run_skips_answered_questions(trained, tmp_path):
    model = load_model(trained / "runs" / "micro")
    bench = BENCHMARKS.get("shapes-vqa")
    run_benchmark(model, bench, trained / "data", tmp_path / "full", batch_size=16, limit=30)
    answers = (tmp_path / "full" / "answers.jsonl").read_text().splitlines()
    (tmp_path / "restart").mkdir()
    (tmp_path / "restart" / PARTIAL).write_text("\n".join(answers[:20]) + "\n")  # killed after 20 answers
    run_benchmark(model, bench, trained / "data", tmp_path / "restart", batch_size=16, limit=30)
    again = (tmp_path / "restart" / "answers.jsonl").read_text().splitlines()
    assert again[:20] == answers[:20]  # the same records (answer ids included): not generated again
    assert [json.loads(a)["text"] for a in again] == [json.loads(a)["text"] for a in answers]
    assert not (tmp_path / "restart" / PARTIAL).exists()


def test_missing_benchmark_data_names_the_path(tmp_path):
    with pytest.raises(
        ConfigError, match=r"eval/pope/llava_pope_test.jsonl does not exist .*LLaVA's evaluation bundle"
    ):
        BENCHMARKS.get("pope").paths(tmp_path)


def test_two_processes_give_the_answers_of_one(trained, tmp_path):
    """Data parallel: each rank answers a share, rank 0 merges in question order."""
    common = ["--benchmarks", "shapes-vqa", "--data-root", "data", "--batch-size", "8", "--limit", "60"]
    one = eval_cli(trained, *common, "--out", str(tmp_path / "one"))
    two = eval_cli(trained, *common, "--out", str(tmp_path / "two"), "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]

    def read(d: Path) -> list[tuple]:
        return [
            (a["question_id"], a["text"])
            for a in map(json.loads, (d / "shapes-vqa" / "answers.jsonl").read_text().splitlines())
        ]

    assert read(tmp_path / "two") == read(tmp_path / "one") and len(read(tmp_path / "one")) == 60
    assert not list((tmp_path / "two" / "shapes-vqa").glob("answers.partial*"))


def test_batch_invariance_check_and_an_unreadable_image(trained, tmp_path):
    import shutil

    from mipha_lab.data.templates import get_template
    from mipha_lab.eval.benchmarks import Question
    from mipha_lab.eval.generate import answer_questions

    out = eval_cli(
        trained,
        "--benchmarks",
        "shapes-vqa",
        "--data-root",
        "data",
        "--batch-size",
        "16",
        "--limit",
        "48",
        "--check-batch-invariance",
        "24",
        "--out",
        str(tmp_path / "inv"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "inv" / "shapes-vqa" / "batch_invariance.json").read_text())
    assert report == {"questions": 24, "agreement": 1.0, "different": []}

    model = load_model(trained / "runs" / "micro")
    good = trained / "data" / "shapes" / "images" / "eval" / "000000.png"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    shutil.copy(good, tmp_path / "good.png")
    from PIL import Image

    questions = [
        Question(i, "How many shapes are there?", (lambda p=p: Image.open(p).convert("RGB")))
        for i, p in enumerate([tmp_path / "good.png", bad, tmp_path / "good.png"])
    ]
    answers = answer_questions(model, get_template("phi"), questions, batch_size=3, max_new_tokens=4)
    assert answers[1]["text"] == "" and answers[1]["metadata"] == {"error": "unreadable image"}
    # the readable ones keep their own image: the answer batch 1 gives (whatever a micro model says)
    alone = answer_questions(model, get_template("phi"), questions[:1], batch_size=1, max_new_tokens=4)
    assert answers[0]["metadata"] == answers[2]["metadata"] == {}
    assert answers[0]["text"] == answers[2]["text"] == alone[0]["text"]


def test_a_misnamed_benchmark_or_scorer_fails_before_training(tmp_path, data_root):
    """A typo in `eval:` is found when the run starts, not after it trained: no run folder is made."""
    from tests.test_resume import launch

    run = launch(tmp_path, data_root, "eval.benchmarks=[popee]")
    assert run.returncode == 2 and "popee" in run.stderr and "pope" in run.stderr, run.stderr[-2000:]
    harness = "eval.harness={tasks: [my_pope], score_as: {my_pope: popee}}"
    run = launch(tmp_path, data_root, harness)
    assert run.returncode == 2 and "eval.harness.score_as {'my_pope': 'popee'}" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and not (tmp_path / "runs").exists()
