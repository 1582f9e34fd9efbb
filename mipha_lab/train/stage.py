"""Train one stage: policy, engine, the data plan of each epoch, the step loop, checkpoints, resume."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

from mipha_lab.config import Experiment, StageConfig
from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.data.batching import RankBatchSampler, collator, plan_epoch
from mipha_lab.data.llava import LlavaDataset
from mipha_lab.data.mixtures import load_mixture
from mipha_lab.data.problems import SkipReport
from mipha_lab.data.templates import get_template
from mipha_lab.distributed import Distributed, gather_objects, whole_parameters
from mipha_lab.errors import ConfigError
from mipha_lab.model import MultimodalModel
from mipha_lab.runs.folder import RunFolder
from mipha_lab.train import faults, preemption
from mipha_lab.train.checkpoint import CheckpointWriter, TrainState, load_model_state, load_rng
from mipha_lab.train.engine import Engine, make_engine
from mipha_lab.train.flops import FlopModel, peak_flops
from mipha_lab.train.policy import apply_policy, table_markdown
from mipha_lab.train.preemption import Preempted
from mipha_lab.train.speed import apply_speed
from mipha_lab.train.step import NonFiniteLoss, global_counts, on_device, train_step
from mipha_lab.train.tracking import Tracker


def stage_dataset(model: MultimodalModel, stage: StageConfig, experiment: Experiment) -> tuple[LlavaDataset, list]:
    records, skipped = load_mixture(stage.mixture, experiment.data_root, experiment.seed, stage.bad_samples)
    if not records:
        raise ConfigError(f"stage '{stage.name}': mixture '{stage.mixture}' has no usable samples")
    dataset = LlavaDataset(
        records,
        get_template(stage.template),
        model.tokenizer,
        model.image_processor(stage.image_strategy),
        max_length=stage.max_length,
        layout=model.layout,
        policy=stage.bad_samples,
        mask_first_answer_token=experiment.quirks.mask_first_answer_token,
        max_image_pixels=experiment.max_image_pixels,
        cache_mb=experiment.data_cache_mb,
    )
    return dataset, skipped


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gathered_state(model: MultimodalModel, dist: Distributed, zero3: bool) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (gathered from every rank under ZeRO-3), None elsewhere."""
    with whole_parameters(model, zero3):
        return model.weights_to_save() if dist.main else None


