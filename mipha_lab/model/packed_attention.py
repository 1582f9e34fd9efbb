"""SDPA that keeps packed rows' attention within each sample, without an (L, L) mask.

A packed row holds several samples; a block-causal mask over the whole row makes SDPA compute every
score of the row (an 8192-position row of 9 samples does ~9x the attention work of its samples).
`sdpa_packed` is transformers' SDPA everywhere (same masks, same kernels) except when the forward pass
is given `packed_segments`: then attention runs per sample - through PyTorch's variable-length flash
kernel (`torch.nn.attention.varlen`) on GPUs in half precision, else causal SDPA over each sample's
span. The segments are a keyword argument, not state, so activation checkpointing recomputes exactly
the same attention.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed"


@dataclass
class PackedSegments:
    """Per row, the (start, end) of each packed sample; padding (-1) belongs to none. The flat token
    index and cumulative lengths the varlen kernel takes are built once per forward pass, not per layer."""

    spans: list[list[tuple[int, int]]]
    width: int  # positions per row
    _flat: dict[torch.device, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_ids(cls, segment_ids: torch.Tensor) -> PackedSegments:
        changed = torch.ones_like(segment_ids, dtype=torch.bool)
        changed[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        spans = []
        for row_ids, row_changed in zip(segment_ids.tolist(), changed.tolist(), strict=True):
            starts = [i for i, c in enumerate(row_changed) if c] + [len(row_ids)]
            spans.append([(s, e) for s, e in itertools.pairwise(starts) if row_ids[s] >= 0])
        return cls(spans, segment_ids.shape[1])

    def flat(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Indices of the samples' tokens in the flattened (rows x width) positions, cumulative sample
        lengths (int32) and the longest sample."""
        if device not in self._flat:
            index = [
                i
                for b, spans in enumerate(self.spans)
                for s, e in spans
                for i in range(b * self.width + s, b * self.width + e)
            ]
            lengths = [e - s for spans in self.spans for s, e in spans]
            cumulative = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self._flat[device] = (torch.tensor(index, device=device), cumulative.to(device), max(lengths, default=0))
        return self._flat[device]


def _varlen_kernel() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return cast(Callable[..., torch.Tensor], varlen_attn)  # its signature, as a plain callable


VARLEN = _varlen_kernel()
VARLEN_PARAMETERS = set(inspect.signature(VARLEN).parameters) if VARLEN is not None else set()


def _varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: PackedSegments, scaling: float | None
) -> torch.Tensor:
    """All packed samples in one call of the flash varlen kernel; (B, H, L, D) in, (B, L, H, D) out."""
    assert VARLEN is not None
    batch, heads, width, dim = query.shape
    index, cumulative, longest = segments.flat(query.device)
    q, k, v = (
        t.transpose(1, 2).reshape(batch * width, t.shape[1], dim).index_select(0, index) for t in (query, key, value)
    )
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in VARLEN_PARAMETERS else {"is_causal": True}
    if k.shape[1] != heads:
        if "enable_gqa" in VARLEN_PARAMETERS:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    if scaling is not None:
        if "scale" in VARLEN_PARAMETERS:
            options["scale"] = scaling
        else:
            q = q * (scaling * dim**0.5)  # the kernel scales by 1 / sqrt(dim)
    out = VARLEN(q, k, v, cumulative, cumulative, longest, longest, **options)
    flat = out.new_zeros(batch * width, heads, dim).index_copy(0, index, out)
    return flat.view(batch, width, heads, dim)


def _looped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: PackedSegments,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Causal SDPA over each sample's span (CPU, fp32, or a torch without the varlen kernel)."""
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, spans in enumerate(segments.spans):
        parts, end = [], 0
        for start, end in spans:
            parts.append(
                F.scaled_dot_product_attention(
                    query[b : b + 1, :, start:end],
                    key[b : b + 1, :, start:end],
                    value[b : b + 1, :, start:end],
                    dropout_p=dropout,
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=gqa,
                )
            )
        if end < segments.width:  # padding after the last sample: zeros
            parts.append(query.new_zeros(1, query.shape[1], segments.width - end, query.shape[3]))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous()


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: PackedSegments | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D); padding positions give zeros."""
    if packed_segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    dropout = dropout if module.training else 0.0
    half = query.dtype in (torch.float16, torch.bfloat16)
    if VARLEN is not None and query.is_cuda and half and dropout == 0.0:
        return _varlen_attention(query, key, value, packed_segments, scaling), None
    return _looped_attention(query, key, value, packed_segments, scaling, dropout), None


def without_cudnn_attention() -> contextlib.AbstractContextManager:
    """SDPA without its cuDNN backend, for generation. cuDNN builds an execution graph for every new
    sequence length, and each decoding step is one: on an H200 a batched generation of 32 tokens took
    5.09 s the first time and 0.91 s repeated with the same shapes, and batch 16 over batch 1 went from
    3.45x to 13.2x with cuDNN off (bench/NOTES.md). Training keeps cuDNN (checkpointed blocks recompute
    outside any context manager, and its measured effect there was mixed)."""

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
