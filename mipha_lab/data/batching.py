"""Batching: which samples form each micro-batch (padded, modality-grouped or packed), and collators.

An epoch plan is a list of micro-batches (lists of sample indices) in global order; micro-batch i
goes to rank i % world_size. Plans depend on the seed and epoch only (and, for grouping, on the
world size, as in the original), never on worker timing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import torch

from mipha_lab.constants import IGNORE_INDEX
from mipha_lab.data.problems import Skipped
from mipha_lab.errors import ConfigError

Batching = Literal["padded", "modality-grouped", "packed"]


def _rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def plan_padded(num_samples: int, micro_batch: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(num_samples))
    _rng(seed, epoch).shuffle(order)
    return [order[i : i + micro_batch] for i in range(0, num_samples, micro_batch)]


def _even_chunks(indices: list[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Split longest-first into `parts` chunks of equal count with balanced total length (the original's
    `split_to_even_chunks`)."""
    per_part = len(indices) // parts if len(indices) % parts == 0 else None
    chunks: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for index in sorted(indices, key=lambda i: -abs(lengths[i])):
        open_parts = [p for p in range(parts) if per_part is None or len(chunks[p]) < per_part]
        target = min(open_parts, key=lambda p: totals[p])
        chunks[target].append(index)
        totals[target] += abs(lengths[index])
    return chunks


