"""Splicing: forward+backward time of training micro-batches with our vectorized image splicing vs the
original's per-sample Python loop (LLaVA's `prepare_inputs_labels_for_multimodal`), measured in the
same run on the same tiny model (729 visual tokens) and the same micro-batches of 4 samples of one modality
with LLaVA-mix-like lengths (see bench/_common.py). Both splices are checked equal before anything is
timed. The splice alone (its forward+backward without the model) is timed too, at batch 4 and at
batch 32 (batched evaluation's size).

The baseline is written here as the original does it (per sample: drop padding, cut at each image,
concatenate, truncate, pad again), not `splice_reference`, which loops per token and would flatter us.
Prints `splice: <ratio>x (...)` and writes bench/results/splice.json.

    python bench/splice.py [--smoke] [--batches N] [--repeats R] [--out DIR]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import (
    MICRO_BATCH,
    TINY_729,
    llava_mix_shapes,
    parser,
    seconds,
    synthetic_items,
    tiny_vlm_729,
    train_pass,
)
from bench._results import report
from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.data.batching import collate_padded, plan_modality_grouped
from mipha_lab.model import MultimodalModel, vlm
from mipha_lab.model.splice import Spliced, splice

LARGE_BATCH = 32  # batched evaluation's size


def llava_splice(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_embeds: torch.Tensor,
    image_features: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    padding_side: str = "right",
    max_length: int | None = None,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    segment_ids: torch.Tensor | None = None,
) -> Spliced:
    """The original's splice, one sample at a time (same signature as ours, right padding only)."""
    assert padding_side == "right" and segment_ids is None, "the original splices right-padded rows only"
    given = labels if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)
    rows, row_labels, full = [], [], []
    image = 0
    for ids, embeds, labs, real in zip(input_ids, text_embeds, given, attention_mask.bool(), strict=True):
        ids, embeds, labs = ids[real], embeds[real], labs[real]
        cuts = [-1, *torch.where(ids == image_token_index)[0].tolist(), ids.shape[0]]
        pieces, piece_labels = [], []
        for i in range(len(cuts) - 1):
            pieces.append(embeds[cuts[i] + 1 : cuts[i + 1]])
            piece_labels.append(labs[cuts[i] + 1 : cuts[i + 1]])
            if i < len(cuts) - 2:
                assert image_features is not None
                features = image_features[image].to(embeds.dtype)
                image += 1
                pieces.append(features)
                piece_labels.append(torch.full((features.shape[0],), IGNORE_INDEX, dtype=labs.dtype))
        row, row_label = torch.cat(pieces), torch.cat(piece_labels)
        full.append(row.shape[0])
        rows.append(row[:max_length])
        row_labels.append(row_label[:max_length])
    width = max(row.shape[0] for row in rows)
    padded, padded_labels, masks = [], [], []
    for row, row_label in zip(rows, row_labels, strict=True):
        pad = width - row.shape[0]
        padded.append(torch.cat([row, row.new_zeros(pad, row.shape[1])]))
        padded_labels.append(torch.cat([row_label, row_label.new_full((pad,), IGNORE_INDEX)]))
        masks.append(torch.cat([torch.ones(row.shape[0], dtype=torch.long), torch.zeros(pad, dtype=torch.long)]))
    mask = torch.stack(masks)
    positions = torch.arange(width)[None].expand_as(mask).masked_fill(mask == 0, 1)
    return Spliced(
        torch.stack(padded),
        mask,
        positions,
        torch.stack(padded_labels) if labels is not None else None,
        torch.tensor(full) - mask.sum(1),
    )


def splice_inputs(model: MultimodalModel, batch: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The splice's arguments for a batch, as `MultimodalModel.embed` passes them (leaves that need grad)."""
    with torch.no_grad():
        text = model.lm.embeddings(batch["input_ids"].clamp(min=0))
        features = model.encode_images(batch["pixel_values"])
    args = (
        batch["input_ids"],
        batch["attention_mask"],
        text.requires_grad_(),
        features.requires_grad_(),
        batch["labels"],
    )
    return args, {"max_length": model.config.max_positions, "padding_side": "right", "segment_ids": None}


def check_equal(model: MultimodalModel, batches: list[dict[str, Any]]) -> None:
    for batch in batches:
        args, kwargs = splice_inputs(model, batch)
        ours, theirs = splice(*args, **kwargs), llava_splice(*args, **kwargs)
        for field in ("inputs_embeds", "labels", "attention_mask", "position_ids", "truncated"):
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), field


