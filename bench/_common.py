"""What several benchmarks share: the command line, timing, a tiny model with SigLIP-SO400M's 729 visual
tokens, and synthetic samples with LLaVA-mix-like lengths."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.data.batching import sample_item
from mipha_lab.model import MultimodalModel, build_vlm
from mipha_lab.train.step import batch_forward

GRID = 27  # SigLIP-SO400M/14 at 384 px: a 27 x 27 grid of visual tokens
IMAGE_TOKENS = GRID * GRID
TINY_PATCH = 8  # the tiny SigLIP card's patch: 27 x 8 = 216 px gives the same 729 tokens
MAX_LENGTH = 2048
MICRO_BATCH = 4
TINY_729 = "tiny-siglip-so400m-384 at 216 px (729 tokens) + mlp2x_gelu + tiny-phi-2, fp32"


def parser(doc: str, smoke_help: str) -> argparse.ArgumentParser:
    """The options every benchmark has: `--smoke` (what CI runs) and `--out` (the results folder)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    return parser


def seconds(run: Callable[[], Any]) -> float:
    """Wall time of one call (benchmarks interleave the variants and keep the best of each)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def tiny_vlm_729(seed: int = 0, max_positions: int | None = None, attn_implementation: str = "sdpa") -> MultimodalModel:
    """tiny-siglip-so400m-384 at 216 px (729 visual tokens, as the real tower) + tiny-phi-2, fp32, no tokenizer
    (the benchmarks make token ids directly)."""
    torch.manual_seed(seed)
    return build_vlm(
        "tiny-siglip-so400m-384",
        "tiny-phi-2",
        image_size=GRID * TINY_PATCH,
        max_positions=max_positions,
        attn_implementation=attn_implementation,
        with_tokenizer=False,
    )


@dataclass(frozen=True)
class Shape:
    text: int  # text positions (the image placeholder excluded)
    image: bool

    @property
    def length(self) -> int:
        """Positions after splicing."""
        return self.text + (IMAGE_TOKENS if self.image else 0)


def _lognormal(rng: np.random.Generator, median: float, p90: float, size: int) -> np.ndarray:
    sigma = np.log(p90 / median) / 1.2815515655446004  # the standard normal's 90th percentile
    return rng.lognormal(np.log(median), sigma, size)


def llava_mix_shapes(count: int, seed: int = 0) -> list[Shape]:
    """LLaVA-v1.5-mix-like samples: 94% with one image (729 tokens) plus log-normal text (median 120,
    90th percentile 500), 6% text-only (median 400, 90th percentile 1500); every sample capped at 2048."""
    rng = np.random.default_rng(seed)
    image = rng.random(count) < 0.94
    text = np.where(image, _lognormal(rng, 120, 500, count), _lognormal(rng, 400, 1500, count))
    cap = np.where(image, MAX_LENGTH - IMAGE_TOKENS, MAX_LENGTH)
    text = np.clip(np.rint(text), 2, cap).astype(int)
    return [Shape(int(t), bool(i)) for t, i in zip(text, image, strict=True)]


def synthetic_item(index: int, shape: Shape, image_size: int, vocab: int, generator: torch.Generator) -> dict:
    """A dataset item (the keys the collators read): random token ids with the image placeholder second,
    the first third of the text as a masked prompt and the rest supervised, random pixels."""
    ids = torch.randint(1, vocab, (shape.text + shape.image,), generator=generator)
    if shape.image:
        ids[1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[: shape.image + shape.text // 3 + 1] = IGNORE_INDEX
    pixels = torch.rand(1, 3, image_size, image_size, generator=generator) * 2 - 1 if shape.image else None
    return sample_item(str(index), ids, labels, pixels, [IMAGE_TOKENS] * shape.image)


def synthetic_items(model: MultimodalModel, shapes: list[Shape], seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.lm.vocab_size
    return [synthetic_item(i, s, model.vision_tower.image_size, vocab, generator) for i, s in enumerate(shapes)]


def train_pass(model: MultimodalModel, batch: dict[str, Any]) -> tuple[float, int]:
    """One micro-batch's forward and backward (gradients accumulate); its loss sum and supervised count."""
    out = batch_forward(model, batch)
    out.loss_sum.backward()
    return float(out.loss_sum.detach()), int(out.num_supervised)
