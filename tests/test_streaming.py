"""Streamed mixtures: each epoch a deterministic permutation read front to back, bad samples in place, the
rules a stream cannot follow refused, and a SIGKILLed run resuming to the same weights bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mipha_lab.data.llava import LlavaDataset
from mipha_lab.data.mixtures import load_mixture, read_source
from mipha_lab.data.problems import SampleError
from mipha_lab.data.streaming import StreamedRecords
from mipha_lab.data.synthetic import generate
from mipha_lab.data.templates import get_template
from mipha_lab.errors import ConfigError
from mipha_lab.model import build_vlm
from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.registry.cards import MixtureCard, SourceSpec
from tests.test_resume import assert_bitwise_equal, launch, losses, weights

SAMPLES = 60


def shards(mixture: str, data_root: Path, out: Path, shard_mb: str = "0.05") -> str:
    """Our shards command on a mixture; returns the shards' brace pattern (absolute)."""
    command = ["mipha_lab.data.shards", mixture, str(out), f"--data-root={data_root}", f"--shard-mb={shard_mb}"]
    done = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return str(out / json.loads((out / "manifest.json").read_text())["pattern"])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    generate(root / "shapes", n_train=SAMPLES, n_eval=4, seed=0, progress=False)
    source = "{name: q, annotations: shapes/instruct.json, images: shapes/images}"
    (root / "all.yaml").write_text(f"description: every question\nsources:\n  - {source}\n")
    shards(str(root / "all.yaml"), root, root / "shards")
    return root


def streamed(root: Path, **extra) -> MixtureCard:
    pattern = json.loads((root / "shards/manifest.json").read_text())["pattern"]
    source = SourceSpec(name="shards", kind="webdataset", path=f"shards/{pattern}", stream=True, **extra)
    return MixtureCard(description="streamed", sources=[source]).named("streamed", "")


def test_each_epoch_is_a_deterministic_permutation_of_the_source(root):
    indexed, _ = read_source(SourceSpec(name="q", annotations="shapes/instruct.json", images="shapes/images"), root)
    by_id = {r.sample_id: r for r in indexed}
    records = StreamedRecords(streamed(root), root, seed=0, buffer=8)
    orders = []
    for epoch in (0, 1, 0):
        records.start_epoch(epoch)
        epoch_records = [records[i] for i in range(len(records))]
        assert sorted(r.sample_id for r in epoch_records) == sorted(by_id)
        assert all(r.messages == by_id[r.sample_id].messages for r in epoch_records)
        orders.append([r.sample_id for r in epoch_records])
    assert orders[0] == orders[2] and orders[0] != orders[1]
    assert orders[0] != [r.sample_id for r in indexed]  # shuffled, not file order
    again = StreamedRecords(streamed(root), root, seed=0, buffer=8)
    assert [again[i].sample_id for i in (41, 3, 59)] == [orders[0][i] for i in (41, 3, 59)]  # backwards restarts
    other = StreamedRecords(streamed(root), root, seed=1, buffer=8)
    assert [other[i].sample_id for i in range(SAMPLES)] != orders[0]


def test_load_mixture_streams_and_caps(root):
    records, skipped = load_mixture(streamed(root, cap=25), root, seed=0)
    assert isinstance(records, StreamedRecords) and skipped == [] and len(records) == 25
    assert len({records[i].sample_id for i in range(25)}) == 25