def splice_only(function, inputs: list[tuple[tuple, dict[str, Any]]]) -> None:
    for args, kwargs in inputs:
        function(*args, **kwargs).inputs_embeds.sum().backward()


def model_passes(model: MultimodalModel, batches: list[dict[str, Any]]) -> None:
    model.zero_grad(set_to_none=True)
    for batch in batches:
        train_pass(model, batch)


def splice_alone(model: MultimodalModel, items: list[dict], size: int, repeats: int) -> dict[str, float]:
    """Best seconds of the splice's forward+backward alone over `items` in batches of `size`, each way."""
    batches = [collate_padded(items[i : i + size]) for i in range(0, len(items) - size + 1, size)]
    check_equal(model, batches)
    inputs = [splice_inputs(model, batch) for batch in batches]
    times: dict[str, list[float]] = {"loop": [], "ours": []}
    for _ in range(repeats):
        times["loop"].append(seconds(lambda: splice_only(llava_splice, inputs)))
        times["ours"].append(seconds(lambda: splice_only(splice, inputs)))
    return {name: min(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "3 micro-batches, 2 repeats (what CI runs)")
    cli.add_argument("--batches", type=int, default=None, help="micro-batches of 4 samples")
    cli.add_argument("--repeats", type=int, default=None)
    args = cli.parse_args(argv)
    count, repeats = args.batches or (3 if args.smoke else 16), args.repeats or (2 if args.smoke else 5)
    shapes = llava_mix_shapes(max(count * MICRO_BATCH, 2 * LARGE_BATCH))
    model = tiny_vlm_729().train()
    items = synthetic_items(model, shapes)
    trained = shapes[: count * MICRO_BATCH]
    signed = [s.length if s.image else -s.length for s in trained]
    plan = plan_modality_grouped(signed, MICRO_BATCH, world_size=1, seed=0, epoch=0)
    batches = [collate_padded([items[i] for i in group]) for group in plan]
    check_equal(model, batches)
    model_passes(model, batches[:1])  # warm-up
    times: dict[str, list[float]] = {"ours": [], "loop": []}
    for _ in range(repeats):  # interleaved, best of each: this machine is noisy
        with mock.patch.object(vlm, "splice", llava_splice):
            times["loop"].append(seconds(lambda: model_passes(model, batches)))
        times["ours"].append(seconds(lambda: model_passes(model, batches)))
    best = {name: min(values) for name, values in times.items()}
    alone = {size: splice_alone(model, items, size, repeats) for size in (MICRO_BATCH, LARGE_BATCH)}
    ratio = best["loop"] / best["ours"]
    figures = {
        "ratio": round(ratio, 3),
        "splice_only_ratio": {str(size): round(t["loop"] / t["ours"], 2) for size, t in alone.items()},
        "seconds": {name: round(value, 4) for name, value in best.items()},
        "splice_only_seconds": {str(size): {k: round(v, 4) for k, v in t.items()} for size, t in alone.items()},
        "micro_batches": len(batches),
        "micro_batch": MICRO_BATCH,
        "images": sum(s.image for s in trained),
        "positions": sum(s.length for s in trained),
        "repeats": repeats,
        "identical_outputs": True,
        "smoke": args.smoke,
        "model": TINY_729 + ", every module trains",
    }
    only = figures["splice_only_ratio"]
    return report(
        "splice",
        figures,
        args.out,
        f"{ratio:.2f}x (forward+backward time of training micro-batches of {MICRO_BATCH} with the original's "
        f"per-sample splice over ours; the splice alone {only[str(MICRO_BATCH)]:.2f}x at batch {MICRO_BATCH}, "
        f"{only[str(LARGE_BATCH)]:.2f}x at batch {LARGE_BATCH})",
    )


if __name__ == "__main__":
    sys.exit(main())
