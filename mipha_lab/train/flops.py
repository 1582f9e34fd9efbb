"""Analytic training FLOPs of one sample (vision + projector + LM), for MFU.

The model is walked in computation order as units: the tower's patch embedding, each tower block, the
projector, each LM block, the LM head. Per unit:
- forward: 2 x (weights of its linear and convolution layers) per token (embeddings, norms and biases
  are not matmuls and are not counted, as in torch's FLOP counter); attention adds 4 x width x
  sequence per token and layer (scores and weighted values; causal masking is not discounted, as in
  PaLM's MFU). The head runs on supervised positions only.
- backward: weight gradients (1 x forward) for the weights that train; input gradients (1 x forward)
  and both operands of attention (2 x its forward) wherever the gradient flows, i.e. in a unit that
  trains or has a training unit upstream; nothing elsewhere. The patch embedding's input is pixels,
  so it never computes input gradients. Within a unit every layer is treated alike (the first layer of
  the first training unit computes input gradients it does not need: a fraction of a percent).

The tower's blocks after the feature layer never run (every backend stops at the feature layer) and
are not counted. Recomputation under activation checkpointing is counted apart (`recompute`): work,
but not useful work, so MFU uses `useful` only. The pooling head some towers run forward (SigLIP's, on
one probe token) is not counted (under 1% of a tower's forward). `bench/flops.py` checks the sum
against torch's FLOP counter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mipha_lab.model.vision import VisionTower
from mipha_lab.model.vlm import MultimodalModel


@dataclass(frozen=True)
class Flops:
    """Training FLOPs: those of the model's math, and those spent again by recomputation."""

    useful: float  # forward + backward
    recompute: float  # extra forward under activation checkpointing


@dataclass(frozen=True)
class _Unit:
    dense: float  # forward FLOPs of the unit's matmuls
    trained_dense: float  # the part whose weights train (their weight gradients cost as much)
    attention: float  # forward FLOPs of attention
    trains: bool  # any of its parameters (norms and biases too)
    checkpointed: bool
    pixels_in: bool = False  # input is pixels: no input gradient ever


def _matmul_weights(module: nn.Module, trainable_only: bool = False) -> int:
    """Weights of the linear and convolution layers (LoRA adapters included; the packed input projection
    of `nn.MultiheadAttention`, as open_clip uses it, too)."""
    weights = [m.weight for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights += [
        m.in_proj_weight
        for m in module.modules()
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None
    ]
    return sum(w.numel() for w in weights if w.requires_grad or not trainable_only)


def _unit(
    module: nn.Module, tokens: float, attention: float = 0.0, checkpointed: bool = False, pixels_in: bool = False
) -> _Unit:
    return _Unit(
        2.0 * _matmul_weights(module) * tokens,
        2.0 * _matmul_weights(module, True) * tokens,
        attention,
        any(p.requires_grad for p in module.parameters()),
        checkpointed,
        pixels_in,
    )


def _attention(width: int, tokens: float) -> float:
    return 4.0 * width * tokens * tokens


def _attention_width(config) -> int:
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def _tower_units(tower: VisionTower, images: float, checkpointed: bool) -> list[_Unit]:
    """The units of `images` images through the tower, up to its feature layer."""
    patches = tower.grid**2
    tokens = patches + tower.num_prefix_tokens
    try:
        blocks = list(tower.blocks)
    except NotImplementedError:  # a tower that does not expose its layers: one dense unit, no attention
        return [_unit(tower, images * tokens, checkpointed=checkpointed)]
    patch_embeddings = [m for m in tower.modules() if isinstance(m, nn.Conv2d)]
    units = [_unit(conv, images * patches, pixels_in=True) for conv in patch_embeddings]
    used = tower.absolute_layer(len(blocks)) + 1
    attention = images * _attention(tower.hidden_size, tokens)
    return units + [_unit(block, images * tokens, attention, checkpointed) for block in blocks[:used]]


def sample_flops(
    model: MultimodalModel,
    text_tokens: float,
    images: float,
    supervised: float,
    checkpointing: dict[str, bool] | None = None,
) -> Flops:
    """FLOPs to train on one sample with `text_tokens` text positions (image placeholders excluded),
    `images` images and `supervised` positions in the loss."""
    checkpointing = checkpointing or {}
    tower, lm = model.vision_tower, model.lm
    sequence = text_tokens + images * model.num_image_tokens
    units = _tower_units(tower, images, bool(checkpointing.get("vision"))) if images else []
    if images:
        units.append(_unit(model.projector, images * tower.num_tokens))
    attention = _attention(_attention_width(lm.config), sequence)
    units += [_unit(layer, sequence, attention, bool(checkpointing.get("lm"))) for layer in lm.layers]
    units.append(_unit(lm.head, supervised))
    useful = recompute = 0.0
    upstream_trains = False
    for unit in units:
        flows = unit.trains or upstream_trains
        backward = unit.trained_dense
        if flows:
            backward += (0.0 if unit.pixels_in else unit.dense) + 2.0 * unit.attention
            recompute += (unit.dense + unit.attention) if unit.checkpointed else 0.0
        useful += unit.dense + unit.attention + backward
        upstream_trains = flows
    return Flops(useful, recompute)


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device_name: str | None) -> float | None:
    """Datasheet dense bf16 peak of a GPU name, or None (CPU, unknown card)."""
    if not device_name:
        return None
    return next((value for key, value in PEAK_BF16.items() if key in device_name), None)


def batch_flops(
    model: MultimodalModel, samples: list[tuple[int, int, int]], checkpointing: dict[str, bool] | None = None
) -> Flops:
    """Sum over samples given as (text tokens, images, supervised tokens): attention is quadratic in
    each sample's own length, never in the batch's total."""
    parts = [sample_flops(model, text, images, supervised, checkpointing) for text, images, supervised in samples]
    return Flops(sum(f.useful for f in parts), sum(f.recompute for f in parts))
