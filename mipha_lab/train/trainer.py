"""Run an experiment: lock its run folder, train the stages in order (resuming from the latest
checkpoint when the folder already holds this run), save final/, evaluate."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from huggingface_hub.constants import HF_HUB_CACHE

from mipha_lab.config import AFTER_NONFINITE, Experiment, config_differences
from mipha_lab.data.mixtures import MIXTURES, ensure_generated
from mipha_lab.distributed import Distributed, init_distributed
from mipha_lab.errors import ConfigError, disk_writes
from mipha_lab.model import MultimodalModel, build_model
from mipha_lab.model.adapters import merge_lora
from mipha_lab.model.language import LLM
from mipha_lab.model.vision import VISION
from mipha_lab.registry import add_card_dir
from mipha_lab.run_folder import RunFolder, file_digest
from mipha_lab.run_lock import RunLock
from mipha_lab.train import preemption
from mipha_lab.train.checkpoint import (
    CheckpointWriter,
    TrainState,
    latest_checkpoint,
    load_model_state,
    read_state,
    rng_state,
    set_rng_state,
)
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
    with disk_writes(f"saving the model to {folder}", "the last complete checkpoint is kept - free space, then "
                                                      "launch the same command again to resume from it"):
        _save_model(model, folder, dist, zero3)


def _save_model(model: MultimodalModel, folder: Path, dist: Distributed, zero3: bool) -> None:
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if dist.main:
                model.save_pretrained(folder)
    elif dist.main:
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
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            merge_lora(model)
    else:
        merge_lora(model)
    for param in model.parameters():
        param.requires_grad = False


def data_files(experiment: Experiment) -> list[Path]:
    root = Path(experiment.data_root)
    return [root / source.annotations for stage in experiment.stages for source in MIXTURES.get(stage.mixture).sources]


def hub_available(repo: str) -> bool:
    """A local folder, a repository in the Hugging Face cache, or any repository while the hub is online."""
    if Path(repo).exists():
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        return True

    snapshots = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def preflight(experiment: Experiment) -> None:
    """Fail at once, before a run folder or a model exists, naming every missing input and its origin."""
    root, missing = Path(experiment.data_root), []
    for stage in experiment.stages:
        card = MIXTURES.get(stage.mixture)
        if card.generate:
            continue
        origin = f" (from {card.url})" if card.url else ""
        for source in card.sources:
            for path, kind in ((root / source.annotations, "file"), (root / (source.images or "."), "folder")):
                exists = path.is_file() if kind == "file" else path.is_dir()
                if not exists:
                    missing.append(f"stage '{stage.name}', mixture '{stage.mixture}': {kind} {path}{origin}")
    if experiment.model.pretrained:
        llm = LLM.get(experiment.model.llm)
        vision = VISION.get(experiment.model.vision)  # a card, or a class registered in Python (no hub weights)
        wanted = [("vision weights", getattr(vision, "hub_id", None)), ("language-model weights", llm.hub_id)]
        if not llm.tokenizer.startswith("builtin:"):
            wanted.append(("tokenizer", llm.tokenizer))
        for what, repo in wanted:
            if repo and not hub_available(repo):
                missing.append(f"{what} '{repo}': not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                               f"(get them with `huggingface-cli download {repo}`, or point the card at a local folder)")
    if missing:
        raise ConfigError(f"{experiment.source or experiment.run_name}: cannot start, missing:\n  - " + "\n  - ".join(missing))


def prepare_run(run: RunFolder, experiment: Experiment, world_size: int, allow_changed_data: bool = False) -> str | None:
    """On the main rank, holding the lock: a new folder is created; one holding this run resumes.
    Returns the state found ('done', 'failed', ...) or None for a new run."""
    state = (run.read_status() or {}).get("state")
    if state in ("failed", "running", "interrupted") and latest_checkpoint(run.path) is None and not run.metrics():
        # it stopped before its first step (a model or data error): nothing to lose, nothing to resume
        print(f"run folder {run.path} holds no trained step yet ({state}); starting it afresh", file=sys.stderr)
        state = None
    if state is None:
        for stage in experiment.stages:  # synthetic data is written before its files are hashed
            ensure_generated(MIXTURES.get(stage.mixture), Path(experiment.data_root))
        run.create(experiment, data_files(experiment), world_size)
        run.status("running", stage=experiment.stages[0].name, step=0, total_steps=None)
        return None
    check_same_configuration(run, experiment, after_nonfinite=state == "failed" and (run.path / "nonfinite.json").is_file())
    if state != "done":
        check_same_data(run, experiment, allow_changed_data)
    return state


def check_same_configuration(run: RunFolder, experiment: Experiment, after_nonfinite: bool) -> None:
    """A resume continues the same experiment; after a non-finite stop the optimizer's hyperparameters may
    change (that is the advice), and the folder's config.yaml then records the new values."""

    stored = yaml.safe_load((run.path / "config.yaml").read_text())
    changed = config_differences(stored, experiment.model_dump(mode="json"))
    allowed = [key for key in changed if after_nonfinite and AFTER_NONFINITE.fullmatch(key)]
    refused = [key for key in changed if key not in allowed]
    if refused:
        hint = f" (after a non-finite stop these may change: {AFTER_NONFINITE.pattern})" if after_nonfinite else ""
        raise ConfigError(
            f"run folder {run.path} holds a run of another configuration (differs in: {', '.join(refused)}){hint}; "
            "resuming would mix two experiments - choose another run_name=... or remove the folder"
        )
    if allowed:
        print(f"resuming after the non-finite stop with changed {', '.join(allowed)}", file=sys.stderr)
        run.write_config(experiment)


def check_same_data(run: RunFolder, experiment: Experiment, allow_changed_data: bool) -> None:
    """The annotation files a run trains on are those it started with (sha256 in manifest.json), unless
    the user says otherwise."""
    recorded = (run.read_json("manifest.json") or {}).get("data_files", [])
    current = [file_digest(p) if p.is_file() else {"path": str(p), "sha256": None} for p in data_files(experiment)]
    changed = [f"{now['path']} (was {was['path']})" if was["path"] != now["path"] else now["path"]
               for was, now in zip(recorded, current) if was["sha256"] != now["sha256"]]
    if len(recorded) != len(current):
        changed.append(f"the list of annotation files ({len(recorded)} recorded, {len(current)} now)")
    if not changed:
        return
    if not allow_changed_data:
        raise ConfigError(f"run folder {run.path}: the training data changed since the run started (sha256 in "
                          f"manifest.json): {'; '.join(changed)}. Resuming would train on other data than the steps "
                          "so far; restore the files, or launch with --allow-changed-data to resume anyway")
    print(f"resuming on changed data (--allow-changed-data): {'; '.join(changed)}", file=sys.stderr)
    run.record_data(data_files(experiment))


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
            print(f"resuming {run.path} from {checkpoint.name} (stage {state.stage_index}, step {state.global_step})",
                  file=sys.stderr)
        run.truncate_metrics(state.global_step)  # steps after the checkpoint are trained again
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
            run.status("interrupted", step=reached[-1]["step"] if reached else state.global_step,
                       resumes_from=(latest_checkpoint(run.path) or Path("(the start)")).name)
        elif not isinstance(err, (Preempted, preemption.Interrupted)):  # those wrote their own status
            run.status("failed", reason=f"{type(err).__name__}: {err}", step=state.global_step)
    except OSError as write_error:
        log.error("%s: could not record the run's state (%s)", run.path / "status.json", write_error)
