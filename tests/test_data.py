"""LLaVA-format datasets, bad data, mixtures, batching plans, packing and the synthetic generator."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from mipha_lab.constants import IMAGE_TOKEN_INDEX
from mipha_lab.data.batching import (
    RankBatchSampler,
    collate_packed,
    collate_padded,
    plan_modality_grouped,
    plan_packed,
    plan_padded,
)
from mipha_lab.data.llava import LlavaDataset, read_records
from mipha_lab.data.mixtures import MIXTURES, load_mixture, sample_indices
from mipha_lab.data.problems import SampleError, Skipped, SkipReport
from mipha_lab.data.synthetic import generate
from mipha_lab.data.templates import get_template
from mipha_lab.errors import ConfigError
from mipha_lab.model import build_vlm
from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.registry.cards import MixtureCard
from mipha_lab.train.speed import transformers_checkpointing


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate(root / "shapes", n_train=120, n_eval=10, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_vlm("tiny-siglip-so400m-384", "tiny-phi-2").eval()


def dataset(model, records, policy="skip", max_length=2048, strategy="pad"):
    return LlavaDataset(
        records,
        get_template("phi"),
        model.tokenizer,
        ImageProcessor(model.vision_tower.image_spec, strategy),
        max_length=max_length,
        layout=model.layout,
        policy=policy,
    )


def write(tmp_path: Path, name: str, rows) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def conv(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def test_synthetic_layout_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    counts = generate(a, n_train=30, n_eval=6, seed=3, progress=False)
    generate(b, n_train=30, n_eval=6, seed=3, progress=False)
    files = [
        "captions.json",
        "instruct.json",
        "eval/shapes-vqa/questions.jsonl",
        "eval/shapes-vqa/answers.jsonl",
        "eval/shapes-pope/questions.jsonl",
        "eval/shapes-pope/annotations/shapes_pope_adversarial.json",
        "images/train/000029.png",
        "images/eval/000005.png",
    ]
    digest = lambda root, f: hashlib.sha256((root / f).read_bytes()).hexdigest()  # noqa: E731
    assert all(digest(a, f) == digest(b, f) for f in files)
    assert counts == {"train": 30, "eval_images": 6, "vqa_questions": 30, "pope_questions": 36}
    question = json.loads((a / "eval/shapes-vqa/questions.jsonl").read_text().splitlines()[0])
    assert (
        set(question) == {"question_id", "image", "text", "category"} and (a / "images" / question["image"]).is_file()
    )
    pope = [
        json.loads(line)
        for line in (a / "eval/shapes-pope/annotations/shapes_pope_random.json").read_text().splitlines()
    ]
    assert {p["label"] for p in pope} == {"yes", "no"}
    sizes = {Image.open(p).size for p in (a / "images/train").glob("*.png")}
    assert len({w / h for w, h in sizes}) > 5  # varied aspect ratios


def test_synthetic_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mipha_lab.data.synthetic", "--out", str(tmp_path), "--n-train", "12", "--n-eval", "3"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads((tmp_path / "instruct.json").read_text())) == 12


def test_image_tag_moves_to_the_start_of_its_turn(tmp_path, model):
    path = write(
        tmp_path, "a.json", [{"id": "x", "image": "i.png", "conversations": conv("What is it?\n<image>", "A cat")}]
    )
    records, _ = read_records(path, tmp_path)
    assert records[0].messages[0]["content"] == "<image>\nWhat is it?"


def test_text_only_and_multi_image_samples(tmp_path, model):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / name)
    rows = [
        {"id": "text", "conversations": conv("Hello there", "Hi")},
        {"id": "two", "image": ["a.png", "b.png"], "conversations": conv("<image> left, <image> right. Same?", "Yes")},
    ]
    records, _ = read_records(write(tmp_path, "a.jsonl", rows), tmp_path)
    data = dataset(model, records)
    text, two = data[0], data[1]
    assert text["pixel_values"] is None and IMAGE_TOKEN_INDEX not in text["input_ids"].tolist()
    assert two["pixel_values"].shape == (2, 3, 32, 32) and two["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 2
    batch = collate_padded([text, two])
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        image_counts=batch["image_counts"],
        sample_ids=batch["ids"],
    )
    assert out.loss is not None and torch.isfinite(out.loss)
    assert data.lengths[0] < 0 < data.lengths[1]


def test_lengths_do_not_open_images(tmp_path, model, monkeypatch):
    rows = [{"id": str(i), "image": "missing.png", "conversations": conv("<image>\nq", "a b c")} for i in range(3)]
    records, _ = read_records(write(tmp_path, "a.json", rows), tmp_path)
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("opened")))
    assert dataset(model, records).lengths == [5 + model.num_image_tokens] * 3


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, model):
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"id": "good", "image": "ok.png", "conversations": conv("<image>\nq", "a")},
        {"id": "missing", "image": "nope.png", "conversations": conv("<image>\nq", "a")},
        {"id": "broken", "image": "broken.png", "conversations": conv("<image>\nq", "a")},
        {"id": "tags", "image": "ok.png", "conversations": conv("<image><image>\nq", "a")},
        {"id": "empty", "conversations": []},
        {"id": "long", "conversations": conv("word " * 400, "a")},
    ]
    path = tmp_path / "a.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:3])
        + "{not json\n"
        + "".join(json.dumps(r) + "\n" for r in rows[3:])
    )
    records, skipped = read_records(path, tmp_path)
    data = dataset(model, records, max_length=64)
    items = [data[i] for i in range(len(data))]
    batch = collate_padded(items)
    report = SkipReport()
    report.add(skipped + batch["skipped"])
    assert batch["ids"] == ["good"]
    assert dict(report.counts) == {
        "bad_json": 1,
        "image_tag_mismatch": 1,
        "empty_conversation": 1,
        "missing_image": 1,
        "unreadable_image": 1,
        "too_long": 1,
    }
    assert report.examples["bad_json"] == ["a.jsonl:4 (Expecting property name enclosed in double quotes)"]
    assert "skipped 6 sample(s)" in report.summary()
    report.write(tmp_path / "skipped.json")
    assert json.loads((tmp_path / "skipped.json").read_text())["total"] == 6


def test_error_policy_names_the_file_line_and_sample(tmp_path, model):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"id": "ok", "conversations": conv("q", "a")}) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"a\.jsonl:2: not valid JSON"):
        read_records(path, tmp_path, policy="error")
    rows = [{"id": "m1", "image": "nope.png", "conversations": conv("<image>\nq", "a")}]
    records, _ = read_records(write(tmp_path, "b.json", rows), tmp_path, policy="error")
    with pytest.raises(SampleError, match=r"sample m1: missing_image: .*nope\.png"):
        dataset(model, records, policy="error")[0]
    with pytest.raises(
        SampleError, match=r"sample t: image_tag_mismatch: 2 <image> tag\(s\) for 1 image\(s\) \(in .*c\.json\)"
    ):
        read_records(
            write(tmp_path, "c.json", [{"id": "t", "image": "x.png", "conversations": conv("<image><image>", "a")}]),
            tmp_path,
            policy="error",
        )


def test_broken_json_file_names_file_and_line(tmp_path):
    (tmp_path / "a.json").write_text('[{"id": 1},\n{"id": }]')
    with pytest.raises(ConfigError, match=r"a\.json:2: not valid JSON"):
        read_records(tmp_path / "a.json")


def test_mixture_sampling_rules_and_determinism(shapes):
    base = MIXTURES.get("shapes-mixed")
    records, _ = load_mixture(base, shapes, seed=1)
    again, _ = load_mixture(base, shapes, seed=1)
    other, _ = load_mixture(base, shapes, seed=2)
    assert [r.sample_id for r in records] == [r.sample_id for r in again]
    assert len(records) == 120 + 60 and [r.sample_id for r in records] != [r.sample_id for r in other]
    rule = lambda sample: base.sources[0].model_copy(update={"sample": sample})  # noqa: E731
    from mipha_lab.registry.cards import FirstN, RandomN, Weight

    assert sample_indices(10, rule(FirstN(first=3)), 0) == [0, 1, 2]
    assert len(set(sample_indices(10, rule(RandomN(random=4)), 0))) == 4
    doubled = sample_indices(10, rule(Weight(weight=2.5)), 0)
    assert len(doubled) == 25 and all(doubled.count(i) >= 2 for i in range(10))


def test_missing_mixture_data_names_the_path_and_origin(tmp_path):
    with pytest.raises(ConfigError, match=r"llava_v1_5_mix665k.json does not exist \(get it from https://"):
        load_mixture("llava-v1.5-mix665k", tmp_path)


def test_synthetic_mixture_is_generated_on_first_use(tmp_path, monkeypatch):
    import mipha_lab.data.synthetic as synthetic

    calls = []
    monkeypatch.setattr(synthetic, "generate", calls.append)
    card = MixtureCard(
        description="x",
        generate="shapes",
        sources=[{"name": "c", "annotations": "shapes/captions.json", "images": "shapes/images"}],
    )
    with pytest.raises(ConfigError):  # the stub wrote nothing, so the file is still missing
        load_mixture(card, tmp_path)
    assert calls == [tmp_path / "shapes"]


def test_sample_order_does_not_depend_on_process_count():
    plan = plan_padded(40, 4, seed=5, epoch=0)
    one = [i for b in RankBatchSampler(plan, 0, 1) for i in b]
    two = [RankBatchSampler(plan, r, 2).batches for r in range(2)]
    interleaved = [i for pair in zip(*two, strict=True) for batch in pair for i in batch]
    assert one == interleaved and sorted(one) == list(range(40))
    assert plan != plan_padded(40, 4, seed=5, epoch=1)


def test_modality_grouped_steps_are_single_modality_and_balanced():
    lengths = [(-1) ** (i % 3 == 0) * (10 + (i * 37) % 90) for i in range(200)]
    plan = plan_modality_grouped(lengths, micro_batch=4, world_size=2, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(200))
    for step in range(0, len(plan) - 2, 2):  # the last step may mix the leftovers
        modalities = {lengths[i] > 0 for b in plan[step : step + 2] for i in b}
        assert len(modalities) == 1
        totals = [sum(abs(lengths[i]) for i in b) for b in plan[step : step + 2]]
        assert abs(totals[0] - totals[1]) <= max(abs(lengths[i]) for b in plan[step : step + 2] for i in b)


def test_packed_plan_respects_the_budget_and_wastes_little():
    lengths = [20 + (i * 53) % 300 for i in range(400)]
    plan = plan_packed(lengths, budget=1024, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(400))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in plan)
    assert sum(lengths) / (1024 * len(plan)) > 0.9


@pytest.mark.parametrize(
    "llm,attention,checkpointing",
    [
        ("tiny-phi-2", "sdpa", False),
        ("tiny-phi-2", "sdpa", True),
        ("tiny-phi-2", "eager", False),
        ("tiny-gemma-2b", "sdpa", False),
        ("tiny-qwen2.5-0.5b", "sdpa", False),
        ("tiny-smollm2-1.7b", "sdpa", False),
    ],
)
def test_packed_batch_has_the_loss_and_gradients_of_the_padded_batch(shapes, llm, attention, checkpointing):
    """Per-sample SDPA (`sdpa_packed`, also when checkpointed blocks recompute it) and the block-causal
    mask (eager) both keep samples apart."""
    torch.manual_seed(0)
    model = build_vlm("tiny-siglip-so400m-384", llm, attn_implementation=attention)
    expected = "sdpa_packed" if attention == "sdpa" else attention
    assert model.language_model.config._attn_implementation == expected
    if checkpointing:
        assert transformers_checkpointing(model.language_model)
    records, _ = load_mixture("shapes-instruct", shapes, seed=0)
    data = dataset(model, records[:6])
    items = [data[i] for i in range(6)]
    padded, packed = collate_padded(items), collate_packed(items)
    model.train()
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            segment_ids=batch["segment_ids"],
            return_logits=False,
        )
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), int(out.num_supervised), grads))
    model.eval()
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b and packed["input_ids"].shape[0] == 1
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_positions_restart_per_sample(shapes, model):
    records, _ = load_mixture("shapes-captions", shapes, seed=0)
    items = [dataset(model, records)[i] for i in range(3)]
    batch = collate_packed(items)
    spliced = model.embed(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        segment_ids=batch["segment_ids"],
    )
    starts = (spliced.position_ids[0] == 0).nonzero().flatten().tolist()
    lengths = [item["length"] for item in items]
    assert starts == [0, lengths[0], lengths[0] + lengths[1]]


def test_plan_epoch_dispatches_and_packs_by_exact_lengths(shapes, model):
    from mipha_lab.data.batching import plan_epoch

    records, _ = load_mixture("shapes-instruct", shapes, seed=0)
    data = dataset(model, records[:40])
    exact = data.token_lengths()
    assert exact[0] == data[0]["length"]
    packed = plan_epoch("packed", data, micro_batch=2, world_size=1, seed=0, epoch=0, max_length=128)
    assert all(sum(exact[i] for i in b) <= 256 for b in packed) and len(packed) < 20
    grouped = plan_epoch("modality-grouped", data, micro_batch=4, world_size=2, seed=0, epoch=0, max_length=128)
    assert sorted(i for b in grouped for i in b) == list(range(40))
    with pytest.raises(ValueError, match="allowed: padded, modality-grouped, packed"):
        plan_epoch("stacked", data, micro_batch=2, world_size=1, seed=0, epoch=0, max_length=128)


def test_the_sample_cache_gives_what_loading_gives_within_its_budget(shapes, model):
    """Later epochs read cached samples: the same tensors as a fresh load, the budget never exceeded, and
    a skipped sample stays skipped with its reason."""
    records, _ = load_mixture("shapes-instruct", shapes, seed=0)
    records = [*records[:100], replace(records[100], images=("missing.png",))]
    fresh = dataset(model, records)
    cached = LlavaDataset(
        records,
        get_template("phi"),
        model.tokenizer,
        ImageProcessor(model.vision_tower.image_spec, "pad"),
        max_length=2048,
        layout=model.layout,
        cache_mb=1,
    )
    for _ in range(2):  # the second pass reads the cache
        for index in range(len(records)):
            ours, theirs = cached[index], fresh[index]
            if isinstance(theirs, Skipped):
                assert isinstance(ours, Skipped) and ours.reason == theirs.reason == "missing_image"
                continue
            for key, value in theirs.items():
                assert torch.equal(ours[key], value) if isinstance(value, torch.Tensor) else ours[key] == value, key
    assert 0 < len(cached._cache) < len(records)  # 1 MiB holds some of the 100 samples (about 14 KB each), not all
    held = sum(
        sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor))
        for item in cached._cache.values()
        if isinstance(item, dict)
    )
    assert held <= 2**20
