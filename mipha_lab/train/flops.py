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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    """A unit's matmul weights, read once: its FLOPs for a sample are these times the tokens it sees."""

    tokens: str  # what it runs on: "patches{i}", "tower{i}" (tower i's patches and tokens), "image" (projector
    # input), "sequence", "supervised"
    weights: float  # matmul weights (forward: 2 x weights per token)
    trained_weights: float  # the part whose weights train (their weight gradients cost as much)
    attention_width: int  # 0: no attention in the unit
    trains: bool  # any of its parameters (norms and biases too)
    recomputed_weights: float  # weights whose forward runs again under activation checkpointing
    recomputes_attention: bool
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
    module: nn.Module,
    tokens: str,
    attention_width: int = 0,
    recomputed: str = "none",
    pixels_in: bool = False,
) -> _Unit:
    """`recomputed`: "none", "all" (the whole unit is checkpointed), or a submodule's name (selective
    checkpointing of a decoder layer's `self_attn` or `mlp`)."""
    weights = _matmul_weights(module)
    if recomputed in ("none", "all"):
        again = weights if recomputed == "all" else 0
    else:
        again = _matmul_weights(getattr(module, recomputed))
    return _Unit(
        tokens,
        float(weights),
        float(_matmul_weights(module, True)),
        attention_width,
        any(p.requires_grad for p in module.parameters()),
        float(again),
        attention_width > 0 and recomputed in ("all", "self_attn"),
        pixels_in,
    )


def _attention_width(config) -> int:
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


LM_RECOMPUTED = {False: "none", True: "all", "none": "none", "full": "all", "attention": "self_attn", "mlp": "mlp"}


def _tower_units(tower: VisionTower, checkpointed: bool) -> list[_Unit]:
    """The units of each tower that runs (a fused encoder's towers side by side), up to its feature layer;
    tower `i` runs on the token kinds `patches{i}` and `tower{i}`."""
    recomputed = "all" if checkpointed else "none"
    units: list[_Unit] = []
    for index, part in enumerate(tower.parts):
        try:
            blocks = list(part.blocks)
        except NotImplementedError:  # a tower that does not expose its layers: one dense unit, no attention
            units.append(_unit(part, f"tower{index}", recomputed=recomputed))
            continue
        patch_embeddings = [m for m in part.modules() if isinstance(m, nn.Conv2d)]
        units += [_unit(conv, f"patches{index}", pixels_in=True) for conv in patch_embeddings]
        used = part.absolute_layer(len(blocks)) + 1
        units += [_unit(block, f"tower{index}", part.hidden_size, recomputed) for block in blocks[:used]]
    return units


class FlopModel:
    """The model's units read once (after the training policy and checkpointing are set), so that a step's
    FLOPs are arithmetic over its samples, not a walk over every module per sample."""

    def __init__(self, model: MultimodalModel, checkpointing: dict[str, Any] | None = None) -> None:
        checkpointing = checkpointing or {}
        tower, lm = model.vision_tower, model.lm
        self.image_tokens = model.num_image_tokens
        parts = tower.parts
        self.tower_tokens = {f"tower{i}": part.grid**2 + part.num_prefix_tokens for i, part in enumerate(parts)}
        self.patches = {f"patches{i}": part.grid**2 for i, part in enumerate(parts)}
        self.projector_tokens = tower.num_tokens
        lm_recomputed = LM_RECOMPUTED[checkpointing.get("lm", False)]
        self.image_units = _tower_units(tower, bool(checkpointing.get("vision")))
        self.image_units.append(_unit(model.projector, "image"))
        width = _attention_width(lm.config)
        self.text_units = [_unit(layer, "sequence", width, lm_recomputed) for layer in lm.layers]
        self.text_units.append(_unit(lm.head, "supervised"))

    def sample(self, text_tokens: float, images: float, supervised: float, visual_tokens: float | None = None) -> Flops:
        """FLOPs to train on one sample with `text_tokens` text positions (image placeholders excluded),
        `images` encoder frames (a tiled image has several), `supervised` positions in the loss and
        `visual_tokens` positions of image features in the LM (one frame's tokens per frame by default)."""
        sequence = text_tokens + (images * self.image_tokens if visual_tokens is None else visual_tokens)
        tokens = {
            **{kind: images * count for kind, count in self.patches.items()},
            **{kind: images * count for kind, count in self.tower_tokens.items()},
            "image": images * self.projector_tokens,
            "sequence": sequence,
            "supervised": supervised,
        }
        sequences: dict[str, tuple[float, float]] = {kind: (images, count) for kind, count in self.tower_tokens.items()}
        sequences["sequence"] = (1.0, sequence)
        units = (self.image_units if images else []) + self.text_units
        useful = recompute = 0.0
        upstream_trains = False
        for unit in units:
            count = tokens[unit.tokens]
            dense, trained = 2.0 * unit.weights * count, 2.0 * unit.trained_weights * count
            attention = 0.0
            if unit.attention_width:
                copies, length = sequences[unit.tokens]
                attention = copies * 4.0 * unit.attention_width * length * length
            flows = unit.trains or (upstream_trains and not unit.pixels_in)  # a tower starts from pixels
            backward = trained
            if flows:
                backward += (0.0 if unit.pixels_in else dense) + 2.0 * attention
                recompute += 2.0 * unit.recomputed_weights * count + (attention if unit.recomputes_attention else 0.0)
            useful += dense + attention + backward
            upstream_trains = flows
        return Flops(useful, recompute)

    def batch(self, samples: Sequence[Sequence[float]]) -> Flops:
        """Sum over samples given as (text tokens, frames, supervised tokens[, visual tokens]): attention is
        quadratic in each sample's own length, never in the batch's total."""
        parts = [self.sample(*sizes) for sizes in samples]
        return Flops(sum(f.useful for f in parts), sum(f.recompute for f in parts))


def sample_flops(
    model: MultimodalModel,
    text_tokens: float,
    images: float,
    supervised: float,
    checkpointing: dict[str, Any] | None = None,
    visual_tokens: float | None = None,
) -> Flops:
    """One sample's FLOPs (see FlopModel.sample)."""
    return FlopModel(model, checkpointing).sample(text_tokens, images, supervised, visual_tokens)


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def peak_flops(device_name: str | None) -> float | None:
    """Datasheet dense bf16 peak of a GPU name, or None (CPU, unknown card)."""
    if not device_name:
        return None
    return next((value for key, value in PEAK_BF16.items() if key in device_name), None)
