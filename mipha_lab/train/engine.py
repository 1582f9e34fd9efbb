"""One engine interface (`Engine`) over plain PyTorch (one process) and DeepSpeed ZeRO 0/1/2/3 (any number).

The step function (step.py) scales each micro-batch's loss to the global batch itself, so DeepSpeed's own
division by the accumulation steps is turned off (`scale_wrt_gas=False`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mipha_lab.config import Experiment, ScheduleConfig, StageConfig
from mipha_lab.distributed import Distributed
from mipha_lab.errors import ConfigError


class Engine(Protocol):
    """What the step function and the stage loop ask of an engine."""

    model: nn.Module  # what forward is called on (DeepSpeed's wrapper under DeepSpeed)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The precision forward runs under (bf16 autocast over fp32 weights on GPUs)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def micro_step(self) -> None:
        """After each micro-batch's backward (DeepSpeed counts them)."""

    def step(self) -> float:
        """Clip, update, advance the schedule, clear gradients; the gradient norm before clipping."""

    def lrs(self) -> dict[str, float]: ...

    def save_state(self, folder: Path) -> None: ...

    def load_state(self, folder: Path) -> None: ...


def lr_lambda(schedule: ScheduleConfig, total_steps: int):
    warmup = math.ceil(schedule.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule.kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def _optimizer(param_groups: list[dict[str, Any]], stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW; its fused kernel (one kernel for every parameter, the same update) where asked, by default
    on GPUs."""
    opt, fused = stage.optimizer, stage.speed.fused_optimizer
    if fused is None:
        fused = all(p.is_cuda for group in param_groups for p in group["params"]) and any(
            group["params"] for group in param_groups
        )
    return torch.optim.AdamW(
        param_groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, fused=fused or None
    )


HYPERPARAMETERS = ("initial_lr", "betas", "eps", "weight_decay")


def configured(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyperparameters the experiment gives each parameter group (read before a checkpoint is loaded)."""
    return [{k: g[k] for k in HYPERPARAMETERS} for g in optimizer.param_groups]


def reapply(optimizer: torch.optim.Optimizer, scheduler: Any, wanted: list[dict[str, Any]]) -> None:
    """After loading a checkpoint, the experiment's hyperparameters win over the stored ones (they differ
    only where a resume after a non-finite stop changed them); the learning rate is recomputed exactly as
    the schedule computes it, so an unchanged experiment resumes bit for bit."""
    scheduler.base_lrs = [w["initial_lr"] for w in wanted]
    for index, (group, values) in enumerate(zip(optimizer.param_groups, wanted, strict=True)):
        group.update(values)
        group["lr"] = values["initial_lr"] * scheduler.lr_lambdas[index](scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


class TorchEngine:
    """Single process: AdamW, gradient clipping, the schedule; bf16 autocast on GPUs."""

    def __init__(
        self,
        model: nn.Module,
        param_groups: list[dict[str, Any]],
        stage: StageConfig,
        total_steps: int,
        bf16: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = _optimizer(param_groups, stage)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(stage.schedule, total_steps))
        self.max_grad_norm = stage.optimizer.max_grad_norm
        self.bf16 = bf16
        self.params = [p for g in param_groups for p in g["params"]]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.bf16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def micro_step(self) -> None:
        """Called after each micro-batch's backward (DeepSpeed counts them; nothing to do here)."""

    def step(self) -> float:
        limit = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def save_state(self, folder: Path) -> None:
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            folder / "optimizer.pt",
        )

    def load_state(self, folder: Path) -> None:
        wanted = configured(self.optimizer)
        state = torch.load(folder / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        reapply(self.optimizer, self.scheduler, wanted)


class DeepSpeedEngine:
    """DeepSpeed with ZeRO from the experiment; a torch AdamW with our per-module parameter groups."""

    def __init__(
        self,
        model: nn.Module,
        param_groups: list[dict[str, Any]],
        stage: StageConfig,
        total_steps: int,
        zero_stage: int,
        accumulation: int,
        bf16: bool = False,
    ) -> None:
        import deepspeed  # optional and heavy: only for this engine

        optimizer = _optimizer(param_groups, stage)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage.schedule, total_steps))
        config = {
            "train_micro_batch_size_per_gpu": stage.micro_batch,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": stage.optimizer.max_grad_norm or 0.0,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.model = self.engine
        self.bf16 = bf16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> None:
        self.engine.step()  # updates only at the accumulation boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def save_state(self, folder: Path) -> None:
        """DeepSpeed's own files: each rank writes its optimizer partition (a collective call)."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)

    def load_state(self, folder: Path) -> None:
        wanted = configured(self.optimizer)
        self.engine.load_checkpoint(
            str(folder / "deepspeed"),
            tag="state",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=True,
        )
        reapply(self.optimizer, self.scheduler, wanted)


def make_engine(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    experiment: Experiment,
    stage: StageConfig,
    total_steps: int,
    dist: Distributed,
    accumulation: int,
) -> Engine:
    """The experiment's engine for a stage: DeepSpeed when asked (or `auto` with several processes), else
    plain PyTorch; bf16 when asked (or `auto` on a GPU)."""
    kind, precision = experiment.engine.kind, experiment.engine.precision
    bf16 = precision == "bf16" or (precision == "auto" and dist.device.type == "cuda")
    if kind == "deepspeed" or (kind == "auto" and dist.world_size > 1):
        return DeepSpeedEngine(
            model, param_groups, stage, total_steps, experiment.zero_stage(stage), accumulation, bf16
        )
    if dist.world_size > 1:
        raise ConfigError("engine.kind 'torch' runs one process; use 'deepspeed' (or 'auto') for several")
    return TorchEngine(model, param_groups, stage, total_steps, bf16)
