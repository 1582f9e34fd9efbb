"""Mixture source kinds (LLaVA JSON, Hugging Face datasets, WebDataset shards), filters and caps, the
shards command, and packing's image cap and loss reductions.

The other formats are written from the LLaVA JSON by the `datasets` library itself and read back by the
`webdataset` library, so each kind is checked against files a library we did not write made or read."""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from mipha_lab.data.batching import collate_packed, collate_padded, plan_packed
from mipha_lab.data.llava import LlavaDataset
from mipha_lab.data.mixtures import load_mixture, read_source
from mipha_lab.data.problems import SampleError, Skipped
from mipha_lab.data.synthetic import generate
from mipha_lab.data.templates import get_template
from mipha_lab.errors import ConfigError
from mipha_lab.model import build_vlm
from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.registry.cards import MixtureCard, SourceSpec
from mipha_lab.train.step import batch_forward, global_counts

SAMPLES = 40
SIZE = ["--shard-mb", "0.06"]  # a few shards of ~13 samples


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The shapes data, and the first SAMPLES questions written as a `save_to_disk` folder, as parquet
    files, in The Cauldron's layout and as shards (by our command)."""
    root = tmp_path_factory.mktemp("sources")
    generate(root / "shapes", n_train=SAMPLES, n_eval=4, seed=0, progress=False)
    rows = json.loads((root / "shapes/instruct.json").read_text())[:SAMPLES]
    (root / "first.json").write_text(json.dumps([{**r, "quality": i % 5} for i, r in enumerate(rows)]))
    images = [str(root / "shapes/images" / r["image"]) for r in rows]
    table = datasets.Dataset.from_dict(
        {
            "id": [r["id"] for r in rows],
            "conversations": [r["conversations"] for r in rows],
            "picture": images,
            "quality": [[i % 5, 4] for i in range(len(rows))],  # per-turn ratings, as FineVision's
        }
    ).cast_column("picture", datasets.Image())
    table.save_to_disk(str(root / "hf-folder"))
    for part in range(2):
        table.shard(2, part, contiguous=True).to_parquet(str(root / f"parquet/part-{part}.parquet"))
    cauldron = datasets.Dataset.from_dict(
        {
            "images": [[path] for path in images],
            "texts": [
                [
                    {"user": turns[i]["value"].replace("<image>\n", ""), "assistant": turns[i + 1]["value"]}
                    for i in range(0, len(turns), 2)
                ]
                for turns in (r["conversations"] for r in rows)
            ],
        }
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    cauldron.save_to_disk(str(root / "cauldron"))
    card = root / "first.yaml"
    source = "{name: first, annotations: first.json, images: shapes/images}"
    card.write_text(f"description: the first questions\nsources:\n  - {source}\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mipha_lab.data.shards",
            str(card),
            str(root / "shards"),
            "--data-root",
            str(root),
            *SIZE,
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote 40 samples in" in out.stdout and "kind: webdataset" in out.stdout
    return root


KINDS = {
    "llava": {"annotations": "first.json", "images": "shapes/images"},
    "hf": {"kind": "hf", "path": "hf-folder", "columns": {"image": "picture"}},
    "parquet": {"kind": "hf", "path": "parquet/*.parquet", "columns": {"image": "picture"}},
    "arrow": {"kind": "hf", "path": "hf-folder/*.arrow", "columns": {"image": "picture"}},  # the folder's files
    "cauldron": {"kind": "hf", "path": "cauldron", "format": "cauldron"},
    "webdataset": {"kind": "webdataset", "path": "shards/shard-{000000..000999}.tar"},
    "webdataset-url": {"kind": "webdataset", "path": ""},  # the same shards through fsspec, by file:// URL
}


def records_of(root: Path, kind: str, **extra):
    spec = {**KINDS[kind], **extra}
    pattern = json.loads((root / "shards/manifest.json").read_text())["pattern"]
    if kind == "webdataset":
        spec["path"] = f"shards/{pattern}"
    if kind == "webdataset-url":
        spec["path"] = f"file://{root}/shards/{pattern}"
    return read_source(SourceSpec(name=kind, **spec), root)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_vlm("tiny-siglip-so400m-384", "tiny-phi-2").eval()


def dataset(model, records) -> LlavaDataset:
    processor = ImageProcessor(model.vision_tower.image_spec, "pad")
    return LlavaDataset(records, get_template("phi"), model.tokenizer, processor, max_length=2048, layout=model.layout)


@pytest.mark.parametrize("kind", ["hf", "parquet", "arrow", "cauldron", "webdataset", "webdataset-url"])
def test_each_kind_yields_the_samples_of_the_llava_json_it_was_made_from(root, model, kind):
    reference, _ = records_of(root, "llava")
    found, skipped = records_of(root, kind)
    assert skipped == [] and len(found) == len(reference) == SAMPLES
    if kind != "cauldron":  # The Cauldron has no ids
        assert [r.sample_id for r in found] == [r.sample_id for r in reference]
    assert [r.messages for r in found] == [r.messages for r in reference]
    ours, theirs = dataset(model, reference), dataset(model, found)
    for index in (0, 17, SAMPLES - 1):
        a, b = ours[index], theirs[index]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert ours.token_lengths() == theirs.token_lengths()


def test_the_shards_read_back_identical_through_the_webdataset_library(root):
    manifest = json.loads((root / "shards/manifest.json").read_text())
    assert manifest["samples"] == SAMPLES and len(manifest["shards"]) > 1
    assert sum(s["samples"] for s in manifest["shards"]) == SAMPLES
    for shard in manifest["shards"]:
        data = (root / "shards" / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
    rows = json.loads((root / "first.json").read_text())
    pattern = str(root / "shards" / manifest["pattern"])
    samples = list(webdataset.WebDataset(pattern, shardshuffle=False))
    assert len(samples) == SAMPLES
    for row, sample in zip(rows, samples, strict=True):
        record = json.loads(sample["json"])
        assert record["id"] == row["id"] and record["conversations"] == row["conversations"]
        assert sample[record["image"]] == (root / "shapes/images" / row["image"]).read_bytes()


def test_the_shards_command_refuses_a_folder_that_holds_files(root, tmp_path):
    (tmp_path / "old.tar").write_text("x")
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.data.shards", str(root / "first.yaml"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "is not empty" in out.stderr and "Traceback" not in out.stderr


def test_a_mixture_combines_kinds_with_filters_and_caps(root):
    manifest = json.loads((root / "shards/manifest.json").read_text())
    card = MixtureCard(
        description="three kinds",
        sources=[
            SourceSpec(name="json", annotations="first.json", images="shapes/images", cap=7),
            SourceSpec(
                name="rated",
                kind="hf",
                path="hf-folder",
                columns={"image": "picture"},
                where=[{"column": "quality", "op": ">=", "value": 3}],  # every turn rated 3 or more
            ),
            SourceSpec(name="shards", kind="webdataset", path="shards/" + manifest["pattern"], sample={"first": 5}),
        ],
    ).named("combined", "")
    records, skipped = load_mixture(card, root, seed=3)
    again, _ = load_mixture(card, root, seed=3)
    rated = [i for i in range(SAMPLES) if i % 5 >= 3]
    assert skipped == [] and len(records) == 7 + len(rated) + 5
    assert [r.sample_id for r in records] == [r.sample_id for r in again]
    ids = [f"ins-{i}" for i in range(SAMPLES)]
    assert [r.sample_id for r in records[7 : 7 + len(rated)]] == [ids[i] for i in rated]
    assert [r.sample_id for r in records[-5:]] == ids[:5]
    capped = [r.sample_id for r in records[:7]]
    assert capped == sorted(capped, key=ids.index) and capped != ids[:7]  # a random subset, in file order


def test_a_filter_on_a_missing_column_and_a_source_without_its_path_are_named(root):
    with pytest.raises(ConfigError, match=r"source 'llava', sample 0: no column 'stars'"):
        records_of(root, "llava", where=[{"column": "stars", "op": ">", "value": 1}])
    with pytest.raises(ValueError, match="source 'x' of kind hf needs `path`"):
        SourceSpec(name="x", kind="hf")
    with pytest.raises(ConfigError, match="has no column 'conversations'"):
        read_source(SourceSpec(name="c", kind="hf", path="cauldron"), root)


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with webdataset.TarWriter(str(path)) as writer:
        keys = dict.fromkeys(name.split(".", 1)[0] for name in members)
        for key in keys:
            fields = {n.split(".", 1)[1]: v for n, v in members.items() if n.split(".", 1)[0] == key}
            writer.write({"__key__": key, **fields})


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(tag: bool = True) -> list[dict[str, str]]:
    return [{"from": "human", "value": ("<image>\n" if tag else "") + "What?"}, {"from": "gpt", "value": "red"}]


def test_bad_samples_of_each_kind_are_counted_with_their_reason(tmp_path, model):
    good = {"conversations": conversation()}
    write_tar(
        tmp_path / "bad.tar",
        {
            "a.json": json.dumps(good).encode(),
            "a.png": png(),
            "b.json": b"{not json",
            "b.png": png(),
            "c.json": json.dumps({**good, "image": "jpg"}).encode(),  # names a member that is not there
            "c.png": png(),
            "d.json": json.dumps(good).encode(),
            "d.png": b"not an image",
            "e.json": json.dumps({"conversations": conversation(tag=False)}).encode(),
            "e.png": png(),
        },
    )
    records, skipped = read_source(SourceSpec(name="w", kind="webdataset", path="bad.tar"), tmp_path)
    assert sorted(s.reason for s in skipped) == ["bad_json", "image_tag_mismatch", "missing_image"]
    assert [r.sample_id for r in records] == ["bad.tar:a", "bad.tar:d"]  # shard and key, when the record has no id
    loaded = dataset(model, records)[1]
    assert isinstance(loaded, Skipped) and loaded.reason == "unreadable_image" and "bad.tar:d.png" in loaded.detail
    with pytest.raises(SampleError, match="bad_json"):
        read_source(SourceSpec(name="w", kind="webdataset", path="bad.tar"), tmp_path, policy="error")

    table = datasets.Dataset.from_dict(
        {
            "texts": [
                [{"user": "What?", "assistant": "red"}],
                [{"user": "What?"}],
                [{"user": "What?", "assistant": "red"}],
            ],
            "images": [[{"bytes": png(), "path": None}], [{"bytes": png(), "path": None}], [{"bytes": b"??"}]],
        }
    ).cast_column("images", datasets.Sequence(datasets.Image()))
    table.save_to_disk(str(tmp_path / "cauldron"))
    records, skipped = read_source(SourceSpec(name="c", kind="hf", path="cauldron", format="cauldron"), tmp_path)
    assert [s.reason for s in skipped] == ["bad_conversation"] and len(records) == 2
    items = [dataset(model, records)[i] for i in range(2)]
    assert isinstance(items[0], dict)
    assert isinstance(items[1], Skipped) and items[1].reason == "unreadable_image"


def test_packed_rows_hold_at_most_the_image_cap():
    lengths = [40] * 30 + [10] * 30
    images = [1] * 30 + [3] * 30
    plan = plan_packed(lengths, budget=400, seed=0, epoch=0, image_counts=images, max_images=4)
    assert sorted(i for row in plan for i in row) == list(range(60))
    assert all(sum(images[i] for i in row) <= 4 for row in plan)
    assert all(sum(lengths[i] for i in row) <= 400 for row in plan)
    uncapped = plan_packed(lengths, budget=400, seed=0, epoch=0)
    assert max(sum(images[i] for i in row) for row in uncapped) > 4 and len(uncapped) < len(plan)


def reference_loss(model, items, reduction: str) -> torch.Tensor:
    """InternVL / SmolVLM2's definition from each sample's own mean token loss m and count n:
    sum(w n m) / sum(w n) with w = 1, 1/n or 1/sqrt(n)."""
    weight = {"token": lambda n: 1.0, "sample": lambda n: 1.0 / n, "square": lambda n: 1.0 / math.sqrt(n)}[reduction]
    total, norm = 0.0, 0.0
    for item in items:
        batch = collate_padded([item])
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
        n = float(out.num_supervised)
        total = total + weight(n) * n * out.loss
        norm += weight(n) * n
    return total / norm


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_loss_reductions_packed_equal_padded_equal_the_formula(root, model, reduction):
    records, _ = records_of(root, "llava")
    data = dataset(model, records[:5])
    items = [data[i] for i in range(5)]
    model.loss_reduction = "token"
    expected = reference_loss(model, items, reduction)
    losses = []
    model.loss_reduction = reduction
    try:
        for batch in (collate_padded(items), collate_packed(items)):
            out = batch_forward(model, batch)  # the trainer's call
            losses.append(out.loss_sum / out.num_supervised)
    finally:
        model.loss_reduction = "token"
    torch.testing.assert_close(losses[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1], expected, rtol=1e-5, atol=1e-6)
    if reduction != "token":
        assert not torch.allclose(expected, reference_loss(model, items, "token"))  # the weighting matters


def test_the_step_normalises_by_the_same_weights(root, model):
    """global_counts (before any forward) gives the forward's denominator for every reduction."""
    from mipha_lab.distributed import Distributed

    records, _ = records_of(root, "llava")
    data = dataset(model, records[:5])
    items = [data[i] for i in range(5)]
    single = Distributed(0, 1, 0, torch.device("cpu"))
    for reduction in ("token", "sample", "square"):
        model.loss_reduction = reduction
        try:
            for batch in (collate_padded(items), collate_packed(items)):
                counts = global_counts([batch], model.config.max_positions, single, reduction)
                out = batch_forward(model, batch)
                assert counts.targets == pytest.approx(float(out.num_supervised), rel=1e-6)
        finally:
            model.loss_reduction = "token"
    assert np.isclose(counts.samples, 5)


@pytest.mark.slow
def test_a_packed_stage_trains_with_an_image_cap_and_the_square_loss(tmp_path, data_root):
    from tests.test_resume import launch, losses

    overrides = [
        "stages.instruct.batching=packed",
        "stages.instruct.max_images_per_row=3",
        "stages.instruct.loss_reduction=square",
        "stages.instruct.max_steps=6",
    ]
    done = launch(tmp_path, data_root, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = losses(tmp_path / "runs/micro")
    assert len(rows) == 5 + 6 and all(math.isfinite(loss) for _, loss in rows)
    refused = launch(tmp_path, data_root, "stages.instruct.max_images_per_row=3", "run_name=padded")
    assert refused.returncode == 2 and "max_images_per_row caps packed rows" in refused.stderr
    assert "Traceback" not in refused.stderr
