"""Run an experiment: build the model, train its stages in order in one run folder, evaluate."""
from __future__ import annotations

import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mipha_lab.config import Experiment, StageConfig
from mipha_lab.data.batching import RankBatchSampler, collator, plan_epoch
from mipha_lab.data.image_processing import ImageProcessor
from mipha_lab.data.llava import LlavaDataset
from mipha_lab.data.mixtures import ensure_generated, load_mixture
from mipha_lab.data.problems import SkipReport
from mipha_lab.data.templates import get_template
from mipha_lab.errors import ConfigError
from mipha_lab.model import MultimodalModel, build_vlm
from mipha_lab.model.splice import count_targets
from mipha_lab.registry import MIXTURES, add_card_dir
from mipha_lab.run_folder import RunFolder
from mipha_lab.train.engine import DeepSpeedEngine, TorchEngine
from mipha_lab.train.flops import peak_flops, sample_flops
from mipha_lab.train.policy import apply_policy, merge_lora, table_markdown
from mipha_lab.train.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(process_group: bool = False) -> Distributed:
    """torchrun / SLURM environment -> process group (gloo on the CPU, NCCL on GPUs) via DeepSpeed.
    `process_group` makes one for a single process too (DeepSpeed needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if process_group and "WORLD_SIZE" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or process_group) and not torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return Distributed(rank, world, local, device)


def build_model(experiment: Experiment) -> MultimodalModel:
    m = experiment.model
    torch.manual_seed(experiment.seed)
    from mipha_lab.model.language import resolve_attn_implementation

    return build_vlm(
        m.vision, m.llm, m.projector, projector_args=m.projector_args, pretrained=m.pretrained,
        attn_implementation=resolve_attn_implementation(m.attn_implementation), max_positions=m.max_positions,
        feature_layer=m.feature_layer, select=m.feature_select,
    )


def stage_dataset(model: MultimodalModel, stage: StageConfig, experiment: Experiment) -> tuple[LlavaDataset, list]:
    records, skipped = load_mixture(stage.mixture, experiment.data_root, experiment.seed, stage.bad_samples)
    if not records:
        raise ConfigError(f"stage '{stage.name}': mixture '{stage.mixture}' has no usable samples")
    dataset = LlavaDataset(
        records, get_template(stage.template), model.tokenizer,
        ImageProcessor(model.vision_tower.image_spec, stage.image_strategy),
        max_length=stage.max_length, image_tokens=model.num_image_tokens, policy=stage.bad_samples,
        mask_first_answer_token=stage.quirks.mask_first_answer_token,
    )
    return dataset, skipped


def enable_checkpointing(model: MultimodalModel, stage: StageConfig) -> None:
    if stage.activation_checkpointing.lm:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.activation_checkpointing.vision:
        backbone = model.vision_tower.backbone
        if hasattr(backbone, "gradient_checkpointing_enable"):
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(backbone, "set_grad_checkpointing"):
            backbone.set_grad_checkpointing(True)
        else:
            raise ConfigError(f"vision tower '{model.vision_tower.name}' has no activation checkpointing")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class StageRunner:
    """Trains one stage: data plan per epoch, exact global-batch loss, metrics, skip reports."""

    def __init__(self, model: MultimodalModel, stage: StageConfig, experiment: Experiment, run: RunFolder,
                 dist: Distributed, tracker: Tracker, step_offset: int) -> None:
        self.model, self.stage, self.experiment, self.run, self.dist = model, stage, experiment, run, dist
        self.tracker, self.step_offset = tracker, step_offset
        self.dataset, self.read_skips = stage_dataset(model, stage, experiment)
        self.accumulation = stage.global_batch // (stage.micro_batch * dist.world_size)
        if self.accumulation < 1 or stage.global_batch % (stage.micro_batch * dist.world_size):
            raise ConfigError(
                f"stage '{stage.name}': global_batch {stage.global_batch} is not a multiple of micro_batch "
                f"{stage.micro_batch} x {dist.world_size} processes"
            )

    def plan(self, epoch: int) -> list[list[int]]:
        return plan_epoch(self.stage.batching, self.dataset, micro_batch=self.stage.micro_batch,
                          world_size=self.dist.world_size, seed=self.experiment.seed, epoch=epoch,
                          max_length=self.stage.max_length)

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.stage.max_steps is not None:
            return self.stage.max_steps
        return max(1, math.floor((self.stage.epochs or 1.0) * steps_per_epoch))

    def engine(self, param_groups: list[dict[str, Any]], total: int):
        kind = self.experiment.engine.kind
        bf16 = self.experiment.engine.precision == "bf16" or (
            self.experiment.engine.precision == "auto" and self.dist.device.type == "cuda")
        if kind == "deepspeed" or (kind == "auto" and self.dist.world_size > 1):
            return DeepSpeedEngine(self.model, param_groups, self.stage, total, self.experiment.engine.zero_stage,
                                   self.accumulation, bf16)
        if self.dist.world_size > 1:
            raise ConfigError("engine.kind 'torch' runs one process; use 'deepspeed' (or 'auto') for several")
        return TorchEngine(self.model, param_groups, self.stage, total, bf16)

    def train(self) -> int:
        stage, dist = self.stage, self.dist
        param_groups, rows = apply_policy(self.model, stage, self.experiment.model.llm)
        enable_checkpointing(self.model, stage)
        markdown = table_markdown(stage.name, rows)
        if dist.main:
            print(markdown)
            self.run.write_params(stage.name, rows, markdown)
        steps_per_epoch = len(RankBatchSampler(self.plan(0), dist.rank, dist.world_size)) // self.accumulation
        if steps_per_epoch < 1:
            raise ConfigError(f"stage '{stage.name}': {len(self.dataset)} samples do not fill one global batch of "
                              f"{stage.global_batch}")
        total = self.total_steps(steps_per_epoch)
        engine = self.engine(param_groups, total)
        self.model.train()
        bar = tqdm(total=total, desc=f"stage {stage.name}", unit="step", disable=not dist.main, dynamic_ncols=True)
        step, epoch, started, first_loss = 0, 0, time.time(), None
        report = SkipReport()
        report.add(self.read_skips)
        while step < total:
            sampler = RankBatchSampler(self.plan(epoch), dist.rank, dist.world_size)
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collator(stage.batching),
                                                 num_workers=self.experiment.data_workers)
            batches = iter(loader)
            for _ in range(len(sampler) // self.accumulation):
                if step >= total:
                    break
                self.optimizer_step(engine, batches, step, epoch, total, report)
                first_loss = self.last_loss if first_loss is None else first_loss
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.last_loss:.4f}")
            epoch += 1
            self.report_skips(report, epoch)
        bar.close()
        if dist.main:
            print(f"stage {stage.name}: {step} steps, {epoch} epoch(s) in {time.time() - started:.0f} s, "
                  f"loss {first_loss:.4f} -> {self.last_loss:.4f}; {report.summary()}")
        return self.step_offset + step

    def report_skips(self, report: SkipReport, epoch: int) -> None:
        totals = self.dist.all_sum([float(report.total)])
        if self.dist.main:
            if totals[0]:
                print(f"stage {self.stage.name}, epoch {epoch}: {report.summary()}")
            report.write(self.run.path / f"skipped-{self.stage.name}.json")

    def optimizer_step(self, engine, batches, step: int, epoch: int, total: int, report: SkipReport) -> None:
        model, dist = self.model, self.dist
        start = time.perf_counter()
        micro = [_to(next(batches), dist.device) for _ in range(self.accumulation)]
        data_time = time.perf_counter() - start
        for batch in micro:
            report.add(batch["skipped"])
        local = [
            sum(float(count_targets(b["input_ids"], b["attention_mask"], b["labels"], model.num_image_tokens,
                                    model.config.max_positions)) for b in micro),
            sum(float(b["attention_mask"].sum()) + float(b["image_counts"].sum()) * (model.num_image_tokens - 1) for b in micro),
            sum(float(len(b["ids"])) for b in micro),
            sum(float(b["image_counts"].sum()) for b in micro),
        ]
        targets, tokens, samples, images = dist.all_sum(local)
        start = time.perf_counter()
        loss_sum = 0.0
        for batch in micro:
            with engine.autocast():
                out = engine.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                                   image_counts=batch["image_counts"], sample_ids=batch["ids"],
                                   segment_ids=batch["segment_ids"], return_logits=False)
            engine.backward(out.loss_sum * dist.world_size / max(targets, 1.0))
            engine.micro_step()
            loss_sum += float(out.loss_sum)
        compute_time = time.perf_counter() - start
        start = time.perf_counter()
        grad_norm = engine.step()
        optim_time = time.perf_counter() - start
        (global_loss,) = dist.all_sum([loss_sum])
        self.last_loss = global_loss / max(targets, 1.0)
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(f"stage {self.stage.name}, step {step}: loss is {self.last_loss}")
        elapsed = data_time + compute_time + optim_time
        flops = sample_flops(model, int(tokens - images * model.num_image_tokens), int(images), int(targets),
                             self.stage.activation_checkpointing.model_dump())
        peak = peak_flops(torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else None)
        row = {
            "stage": self.stage.name, "step": self.step_offset + step + 1, "stage_step": step + 1, "total_steps": total,
            "epoch": epoch, "loss": self.last_loss, "lr": engine.lrs(), "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed, "images_per_s": images / elapsed,
            "time": {"data": data_time, "forward_backward": compute_time, "optimizer": optim_time},
            "peak_memory_mb": peak_memory_mb(dist.device), "supervised_tokens": int(targets),
            "flops": flops.useful, "recompute_flops": flops.recompute,
            "mfu": flops.useful / (elapsed * peak * dist.world_size) if peak else None,
        }
        if dist.main:
            self.run.append_metrics(row)
            self.tracker.log(row)
            self.run.status("running", stage=self.stage.name, step=step + 1, total_steps=total)


def save_model(model: MultimodalModel, folder: Path, dist: Distributed, zero3: bool) -> None:
    """The full model, gathered from every rank under ZeRO-3, written by rank 0."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if dist.main:
                model.save_pretrained(folder)
    elif dist.main:
        model.save_pretrained(folder)
    dist.barrier()


