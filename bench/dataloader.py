"""Dataloader throughput: our dataset + collator against a LLaVA-style LazySupervisedDataset, and the same
samples read from WebDataset shards against the JSON + image folder.

Same synthetic 640x480 JPEGs processed to 384 px (SigLIP card, `pad`), the `phi` template, the same
number of loader processes; the outputs are checked equal (ids and labels exactly, pixels to 1e-5)
before anything is timed. Prints `dataloader: <ratio>x (...)` and writes bench/results/dataloader.json.

    python bench/dataloader.py [--smoke] [--samples N] [--workers W] [--out DIR]
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from bench._common import parser
from bench._results import report
from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from mipha_lab.data.batching import collate_padded, sample_item
from mipha_lab.data.llava import LlavaDataset, read_records
from mipha_lab.data.mixtures import read_source
from mipha_lab.data.shards import shard_pattern, write_shards
from mipha_lab.data.templates import PHI_SYSTEM, get_template
from mipha_lab.model.image_layout import ImageLayout
from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.model.language import (
    LLM,
    load_tokenizer,
)
from mipha_lab.model.vision import VISION
from mipha_lab.registry.cards import SourceSpec

WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "left",
    "right",
    "top",
    "is",
    "what",
    "where",
    "how",
    "many",
    "color",
    "shape",
    "there",
]


def make_data(root: Path, samples: int, seed: int = 0) -> Path:
    """JPEG photos-like noise at 640x480 and multi-turn LLaVA conversations."""
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(samples):
        base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * rng.random((480, 1, 3))
        pixels = np.clip(base + rng.normal(0, 25, (480, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.jpg", quality=90)
        turns = []
        for t in range(pyrng.randint(1, 4)):
            question = " ".join(pyrng.choices(WORDS, k=pyrng.randint(4, 14))) + "?"
            answer = " ".join(pyrng.choices(WORDS, k=pyrng.randint(1, 20)))
            turns += [
                {"from": "human", "value": (IMAGE_TOKEN + "\n" if t == 0 else "") + question},
                {"from": "gpt", "value": answer},
            ]
        rows.append({"id": str(i), "image": f"{i}.jpg", "conversations": turns})
    path = root / "data.json"
    path.write_text(json.dumps(rows))
    return path


class ReferenceDataset(torch.utils.data.Dataset):
    """What LLaVA's LazySupervisedDataset does per sample: open, expand2square, the transformers PIL
    processor, build the prompt string, tokenize chunk by chunk around <image>, then mask each round by
    re-tokenizing its instruction part."""

    def __init__(self, path: Path, image_root: Path, tokenizer) -> None:
        from transformers import SiglipImageProcessorPil

        self.rows = json.loads(path.read_text())
        self.root, self.tokenizer = image_root, tokenizer
        self.processor = SiglipImageProcessorPil(
            size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
        )

    def __len__(self) -> int:
        return len(self.rows)

    def tokenizer_image_token(self, prompt: str) -> list[int]:
        chunks = [self.tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            ids += ([IMAGE_TOKEN_INDEX] if i else []) + chunk
        return ids

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        image = Image.open(self.root / row["image"]).convert("RGB")
        width, height = image.size
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), (127, 127, 127))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        pixels = self.processor.preprocess(canvas, return_tensors="pt")["pixel_values"][0]
        turns = [t["value"] for t in row["conversations"]]
        turns[0] = IMAGE_TOKEN + "\n" + turns[0].replace(IMAGE_TOKEN, "").strip()
        prompt = PHI_SYSTEM + " "
        rounds = []
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            instruction = f"USER: {q} ASSISTANT:"
            rounds.append((instruction, f"{instruction} {a}<|endoftext|>"))
            prompt += rounds[-1][1]
        input_ids = torch.tensor(self.tokenizer_image_token(prompt))
        labels = input_ids.clone()
        cursor = len(self.tokenizer_image_token(PHI_SYSTEM + " "))
        labels[:cursor] = IGNORE_INDEX
        for instruction, whole in rounds:
            instruction_len = len(self.tokenizer_image_token(instruction))
            labels[cursor : cursor + instruction_len] = IGNORE_INDEX
            cursor += len(self.tokenizer_image_token(whole))
        labels[input_ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
        return sample_item(row["id"], input_ids, labels, pixels[None], [729])


def loader(dataset, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=collate_padded)


def throughput(dataset, workers: int) -> float:
    start = time.perf_counter()
    count = sum(len(batch["ids"]) for batch in loader(dataset, workers))
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "two dozen samples, timed once (what CI runs)")
    cli.add_argument("--samples", type=int, default=None)
    cli.add_argument("--workers", type=int, default=0, help="loader processes, the same for both")
    cli.add_argument("--repeats", type=int, default=None)
    args = cli.parse_args(argv)
    samples, repeats = args.samples or (24 if args.smoke else 400), args.repeats or (1 if args.smoke else 3)
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))

    def ours_over(records: list) -> LlavaDataset:
        processor = ImageProcessor(VISION.get("siglip-so400m-384").image, "pad")
        layout = ImageLayout(None, 384, 729)
        return LlavaDataset(records, get_template("phi"), tokenizer, processor, max_length=4096, layout=layout)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_data(Path(tmp), samples)
        start = time.perf_counter()
        records, _ = read_records(path, Path(tmp) / "images")
        index_json_s = time.perf_counter() - start
        ours = ours_over(records)
        reference = ReferenceDataset(path, Path(tmp) / "images", tokenizer)
        for a, b in zip(loader(ours, 0), loader(reference, 0), strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
            assert float((a["pixel_values"] - b["pixel_values"]).abs().max()) < 1e-5
        # the same samples as WebDataset shards (python -m mipha_lab.data.shards): identical tensors first
        shards, _ = write_shards(records, Path(tmp) / "shards", 32 * 2**20)
        start = time.perf_counter()
        pattern = str(Path(tmp) / "shards" / shard_pattern(len(shards)))
        sharded_records, _ = read_source(SourceSpec(name="shards", kind="webdataset", path=pattern), Path(tmp))
        index_shards_s = time.perf_counter() - start
        sharded = ours_over(sharded_records)
        for a, b in zip(loader(ours, 0), loader(sharded, 0), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "pixel_values"))
        ours_rate, ref_rate, shard_rate = [], [], []
        for _ in range(repeats):  # interleaved, best of each: this machine is noisy
            ref_rate.append(throughput(reference, args.workers))
            ours_rate.append(throughput(ours, args.workers))
            shard_rate.append(throughput(sharded, args.workers))
    ratio = max(ours_rate) / max(ref_rate)
    shards_ratio = max(shard_rate) / max(ours_rate)
    figures = {
        "ratio": round(ratio, 3),
        "ours_samples_per_s": round(max(ours_rate), 2),
        "reference_samples_per_s": round(max(ref_rate), 2),
        "samples": samples,
        "workers": args.workers,
        "identical_outputs": True,
        "shards": {
            "ratio_vs_json_and_folder": round(shards_ratio, 3),
            "samples_per_s": round(max(shard_rate), 2),
            "files": len(shards),
            "index_s": round(index_shards_s, 3),
            "json_index_s": round(index_json_s, 3),
            "identical_tensors": True,
        },
        "smoke": args.smoke,
    }
    return report(
        "dataloader",
        figures,
        args.out,
        f"{ratio:.2f}x (samples/s of our dataset+collator over a LLaVA-style reference; "
        f"{max(ours_rate):.1f} vs {max(ref_rate):.1f}); from {len(shards)} shard(s) {shards_ratio:.2f}x "
        f"the JSON + {samples} image files ({max(shard_rate):.1f} samples/s)",
    )


if __name__ == "__main__":
    sys.exit(main())
