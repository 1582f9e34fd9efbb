"""Run folders and the launcher under faults: a metrics line cut short, Ctrl-C, a full disk, training data
changed before a resume, a config error found while building the model, invalid numbers in the schema,
generated data interrupted, and outputs written over existing work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mipha_lab.config import load_experiment
from mipha_lab.errors import ConfigError, StorageError
from mipha_lab.runs.folder import RunFolder

REPO = Path(__file__).resolve().parents[2]
MICRO = REPO / "experiments" / "micro.yaml"
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def launch_command(data_root: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mipha_lab.launch",
        str(MICRO),
        f"data_root={data_root}",
        "eval.benchmarks=[]",
        "checkpoint.every_steps=4",
        *overrides,
    ]


def launch(cwd: Path, data_root: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_command(data_root, *overrides), cwd=cwd, capture_output=True, text=True, timeout=600, env=env or ENV
    )


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


@pytest.fixture
def own_data(tmp_path, data_root) -> Path:
    """A copy of the shapes data this test may change."""
    shutil.copytree(data_root, tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.slow
def test_a_cut_metrics_line_and_changed_data(tmp_path, own_data):
    killed = launch(tmp_path, own_data, env={**ENV, "MIPHA_LAB_KILL_AT": "step:9"})
    assert killed.returncode == -9
    run = tmp_path / "runs" / "micro"
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"stage": "instruct", "step": 10, "lo')  # the disk filled mid-write
    shown = subprocess.run(
        [sys.executable, "-m", "mipha_lab.runs", "status", str(tmp_path / "runs"), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert shown.returncode == 0 and json.loads(shown.stdout)[0]["step"] == 9, shown.stderr[-2000:]
    annotations = own_data / "shapes" / "instruct.json"
    text = annotations.read_text()
    annotations.write_text(text[:-1] + " " + text[-1])  # one more byte: same samples, another file
    refused = launch(tmp_path, own_data)
    assert refused.returncode == 2 and "the training data changed" in refused.stderr, refused.stderr[-2000:]
    assert str(annotations) in refused.stderr and "Traceback" not in refused.stderr
    resumed = subprocess.run(
        [*launch_command(own_data), "--allow-changed-data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [row["step"] for row in RunFolder(run).metrics()]
    assert steps == list(range(1, 21)) and status(run)["state"] == "done"


@pytest.mark.slow
def test_ctrl_c_checkpoints_stops_as_interrupted_and_resumes(tmp_path, data_root):
    process = subprocess.Popen(
        launch_command(data_root, "checkpoint.every_steps=100"),
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "runs" / "micro" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 7):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted (Ctrl-C)" in stderr
    run = tmp_path / "runs" / "micro"
    reached = RunFolder(run).metrics()[-1]["step"]
    assert status(run)["state"] == "interrupted" and status(run)["step"] == reached
    assert (run / "checkpoints" / f"step-{reached:08d}").is_dir()  # nothing trained is lost
    resumed = launch(tmp_path, data_root, "checkpoint.every_steps=100")
    assert resumed.returncode == 0 and f"step {reached})" in resumed.stderr, resumed.stderr[-3000:]
    assert [row["step"] for row in RunFolder(run).metrics()] == list(range(1, 21))


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB file system (tmpfs; needs root, as on these machines and CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip()}): the full-disk test needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_what_was_finished(tmp_path, data_root, small_disk):
    """The micro model's checkpoint (weights ~2.4 MB, optimizer ~4.8 MB) does not fit 3 MiB."""
    out = launch(tmp_path, data_root, f"runs_root={small_disk}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "No space left on device" in out.stderr and "launch the same command again" in out.stderr
    assert "Traceback" not in out.stderr
    run = small_disk / "micro"
    assert not list((run / "checkpoints").glob(".partial-*"))  # the space is given back
    assert status(run)["state"] == "failed" and "StorageError" in status(run)["reason"]
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    resumed = launch(tmp_path, data_root, f"runs_root={small_disk}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_a_full_disk_while_writing_metrics_is_named(small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (3 * 1024 * 1024 - 4096))
    run = RunFolder(small_disk / "run")
    run.path.mkdir(exist_ok=True)
    with pytest.raises(StorageError, match=r"metrics.jsonl: writing step 3's metrics failed: No space left"):
        for _ in range(100):
            run.append_metrics({"step": 3, "padding": "x" * 4096})


@pytest.mark.slow
def test_a_model_error_leaves_no_folder_that_blocks_the_corrected_launch(tmp_path, data_root):
    wrong = launch(tmp_path, data_root, "model.projector=mlp2x_gleu")
    assert wrong.returncode == 2 and "mlp2x_gleu" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr[
        -2000:
    ]
    fixed = launch(tmp_path, data_root, "stages.instruct.max_steps=2", "stages.align.max_steps=1")
    assert fixed.returncode == 0 and "starting it afresh" in fixed.stderr, fixed.stderr[-3000:]


@pytest.mark.parametrize(
    "override",
    [
        "stages.align.max_steps=0",
        "stages.align.epochs=-1",
        "stages.align.max_length=0",
        "stages.align.micro_batch=0",
        "stages.align.global_batch=-8",
        "stages.align.optimizer.lr=-1e-3",
        "stages.align.optimizer.lr=.nan",
        "stages.align.optimizer.lr=.inf",
    ],
)
def test_impossible_numbers_are_schema_errors(override):
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises(ConfigError, match=key):
        load_experiment(MICRO, [override])


def test_interrupted_generation_never_leaves_a_dataset_taken_as_complete(tmp_path):
    from mipha_lab.data import synthetic

    calls = {"n": 0}
    original = synthetic.draw

    def dies_half_way(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt  # a kill half-way through the images
        return original(*args, **kwargs)

    synthetic.draw = dies_half_way
    try:
        with pytest.raises(KeyboardInterrupt):
            synthetic.generate(tmp_path / "shapes", n_train=30, n_eval=4, progress=False)
    finally:
        synthetic.draw = original
    assert not (tmp_path / "shapes").exists() and not synthetic.is_complete(tmp_path / "shapes")
    synthetic.generate(tmp_path / "shapes", n_train=30, n_eval=4, progress=False)
    assert synthetic.is_complete(tmp_path / "shapes") and not list(tmp_path.glob(".shapes.partial"))


def test_outputs_never_overwrite_work_unless_asked(tmp_path):
    from mipha_lab.model import build_vlm

    model_dir = tmp_path / "run" / "final"
    build_vlm("tiny-siglip-so400m-384", "tiny-phi-2").save_pretrained(model_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("x")

    def export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mipha_lab.export", "merged", *args],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )

    for target, message in (
        (tmp_path / "busy", "exists and is not empty"),
        (model_dir, "is the model being read"),
        (tmp_path / "a-file", "is a file"),
    ):
        out = export(str(tmp_path / "run"), str(target))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    out = export(str(tmp_path / "run"), str(tmp_path / "busy"), "--overwrite")
    assert (
        out.returncode == 0
        and (tmp_path / "busy" / "config.json").is_file()
        and not (tmp_path / "busy" / "notes.txt").exists()
    )


def test_answer_files_with_wrong_id_types_or_text_are_named_by_line(tmp_path, data_root):
    questions = data_root / "shapes" / "eval" / "shapes-pope" / "questions.jsonl"
    asked = [json.loads(line) for line in questions.read_text().splitlines()]
    cases = {
        "string ids": (
            [{"question_id": str(q["question_id"]), "text": "yes"} for q in asked],
            "a string, where the questions' ids are integers",
        ),
        "text null": (
            [{"question_id": q["question_id"], "text": None if i == 2 else "no"} for i, q in enumerate(asked)],
            "line 3: 'text' is None",
        ),
        "text missing": (
            [{"question_id": q["question_id"], **({} if i == 4 else {"text": "no"})} for i, q in enumerate(asked)],
            "line 5: 'text' is missing",
        ),
    }
    for name, (rows, message) in cases.items():
        answers = tmp_path / f"{name}.jsonl"
        answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mipha_lab.eval",
                "score",
                "pope",
                "--questions",
                str(questions),
                "--answers",
                str(answers),
                "--annotations",
                str(questions.parent / "annotations"),
            ],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (
            name,
            out.stderr[-2000:],
        )
