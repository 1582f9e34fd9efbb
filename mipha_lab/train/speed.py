"""A stage's performance levers applied to the model: activation checkpointing (whole or selective, or
chosen from a memory budget), regional compilation, the fused loss. None changes what is computed;
`tests/test_speed.py` checks each against the plain path."""

from __future__ import annotations

import functools
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mipha_lab.config import Experiment, StageConfig
from mipha_lab.errors import ConfigError
from mipha_lab.model import MultimodalModel
from mipha_lab.train.memory import RECOMPUTE_ORDER, Recompute, estimate_gib, least_recompute

SUB_BLOCKS: dict[Recompute, str] = {"attention": "self_attn", "mlp": "mlp"}
FIXED_RECOMPUTE: dict[bool | str, Recompute] = {False: "none", True: "full", "attention": "attention", "mlp": "mlp"}
BUDGET_SHARE = 0.9  # of the GPU's memory, when no budget is given: the allocator's fragmentation and buffers


def transformers_checkpointing(module: nn.Module, enabled: bool = True) -> bool:
    """Switch a transformers model's activation checkpointing (non-reentrant); False if it has none.
    transformers 5.2x renamed `gradient_checkpointing_*` to `activation_checkpointing_*`; both are served."""
    verb = "enable" if enabled else "disable"
    for name in (f"activation_checkpointing_{verb}", f"gradient_checkpointing_{verb}"):
        if hasattr(module, name):
            kwargs = {name.replace(verb, "kwargs"): {"use_reentrant": False}} if enabled else {}
            getattr(module, name)(**kwargs)
            return True
    return False


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


WRAPPED = "_mipha_lab_unwrapped"  # on a module whose forward we wrapped: the forward it had before


def wrap_forward(module: nn.Module, compiled: bool = False, checkpointed: bool = False) -> None:
    """Wrap a module's forward, compiled and/or recomputed in backward, replacing what an earlier stage set
    (a forward another library set on the instance is kept underneath). The module's own call is wrapped,
    so its parameters keep their names."""
    if WRAPPED in vars(module):
        previous = vars(module).pop(WRAPPED)
        if previous is None:
            del module.forward  # back to the class's
        else:
            module.forward = previous
    instance = vars(module).get("forward")  # a forward another library set on this module, or None
    forward = module.forward
    if compiled:
        forward = torch.compile(forward, dynamic=True)
    if checkpointed:
        forward = functools.partial(_checkpointed, forward)
    if compiled or checkpointed:
        setattr(module, WRAPPED, instance)
        module.forward = forward


def _set_sub_block(block: nn.Module, name: str, where: str, compiled: bool = False, checkpointed: bool = False) -> None:
    """Wrap a block's sub-block as asked; an error naming it if it is missing and something is asked."""
    module = getattr(block, name, None)
    if isinstance(module, nn.Module):
        wrap_forward(module, compiled, checkpointed)
    elif compiled or checkpointed:
        raise ConfigError(f"{where} has no '{name}' sub-block")


def micro_batch_tokens(stage: StageConfig, model: MultimodalModel) -> float:
    """The most positions a micro-batch holds: its samples at the stage's maximum length (images spliced)."""
    return float(stage.micro_batch * min(stage.max_length, model.config.max_positions or stage.max_length))


def device_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def lm_recompute(
    model: MultimodalModel, stage: StageConfig, experiment: Experiment, gpus: int, device_gib: float | None
) -> Recompute:
    """The stage's LM recomputation; `auto` is the least whose estimate (memory.py) fits the stage's
    `memory_budget_gib`, else 90% of `device_gib`; none without either (the CPU). The training policy
    must already be applied (trained parameters count more)."""
    setting = stage.activation_checkpointing
    if setting.lm != "auto":
        return FIXED_RECOMPUTE[setting.lm]
    budget = setting.memory_budget_gib or (BUDGET_SHARE * device_gib if device_gib else None)
    if budget is None:
        return "none"
    kind = experiment.engine.kind
    engine: Literal["torch", "deepspeed"] = (
        "deepspeed" if kind == "deepspeed" or (kind == "auto" and gpus > 1) else "torch"
    )
    lm = model.lm
    estimates = {
        option: estimate_gib(
            model,
            lm.width,
            len(lm.layers),
            micro_batch_tokens(stage, model),
            option,
            engine,
            experiment.zero_stage(stage),
            gpus,
        )
        for option in RECOMPUTE_ORDER
    }
    return least_recompute(estimates, budget)


def set_layers(model: MultimodalModel, stage: StageConfig, lm: Recompute) -> None:
    """The stage's activation checkpointing (the LM's as resolved by `lm_recompute`, the tower's whole) and
    regional compilation (the MLP of every LM decoder layer and vision block, for any number of tokens:
    packed rows change length every step); whatever an earlier stage set is undone first."""
    transformers_checkpointing(model.language_model, lm == "full")
    wanted = stage.speed.compile
    for index, layer in enumerate(model.lm.layers):
        where = f"LM decoder layer {index}"
        _set_sub_block(layer, "mlp", where, wanted.lm, lm == "mlp")
        _set_sub_block(layer, "self_attn", where, checkpointed=lm == "attention")
    tower = model.vision_tower
    try:
        blocks = list(tower.blocks)
    except NotImplementedError:  # a tower that does not expose its layers
        blocks = []
    mlps = [block.mlp for block in blocks if isinstance(getattr(block, "mlp", None), nn.Module)]
    if wanted.vision and not mlps:
        raise ConfigError(f"stage '{stage.name}': speed.compile.vision: tower '{tower.name}' exposes no MLP blocks")
    for mlp in mlps:
        wrap_forward(cast(nn.Module, mlp), compiled=wanted.vision)
    tower_checkpointing(model, stage.activation_checkpointing.vision)


def tower_checkpointing(model: Any, enabled: bool) -> None:
    """Switch the vision tower's activation checkpointing (its library's own switch: transformers, timm, open_clip)."""
    backbone = getattr(model.vision_tower, "backbone", None)  # the library model a card's tower wraps
    if backbone is not None and transformers_checkpointing(backbone, enabled):
        return
    if backbone is not None and hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(enabled)
    elif enabled:
        raise ConfigError(f"vision tower '{model.vision_tower.name}' has no activation checkpointing")


def apply_speed(
    model: MultimodalModel, stage: StageConfig, experiment: Experiment, device: torch.device, gpus: int
) -> Recompute:
    """Everything a stage's settings ask of the model before its engine is made; the LM recomputation chosen."""
    if stage.speed.fused_loss != "off" and experiment.zero_stage(stage) == 3 and gpus > 1:
        raise ConfigError(
            f"stage '{stage.name}': speed.fused_loss: {stage.speed.fused_loss} does not work under ZeRO-3, which "
            "partitions the head's weight outside the head's own forward (the chunked loss recomputes it in "
            "backward, Liger reads it directly); use fused_loss: off with ZeRO-3, or ZeRO-2"
        )
    recompute = lm_recompute(model, stage, experiment, gpus, device_memory_gib(device))
    set_layers(model, stage, recompute)
    model.fused_loss = stage.speed.fused_loss
    return recompute
