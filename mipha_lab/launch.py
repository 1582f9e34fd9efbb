"""`python -m mipha_lab.launch [EXPERIMENT.yaml] [key.sub=value ...] [--nproc N]`: the main job.

Without an experiment it runs the embedded demo (experiments/demo_shapes.yaml). With `--nproc N`
it re-launches itself under `torchrun --standalone --nproc_per_node N` (DeepSpeed on every rank);
launching under torchrun or SLURM yourself works the same way.

Launching a run folder (or the same experiment and run name again) resumes it from its latest
checkpoint. `--dry-run` prints what the recipe costs (parameters, steps, FLOPs, memory, GPU hours)
without training: the model is built on the meta device, offline; `--json` makes stdout that plan
as one JSON object.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from mipha_lab.errors import MiphaLabError, exit_status


def default_experiment() -> Path:
    """The demo, from a source checkout or from the copy shipped inside the package."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_experiments" / "demo_shapes.yaml", package.parent / "experiments" / "demo_shapes.yaml"):
        if candidate.is_file():
            return candidate
    raise MiphaLabError("the embedded demo experiment (demo_shapes.yaml) is missing from this installation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipha_lab.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", help="experiment YAML (default: the embedded demo)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the file")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and cost; train nothing")
    parser.add_argument("--gpu", default="H100", help="GPU type the plan assumes (peak bf16 rate)")
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs the plan assumes")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the plan assumes")
    parser.add_argument("--json", action="store_true", help="with --dry-run: stdout holds only the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    if args.experiment and "=" in args.experiment and not args.experiment.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.experiment)
        args.experiment = None
    if args.experiment and Path(args.experiment).is_dir():  # a run folder: its resolved config
        args.experiment = str(Path(args.experiment) / "config.yaml")
    if args.dry_run:
        return dry_run(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "mipha_lab.launch", args.experiment or str(default_experiment()), *args.overrides]
        return subprocess.call(command)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from mipha_lab.config import load_experiment
    from mipha_lab.train.trainer import run_experiment

    def train() -> int:
        run = run_experiment(load_experiment(args.experiment or default_experiment(), args.overrides))
        if os.environ.get("RANK", "0") == "0":
            print(f"run folder: {run.path}")
        return 0

    return exit_status(train)


def dry_run(args: argparse.Namespace) -> int:
    """The plan on stdout (a table, or only JSON with --json); logs and errors on stderr."""
    import json

    from mipha_lab.config import load_experiment
    from mipha_lab.plan import format_plan, plan_experiment

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    def show() -> int:
        experiment = load_experiment(args.experiment or default_experiment(), args.overrides)
        plan = plan_experiment(experiment, gpu=args.gpu, num_gpus=args.num_gpus, mfu=args.mfu)
        print(json.dumps(plan) if args.json else format_plan(plan))
        return 0

    return exit_status(show)


if __name__ == "__main__":
    sys.exit(main())