def plan_modality_grouped(
    lengths: Sequence[int], micro_batch: int, world_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """LLaVA's `group_by_modality_length`: every global micro-step (world_size micro-batches) is all-image
    or all-text; within it, samples of similar length are grouped and balanced across ranks. `lengths`
    are positive for image samples and negative for text-only ones."""
    rng = _rng(seed, epoch)
    mega = micro_batch * world_size
    megabatches: list[list[int]] = []
    leftovers: list[int] = []
    for modality in (lambda n: n > 0, lambda n: n <= 0):
        indices = [i for i, n in enumerate(lengths) if modality(n)]
        rng.shuffle(indices)
        groups = [sorted(indices[i : i + mega], key=lambda j: -abs(lengths[j])) for i in range(0, len(indices), mega)]
        if groups and len(groups[-1]) < mega:
            leftovers += groups.pop()
        megabatches += groups
    rng.shuffle(megabatches)
    if leftovers:
        megabatches.append(leftovers)
    plan: list[list[int]] = []
    for group in megabatches:
        plan += [chunk for chunk in _even_chunks(group, lengths, world_size) if chunk]
    return plan


def plan_packed(
    token_lengths: Sequence[int],
    budget: int,
    seed: int,
    epoch: int,
    image_counts: Sequence[int] | None = None,
    max_images: int | None = None,
) -> list[list[int]]:
    """Shuffle, then first-fit-decreasing within windows: each micro-batch is one row of at most
    `budget` tokens (sequence lengths after splicing) and, given `max_images`, at most that many images
    (a sample with more images than the cap gets a row of its own)."""
    order = list(range(len(token_lengths)))
    _rng(seed, epoch).shuffle(order)
    images = image_counts if max_images is not None and image_counts is not None else [0] * len(order)
    image_room = max_images if max_images is not None else 0
    rows: list[list[int]] = []
    window = 512
    for start in range(0, len(order), window):
        bins: list[list[int]] = []
        space: list[tuple[int, int]] = []  # (tokens, images) still free per row
        for index in sorted(order[start : start + window], key=lambda i: -token_lengths[i]):
            size, count = min(token_lengths[index], budget), images[index]
            slot = next((b for b, (free, room) in enumerate(space) if free >= size and room >= count), None)
            if slot is None:
                bins.append([index])
                space.append((budget - size, image_room - count))
            else:
                bins[slot].append(index)
                space[slot] = (space[slot][0] - size, space[slot][1] - count)
        rows += bins
    _rng(seed, epoch + 7919).shuffle(rows)
    return rows


def plan_epoch(
    batching: Batching,
    dataset: Any,
    *,
    micro_batch: int,
    world_size: int,
    seed: int,
    epoch: int,
    max_length: int,
    max_images_per_row: int | None = None,
) -> list[list[int]]:
    """The epoch's micro-batches for the batching mode an experiment selects. A packed row holds up to
    micro_batch x max_length positions (and `max_images_per_row` images)."""
    if getattr(dataset, "streamed", False):  # the stream is shuffled already: its order, in batches
        if batching != "padded":
            raise ConfigError(
                f"a streamed mixture is batched `padded` (its lengths are not known ahead), not {batching}"
            )
        return [list(range(i, min(i + micro_batch, len(dataset)))) for i in range(0, len(dataset), micro_batch)]
    if batching == "padded":
        return plan_padded(len(dataset), micro_batch, seed, epoch)
    if batching == "modality-grouped":
        return plan_modality_grouped(dataset.lengths, micro_batch, world_size, seed, epoch)
    if batching == "packed":
        counts = [len(record.images) for record in dataset.records]
        return plan_packed(dataset.token_lengths(), micro_batch * max_length, seed, epoch, counts, max_images_per_row)
    raise ValueError(f"unknown batching {batching!r} (allowed: padded, modality-grouped, packed)")


def collator(batching: Batching):
    return collate_packed if batching == "packed" else collate_padded


class RankBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of an epoch plan (so every rank runs the same number of steps),
    from its `start`-th one (a resumed run continues mid-epoch)."""

    def __init__(self, plan: list[list[int]], rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        usable = len(plan) - len(plan) % world_size
        self.start = start
        self.batches = plan[rank:usable:world_size][start:]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _split_skipped(items: Sequence[dict | Skipped]) -> tuple[list[dict], list[Skipped]]:
    good = [item for item in items if not isinstance(item, Skipped)]
    return good, [item for item in items if isinstance(item, Skipped)]


def sample_item(
    sample_id: str,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_tokens: Sequence[int] = (),
    image_frames: Sequence[int] | None = None,
    image_sizes: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    """One sample as the collators take it: its tokens (IMAGE_TOKEN_INDEX at each <image> placeholder), its
    images' frames, and per placeholder the visual tokens it becomes, its encoder frames (1 each by default)
    and its image's (height, width) (tiled models)."""
    frames = [1] * len(image_tokens) if image_frames is None else list(image_frames)
    return {
        "id": sample_id,
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor(list(image_sizes), dtype=torch.long).reshape(-1, 2),
        "image_tokens": torch.tensor(list(image_tokens), dtype=torch.long),
        "image_frames": torch.tensor(frames, dtype=torch.long),
        "length": len(input_ids) + sum(image_tokens) - len(image_tokens),
    }


def _images(good: list[dict]) -> dict[str, Any]:
    """The batch's frames in order, the <image> placeholders per sample, and at each placeholder its visual
    tokens, its encoder frames and (tiled models) its image's (height, width)."""
    pixels = [item["pixel_values"] for item in good if item["pixel_values"] is not None]
    empty = torch.zeros(0, dtype=torch.long)
    return {
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_counts": torch.tensor([len(item["image_tokens"]) for item in good], dtype=torch.long),
        "image_tokens": torch.cat([item["image_tokens"] for item in good]) if good else empty,
        "image_frames": torch.cat([item["image_frames"] for item in good]) if good else empty,
        "image_sizes": torch.cat([item["image_sizes"] for item in good]) if good else empty.reshape(0, 2),
    }


def collate_padded(items: Sequence[dict | Skipped]) -> dict[str, Any]:
    """Right-padded rows; the attention mask comes from the sequence lengths, never from pad ids."""
    good, skipped = _split_skipped(items)
    width = max((len(item["input_ids"]) for item in good), default=0)
    input_ids = torch.zeros(len(good), width, dtype=torch.long)
    labels = torch.full((len(good), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(good), width, dtype=torch.long)
    for row, item in enumerate(good):
        n = len(item["input_ids"])
        input_ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        **_images(good),
        "ids": [item["id"] for item in good],
        "skipped": skipped,
        "segment_ids": None,
    }


def collate_packed(items: Sequence[dict | Skipped]) -> dict[str, Any]:
    """All samples of the micro-batch in one row; `segment_ids` keep them apart in attention."""
    good, skipped = _split_skipped(items)
    images = _images(good)

    def cat(key: str) -> torch.Tensor:
        return torch.cat([item[key] for item in good]).unsqueeze(0) if good else torch.zeros(1, 0, dtype=torch.long)

    segments = (
        torch.cat([torch.full((len(item["input_ids"]),), i) for i, item in enumerate(good)]) if good else torch.zeros(0)
    )
    input_ids, labels = cat("input_ids"), cat("labels")
    starts = torch.tensor([0] + [len(item["input_ids"]) for item in good[:-1]]).cumsum(0) if good else None
    if starts is not None:
        labels[0, starts] = IGNORE_INDEX  # a sample's first token is never predicted from the previous sample
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        **images,
        "image_counts": images["image_counts"].sum().reshape(1),
        "ids": [item["id"] for item in good],
        "skipped": skipped,
        "segment_ids": segments.long().unsqueeze(0),
    }


def real_token_fraction(plan: list[list[int]], token_lengths: Sequence[int], row_width: int | None = None) -> float:
    """Real tokens over computed positions: padded rows cost width x rows, packed rows their budget."""
    real = sum(token_lengths[i] for batch in plan for i in batch)
    if row_width is not None:
        computed = row_width * len(plan)
    else:
        computed = sum(len(batch) * max(token_lengths[i] for i in batch) for batch in plan)
    return real / computed if computed else 1.0