def finish_stage(model: MultimodalModel, dist: Distributed, zero3: bool) -> None:
    """Fold LoRA adapters into the weights so the next stage (and final/) starts from plain weights."""
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


def run_experiment(experiment: Experiment) -> RunFolder:
    """Train every stage in order in one run folder, save final/, then evaluate."""
    dist = init_distributed(process_group=experiment.engine.kind == "deepspeed")
    for folder in experiment.model.card_dirs:
        add_card_dir(folder)
    run = RunFolder.for_experiment(experiment)
    if dist.main:
        state = (run.read_status() or {}).get("state")
        if state is not None:
            raise ConfigError(
                f"run folder {run.path} already holds a run (state: {state}); choose another run_name=... "
                "or remove the folder (resuming arrives with the next issue)"
            )
        for stage in experiment.stages:  # synthetic data is written before its files are hashed
            ensure_generated(MIXTURES.get(stage.mixture), Path(experiment.data_root))
        run.create(experiment, data_files(experiment), dist.world_size)
        run.status("running", stage=experiment.stages[0].name, step=0, total_steps=None)
    dist.barrier()
    model = build_model(experiment).to(dist.device)
    tracker = Tracker(experiment, run.path, dist.main)
    zero3 = experiment.engine.zero_stage == 3 and dist.world_size > 1
    step = 0
    try:
        for stage in experiment.stages:
            step = StageRunner(model, stage, experiment, run, dist, tracker, step).train()
            finish_stage(model, dist, zero3)
            save_model(model, run.path / "stages" / stage.name, dist, zero3)
        save_model(model, run.path / "final", dist, zero3)
    except BaseException as err:
        if dist.main:
            run.status("failed", reason=f"{type(err).__name__}: {err}", step=step)
        tracker.finish()
        raise
    tracker.finish()
    if dist.main:
        run.status("evaluating" if experiment.eval.benchmarks else "done", step=step)
        if experiment.eval.benchmarks:
            from mipha_lab.eval.shapes import evaluate_run

            evaluate_run(run, experiment)
            run.status("done", step=step)
    dist.barrier()
    return run
