"""Packing: real-token fraction and training tokens/s of packed rows vs padded batches grouped by modality
and length (the original's `group_by_modality_length`), measured in the same run.

Samples have LLaVA-mix-like lengths (bench/_common.py: 94% one 729-token image plus log-normal text,
6% text-only, capped at 2048); micro batch 4 at max length 2048, so a packed row has 8192 positions.
Real-token fractions come from the epoch plans of many samples; tokens/s (real tokens over the time of
forward+backward of every micro-batch, full fine-tuning) and the loss from training passes over the
same subset in both layouts, on a tiny model whose tower yields 729 tokens. Gradients accumulate over
the subset without an optimizer step, so the two layouts must give the same loss and gradients.
Prints `packing: <fraction> (...)` and writes bench/results/packing.json.

    python bench/packing.py [--smoke] [--samples N] [--timed N] [--repeats R] [--out DIR]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import (
    MAX_LENGTH,
    MICRO_BATCH,
    TINY_729,
    Shape,
    llava_mix_shapes,
    parser,
    synthetic_items,
    tiny_vlm_729,
    train_pass,
)
from bench._results import report
from mipha_lab.data.batching import (
    collate_packed,
    collate_padded,
    plan_modality_grouped,
    plan_packed,
    real_token_fraction,
)
from mipha_lab.model import MultimodalModel

WORLD = 8  # the released recipe's GPUs: lengths are grouped within mega-batches of 8 x 4 samples
BUDGET = MICRO_BATCH * MAX_LENGTH


def plans(shapes: list[Shape], seed: int = 0) -> dict[str, list[list[int]]]:
    lengths = [s.length for s in shapes]
    signed = [s.length if s.image else -s.length for s in shapes]
    return {
        "packed": plan_packed(lengths, BUDGET, seed, 0),
        "padded": plan_modality_grouped(signed, MICRO_BATCH, WORLD, seed, 0),
    }


def fractions(shapes: list[Shape], plan: dict[str, list[list[int]]]) -> tuple[float, float]:
    """Real tokens over computed positions: a packed row costs its whole budget, a padded batch its
    longest sample times its size."""
    lengths = [s.length for s in shapes]
    return real_token_fraction(plan["packed"], lengths, BUDGET), real_token_fraction(plan["padded"], lengths)


def epoch(model: MultimodalModel, batches: list[dict]) -> tuple[float, float, int, dict[str, torch.Tensor]]:
    """Forward+backward of every micro-batch: seconds, loss sum, supervised tokens, accumulated gradients."""
    model.zero_grad(set_to_none=True)
    loss_sum, supervised = 0.0, 0
    start = time.perf_counter()
    for batch in batches:
        loss, count = train_pass(model, batch)
        loss_sum, supervised = loss_sum + loss, supervised + count
    seconds = time.perf_counter() - start
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return seconds, loss_sum, supervised, grads


def gradient_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over the largest gradient (per tensor, gradients that are zero in exact
    arithmetic, such as attention key biases', would be all rounding noise)."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) / max(float(a[k].abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "a smaller plan and 16 samples trained (what CI runs)")
    cli.add_argument("--samples", type=int, default=None, help="samples in the epoch plans")
    cli.add_argument("--timed", type=int, default=None, help="samples trained in each layout")
    cli.add_argument("--repeats", type=int, default=None)
    args = cli.parse_args(argv)
    samples, timed = args.samples or (2000 if args.smoke else 20000), args.timed or (16 if args.smoke else 128)
    repeats = args.repeats or (1 if args.smoke else 2)
    shapes = llava_mix_shapes(samples)
    packed_fraction, padded_fraction = fractions(shapes, plans(shapes))

    subset = shapes[:timed]
    model = tiny_vlm_729().train()
    items = synthetic_items(model, subset)
    layouts = {"padded": collate_padded, "packed": collate_packed}
    batches = {
        name: [layouts[name]([items[i] for i in group]) for group in plan] for name, plan in plans(subset).items()
    }
    for name in layouts:  # warm-up
        train_pass(model, batches[name][0])
    best: dict[str, float] = {}
    results: dict[str, tuple[float, int, dict[str, torch.Tensor]]] = {}
    for _ in range(repeats):  # interleaved, best of each: this machine is noisy
        for name in layouts:
            seconds, loss_sum, supervised, grads = epoch(model, batches[name])
            best[name] = min(best.get(name, float("inf")), seconds)
            results[name] = (loss_sum, supervised, grads)
    tokens = sum(s.length for s in subset)
    rates = {name: tokens / seconds for name, seconds in best.items()}
    (loss_a, count_a, grads_a), (loss_b, count_b, grads_b) = results["padded"], results["packed"]
    assert count_a == count_b, (count_a, count_b)
    figures = {
        "real_token_fraction": round(packed_fraction, 4),
        "padded_real_token_fraction": round(padded_fraction, 4),
        "tokens_per_s_ratio": round(rates["packed"] / rates["padded"], 3),
        "tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "loss": {"packed": loss_b / count_b, "padded": loss_a / count_a},
        "loss_abs_difference": abs(loss_b / count_b - loss_a / count_a),
        "gradient_max_difference": gradient_difference(grads_a, grads_b),
        "samples": samples,
        "timed_samples": timed,
        "timed_tokens": tokens,
        "supervised_tokens": count_a,
        "micro_batches": {name: len(b) for name, b in batches.items()},
        "row_budget": BUDGET,
        "grouping_world_size": WORLD,
        "repeats": repeats,
        "smoke": args.smoke,
        "model": TINY_729 + ", every module trains",
        "attn_implementation": model.lm.attention,
    }
    return report(
        "packing",
        figures,
        args.out,
        f"{packed_fraction:.1%} real tokens (packed rows of {BUDGET} over modality-grouped padded batches: "
        f"{padded_fraction:.1%}; training tokens/s packed over padded {figures['tokens_per_s_ratio']:.2f}x, "
        f"loss difference {figures['loss_abs_difference']:.1e})",
    )


if __name__ == "__main__":
    sys.exit(main())
