"""Estimated peak GPU memory of a training stage: what `plan` reports and what `activation_checkpointing.lm:
auto` chooses the recomputation from.

Model states per parameter: the torch engine keeps fp32 weights, gradients and AdamW's two moments (16
bytes per trained parameter, 4 per frozen one); DeepSpeed in bf16 keeps bf16 weights and gradients and
fp32 master weights and moments (2 + 2 + 12), the last two partitioned by ZeRO 1/2/3 as their stage says.
Activations follow Korthikanti et al. (2022, "Reducing activation recomputation in large transformer
models") with a fused attention kernel (no scores stored): about 34 x width bytes per token and layer in
bf16, of which the attention sub-block keeps 11 and the MLP 19; recomputing a sub-block keeps its
input only (2 x width). The vision tower's activations are counted as one more layer per image token.
An estimate, to choose between options; measure with `bench/gpu.py`.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

GIB = 2**30
GPU_MEMORY_GIB = {"H200": 141.0, "H100": 80.0, "A100": 80.0, "L40S": 48.0, "A10": 24.0, "L4": 24.0}  # datasheet
Recompute = Literal["none", "attention", "mlp", "full"]
# least recomputation first: `auto` takes the first that fits its budget
RECOMPUTE_ORDER: tuple[Recompute, ...] = ("none", "attention", "mlp", "full")
ACTIVATION_BYTES_PER_WIDTH: dict[Recompute, float] = {
    "none": 34.0,
    "attention": 34.0 - 11.0 + 2.0,
    "mlp": 34.0 - 19.0 + 2.0,
    "full": 2.0,
}


def model_state_bytes(model: nn.Module, engine: Literal["torch", "deepspeed"], zero_stage: int, gpus: int) -> float:
    """Weights, gradients and optimizer states on one GPU."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if engine == "torch":
        return 4.0 * total + 12.0 * trainable
    weights, grads, optimizer = 2.0 * total, 2.0 * trainable, 12.0 * trainable
    if zero_stage >= 1:
        optimizer /= gpus
    if zero_stage >= 2:
        grads /= gpus
    if zero_stage >= 3:
        weights /= gpus
    return weights + grads + optimizer


def activation_bytes(width: int, layers: int, tokens: float, recompute: Recompute) -> float:
    """Activations kept for backward by `layers` decoder layers over `tokens` positions (a micro-batch)."""
    return ACTIVATION_BYTES_PER_WIDTH[recompute] * width * layers * tokens


def estimate_gib(
    model: nn.Module,
    width: int,
    layers: int,
    micro_tokens: float,
    recompute: Recompute,
    engine: Literal["torch", "deepspeed"] = "deepspeed",
    zero_stage: int = 0,
    gpus: int = 1,
) -> float:
    return (
        model_state_bytes(model, engine, zero_stage, gpus) + activation_bytes(width, layers, micro_tokens, recompute)
    ) / GIB


def least_recompute(estimates: dict[Recompute, float], budget_gib: float) -> Recompute:
    """The least recomputation whose estimate fits the budget; full recomputation when none does."""
    return next((option for option in RECOMPUTE_ORDER if estimates[option] <= budget_gib), "full")
