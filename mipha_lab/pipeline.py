"""One experiment end to end, as `launch` runs it here and a cluster job runs it there: train its stages
(resuming where a run stopped), then evaluate the final model with the experiment's `eval:` block."""

from __future__ import annotations

import os

from mipha_lab.config import Experiment
from mipha_lab.eval.runner import evaluate_run
from mipha_lab.runs.folder import RunFolder
from mipha_lab.train.trainer import run_experiment


def train_and_evaluate(experiment: Experiment, evaluate: bool = True, allow_changed_data: bool = False) -> RunFolder:
    """The run folder, trained (unless it held a finished run) and evaluated by the main process (unless
    `evaluate` is off: a dependent job does it)."""
    run, trained = run_experiment(experiment, allow_changed_data)
    if evaluate and trained and os.environ.get("RANK", "0") == "0":
        evaluate_run(experiment, run)
    return run