def sample_sizes(batch: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """(text tokens without image placeholders, encoder frames, supervised tokens, visual tokens) of each sample
    of a batch; a packed row is split at its segment boundaries."""
    valid = batch["attention_mask"].bool()
    ids = batch["input_ids"]
    if batch["segment_ids"] is None:
        owner = torch.arange(len(ids))[:, None].expand_as(ids)
    else:
        owner = batch["segment_ids"].clamp(min=0)
    samples = int(owner[valid].max()) + 1 if valid.any() else 0
    is_image = (ids == IMAGE_TOKEN_INDEX) & valid
    owners = owner[is_image]  # the sample of each placeholder, in the batch's order of placeholders

    def per_sample(where: torch.Tensor, values: torch.Tensor | None = None) -> list[int]:
        index = owner[where] if values is None else owners
        counts = torch.ones(len(index), dtype=torch.long) if values is None else values.long()
        return torch.zeros(samples, dtype=torch.long).index_add_(0, index, counts).tolist()

    positions, placed = per_sample(valid), per_sample(is_image)
    supervised = per_sample(valid & (batch["labels"] != IGNORE_INDEX))
    frames, tokens = per_sample(is_image, batch["image_frames"]), per_sample(is_image, batch["image_tokens"])
    return [(n - p, f, s, t) for n, p, f, s, t in zip(positions, placed, frames, supervised, tokens, strict=True)]


class StageRunner:
    """Trains one stage: data plan per epoch, exact global-batch loss, metrics, checkpoints, resume."""

    def __init__(
        self,
        model: MultimodalModel,
        index: int,
        experiment: Experiment,
        run: RunFolder,
        dist: Distributed,
        tracker: Tracker,
        state: TrainState,
    ) -> None:
        self.model, self.index, self.experiment, self.run, self.dist = model, index, experiment, run, dist
        self.stage = stage = experiment.stages[index]
        self.tracker, self.state = tracker, state
        self.zero3 = experiment.zero_stage(stage) == 3 and dist.world_size > 1
        self.writer = CheckpointWriter(run.path, dist.rank, experiment.checkpoint.keep_last, dist.barrier)
        self.dataset, self.read_skips = stage_dataset(model, stage, experiment)
        pin = experiment.pin_memory
        self.pin_memory = dist.device.type == "cuda" if pin is None else pin and dist.device.type == "cuda"
        self.accumulation = stage.global_batch // (stage.micro_batch * dist.world_size)
        if self.accumulation < 1 or stage.global_batch % (stage.micro_batch * dist.world_size):
            raise ConfigError(
                f"stage '{stage.name}': global_batch {stage.global_batch} is not a multiple of micro_batch "
                f"{stage.micro_batch} x {dist.world_size} processes"
            )

    def checkpointing(self) -> dict[str, Any]:
        """The stage's activation checkpointing as resolved (`auto` chosen), for FLOPs and metrics."""
        return {"vision": self.stage.activation_checkpointing.vision, "lm": self.recompute}

    def plan(self, epoch: int) -> list[list[int]]:
        return plan_epoch(
            self.stage.batching,
            self.dataset,
            micro_batch=self.stage.micro_batch,
            world_size=self.dist.world_size,
            seed=self.experiment.seed,
            epoch=epoch,
            max_length=self.stage.max_length,
            max_images_per_row=self.stage.max_images_per_row,
        )

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.stage.max_steps is not None:
            return self.stage.max_steps
        return max(1, math.floor((self.stage.epochs or 1.0) * steps_per_epoch))

    def checkpoint_due(self, step: int, total: int, last_save: float) -> tuple[bool, bool]:
        """(a checkpoint is due, the job was signalled to stop). Due every `every_steps` global steps or
        `every_minutes` (the stage's last step is left to the end-of-stage checkpoint); every rank must
        agree, so the main rank's clock decides and any rank's preemption signal counts for all."""
        every = self.experiment.checkpoint
        global_step = self.state.global_step - self.state.stage_step + step
        due = bool(every.every_steps and global_step % every.every_steps == 0) or bool(
            every.every_minutes and time.time() - last_save >= 60 * every.every_minutes
        )
        stop = preemption.requested() or preemption.interrupted()
        votes = self.dist.all_sum([float(due and self.dist.main), float(stop)])
        return step < total and votes[0] > 0, votes[1] > 0

    def save_checkpoint(self, engine: Any, state: TrainState) -> None:
        self.writer.save(state, gathered_state(self.model, self.dist, self.zero3), engine)

    def train(self, resume: Path | None = None) -> TrainState:
        """Train to the end of the stage, from `resume` (a checkpoint of this stage) when given."""
        stage, dist, state = self.stage, self.dist, self.state
        boundary = resume is not None and state.stage_step == 0
        if resume is not None and boundary:  # a checkpoint written at the end of the previous stage: weights, RNG
            load_model_state(resume, self.model)
            load_rng(resume, dist.rank)
        param_groups, rows = apply_policy(self.model, stage, self.experiment.model.llm, self.experiment.quirks)
        self.recompute = apply_speed(self.model, stage, self.experiment, dist.device, dist.world_size)
        self.model.loss_reduction = stage.loss_reduction
        self.flop_model = FlopModel(self.model, self.checkpointing())
        markdown = table_markdown(stage.name, rows)
        if dist.main:
            print(markdown)
            if stage.activation_checkpointing.lm == "auto":
                print(f"stage {stage.name}: activation_checkpointing.lm auto -> {self.recompute}")
            self.run.write_params(stage.name, rows, markdown)
        steps_per_epoch = len(RankBatchSampler(self.plan(0), dist.rank, dist.world_size)) // self.accumulation
        if steps_per_epoch < 1:
            raise ConfigError(
                f"stage '{stage.name}': {len(self.dataset)} samples do not fill one global batch of "
                f"{stage.global_batch}"
            )
        total = self.total_steps(steps_per_epoch)
        if resume is not None and not boundary:
            load_model_state(resume, self.model)
        engine = make_engine(self.model, param_groups, self.experiment, stage, total, dist, self.accumulation)
        if resume is not None and not boundary:
            engine.load_state(resume)
            load_rng(resume, dist.rank)
        self.model.train()
        step, epoch, position = state.stage_step, state.epoch, state.batches_done
        offset = state.global_step - state.stage_step  # steps of the earlier stages
        report = SkipReport()
        if state.skips:  # a resumed stage: the counts so far, read-time skips included
            report.restore(state.skips)
        else:
            report.add(self.read_skips)
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"stage {stage.name}",
            unit="step",
            disable=not dist.main,
            dynamic_ncols=True,
        )
        started = time.time()
        with preemption.deferred():
            step, epoch, first_loss = self.loop(engine, total, report, (step, epoch, position, offset), bar)
        bar.close()
        if dist.main:
            resumed = f" (resumed at step {state.stage_step})" if state.stage_step else ""
            epochs = step / steps_per_epoch
            print(
                f"stage {stage.name}: {step} steps{resumed}, {epochs:.3g} epoch(s) in {time.time() - started:.0f} s, "
                f"loss {first_loss if first_loss is not None else float('nan'):.4f} -> {self.last_loss:.4f}; "
                f"{report.summary()}"
            )
        if dist.main:
            report.write(self.run.path / f"skipped-{stage.name}.json")
        return TrainState(self.index, step, offset + step, epoch, 0, report.state())

    def loop(
        self, engine: Any, total: int, report: SkipReport, start: tuple[int, int, int, int], bar: tqdm
    ) -> tuple[int, int, float | None]:
        """Optimizer steps to the end of the stage from (stage step, epoch, batches done, earlier stages'
        steps); checkpoints on schedule and on a preemption signal. Returns (steps, epochs, first loss)."""
        stage, dist = self.stage, self.dist
        step, epoch, position, offset = start
        last_save, first_loss = time.time(), None
        while step < total:
            self.dataset.start_epoch(epoch)
            sampler = RankBatchSampler(self.plan(epoch), dist.rank, dist.world_size, start=position)
            # own generator: creating the loader must not draw from the global RNG (bitwise resume)
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=sampler,
                collate_fn=collator(stage.batching),
                num_workers=self.experiment.data_workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(self.experiment.seed + epoch),
            )
            batches = iter(loader)
            groups, done = len(sampler) // self.accumulation, 0
            while done < groups and step < total:
                self.optimizer_step(engine, batches, step, epoch, total, report)
                first_loss = self.last_loss if first_loss is None else first_loss
                step, position, done = step + 1, position + self.accumulation, done + 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss:.4f}")
                due, preempted = self.checkpoint_due(step, total, last_save)
                if due or preempted:
                    self.save_checkpoint(
                        engine, TrainState(self.index, step, offset + step, epoch, position, report.state())
                    )
                    last_save = time.time()
                if preempted:
                    self.stop_preempted(offset + step)
                faults.maybe_kill("step", offset + step)
            if done == groups:
                epoch, position = epoch + 1, 0
                self.report_skips(report, epoch)
        return step, epoch, first_loss

    def report_skips(self, report: SkipReport, epoch: int) -> None:
        totals = self.dist.all_sum([float(report.total)])
        if self.dist.main:
            if totals[0]:
                print(f"stage {self.stage.name}, epoch {epoch}: {report.summary()}")
            report.write(self.run.path / f"skipped-{self.stage.name}.json")

    def optimizer_step(self, engine: Engine, batches, step: int, epoch: int, total: int, report: SkipReport) -> None:
        """One global batch through the step function, then its metrics: a row, the tracker, the status."""
        model, dist = self.model, self.dist
        start = time.perf_counter()
        micro = [on_device(next(batches), dist.device) for _ in range(self.accumulation)]
        data_time = time.perf_counter() - start
        for batch in micro:
            report.add(batch["skipped"])
        counts = global_counts(micro, model.config.max_positions, dist, model.loss_reduction)
        if counts.samples == 0:
            raise ConfigError(
                f"stage '{self.stage.name}', step {step + 1}: every sample of the global batch was skipped "
                f"({report.summary()}); is max_length {self.stage.max_length} too short?"
            )
        try:
            figures = train_step(engine, micro, counts, dist)
        except NonFiniteLoss as err:
            self.last_loss = err.loss
            self.stop_nonfinite(step, micro)  # records the batch, raises with the advice
        self.last_loss = figures.loss
        elapsed = data_time + figures.compute_s + figures.optimizer_s
        sizes = [size for batch in micro for size in sample_sizes(batch)]
        flops = self.flop_model.batch(sizes)
        flops_useful, flops_recompute = self.dist.all_sum([flops.useful, flops.recompute])
        peak = peak_flops(torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else None)
        global_step = self.state.global_step - self.state.stage_step + step + 1
        row = {
            "stage": self.stage.name,
            "step": global_step,
            "stage_step": step + 1,
            "total_steps": total,
            "epoch": epoch,
            "loss": figures.loss,
            "lr": engine.lrs(),
            "grad_norm": figures.grad_norm,
            "tokens_per_s": counts.tokens / elapsed,
            "samples_per_s": counts.samples / elapsed,
            "images_per_s": counts.images / elapsed,
            "time": {"data": data_time, "forward_backward": figures.compute_s, "optimizer": figures.optimizer_s},
            "peak_memory_mb": peak_memory_mb(dist.device),
            "supervised_tokens": int(counts.supervised),
            "flops": flops_useful,
            "recompute_flops": flops_recompute,
            "mfu": flops_useful / (elapsed * peak * dist.world_size) if peak else None,
        }
        if dist.main:
            self.run.append_metrics(row)
            self.tracker.log(row)
            self.run.status("running", stage=self.stage.name, step=global_step, stage_step=step + 1, total_steps=total)

    def stop_preempted(self, global_step: int) -> None:
        if preemption.interrupted():
            if self.dist.main:
                self.run.status("interrupted", stage=self.stage.name, step=global_step)
            raise preemption.Interrupted(
                f"stage {self.stage.name}, step {global_step}: interrupted (Ctrl-C); checkpoint saved in "
                f"{self.run.path / 'checkpoints'} - launch the same command again to resume from it"
            )
        if self.dist.main:
            self.run.status("preempted", stage=self.stage.name, step=global_step)
        raise Preempted(
            f"stage {self.stage.name}, step {global_step}: signalled to stop; checkpoint saved in "
            f"{self.run.path / 'checkpoints'}, the job is requeued and resumes from it"
        )

    def stop_nonfinite(self, step: int, micro: list[dict[str, Any]]) -> NoReturn:
        """Record the step and every rank's sample ids of the offending global batch, then stop."""
        global_step = self.state.global_step - self.state.stage_step + step + 1
        ids = [i for rank_ids in gather_objects(self.dist, [i for b in micro for i in b["ids"]]) for i in rank_ids]
        if self.dist.main:
            record = {
                "stage": self.stage.name,
                "step": global_step,
                "stage_step": step + 1,
                "loss": repr(self.last_loss),
                "sample_ids": ids,
            }
            (self.run.path / "nonfinite.json").write_text(json.dumps(record, indent=2) + "\n")
        raise NonFiniteLoss(
            self.last_loss,
            f"stage {self.stage.name}, step {global_step}: loss is {self.last_loss}; the step was not applied, the "
            f"last checkpoint is kept, the batch's {len(ids)} sample ids are in {self.run.path / 'nonfinite.json'}. "
            f"Fix the cause, then launch again to resume: lower stages.{self.stage.name}.optimizer.lr or "
            f"max_grad_norm (eps, betas, weight_decay and schedule.warmup_ratio may change too), or repair or "
            "remove those samples and launch with --allow-changed-data (if the last checkpoint is itself "
            "degraded, move it out of checkpoints/ to resume from the one before)",
        )
