"""Vectorized splicing against the original's per-sample loop."""

from __future__ import annotations

import pytest
import torch

from mipha_lab.constants import IGNORE_INDEX
from mipha_lab.constants import IMAGE_TOKEN_INDEX as IMG
from mipha_lab.errors import InputError
from mipha_lab.model.splice import count_targets, splice, splice_reference


def random_batch(images_per_row: list[int], seed: int = 0, tokens_per_image: int = 5, dim: int = 4):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for count in images_per_row:
        length = int(torch.randint(2, 9, (1,), generator=gen))
        ids = torch.randint(1, 50, (length + count,), generator=gen)
        places = torch.randperm(length + count, generator=gen)[:count]
        ids[places] = IMG
        rows.append(ids)
    width = max(len(r) for r in rows) + 2
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)], mask[b, : len(row)] = row, 1
    labels = torch.where(input_ids == IMG, IGNORE_INDEX, input_ids * 10)
    embeds = torch.randn(len(rows), width, dim, generator=gen)
    feats = torch.randn(sum(images_per_row), tokens_per_image, dim, generator=gen) if sum(images_per_row) else None
    return input_ids, mask, embeds, feats, labels


@pytest.mark.parametrize("counts", [[1, 1, 1], [0, 2, 1, 3], [0, 0], [2], [1, 0, 0, 4]])
@pytest.mark.parametrize("max_length", [None, 12])
def test_vectorized_splice_equals_per_sample_loop(counts, max_length):
    input_ids, mask, embeds, feats, labels = random_batch(counts, seed=sum(counts))
    got = splice(input_ids, mask, embeds, feats, labels, max_length=max_length)
    want = splice_reference(input_ids, mask, embeds, feats, labels, max_length=max_length)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert torch.equal(got.inputs_embeds, want.inputs_embeds)
    assert torch.equal(got.labels, want.labels)
    assert torch.equal(got.truncated, want.truncated)
    assert torch.equal(got.position_ids[got.attention_mask == 1], want.position_ids[want.attention_mask == 1])


def test_left_padding_puts_the_same_rows_at_the_end():
    input_ids, mask, embeds, feats, labels = random_batch([1, 0, 2], seed=3)
    right = splice(input_ids, mask, embeds, feats, labels)
    left = splice(input_ids, mask, embeds, feats, labels, padding_side="left")
    for b in range(3):
        n = int(right.lengths[b])
        assert torch.equal(left.inputs_embeds[b, -n:], right.inputs_embeds[b, :n])
        assert torch.equal(left.position_ids[b, -n:], torch.arange(n))
        assert left.attention_mask[b, : left.attention_mask.shape[1] - n].sum() == 0


def test_input_padding_side_does_not_matter():
    """The mask says which tokens are real; left-padded inputs splice like right-padded ones."""
    input_ids, mask, embeds, feats, labels = random_batch([1, 2], seed=5)
    shifted = [torch.roll(t, shifts=2, dims=1) for t in (input_ids, mask, embeds, labels)]
    a = splice(input_ids, mask, embeds, feats, labels)
    b = splice(shifted[0], shifted[1], shifted[2], feats, shifted[3])
    assert torch.equal(a.inputs_embeds, b.inputs_embeds) and torch.equal(a.labels, b.labels)


def test_images_get_ignored_labels_and_truncation_is_counted():
    input_ids, mask, embeds, feats, labels = random_batch([2, 0], seed=7)
    full = splice(input_ids, mask, embeds, feats, labels)
    assert (full.labels == IGNORE_INDEX).sum() >= 2 * 5
    cut = splice(input_ids, mask, embeds, feats, labels, max_length=6)
    assert cut.inputs_embeds.shape[1] == 6
    assert cut.truncated.tolist() == (full.lengths - 6).clamp(min=0).tolist()


def test_image_count_mismatch_is_an_error():
    input_ids, mask, embeds, feats, labels = random_batch([1, 2], seed=1)
    with pytest.raises(InputError, match=r"3 image placeholder\(s\) \(per row: \[1, 2\]\) but 2 image\(s\)"):
        splice(input_ids, mask, embeds, feats[:2], labels)


