"""The assembled model: loss, batch invariance, generation, save/load, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mipha_lab.constants import IGNORE_INDEX
from mipha_lab.constants import IMAGE_TOKEN_INDEX as IMG
from mipha_lab.errors import ConfigError, InputError
from mipha_lab.model import MultimodalModel, build_vlm
from mipha_lab.model.splice import splice_reference

PAIRS = [
    ("tiny-siglip-so400m-384", "tiny-phi-2"),
    ("tiny-clip-vit-l-336", "tiny-gemma-2b"),
    ("tiny-dinov2-large", "tiny-qwen2.5-0.5b"),
    ("tiny-timm-siglip-so400m-384", "tiny-smollm2-1.7b"),
    ("tiny-openclip-vit-b-16-laion2b", "tiny-phi-1.5"),
]


def batch(model: MultimodalModel, images_per_row=(1, 0, 2), seed=0):
    """Right-padded rows of random text with image placeholders, and matching pixels."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for count in images_per_row:
        text = torch.randint(5, 900, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        for i in range(count):
            text.insert(min(i * 2, len(text)), IMG)
        rows.append(text)
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    size = model.vision_tower.image_size
    pixels = torch.randn(sum(images_per_row), 3, size, size, generator=gen) if sum(images_per_row) else None
    labels = torch.where((ids == IMG) | (mask == 0), IGNORE_INDEX, ids)
    return ids, mask, pixels, labels


def rows(ids, mask, pixels, images_per_row):
    """Each sample alone, unpadded."""
    start = 0
    for b, count in enumerate(images_per_row):
        n = int(mask[b].sum())
        px = pixels[start : start + count] if count else None
        start += count
        yield ids[b : b + 1, :n], mask[b : b + 1, :n], px


@pytest.fixture(scope="module")
def phi_model():
    torch.manual_seed(0)
    return build_vlm("tiny-siglip-so400m-384", "tiny-phi-2").eval()


def test_loss_equals_transformers_loss_on_reference_splice(phi_model):
    ids, mask, pixels, labels = batch(phi_model)
    out = phi_model(ids, mask, pixels, labels)
    text = phi_model.language_model.get_input_embeddings()(ids.clamp(min=0))
    ref = splice_reference(ids, mask, text, phi_model.encode_images(pixels), labels)
    hf = phi_model.language_model(inputs_embeds=ref.inputs_embeds, attention_mask=ref.attention_mask, labels=ref.labels)
    torch.testing.assert_close(out.loss, hf.loss, rtol=1e-6, atol=1e-6)
    real = ref.attention_mask.bool()
    torch.testing.assert_close(out.logits[real], hf.logits.float()[real], rtol=1e-5, atol=1e-5)
    assert int(out.num_supervised) == int((ref.labels[:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("vision,llm", PAIRS)
def test_batch_logits_equal_each_sample_alone(vision, llm):
    model = build_vlm(vision, llm).eval()
    counts = (1, 0, 2, 1)
    ids, mask, pixels, _ = batch(model, counts, seed=1)
    with torch.no_grad():
        out = model(ids, mask, pixels)
        for b, (i, m, px) in enumerate(rows(ids, mask, pixels, counts)):
            alone = model(i, m, px).logits[0]
            torch.testing.assert_close(out.logits[b, : alone.shape[0]], alone, rtol=1e-5, atol=1e-5)


def _confident_prefix(logits: list[torch.Tensor], margin: float = 1e-3) -> int:
    """How many greedy steps have a top-2 margin above `margin` (random tiny models have near-ties)."""
    for step, row in enumerate(logits):
        top = row.float().topk(2).values
        if float(top[0] - top[1]) <= margin:
            return step
    return len(logits)


@pytest.mark.parametrize("vision,llm", PAIRS[:3])
def test_batched_greedy_generation_equals_each_sample_alone(vision, llm):
    model = build_vlm(vision, llm).eval()
    counts = (1, 2, 0)
    ids, mask, pixels, _ = batch(model, counts, seed=2)
    out = model.generate(ids, mask, pixels, max_new_tokens=8, output_scores=True)
    for b, (i, m, px) in enumerate(rows(ids, mask, pixels, counts)):
        alone = model.generate(i, m, px, max_new_tokens=8, output_scores=True)
        steps = _confident_prefix([step[0] for step in alone.logits])
        assert out.sequences[b, :steps].tolist() == alone.sequences[0, :steps].tolist()
        for step in range(len(alone.logits)):
            torch.testing.assert_close(out.logits[step][b], alone.logits[step][0], rtol=1e-5, atol=1e-5)
            if alone.sequences[0, step] == model.tokenizer.eos_token_id:
                break


def test_stop_strings_end_generation(phi_model):
    ids, mask, pixels, _ = batch(phi_model, (1,), seed=3)
    free = phi_model.generate(ids, mask, pixels, max_new_tokens=12)[0]
    text = phi_model.tokenizer.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = phi_model.generate(ids, mask, pixels, max_new_tokens=12, stop_strings=[stop])[0]
    decoded = phi_model.tokenizer.decode(stopped, skip_special_tokens=True)
    assert stop in decoded and len(stopped) <= len(free)
    assert not any(stop in phi_model.tokenizer.decode(stopped[:k]) for k in range(len(stopped)))


def test_sampling_honours_temperature_and_top_p(phi_model):
    ids, mask, pixels, _ = batch(phi_model, (1,), seed=4)
    greedy = phi_model.generate(ids, mask, pixels, max_new_tokens=10)
    torch.manual_seed(1)
    nucleus_of_one = phi_model.generate(ids, mask, pixels, max_new_tokens=10, temperature=1.0, top_p=1e-9)
    assert torch.equal(greedy, nucleus_of_one)
    draws = set()
    for seed in range(4):
        torch.manual_seed(seed)
        draws.add(tuple(phi_model.generate(ids, mask, pixels, max_new_tokens=10, temperature=5.0)[0].tolist()))
    assert len(draws) > 1


@pytest.mark.parametrize("vision,llm", PAIRS)
def test_save_and_load_give_identical_logits(tmp_path, vision, llm):
    model = build_vlm(vision, llm, projector="ldp-v2", projector_args={"tokens_per_side": 2}).eval()
    folder = tmp_path / "some-folder-named-gemma-phi-whatever"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["vision"]["card"]["builder"] and config["llm"]["name"] == llm
    assert (folder / "preprocessor_config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    loaded = MultimodalModel.from_pretrained(folder)
    ids, mask, pixels, _ = batch(model, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pixels).logits, model(ids, mask, pixels).logits, rtol=0, atol=0)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.config == model.config


def test_loading_refuses_folders_that_are_not_ours(tmp_path):
    with pytest.raises(ConfigError, match=r"has no config.json"):
        MultimodalModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    with pytest.raises(ConfigError, match=r"model_type='llava_llama'.*mipha_phi"):
        MultimodalModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mipha_phi"}))  # released layout, no weights
    with pytest.raises(ConfigError, match=r"no weights - expected model.safetensors.index.json"):
        MultimodalModel.from_pretrained(tmp_path)


def test_text_only_training_step_still_runs_the_vision_tower(phi_model):
    """Every rank runs the tower on every step (ZeRO-3 gathers its weights collectively)."""
    model = phi_model.train()
    calls = []
    hook = model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    ids, mask, pixels, labels = batch(model, (1, 0), seed=6)
    model.zero_grad()
    model(ids, mask, pixels, labels).loss.backward()
    used = {n for n, p in model.vision_tower.named_parameters() if p.grad is not None}
    ids, mask, _, labels = batch(model, (0, 0), seed=6)
    model.zero_grad()
    model(ids, mask, None, labels).loss.backward()
    grads = {n: p.grad for n, p in model.vision_tower.named_parameters() if p.grad is not None}
    hook.remove()
    model.eval()
    assert len(calls) == 2 and used and set(grads) == used
    assert all(float(g.abs().sum()) == 0 for g in grads.values())


def test_per_sample_image_count_mismatch_names_the_sample(phi_model):
    ids, mask, pixels, _ = batch(phi_model, (1, 2), seed=7)
    with pytest.raises(InputError, match=r"sample 'coco/42' has 2 image placeholder\(s\) but 1 image\(s\)"):
        phi_model(ids, mask, pixels, image_counts=[1, 1], sample_ids=["coco/1", "coco/42"])


def test_wrong_image_size_names_the_encoder(phi_model):
    ids, mask, _, _ = batch(phi_model, (1,), seed=8)
    with pytest.raises(InputError, match="'tiny-siglip-so400m-384' expects images of shape"):
        phi_model(ids, mask, torch.randn(1, 3, 64, 64))


def test_truncation_after_splicing_is_counted_and_reported(caplog):
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2", max_positions=20).eval()
    ids, mask, pixels, labels = batch(model, (2, 0), seed=9)  # 2 images = 32 positions > 20
    with caplog.at_level(logging.WARNING):
        out = model(ids, mask, pixels, labels)
    assert out.logits.shape[1] == 20 and model.truncated_samples == 1
    assert model.truncated_tokens == int(out.spliced.truncated.sum()) > 0
    assert "truncated 1 sample(s)" in caplog.text


def test_frozen_tower_dtype_and_projector_args_reach_the_model():
    model = build_vlm(
        "tiny-siglip-so400m-384", "tiny-qwen2.5-0.5b", projector="avgpool", projector_args={"tokens_per_side": 3}
    )
    assert model.num_image_tokens == 9
    ids, mask, pixels, labels = batch(model, (1,), seed=10)
    assert model(ids, mask, pixels, labels).spliced.inputs_embeds.shape[1] == ids.shape[1] - 1 + 9