def test_a_streamed_dataset_loads_and_a_short_stream_is_named(root, tmp_path):
    rows = json.loads((root / "shapes/instruct.json").read_text())[:10]
    rows[4]["conversations"] = rows[4]["conversations"][:1]  # no answer left: the shards command skips it
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    card = tmp_path / "bad.yaml"
    card.write_text(f"description: x\nsources:\n  - {{name: b, annotations: bad.json, images: {root}/shapes/images}}\n")
    pattern = shards(str(card), tmp_path, tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["samples"] == 9 and manifest["skipped"]["counts"] == {"nothing_to_learn": 1}
    source = SourceSpec(name="s", kind="webdataset", path=pattern, stream=True)
    records = StreamedRecords(MixtureCard(description="x", sources=[source]).named("s", ""), tmp_path, 0)
    torch.manual_seed(0)
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    processor = ImageProcessor(model.vision_tower.image_spec, "pad")
    data = LlavaDataset(records, get_template("phi"), model.tokenizer, processor, max_length=2048, layout=model.layout)
    assert data.streamed and all(isinstance(data[i], dict) for i in range(len(data)))
    manifest["shards"][0]["samples"] += 1  # a manifest that promises more than the shards hold: named
    (tmp_path / "shards/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="source 's': the stream ended after 9 samples, but its count says 10"):
        StreamedRecords(MixtureCard(description="x", sources=[source]).named("s", ""), tmp_path, 0)[0]
    (tmp_path / "shards/shard-000000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"shard-000000\.tar: not a readable tar file"):
        read_source(SourceSpec(name="s", kind="webdataset", path=pattern), tmp_path)


def test_rules_a_stream_cannot_follow_are_refused(root):
    with pytest.raises(ValueError, match="a streamed source is a Hugging Face dataset or shards"):
        SourceSpec(
            name="x", kind="webdataset", path="a.tar", stream=True, where=[{"column": "q", "op": ">", "value": 1}]
        )
    with pytest.raises(ValueError, match="a streamed source"):
        SourceSpec(name="x", annotations="a.json", stream=True)
    indexed = SourceSpec(name="i", annotations="shapes/instruct.json", images="shapes/images")
    mixed = MixtureCard(description="x", sources=[indexed, streamed(root).sources[0]]).named("mixed", "")
    with pytest.raises(ConfigError, match="either every source streams"):
        load_mixture(mixed, root)
    from mipha_lab.data.batching import plan_epoch

    records, _ = load_mixture(streamed(root), root)

    class Streamed:
        streamed = True

        def __len__(self) -> int:
            return len(records)

    with pytest.raises(ConfigError, match="a streamed mixture is batched `padded`"):
        plan_epoch("modality-grouped", Streamed(), micro_batch=4, world_size=1, seed=0, epoch=0, max_length=64)
    assert plan_epoch("padded", Streamed(), micro_batch=7, world_size=1, seed=0, epoch=3, max_length=64)[1] == list(
        range(7, 14)
    )


def test_a_bad_sample_raises_where_it_stands(root, tmp_path):
    import webdataset

    with webdataset.TarWriter(str(tmp_path / "s.tar")) as writer:
        for key, text in (("a", "<image>\nQ?"), ("b", "Q?")):  # b's image has no tag
            conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": "A"}]
            image = (root / "shapes/images/train/000000.png").read_bytes()
            writer.write({"__key__": key, "json": json.dumps({"conversations": conversation}).encode(), "png": image})
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"name": "s.tar", "samples": 2}]}))
    source = SourceSpec(name="s", kind="webdataset", path="s.tar", stream=True)
    records = StreamedRecords(MixtureCard(description="x", sources=[source]).named("s", ""), tmp_path, 0)
    found = []
    for index in range(2):
        try:
            found.append(records[index].sample_id)
        except SampleError as err:
            found.append(err.reason)
    assert sorted(found) == ["image_tag_mismatch", "s.tar:a"]
    assert [r.sample_id for r in records] == ["s.tar:a"]


@pytest.mark.slow
def test_a_streamed_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, data_root, monkeypatch):
    """micro.yaml's stage 2 on the tiny questions as shards, streamed: 20 steps of 8 cross into a second
    epoch of 120; SIGKILL at stage step 9 resumes from the checkpoint of step 7 mid-stream."""
    cards = tmp_path / "cards" / "mixtures"
    cards.mkdir(parents=True)
    pattern = shards("shapes-instruct-tiny", data_root, tmp_path / "shards", shard_mb="0.02")
    (cards / "tiny-streamed.yaml").write_text(
        "description: the tiny questions, streamed\n"
        f"sources:\n  - {{name: q, kind: webdataset, path: '{pattern}', stream: true}}\n"
    )
    monkeypatch.setenv("MIPHA_LAB_CARDS", str(tmp_path / "cards"))
    overrides = ("stages.instruct.mixture=tiny-streamed", "stages.instruct.max_steps=20")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reference = launch(tmp_path / "a", data_root, *overrides)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = launch(tmp_path / "b", data_root, *overrides, kill_at="step:14")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = launch(tmp_path / "b", data_root, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "step-00000012" in resumed.stderr
    a, b = tmp_path / "a/runs/micro", tmp_path / "b/runs/micro"
    assert "mixture: tiny-streamed" in (b / "config.yaml").read_text()
    assert losses(a) == losses(b) and len(losses(a)) == 25
    assert_bitwise_equal(weights(a), weights(b))
