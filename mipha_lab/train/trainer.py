"""Sequence the stages of an experiment in its run folder: lock it, prepare it (runs/setup.py), train each
stage in order (resuming from the latest checkpoint when the folder already holds this run), save each
stage's model and final/. Evaluation is the next step of pipeline.py."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import torch

from mipha_lab.config import Experiment
from mipha_lab.distributed import Distributed, init_distributed, whole_parameters
from mipha_lab.errors import disk_writes
from mipha_lab.model import MultimodalModel, build_model
from mipha_lab.model.adapters import merge_lora
from mipha_lab.registry import add_card_dir
from mipha_lab.runs.folder import RunFolder, latest_checkpoint
from mipha_lab.runs.lock import RunLock
from mipha_lab.runs.setup import preflight, prepare_run
from mipha_lab.train import preemption
from mipha_lab.train.checkpoint import (
    CheckpointWriter,
    TrainState,
    load_model_state,
    read_state,
    rng_state,
    set_rng_state,
)
from mipha_lab.train.host import keep_freed_memory
from mipha_lab.train.preemption import Preempted
from mipha_lab.train.stage import StageRunner, gathered_state
from mipha_lab.train.tracking import Tracker

log = logging.getLogger(__name__)


def rebuilt(experiment: Experiment, checkpoint: Path, dist: Distributed) -> MultimodalModel:
    """A fresh model with a checkpoint's weights; the RNG streams continue as if nothing happened."""
    rng = rng_state()
    model = build_model(experiment).to(dist.device)
    load_model_state(checkpoint, model)
    set_rng_state(rng)
    return model


def save_model(model: MultimodalModel, folder: Path, dist: Distributed, zero3: bool) -> None:
    """The full model, gathered from every rank under ZeRO-3, written by rank 0."""
    with disk_writes(
        f"saving the model to {folder}",
        "the last complete checkpoint is kept - free space, then launch the same command again to resume from it",
    ):
        _save_model(model, folder, dist, zero3)


def _save_model(model: MultimodalModel, folder: Path, dist: Distributed, zero3: bool) -> None:
    with whole_parameters(model, zero3):
        if dist.main:
            model.save_pretrained(folder)
    dist.barrier()


def publish_final(run_path: Path, last_stage: str, dist: Distributed) -> None:
    """final/ is the last stage's saved model (LoRA adapters unmerged, as trained), written as a whole."""
    if dist.main:
        final, staging = run_path / "final", run_path / "final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        with disk_writes(f"writing {final}", "the trained stages are kept - free space, then launch again"):
            shutil.copytree(run_path / "stages" / last_stage, staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    dist.barrier()


def finish_stage(model: MultimodalModel, dist: Distributed, zero3: bool) -> None:
    """Fold LoRA adapters into the weights so the next stage starts from plain weights (the stage's saved
    model keeps them unmerged)."""
    with whole_parameters(model, zero3, modifier_rank=0):
        merge_lora(model)
    for param in model.parameters():
        param.requires_grad = False


def run_experiment(experiment: Experiment, allow_changed_data: bool = False) -> tuple[RunFolder, bool]:
    """Train every stage in order in one run folder and save final/; returns the folder and whether it
    trained now. A folder that already holds this run resumes from its latest checkpoint; a finished one
    is left as it is (False). Evaluation is the caller's next step (pipeline.py)."""
    dist = init_distributed(process_group=experiment.engine.kind == "deepspeed")
    for folder in experiment.model.card_dirs:
        add_card_dir(folder)
    preflight(experiment)
    run = RunFolder.for_experiment(experiment)
    lock = RunLock(run.path).acquire() if dist.main else None
    try:
        found = [prepare_run(run, experiment, dist.world_size, allow_changed_data) if dist.main else None]
        if dist.world_size > 1:
            torch.distributed.broadcast_object_list(found, src=0)
        if found[0] == "done":
            if dist.main:
                print(f"run folder {run.path} holds a finished run: nothing to do", file=sys.stderr)
            return run, False
        train(experiment, run, dist)
    finally:
        if lock is not None:
            lock.release()
    return run, True


def train(experiment: Experiment, run: RunFolder, dist: Distributed) -> None:
    checkpoint = latest_checkpoint(run.path)
    state = read_state(checkpoint) if checkpoint else TrainState(0, 0, 0)
    if dist.main:
        if checkpoint:
            print(
                f"resuming {run.path} from {checkpoint.name} (stage {state.stage_index}, step {state.global_step})",
                file=sys.stderr,
            )
        run.truncate_metrics(state.global_step)  # steps after the checkpoint are trained again
    keep_freed_memory()
    model = build_model(experiment).to(dist.device)
    tracker = Tracker(experiment, run.path, dist.main)
    zero3 = False  # parameters stay partitioned once a ZeRO-3 stage has run
    writer = CheckpointWriter(run.path, dist.rank, experiment.checkpoint.keep_last, dist.barrier)
    preemption.install_interrupt()
    try:
        for index, stage in enumerate(experiment.stages):
            if index < state.stage_index:
                continue
            runner = StageRunner(model, index, experiment, run, dist, tracker, state)
            zero3 = zero3 or runner.zero3
            done = runner.train(checkpoint if checkpoint and index == state.stage_index else None)
            save_model(model, run.path / "stages" / stage.name, dist, zero3)
            finish_stage(model, dist, zero3)
            state = TrainState(index + 1, 0, done.global_step)
            boundary = writer.save(state, gathered_state(model, dist, zero3))
            checkpoint = None
            if zero3:  # ZeRO-3 left this module partitioned: the next stage gets a fresh one, as a resume would
                model = rebuilt(experiment, boundary, dist)
                zero3 = False
        publish_final(run.path, experiment.stages[-1].name, dist)
    except BaseException as err:
        if dist.main:
            record_stop(run, err, state)
        tracker.finish()
        raise
    tracker.finish()
    if dist.main:
        run.status("done", step=state.global_step)
    dist.barrier()


def record_stop(run: RunFolder, err: BaseException, state: TrainState) -> None:
    """status.json after a stop: interrupted (Ctrl-C) at the step reached, or failed with the reason. A status
    that cannot be written (the disk is full) is logged; the error that stopped the run is what the user sees."""
    try:
        if isinstance(err, KeyboardInterrupt):
            reached = run.metrics()
            run.status(
                "interrupted",
                step=reached[-1]["step"] if reached else state.global_step,
                resumes_from=(latest_checkpoint(run.path) or Path("(the start)")).name,
            )
        elif not isinstance(err, (Preempted, preemption.Interrupted)):  # those wrote their own status
            run.status("failed", reason=f"{type(err).__name__}: {err}", step=state.global_step)
    except OSError as write_error:
        log.error("%s: could not record the run's state (%s)", run.path / "status.json", write_error)