def test_left_padded_prompt_longer_than_the_model_is_refused():
    input_ids, mask, embeds, feats, _ = random_batch([1], seed=2)
    with pytest.raises(InputError, match="exceeds the model's 3 positions"):
        splice(input_ids, mask, embeds, feats, padding_side="left", max_length=3)


@pytest.mark.parametrize("max_length", [None, 7])
def test_packed_row_truncates_each_sample_alone(max_length):
    """A packed row is its samples spliced one by one, each cut to `max_length` on its own; the loss
    count known before the forward pass agrees."""
    input_ids, mask, embeds, feats, labels = random_batch([1, 0, 2, 1], seed=11)
    real = mask.bool()
    ids, labs, row_embeds = input_ids[real][None], labels[real][None], embeds[real][None]
    segments = torch.arange(4)[:, None].expand_as(mask)[real][None]
    got = splice(ids, torch.ones_like(ids), row_embeds, feats, labs, max_length=max_length, segment_ids=segments)
    alone = splice(input_ids, mask, embeds, feats, labels, max_length=max_length)
    n = alone.lengths.tolist()
    assert max_length is None or alone.truncated.sum() > 0
    for field in ("inputs_embeds", "labels", "position_ids"):
        want = torch.cat([getattr(alone, field)[b, : n[b]] for b in range(4)])
        assert torch.equal(getattr(got, field)[0], want), field
    assert int(got.truncated) == int(alone.truncated.sum())
    expected = count_targets(ids, torch.ones_like(ids), labs, 5, max_length, segment_ids=segments)
    assert int(expected) == int((got.labels[:, 1:] != IGNORE_INDEX).sum())


def variable_features(count: int, seed: int, dim: int = 4) -> list[torch.Tensor]:
    """Images with different token counts, as tiling gives them (1 to 9 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(1, 10, (1,), generator=gen)), dim, generator=gen) for _ in range(count)]


@pytest.mark.parametrize("counts", [[1, 1, 1], [0, 2, 1, 3], [2], [1, 0, 0, 4]])
@pytest.mark.parametrize("max_length", [None, 9])
def test_images_with_different_token_counts_splice_as_the_per_sample_loop(counts, max_length):
    input_ids, mask, embeds, _, labels = random_batch(counts, seed=sum(counts))
    feats = variable_features(sum(counts), seed=len(counts))
    got = splice(input_ids, mask, embeds, feats, labels, max_length=max_length)
    want = splice_reference(input_ids, mask, embeds, feats, labels, max_length=max_length)
    for field in ("attention_mask", "inputs_embeds", "labels", "truncated"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    real = got.attention_mask == 1
    assert torch.equal(got.position_ids[real], want.position_ids[want.attention_mask == 1])
    tokens = torch.tensor([f.shape[0] for f in feats])
    expected = count_targets(input_ids, mask, labels, tokens, max_length)
    assert int(expected) == int((got.labels[:, 1:] != IGNORE_INDEX).sum())


def test_packed_row_of_images_with_different_token_counts():
    input_ids, mask, embeds, _, labels = random_batch([1, 0, 2, 1], seed=13)
    feats = variable_features(4, seed=5)
    real = mask.bool()
    ids, labs, row_embeds = input_ids[real][None], labels[real][None], embeds[real][None]
    segments = torch.arange(4)[:, None].expand_as(mask)[real][None]
    got = splice(ids, torch.ones_like(ids), row_embeds, feats, labs, max_length=8, segment_ids=segments)
    alone = splice(input_ids, mask, embeds, feats, labels, max_length=8)
    n = alone.lengths.tolist()
    for field in ("inputs_embeds", "labels", "position_ids"):
        want = torch.cat([getattr(alone, field)[b, : n[b]] for b in range(4)])
        assert torch.equal(getattr(got, field)[0], want), field
