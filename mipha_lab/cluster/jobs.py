"""What runs inside a cluster job (one process per task): the job environment -> torch.distributed
variables, the profile's caches, the preemption signal, then the same code as a local run.

The jobs are submitit Checkpointables: on preemption or near the time limit submitit asks them for a
resubmission, which is the same call again; it finds the run folder and resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import submitit

from mipha_lab.config import Experiment, load_experiment
from mipha_lab.registry.user_modules import import_modules
from mipha_lab.train import preemption


def _enter_job(environment: dict[str, str]) -> submitit.JobEnvironment:
    """Caches, torch.distributed variables from the job's tasks, logging, the preemption handler."""
    os.environ.update(environment)
    job = submitit.JobEnvironment()
    # CUDA_VISIBLE_DEVICES stays whole: each task takes GPU `LOCAL_RANK` of its node
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    logging.basicConfig(
        level=logging.INFO if job.global_rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s rank{job.global_rank} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("submitit").propagate = False  # submitit logs to the job's log itself
    preemption.install(job._usr_sig())
    return job


class TrainJob(submitit.helpers.Checkpointable):
    """Train (resuming when the run folder holds a checkpoint) and, unless a separate job does it, evaluate."""

    def __init__(self, experiment: Experiment, environment: dict[str, str], evaluate: bool = True) -> None:
        self.experiment, self.environment, self.evaluate = experiment, environment, evaluate

    def __call__(self) -> str:
        _enter_job(self.environment)
        # after the job's environment is set (a local executor runs no script): transformers reads HF_HOME on import
        from mipha_lab.pipeline import train_and_evaluate

        import_modules(self.experiment.imports, "experiment key 'imports'")  # the experiment arrived pickled
        try:
            return str(train_and_evaluate(self.experiment, evaluate=self.evaluate).path)
        except preemption.Preempted:
            preemption.requeue()  # the main task requeues the job and exits here; the other tasks end quietly
            return ""


class EvaluateRunJob(submitit.helpers.Checkpointable):
    """The experiment's `eval:` block on a finished run (the dependent job of `eval.separate_job`)."""

    def __init__(self, run_path: str, environment: dict[str, str]) -> None:
        self.run_path, self.environment = run_path, environment

    def __call__(self) -> str:
        _enter_job(self.environment)
        # after the job's environment is set (a local executor runs no script): transformers reads HF_HOME on import
        from mipha_lab.eval.runner import evaluate_run
        from mipha_lab.runs.folder import RunFolder

        experiment = load_experiment(Path(self.run_path) / "config.yaml")
        evaluate_run(experiment, RunFolder(self.run_path))
        return self.run_path


class CommandJob(submitit.helpers.Checkpointable):
    """A command-line entry point (`python -m mipha_lab.eval run ...`) run as a job with its arguments."""

    def __init__(self, main: Callable[[list[str]], int], argv: list[str], environment: dict[str, str]) -> None:
        self.main, self.argv, self.environment = main, argv, environment

    def __call__(self) -> int:
        _enter_job(self.environment)
        status = self.main(self.argv)
        if status:
            raise RuntimeError(f"{' '.join(self.argv)}: exit status {status}")
        return status
