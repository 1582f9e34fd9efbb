"""One optimizer step over a global batch, as a function: what the trainer runs and bench/gpu.py times.

Each micro-batch's loss is (sum of its token losses) x world / (supervised tokens of the whole global
batch), so gradients summed over accumulation and averaged over ranks are exactly those of the mean over
every supervised token of the global batch (under loss_reduction sample / square: token losses and the
denominator weighted per sample, `splice.target_weights`). The loss is checked before the last micro-batch reaches the
optimizer, so a non-finite batch never changes the weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from mipha_lab.constants import IGNORE_INDEX
from mipha_lab.distributed import Distributed
from mipha_lab.errors import MiphaLabError
from mipha_lab.model.splice import LossReduction, count_targets
from mipha_lab.train.engine import Engine


class NonFiniteLoss(MiphaLabError):
    """The loss of a global batch is NaN or infinite; the step was not applied."""

    def __init__(self, loss: float, message: str = "") -> None:
        super().__init__(message or f"loss is {loss}; the step was not applied")
        self.loss = loss


@dataclass(frozen=True)
class GlobalCounts:
    """What the whole global batch (every rank, every micro-batch) holds."""

    targets: float  # the loss's denominator: supervised tokens after splicing and truncation (their weights'
    # sum under loss_reduction sample / square)
    tokens: float  # positions after splicing
    samples: float
    images: float
    supervised: float  # supervised tokens (equal to `targets` under the token reduction)


@dataclass(frozen=True)
class StepFigures:
    """What one optimizer step reports: the loss, the gradient norm and where the time went."""

    loss: float  # mean over every supervised token of the global batch
    grad_norm: float
    compute_s: float  # forward and backward of every micro-batch
    optimizer_s: float  # clipping and the update


def global_counts(
    micro: list[dict[str, Any]], max_positions: int, dist: Distributed, reduction: LossReduction = "token"
) -> GlobalCounts:
    """Counted on every rank and summed, before any forward: the normalisation needs the global total.
    Each <image> placeholder becomes the visual tokens the batch records for it (`image_tokens`)."""

    def targets(kind: LossReduction) -> float:
        return sum(
            float(
                count_targets(
                    b["input_ids"],
                    b["attention_mask"],
                    b["labels"],
                    b["image_tokens"],
                    max_positions,
                    segment_ids=b.get("segment_ids"),
                    reduction=kind,
                )
            )
            for b in micro
            if b["input_ids"].numel()
        )

    supervised = targets("token")
    local = [
        supervised if reduction == "token" else targets(reduction),
        sum(float(b["attention_mask"].sum()) + float((b["image_tokens"] - 1).sum()) for b in micro),
        sum(float(len(b["ids"])) for b in micro),
        sum(float(b["image_counts"].sum()) for b in micro),
        supervised,
    ]
    return GlobalCounts(*dist.all_sum(local))


def batch_forward(model: Any, batch: dict[str, Any]) -> Any:
    """The model's training call on a collated batch (the loss only, no logits). A micro-batch whose samples
    were all skipped (too long, unreadable) runs one unsupervised token instead: its loss is zero, and every
    process still runs forward and backward (ZeRO-3 and DDP need all of them)."""
    if not batch["ids"]:
        ids = batch["input_ids"].new_zeros(1, 1)
        return model(ids, torch.ones_like(ids), None, torch.full_like(ids, IGNORE_INDEX), return_logits=False)
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        image_counts=batch["image_counts"],
        image_sizes=batch["image_sizes"],
        sample_ids=batch["ids"],
        segment_ids=batch["segment_ids"],
        return_logits=False,
    )


def train_step(engine: Engine, micro: list[dict[str, Any]], counts: GlobalCounts, dist: Distributed) -> StepFigures:
    """Forward and backward of each micro-batch (on the device, under the engine's precision), then the
    engine's step (clipping, optimizer, schedule). Raises NonFiniteLoss before the update."""
    start = time.perf_counter()
    loss_sum: torch.Tensor | float = 0.0  # summed on the device: one host sync per step, not per micro-batch
    loss = math.nan
    for index, batch in enumerate(micro):
        with engine.autocast():
            out = batch_forward(engine.model, batch)
        engine.backward(out.loss_sum * dist.world_size / max(counts.targets, 1.0))
        loss_sum = loss_sum + out.loss_sum.detach().double()
        if index == len(micro) - 1:
            (global_loss,) = dist.all_sum([float(loss_sum)])
            loss = global_loss / max(counts.targets, 1.0)
            if not math.isfinite(loss):
                raise NonFiniteLoss(loss)
        engine.micro_step()
    compute = time.perf_counter() - start
    start = time.perf_counter()
    grad_norm = engine.step()
    return StepFigures(loss, grad_norm, compute, time.perf_counter() - start)


def on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch on the device; page-locked tensors (the loader's `pin_memory`) copy without blocking."""
    return {k: v.to(device, non_blocking=v.is_pinned()) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
