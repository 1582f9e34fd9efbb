"""`python -m mipha_lab.launch [EXPERIMENT.yaml] [key.sub=value ...] [--nproc N]`: the main job.

Without an experiment it runs the embedded demo (experiments/demo_shapes.yaml). With `--nproc N`
it re-launches itself under `torchrun --standalone --nproc_per_node N` (DeepSpeed on every rank);
launching under torchrun or SLURM yourself works the same way.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from mipha_lab.errors import MiphaLabError


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
    args = parser.parse_args(argv)
    if args.experiment and "=" in args.experiment and not args.experiment.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.experiment)
        args.experiment = None
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "mipha_lab.launch", args.experiment or str(default_experiment()), *args.overrides]
        return subprocess.call(command)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from mipha_lab.config import load_experiment
    from mipha_lab.train.trainer import run_experiment

    try:
        experiment = load_experiment(args.experiment or default_experiment(), args.overrides)
        run = run_experiment(experiment)
    except MiphaLabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
