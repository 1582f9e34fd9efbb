"""Per-sample attention in packed rows: the spans, and the GPU's varlen kernel against the SDPA loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mipha_lab.model.packed_attention import VARLEN, PackedSegments, _looped_attention, _varlen_attention


def test_spans_skip_padding_and_flatten_per_row():
    ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 2, 2]])
    segments = PackedSegments.from_ids(ids)
    assert segments.spans == [[(0, 3), (3, 5)], [(0, 1), (1, 4), (4, 6)]]
    index, cumulative, longest = segments.flat(torch.device("cpu"))
    assert index.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert cumulative.tolist() == [0, 3, 5, 6, 9, 11] and longest == 3


def _qkv(kv_heads: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    shape = lambda heads: (2, heads, 40, 16)  # noqa: E731
    return [torch.randn(shape(h), generator=gen).to(device, dtype).requires_grad_() for h in (4, kv_heads, kv_heads)]


def test_the_loop_equals_each_sample_alone():
    q, k, v = _qkv(2, torch.float32, "cpu")
    segments = PackedSegments.from_ids(torch.tensor([[0] * 15 + [1] * 25, [0] * 30 + [-1] * 10]))
    out = _looped_attention(q, k, v, segments, None, 0.0)
    alone = F.scaled_dot_product_attention(q[:1, :, 15:], k[:1, :, 15:], v[:1, :, 15:], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out[0, 15:], alone[0].transpose(0, 1))
    assert out[1, 30:].abs().max() == 0


@pytest.mark.skipif(not torch.cuda.is_available() or VARLEN is None, reason="needs a GPU and torch.nn.attention.varlen")
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_kernel_equals_the_loop_forward_and_backward(kv_heads):
    ids = torch.tensor([[0] * 12 + [1] * 20 + [2] * 8, [0] * 33 + [-1] * 7])
    segments = PackedSegments.from_ids(ids)
    results = []
    for attention in (_varlen_attention, _looped_attention):
        q, k, v = _qkv(kv_heads, torch.bfloat16, "cuda")
        extra = () if attention is _varlen_attention else (0.0,)
        out = attention(q, k, v, segments, 0.25, *extra)
        out.float().square().sum().backward()
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
