"""The head and cross-entropy over the supervised positions, summed: plainly, in chunks, or fused by Liger.

Plain: the supervised positions' logits in fp32 at once (N x vocabulary). Chunked: the same math over
`CHUNK_ROWS` positions at a time, each chunk's logits recomputed in backward instead of kept, so at most
one chunk's logits exist (one extra head matmul over the supervised positions). Liger: Liger-Kernel's
fused linear + cross-entropy (Triton, CUDA), which never materialises the logits either.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mipha_lab.errors import ConfigError

FusedLoss = Literal["off", "chunked", "liger"]
CHUNK_ROWS = 1024  # positions per chunk: 1024 x 51,200 fp32 logits are 200 MiB


def _plain(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    if weights is None:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights).sum()


def _chunked(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, rows: int, weights: torch.Tensor | None
) -> torch.Tensor:
    run = functools.partial(checkpoint, _plain, use_reentrant=False) if torch.is_grad_enabled() else _plain
    total = hidden.new_zeros((), dtype=torch.float32)
    parts = weights.split(rows) if weights is not None else [None] * len(targets.split(rows))
    for part, part_targets, part_weights in zip(hidden.split(rows), targets.split(rows), parts, strict=True):
        total = total + run(head, part, part_targets, part_weights)
    return total


def _liger(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise ConfigError(
            "speed.fused_loss: liger needs Liger-Kernel (pip install liger-kernel) and a CUDA GPU; "
            "use 'chunked' elsewhere"
        ) from None
    if not hidden.is_cuda or not isinstance(head, nn.Linear):
        raise ConfigError("speed.fused_loss: liger runs on CUDA with a plain linear head; use 'chunked' here")
    weight = head.weight
    if torch.is_autocast_enabled("cuda"):  # Liger's kernel takes operands of one dtype
        dtype = torch.get_autocast_dtype("cuda")
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = head.bias.to(weight.dtype) if head.bias is not None else None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
    return (loss[0] if isinstance(loss, tuple) else loss).float()


def supervised_loss_sum(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    kind: FusedLoss = "off",
    rows: int = CHUNK_ROWS,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over positions of the cross-entropy of `head(hidden)` (N x width) against `targets` (N), each
    position's term times its weight when `weights` (N) are given (the sample / square loss reductions)."""
    if kind == "chunked":
        return _chunked(head, hidden, targets, rows, weights)
    if kind == "liger":
        if weights is not None:
            raise ConfigError(
                "speed.fused_loss: liger sums token losses unweighted; loss_reduction sample / square needs "
                "fused_loss: chunked or off"
            )
        return _liger(head, hidden, targets)
    return _plain(head, hidden, targets, weights)
