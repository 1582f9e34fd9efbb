"""The visual design-space study: a file per cell of each axis, every file planned offline at full scale with
the token budgets the README lists, the same structure at tiny scale, and two tiny cells run and found by
the analysis under their axis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mipha_lab.analysis.study import study
from mipha_lab.sweep import expand_all

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "experiments" / "design_space"
FILES = sorted(STUDY.rglob("*.yaml"))
CELLS = {
    "resolution": ["square", "anyres", "split", "anyres-144", "split-144"],
    "encoder": ["dinoclip-336", "siglip-384", "dinosiglip-384"],
    "compressor": [f"{kind}-{tokens}" for kind in ("ldp-v2", "avgpool", "pixel-shuffle") for tokens in (144, 64)],
}
# (visual tokens per image at most, encoder frames) at full scale and at tiny scale
BUDGETS = {
    "design/base": ((576, 1), (16, 1)),
    "design/resolution/square": ((576, 1), (16, 1)),
    "design/resolution/anyres": ((2928, 5), (88, 5)),
    "design/resolution/split": ((2880, 5), (80, 5)),
    "design/resolution/anyres-144": ((744, 5), (24, 5)),
    "design/resolution/split-144": ((720, 5), (20, 5)),
    "design/encoder/dinoclip-336": ((576, 1), (16, 1)),
    "design/encoder/siglip-384": ((729, 1), (16, 1)),
    "design/encoder/dinosiglip-384": ((729, 1), (16, 1)),
    **{f"design/compressor/{kind}-144": ((144, 1), (4, 1)) for kind in ("ldp-v2", "avgpool", "pixel-shuffle")},
    **{f"design/compressor/{kind}-64": ((64, 1), (1, 1)) for kind in ("ldp-v2", "avgpool", "pixel-shuffle")},
}


def test_a_file_per_cell_each_extending_the_base():
    names = {str(p.relative_to(STUDY)) for p in FILES}
    assert names == {"base.yaml"} | {f"{axis}/{cell}.yaml" for axis, cells in CELLS.items() for cell in cells}
    for path in FILES:
        if path.name != "base.yaml":
            assert "extends: ../base.yaml" in path.read_text(), path
    assert {c.run_name for c in expand_all([str(STUDY)])} == set(BUDGETS)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [None, "tiny"])
def test_every_cell_plans_offline_with_its_token_budget(scale, tmp_path):
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
    budgets = {name: (plan["visual_tokens"], plan["frames_per_image"]) for name, plan in plans.items()}
    assert budgets == {name: full if scale is None else tiny for name, (full, tiny) in BUDGETS.items()}
    if scale is None:  # a tiled image costs its frames in the encoder and its tokens in the LM
        flops = {name: plan["stages"][1]["flops_per_sample"] for name, plan in plans.items()}
        assert flops["design/resolution/anyres"] > 3 * flops["design/base"] > 3 * flops["design/compressor/ldp-v2-64"]


@pytest.mark.slow
def test_tiny_cells_run_and_the_analysis_finds_their_axis(tmp_path, data_root):
    runs = tmp_path / "runs"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipha_lab.launch",
            str(STUDY / "base.yaml"),
            str(STUDY / "resolution/split-144.yaml"),
            "--scale",
            "tiny",
            f"runs_root={runs}",
            f"data_root={data_root}",
            "tracking.wandb_mode=disabled",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cells = {cell.name: cell for cell in study(runs)}
    split = cells["split-144"]
    assert split.axis == "resolution" and split.baseline is cells["base"]
    assert set(split.changed) == {"model.tiling", "model.projector", "model.projector_args.ratio"}
    assert split.score("shapes-pope") is not None
