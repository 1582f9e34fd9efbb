"""The Mipha study: every experiment file plans offline (full and tiny scale); a tiny-scale subset of the
study through the test Slurm cluster, then the notebooks executed headless on its runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mipha_lab.analysis import compare, study, verdicts
from mipha_lab.analysis.intervals import ONE_SEED, QUESTION_ONLY
from mipha_lab.config import load_scale
from mipha_lab.sweep import expand_all

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "experiments" / "mipha_overhaul"
FILES = sorted(STUDY.rglob("*.yaml"))


def test_study_has_a_file_per_cell_of_every_axis():
    names = {str(p.relative_to(STUDY)) for p in FILES}
    for axis, cells in {
        "backbone": ["clip-vit-l-336", "dinov2-large", "siglip-base-224"],
        "resolution": ["224", "336", "448"],
        "vision_tuning": ["frozen"],
        "llm": ["phi-1.5", "gemma-2b", "qwen2.5-1.5b"],
        "lm_instruct": ["phi-2-sft"],
        "finetuning": ["lora", "lora-vision-full"],
        "projector": ["linear", "ldp-v2", "avgpool"],
        "epochs": ["1-epoch"],
        "quirks": ["corrected"],
        "released": ["mipha-3b", "mipha-1.6b", "mipha-2.4b", "llava-phi"],
    }.items():
        for cell in cells:
            assert f"{axis}/{cell}.yaml" in names
    cells = expand_all([str(STUDY)])
    assert len({c.run_name for c in cells}) == len(FILES)  # every file its own run folder
    base = next(c for c in cells if c.run_name == "overhaul/base").experiment
    lora = next(c for c in cells if c.run_name == "overhaul/finetuning/lora").experiment.stage("finetune")
    assert (lora.trainable.lm_body.r, lora.trainable.lm_body.alpha, lora.trainable.lm_body.dropout) == (64, 16, 0.05)
    res = next(c for c in cells if c.run_name == "overhaul/resolution/448").experiment
    assert res.model.image_size == 448 and res.model.vision == base.model.vision


@pytest.mark.slow
@pytest.mark.parametrize("scale", [None, "tiny"])
def test_every_study_file_passes_dry_run_offline(scale, tmp_path):
    command = [sys.executable, "-m", "mipha_lab.launch", str(STUDY), "--dry-run", "--json", f"data_root={tmp_path}"]
    out = subprocess.run(
        command + (["--scale", scale] if scale else []),
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plans = {c["run_name"]: c["plan"] for c in json.loads(out.stdout)["cells"]}
    assert len(plans) == len(FILES)
    tokens = {name: plan["visual_tokens"] for name, plan in plans.items()}
    if scale is None:
        assert tokens["overhaul/base"] == 729 and tokens["overhaul/backbone/clip-vit-l-336"] == 576
        assert tokens["overhaul/resolution/224"] == 256 and tokens["overhaul/resolution/448"] == 1024
        assert tokens["overhaul/projector/ldp-v2"] == 144
        assert plans["overhaul/base"]["params"]["total"] > 3_000_000_000
    else:  # the same structure at CPU size
        assert tokens["overhaul/base"] == 16 and tokens["overhaul/resolution/224"] == 4
        assert tokens["overhaul/resolution/448"] == 25 and tokens["overhaul/projector/ldp-v2"] == 4
        steps = {name: [s["steps"] for s in plan["stages"]] for name, plan in plans.items()}
        assert steps["overhaul/base"] == [5, 30] and steps["overhaul/epochs/1-epoch"] == [5, 15]


def test_tiny_scale_keeps_each_cell_identity():
    tiny = load_scale("tiny")
    cells = {c.run_name: c.experiment for c in expand_all([str(STUDY)], scale=tiny)}
    assert cells["overhaul/base"].model.vision == "tiny-siglip-so400m-384"
    assert cells["overhaul/llm/gemma-2b"].model.llm == "tiny-gemma-2b"
    assert cells["overhaul/finetuning/lora"].stage("finetune").optimizer.lr == 5e-3
    assert cells["overhaul/base"].stage("finetune").optimizer.lr == 2e-3
    assert cells["overhaul/vision_tuning/frozen"].stage("finetune").trainable.vision.mode == "frozen"
    assert cells["overhaul/base"].stage("finetune").trainable.vision.mode == "full"


SUBSET = [
    "backbone/siglip-base-224",
    "resolution/224",
    "resolution/448",
    "llm/phi-1.5",
    "lm_instruct/phi-2-sft",
    "finetuning/lora-vision-full",
    "projector/linear",
    "epochs/1-epoch",
    "quirks/corrected",
]
SEEDED = ["base", "vision_tuning/frozen"]  # the baseline and one axis with 2 seeds
NOTEBOOKS = ("overhaul_tables", "claims", "training_curves")


@pytest.mark.slow
def test_tiny_study_through_slurm_then_the_notebooks(slurm, data_root, tmp_path):
    from mipha_lab.cluster.slurm_state import ACTIVE, RUN_STATE, job_states

    runs = tmp_path / "runs"
    common = [
        f"runs_root={runs}",
        f"data_root={data_root}",
        "tracking.wandb_mode=disabled",
        "--scale",
        "tiny",
        "--cluster",
        str(REPO / "slurm" / "test-node.yaml"),
    ]
    launches = [
        [str(STUDY / f"{c}.yaml") for c in SEEDED] + ["--seeds", "0,1"],
        [str(STUDY / f"{c}.yaml") for c in SUBSET],
    ]
    for files in launches:
        out = subprocess.run(
            [sys.executable, "-m", "mipha_lab.launch", *files, *common],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert out.returncode == 0, out.stderr[-3000:]
    jobs = [json.loads(p.read_text())["job_id"] for p in runs.rglob("job.json")]
    assert len(jobs) == 2 * len(SEEDED) + len(SUBSET)
    deadline = time.time() + 600
    while any(RUN_STATE.get(s) in ACTIVE for s in job_states(jobs).values()):
        assert time.time() < deadline, "the tiny study did not finish in 10 minutes"
        time.sleep(2)
    status = subprocess.run(
        [sys.executable, "-m", "mipha_lab.runs", "status", str(runs), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = json.loads(status.stdout)
    assert len(rows) == len(jobs) and all(r["state"] == "done" for r in rows), [(r["run"], r["error"]) for r in rows]

    cells = study.study(runs)
    table = study.axes(cells)
    assert set(table) == {c.split("/")[0] for c in SUBSET + SEEDED[1:]}
    assert all(members[0].name == "base" and members[0].seeds == [0, 1] for members in table.values())
    assert [c.seeds for c in table["vision_tuning"]] == [[0, 1], [0, 1]]
    assert table["resolution"][1].changed == ["model.image_size"]  # the axis found from the configs

    out_dir = tmp_path / "output"
    env = {**os.environ, "RUNS_ROOT": str(runs), "OUT": str(out_dir), "DRAWS": "200", "MPLBACKEND": "Agg"}
    for name in NOTEBOOKS:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "jupytext",
                "--to",
                "ipynb",
                "--execute",
                "--output",
                str(tmp_path / f"{name}.ipynb"),
                str(REPO / "analysis" / f"{name}.py"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    tables = (out_dir / "overhaul_tables.md").read_text()
    for cell in [c.split("/")[-1] for c in SUBSET] + ["frozen", "base"]:
        assert f"| {cell} |" in tables or f"**{cell}**" in tables, cell
    assert tables.count("**base** (baseline)") == len(table)
    claims = json.loads((out_dir / "claims.json").read_text())
    assert [c["claim"] for c in claims] == [c.text for c in verdicts.CLAIMS]
    by_axis = {c["axis"]: c for c in claims}
    seeded = by_axis["vision_tuning"]  # 2 seeds against 2: a verdict resting on an interval
    assert seeded["verdict"] in ("supported", "contradicted", "inconclusive") and "[" in seeded["evidence"]
    assert seeded["comparisons"][0]["seeds"] == [2, 2] and seeded["comparisons"][0]["detectable"] > 0
    one_seed = [c for c in claims if c["axis"] in ("resolution", "llm", "lm_instruct", "finetuning")]
    assert one_seed and all(c["verdict"] == f"no verdict ({ONE_SEED})" for c in one_seed)
    interval = compare.delta(
        table["resolution"][1], table["resolution"][0], "shapes-vqa", draws=200, question_only=True
    )
    assert interval.low < interval.high and QUESTION_ONLY in interval.text()
    for png in ("overhaul_aggregate.png", "claims.png", "training_curves_loss.png", "training_curves_tokens_per_s.png"):
        assert (out_dir / png).stat().st_size > 5000
