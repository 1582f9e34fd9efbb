"""`python -m mipha_lab.launch [EXPERIMENT.yaml ...] [key.sub=value ...] [--nproc N] [--cluster PROFILE]`:
the main job.

Without an experiment it runs the embedded demo (experiments/demo_shapes.yaml). With `--nproc N`
it re-launches itself under `torchrun --standalone --nproc_per_node N` (DeepSpeed on every rank);
launching under torchrun or SLURM yourself works the same way. Several files, a glob or a file with
a `sweep:` block make several runs (cells), each in its own deterministic run folder. With
`--cluster slurm/PROFILE.yaml` (or `--cluster local`) the runs are submitted as submitit jobs, one
job array per resource shape, and the command returns at once (`--wait` waits and shows the status).

Launching a run folder (or the same experiment and run name again) resumes it from its latest
checkpoint. `--dry-run` prints what the recipe costs (parameters, steps, FLOPs, memory, GPU hours)
without training: the model is built on the meta device, offline; `--json` makes stdout that plan
as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from mipha_lab.cluster.profile import load_profile
from mipha_lab.cluster.submit import submit_cells, wait_for
from mipha_lab.config import load_scale
from mipha_lab.errors import MiphaLabError, exit_status
from mipha_lab.eval.runner import check_eval
from mipha_lab.pipeline import train_and_evaluate
from mipha_lab.plan import format_plan, plan_experiment
from mipha_lab.runs.status import follow_hint, print_status
from mipha_lab.sweep import expand_all


def default_experiment() -> Path:
    """The demo, from a source checkout or from the copy shipped inside the package."""
    package = Path(__file__).resolve().parent
    for candidate in (
        package / "_experiments" / "demo_shapes.yaml",
        package.parent / "experiments" / "demo_shapes.yaml",
    ):
        if candidate.is_file():
            return candidate
    raise MiphaLabError("the embedded demo experiment (demo_shapes.yaml) is missing from this installation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_lab.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="EXPERIMENT",
        help="experiment files, quoted globs or run folders (default: the embedded demo), then "
        "key.sub=value overrides applied to each",
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun)")
    parser.add_argument(
        "--scale",
        metavar="NAME",
        help="run every experiment at another scale: `tiny` (experiments/scales/tiny.yaml) or a file",
    )
    parser.add_argument(
        "--seeds",
        type=lambda v: [int(s) for s in v.split(",")],
        metavar="S,S,...",
        help="run every cell with each of these seeds",
    )
    parser.add_argument(
        "--cluster",
        metavar="PROFILE",
        help="submit as jobs: a profile (slurm/NAME.yaml) or `local` (submitit's local executor)",
    )
    parser.add_argument("--wait", action="store_true", help="with --cluster: wait for the jobs, then show their status")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and cost; train nothing")
    parser.add_argument(
        "--allow-changed-data",
        action="store_true",
        help="resume although the annotation files changed since the run started (refused otherwise)",
    )
    parser.add_argument("--gpu", default="H100", help="GPU type the plan assumes (peak bf16 rate)")
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="GPUs the plan assumes (default: those of the --cluster profile, else 8)",
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the plan assumes")
    parser.add_argument("--json", action="store_true", help="with --dry-run: stdout holds only the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    args.experiments = [t for t in args.targets if not is_override(t)] or [str(default_experiment())]
    args.overrides = [t for t in args.targets if is_override(t)]

    if args.dry_run:
        return dry_run(args)
    if args.cluster:
        return exit_status(lambda: submit(args))
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        passed = [
            *(["--scale", args.scale] if args.scale else []),
            *(["--allow-changed-data"] if args.allow_changed_data else []),
            *(["--seeds", ",".join(map(str, args.seeds))] if args.seeds else []),
        ]
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "mipha_lab.launch",
            *args.experiments,
            *args.overrides,
            *passed,
        ]
        return subprocess.call(command)
    logging.basicConfig(
        level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return exit_status(lambda: train_here(args))


def is_override(target: str) -> bool:
    return "=" in target and not target.endswith((".yaml", ".yml")) and not Path(target).exists()


def experiment_cells(args: argparse.Namespace) -> list:
    """The runs the command line asks for: files, globs, folders, sweeps, at --scale, times --seeds."""

    scale = load_scale(args.scale) if args.scale else None
    cells = expand_all(args.experiments, args.overrides, scale, args.seeds)
    for cell in cells:
        check_eval(cell.experiment.eval)
    return cells


def train_here(args: argparse.Namespace) -> int:
    """Every cell in turn in this process (group); a failed cell is reported and the others still run."""

    cells = experiment_cells(args)
    main_rank = os.environ.get("RANK", "0") == "0"
    if len(cells) == 1:
        run = train_and_evaluate(cells[0].experiment, allow_changed_data=args.allow_changed_data)
        if main_rank:
            print(f"run folder: {run.path}")
        return 0
    failed = []
    for number, cell in enumerate(cells, 1):
        if main_rank:
            print(f"== cell {number}/{len(cells)}: {cell.run_name}", file=sys.stderr)
        try:
            train_and_evaluate(cell.experiment, allow_changed_data=args.allow_changed_data)
        except Exception as err:
            logging.getLogger(__name__).exception("cell %s failed", cell.run_name)
            failed.append(f"{cell.run_name}: {type(err).__name__}: {err}")
    if main_rank:
        print(f"{len(cells) - len(failed)} of {len(cells)} run(s) finished in {Path(cells[0].experiment.runs_root)}")
        for line in failed:
            print(f"failed: {line}")
    return 1 if failed else 0


def submit(args: argparse.Namespace) -> int:
    """Submit the cells through submitit; returns at once unless --wait."""

    cells = experiment_cells(args)
    submissions = submit_cells(cells, load_profile(args.cluster))
    runs_root = Path(cells[0].experiment.runs_root)
    if not args.wait:
        print(follow_hint(runs_root, cells))
        return 0
    wait_for(submissions)
    rows = print_status([cell.run_path for cell in cells], runs_root)
    return 1 if any(row["state"] != "done" for row in rows) else 0


def planned_gpus(args: argparse.Namespace, profile, experiment) -> int:
    """--num-gpus, else the GPUs a run gets from its --cluster profile and `resources:`, else 8."""
    if args.num_gpus:
        return args.num_gpus
    if profile is not None:
        shape = profile.shape(experiment.resources)
        return shape.nodes * shape.gpus_per_node or 8
    return 8


def dry_run(args: argparse.Namespace) -> int:
    """The plan on stdout (a table, or only JSON with --json); logs and errors on stderr. A sweep
    (or several files) prints every cell's plan and the total."""

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    def show() -> int:

        cells = experiment_cells(args)
        profile = load_profile(args.cluster) if args.cluster else None
        plans = [
            plan_experiment(
                c.experiment, gpu=args.gpu, num_gpus=planned_gpus(args, profile, c.experiment), mfu=args.mfu
            )
            for c in cells
        ]
        if len(cells) == 1 and not cells[0].overrides:
            print(json.dumps(plans[0]) if args.json else format_plan(plans[0]))
            return 0
        total = round(sum(p["total_gpu_hours"] for p in plans), 4)
        if args.json:
            print(
                json.dumps(
                    {
                        "cells": [
                            {"run_name": c.run_name, "overrides": c.overrides, "plan": p}
                            for c, p in zip(cells, plans, strict=True)
                        ],
                        "total_gpu_hours": total,
                    }
                )
            )
        else:
            for cell, plan in zip(cells, plans, strict=True):
                print(f"== {cell.run_name}  {cell.overrides}\n{format_plan(plan)}\n")
            print(f"{len(cells)} run(s): {total:.2f} GPU hours in all")
        return 0

    return exit_status(show)


if __name__ == "__main__":
    sys.exit(main())
