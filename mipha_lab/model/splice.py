"""Vectorized splicing of image features into token embeddings.

Input rows hold text token ids and one IMAGE_TOKEN_INDEX per image; `attention_mask` marks the real
tokens (any padding side). Each image placeholder becomes the image's feature tokens. The output
rows are compact (real tokens first for right padding, last for left padding), truncated to
`max_length` *after* splicing (per row, or per sample in packed rows), with the truncation counted per
row. No Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.errors import InputError


@dataclass
class Spliced:
    """The LM's inputs after images are spliced in: embeddings, labels, mask, positions, truncation."""

    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) long
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L), IGNORE_INDEX at images and padding
    truncated: torch.Tensor  # (B,) tokens dropped per row
    segment_ids: torch.Tensor | None = None  # (B, L) packed sample index per position, -1 at padding

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


def sample_starts(values: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """For each token, `values` (non-decreasing along the row) at the first token of its packed sample."""
    changed = torch.ones_like(segment_ids, dtype=torch.bool)
    changed[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.where(changed, values, 0).cummax(dim=1).values


def spliced_positions(
    is_image: torch.Tensor,
    valid: torch.Tensor,
    tokens_per_image: int | torch.Tensor,
    max_length: int | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each input token starts once every image placeholder becomes its image's positions (an int for
    all, or one count per placeholder in row-major order: tiled images differ), padding none; how many of
    its positions are kept, and each row's untruncated length.

    Truncation to `max_length` applies to each row, or with `segment_ids` (packed rows) to each sample,
    so that one long sample never cuts the samples packed after it."""
    width = torch.ones_like(is_image, dtype=torch.long)
    width[is_image] = torch.as_tensor(tokens_per_image, device=width.device)
    width = width * valid
    full_start = width.cumsum(1) - width
    lengths = width.sum(1)
    if max_length is None:
        kept_width = width
    else:
        if segment_ids is not None:
            room = max_length - (full_start - sample_starts(full_start, segment_ids))
        else:
            room = max_length - full_start
        kept_width = torch.minimum(width, room.clamp(min=0))
    return kept_width.cumsum(1) - kept_width, kept_width, lengths


def check_image_counts(
    is_image: torch.Tensor,
    num_images: int,
    image_counts: torch.Tensor | Sequence[int] | None = None,
    sample_ids: Sequence[str] | None = None,
) -> None:
    """Placeholders must match the images given: per sample when `image_counts` is known."""
    placeholders = is_image.sum(1)
    if image_counts is not None:
        expected = torch.as_tensor(image_counts, device=placeholders.device)
        bad = (expected != placeholders).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            who = f"sample {sample_ids[row]!r}" if sample_ids else f"sample at batch row {row}"
            raise InputError(
                f"{who} has {int(placeholders[row])} image placeholder(s) but {int(expected[row])} image(s)"
                + (f" ({len(bad)} such rows: {bad[:10]})" if len(bad) > 1 else "")
            )
    if int(placeholders.sum()) != num_images:
        raise InputError(
            f"the batch has {int(placeholders.sum())} image placeholder(s) (per row: {placeholders.tolist()}) "
            f"but {num_images} image(s) were given"
        )


def splice(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    image_features: torch.Tensor | Sequence[torch.Tensor] | None,
    labels: torch.Tensor | None = None,
    *,
    padding_side: Literal["right", "left"] = "right",
    max_length: int | None = None,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    segment_ids: torch.Tensor | None = None,
) -> Spliced:
    """Build the LM's input embeddings; `image_features` in row-major order: (num_images, T, D), or one
    (T_i, D) tensor per image when images have different token counts (tiling).

    With `segment_ids` (packed rows: the index of the sample each token belongs to), image tokens take
    their placeholder's segment and position ids restart at 0 for every sample."""
    batch, _ = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool()
    is_image = (input_ids == image_token_index) & valid
    num_images = 0 if image_features is None else len(image_features)
    check_image_counts(is_image, num_images)
    counts = image_token_counts(image_features, device)
    flat = None
    if isinstance(image_features, torch.Tensor) and num_images:
        flat = image_features.flatten(0, 1)
    elif image_features is not None and num_images:
        flat = torch.cat(list(image_features))

    start, kept_width, lengths = spliced_positions(is_image, valid, counts, max_length, segment_ids)
    kept = kept_width.sum(1)
    if padding_side == "left" and bool((kept < lengths).any()):
        raise InputError(f"prompt of {int(lengths.max())} positions exceeds the model's {max_length} positions")
    length = int(kept.max()) if batch else 0
    offset = (length - kept) if padding_side == "left" else torch.zeros_like(kept)

    out = text_embeds.new_zeros(batch, length, text_embeds.shape[-1])
    out_labels = (
        None if labels is None else torch.full((batch, length), IGNORE_INDEX, dtype=labels.dtype, device=device)
    )

    rows, cols = (valid & ~is_image & (kept_width > 0)).nonzero(as_tuple=True)
    pos = start[rows, cols] + offset[rows]
    out = out.index_put((rows, pos), text_embeds[rows, cols])
    if out_labels is not None and labels is not None:
        out_labels[rows, pos] = labels[rows, cols]
    out_segments = None if segment_ids is None else torch.full((batch, length), -1, dtype=torch.long, device=device)
    if out_segments is not None and segment_ids is not None:
        out_segments[rows, pos] = segment_ids[rows, cols]

    if flat is not None:
        img_rows, img_cols = is_image.nonzero(as_tuple=True)
        image = torch.repeat_interleave(torch.arange(num_images, device=device), counts)  # per feature token
        inside = torch.arange(flat.shape[0], device=device) - (counts.cumsum(0) - counts)[image]
        rows_of, cols_of = img_rows[image], img_cols[image]
        keep = inside < kept_width[rows_of, cols_of]
        img_pos = start[rows_of, cols_of] + offset[rows_of] + inside
        out = out.index_put((rows_of[keep], img_pos[keep]), flat.to(out.dtype)[keep])
        if out_segments is not None and segment_ids is not None:
            out_segments[rows_of[keep], img_pos[keep]] = segment_ids[rows_of, cols_of][keep]

    arange = torch.arange(length, device=device)[None, :]
    mask = ((arange >= offset[:, None]) & (arange < (offset + kept)[:, None])).long()
    position_ids = (arange - offset[:, None]).clamp(min=0).masked_fill(mask == 0, 1)
    if out_segments is not None:
        position_ids = (arange - sample_starts(arange.expand_as(out_segments), out_segments)).masked_fill(mask == 0, 1)
    return Spliced(out, mask, position_ids, out_labels, lengths - kept, out_segments)


def image_token_counts(
    image_features: torch.Tensor | Sequence[torch.Tensor] | None, device: torch.device
) -> torch.Tensor:
    """Tokens of each image, in order."""
    if image_features is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    if isinstance(image_features, torch.Tensor):
        return torch.full((image_features.shape[0],), image_features.shape[1], dtype=torch.long, device=device)
    return torch.tensor([f.shape[0] for f in image_features], dtype=torch.long, device=device)


LossReduction = Literal["token", "sample", "square"]


def target_weights(
    supervised: torch.Tensor, segment_ids: torch.Tensor | None, reduction: LossReduction
) -> torch.Tensor:
    """Each supervised position's weight in the loss (0 elsewhere), with n the supervised positions of its
    sample (its row, or its segment of a packed row): 1 (`token`), 1/n (`sample`), 1/sqrt(n) (`square`).
    The loss is sum(weight x token loss) / sum(weight) over the global batch."""
    weights = supervised.float()
    if reduction == "token":
        return weights
    rows = torch.arange(supervised.shape[0], device=supervised.device)[:, None].expand_as(supervised)
    sample = rows if segment_ids is None else rows * (int(segment_ids.max()) + 2) + segment_ids + 1
    counts = torch.zeros(int(sample.max()) + 1, device=supervised.device).index_add_(
        0, sample[supervised], weights[supervised]
    )
    n = counts[sample].clamp(min=1.0)
    return weights / (n if reduction == "sample" else n.sqrt())


def count_targets(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    tokens_per_image: int | torch.Tensor,
    max_length: int | None = None,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    segment_ids: torch.Tensor | None = None,
    reduction: LossReduction = "token",
) -> torch.Tensor:
    """The loss's denominator once images are spliced in and the row (or each packed sample) is truncated:
    the supervised positions (`token`), the samples with any (`sample`), the sum of their square roots
    (`square`) - known before any forward pass, so a global batch can be normalised exactly."""
    valid = attention_mask.bool()
    is_image = (input_ids == image_token_index) & valid
    start, kept_width, _ = spliced_positions(is_image, valid, tokens_per_image, max_length, segment_ids)
    supervised = (labels != IGNORE_INDEX) & valid & ~is_image & (kept_width > 0) & (start >= 1)
    return target_weights(supervised, segment_ids, reduction).sum()


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean mask: causal attention within each packed sample, none across samples.
    Padding positions (-1) attend only to themselves so that no softmax row is empty."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids >= 0)[:, :, None]
    eye = torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return ((same & causal & real) | eye)[:, None]


def splice_reference(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    image_features: torch.Tensor | Sequence[torch.Tensor] | None,
    labels: torch.Tensor | None = None,
    *,
    max_length: int | None = None,
    image_token_index: int = IMAGE_TOKEN_INDEX,
) -> Spliced:
    """The original's way, one sample at a time in Python (right padding); kept as the test oracle
    and the baseline of the splice benchmark."""
    rows_embeds, rows_labels, full = [], [], []
    image_iter: Iterator[torch.Tensor] = iter(image_features if image_features is not None else [])
    for b in range(input_ids.shape[0]):
        real = attention_mask[b].bool()
        ids, embeds = input_ids[b][real], text_embeds[b][real]
        labs = labels[b][real] if labels is not None else torch.zeros_like(ids)
        parts, part_labels = [], []
        for i, token in enumerate(ids.tolist()):
            if token == image_token_index:
                feats = next(image_iter)
                parts.append(feats.to(text_embeds.dtype))
                part_labels.append(torch.full((feats.shape[0],), IGNORE_INDEX, dtype=labs.dtype))
            else:
                parts.append(embeds[i : i + 1])
                part_labels.append(labs[i : i + 1])
        row, lab = torch.cat(parts), torch.cat(part_labels)
        full.append(row.shape[0])
        rows_embeds.append(row[:max_length])
        rows_labels.append(lab[:max_length])
    length = max(r.shape[0] for r in rows_embeds)
    out = text_embeds.new_zeros(len(rows_embeds), length, text_embeds.shape[-1])
    out_labels = torch.full((len(rows_embeds), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows_embeds), length, dtype=torch.long)
    for b, (row, lab) in enumerate(zip(rows_embeds, rows_labels, strict=True)):
        out[b, : row.shape[0]] = row
        out_labels[b, : lab.shape[0]] = lab
        mask[b, : row.shape[0]] = 1
    position_ids = torch.arange(length)[None].expand(len(rows_embeds), -1).masked_fill(mask == 0, 1)
    truncated = torch.tensor(full) - mask.sum(1)
    return Spliced(out, mask, position_ids, out_labels if labels is not None else None, truncated)
