"""Sweeps without a cluster: cells of grid / zip / seeds, deterministic run folders, the sweep plan,
cluster profiles, `runs status`, and `--cluster local` (submitit's local executor)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mipha_lab.cluster.profile import load_profile
from mipha_lab.config import ResourcesConfig
from mipha_lab.errors import ConfigError
from mipha_lab.sweep import config_hash, expand, expand_all

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "experiments" / "micro.yaml"
SWEEP = REPO / "experiments" / "micro_sweep.yaml"


def write_sweep(tmp_path: Path, sweep: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"extends: {MICRO}\nsweep:\n{sweep}")
    return path


def test_grid_zip_and_seeds_make_every_combination(tmp_path):
    path = write_sweep(
        tmp_path,
        "  grid:\n    stages.instruct.optimizer.lr: [1.0e-3, 2.0e-3]\n"
        "    stages.align.optimizer.lr: [1.0e-3]\n"
        "  zip:\n    stages.instruct.max_steps: [3, 4]\n    stages.instruct.global_batch: [8, 16]\n"
        "  seeds: [0, 1]\n",
    )
    cells = expand(path)
    assert len(cells) == 2 * 1 * 2 * 2
    first = cells[0].experiment
    assert first.sweep is None and first.seed == 0
    assert first.stage("instruct").optimizer.lr == 1e-3 and first.stage("instruct").max_steps == 3
    assert first.stage("instruct").global_batch == 8
    last = cells[-1].experiment
    assert (last.stage("instruct").optimizer.lr, last.stage("instruct").max_steps, last.seed) == (2e-3, 4, 1)
    assert last.stage("instruct").global_batch == 16
    # readable names: the shortest key suffixes that tell the keys apart, then the config hash
    assert cells[0].run_name.startswith("study/instruct.optimizer.lr=0.001_align.optimizer.lr=0.001_max_steps=3_")
    assert cells[0].run_name.endswith(f"seed=0-{config_hash(first)}")
    assert len({c.run_name for c in cells}) == len(cells)


def test_config_hash_ignores_paths_tracking_resources_and_name_only(tmp_path):
    base = expand(SWEEP)
    moved = expand(
        SWEEP,
        [
            "runs_root=/elsewhere",
            "data_root=/data",
            "tracking.wandb_mode=disabled",
            "resources.nodes=4",
            "run_name=other",
        ],
    )
    cell = [c.run_name.split("/")[1] for c in base]
    assert cell == [c.run_name.split("/")[1] for c in moved]  # the same cells on any machine
    assert moved[0].run_path == Path("/elsewhere") / "other" / cell[0]  # run_name names the sweep's folder
    changed = expand(SWEEP, ["stages.align.optimizer.lr=0.01"])
    assert {c.run_name.rsplit("-", 1)[1] for c in changed}.isdisjoint({c.run_name.rsplit("-", 1)[1] for c in base})


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("  zip:\n    seed: [1, 2]\n    stages.instruct.max_steps: [3]\n", "same length"),
        ("  grid:\n    stages.instruct.optimizer.lr: []\n", "at least one value"),
        ("  grid:\n    stages.instruct.optimiser.lr: [1.0]\n", "optimiser"),
        ("  grid:\n    seed: [1]\n  seeds: [2]\n", "swept twice"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_problem(tmp_path, sweep, message):
    with pytest.raises(ConfigError, match=message):
        expand(write_sweep(tmp_path, sweep))


def test_several_files_and_globs(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(f"extends: {MICRO}\nseed: {ord(name)}\n")
    cells = expand_all([str(tmp_path / "*.yaml"), str(SWEEP)])
    assert [c.run_name for c in cells][:2] == ["a", "b"] and len(cells) == 5
    with pytest.raises(ConfigError, match="no experiment file matches"):
        expand_all([str(tmp_path / "nothing-*.yaml")])


def test_sweep_dry_run_json_lists_every_cell_plan(data_root):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipha_lab.launch",
            str(SWEEP),
            f"data_root={data_root}",
            "--dry-run",
            "--json",
            "--num-gpus",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert [c["overrides"] for c in plan["cells"]] == [{"stages.instruct.optimizer.lr": v} for v in (5e-4, 1e-3, 2e-3)]
    assert [c["run_name"] for c in plan["cells"]] == [c.run_name for c in expand(SWEEP)]
    assert plan["total_gpu_hours"] == pytest.approx(sum(c["plan"]["total_gpu_hours"] for c in plan["cells"]), abs=1e-3)
    assert all(c["plan"]["stages"][1]["steps"] == 15 for c in plan["cells"])


def test_profiles_validate_and_merge_run_resources():
    profile = load_profile(REPO / "slurm" / "example-8xgpu.yaml")
    shape = profile.shape(ResourcesConfig())
    assert (shape.nodes, shape.gpus_per_node, shape.tasks_per_node) == (1, 8, 8)
    bigger = profile.shape(ResourcesConfig(nodes=2, time_min=30))
    assert (bigger.nodes, bigger.tasks_per_node, bigger.time_min) == (2, 8, 30)
    assert profile.job_environment()["HF_HOME"].endswith("/hf")
    assert load_profile("local").executor == "local"


def test_bad_profile_names_file_and_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("partition: gpu\ngpus: 8\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: unknown key 'gpus' \(allowed: .*gpus_per_node"):
        load_profile(path)


def test_cluster_local_runs_jobs_and_status_shows_done_and_failed(tmp_path, data_root):
    """Two cells through submitit's local executor; one fails (max_length too short), the other finishes."""
    path = write_sweep(tmp_path, "  grid:\n    stages.instruct.max_length: [256, 8]\n")
    env_args = [
        f"runs_root={tmp_path / 'runs'}",
        f"data_root={data_root}",
        "eval.benchmarks=[shapes-vqa]",
        "tracking.wandb_mode=disabled",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.launch", str(path), *env_args, "--cluster", "local", "--wait"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr[-3000:]  # one cell failed
    assert "submitted 2 run(s) as 2 job(s) (local" in out.stdout
    status = subprocess.run(
        [sys.executable, "-m", "mipha_lab.runs", "status", str(tmp_path / "runs"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = {row["run"].split("/")[1].split("-")[0]: row for row in json.loads(status.stdout)}
    good, bad = rows["max_length=256"], rows["max_length=8"]
    assert good["state"] == "done" and good["step"] == good["total_steps"] == 20
    assert 0 <= good["scores"]["shapes-vqa"] <= 100 and good["loss"] < 7
    assert bad["state"] == "failed"
    assert any("every sample of the global batch was skipped" in line for line in bad["error"])
    table = subprocess.run(
        [sys.executable, "-m", "mipha_lab.runs", "status", str(tmp_path / "runs"), "--sweep", "study"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "2 run(s): 1 done, 1 failed" in table and "too short?" in table
