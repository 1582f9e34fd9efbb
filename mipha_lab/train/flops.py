"""Analytic training FLOPs of one sample (vision + projector + LM), for MFU.

Forward of a dense layer costs 2 x parameters per token; attention adds 4 x layers x sequence x
width per token (scores and weighted values; causal masking is not discounted, as in PaLM's MFU).
Backward costs 2 x forward for modules that train; for frozen modules that gradients must pass
through, 1 x the dense forward (input gradients only) plus 2 x the attention forward (both operands
of its matmuls are activations); nothing for frozen modules before the first trainable one. Recomputation under
activation checkpointing is counted separately (it is work, but not useful work for MFU).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Flops:
    useful: float  # forward + backward
    recompute: float  # extra forward under activation checkpointing


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _attention(layers: int, width: int, tokens: int) -> float:
    return 4.0 * layers * width * tokens * tokens


def sample_flops(model: nn.Module, text_tokens: int, images: int, supervised: int, checkpointing: dict[str, bool] | None = None) -> Flops:
    """FLOPs to train on one sample with `text_tokens` text positions and `images` images."""
    checkpointing = checkpointing or {}
    tower, projector, lm = model.vision_tower, model.projector, model.language_model
    config = lm.config
    vision_tokens = tower.grid**2 + tower.num_prefix_tokens
    image_tokens = model.num_image_tokens
    sequence = text_tokens + images * image_tokens
    vision_layers = len(tower.blocks) if hasattr(type(tower), "blocks") else 0
    vision_dense = images * 2.0 * _params(tower) * vision_tokens
    vision_attention = images * _attention(vision_layers, tower.hidden_size, vision_tokens)
    projector_dense = images * 2.0 * _params(projector) * vision_tokens
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    body_params = _params(lm) - _params(embeddings) - (0 if head.weight is embeddings.weight else _params(head))
    lm_dense = 2.0 * body_params * sequence + 2.0 * head.weight.numel() * supervised  # head on supervised positions
    lm_attention = _attention(config.num_hidden_layers, config.hidden_size, sequence)
    useful = recompute = 0.0
    upstream_trains = False
    parts = ((vision_dense, vision_attention, tower, "vision"), (projector_dense, 0.0, projector, None),
             (lm_dense, lm_attention, lm, "lm"))
    for dense, attention, module, key in parts:
        trains = _trains(module)
        if trains:
            backward = 2.0 * (dense + attention)
        elif upstream_trains:  # only input gradients: one matmul per dense layer, both operands of attention
            backward = dense + 2.0 * attention
        else:
            backward = 0.0
        useful += dense + attention + backward
        if key and checkpointing.get(key) and (trains or upstream_trains):
            recompute += dense + attention
        upstream_trains = upstream_trains or trains
    return Flops(useful, recompute)


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device_name: str | None) -> float | None:
    """Datasheet dense bf16 peak of a GPU name, or None (CPU, unknown card)."""
    if not device_name:
        return None
    return next((value for key, value in PEAK_BF16.items() if key in device_name), None)


def batch_flops(model: nn.Module, samples: list[tuple[int, int, int]], checkpointing: dict[str, bool] | None = None) -> Flops:
    """Sum over samples given as (text tokens, images, supervised tokens): attention is quadratic in
    each sample's own length, never in the batch's total."""
    parts = [sample_flops(model, text, images, supervised, checkpointing) for text, images, supervised in samples]
    return Flops(sum(f.useful for f in parts), sum(f.recompute for f in parts))
