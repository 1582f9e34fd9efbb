"""Vision towers, projectors and language models built from the tiny cards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from mipha_lab.errors import InputError
from mipha_lab.model.language import LLM, build_language_model, load_tokenizer
from mipha_lab.model.projectors import PROJECTORS
from mipha_lab.model.vision import VISION
from mipha_lab.model.vision_backends import build_vision_tower

TINY_TOWERS = [
    "tiny-siglip-so400m-384",
    "tiny-clip-vit-l-336",
    "tiny-dinov2-large",
    "tiny-timm-siglip-so400m-384",
    "tiny-openclip-vit-b-16-laion2b",
]


def pixels(tower, n=2):
    return torch.randn(n, 3, tower.image_size, tower.image_size)


def test_transformers_tower_returns_penultimate_layer_before_final_norm():
    tower = build_vision_tower(VISION.get("tiny-siglip-so400m-384")).eval()
    x = pixels(tower)
    # the penultimate block's output: hidden_states[-2] of the whole model under transformers 4.5x and 5
    # (4.5x's last entry is post-norm, so [-1] of a truncated model would not be)
    expected = tower.backbone(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tower(x), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(tower(x), tower.backbone(pixel_values=x).last_hidden_state)  # post-norm differs


def test_clip_patch_drops_cls_and_cls_patch_keeps_it():
    card = VISION.get("tiny-clip-vit-l-336")
    tower = build_vision_tower(card).eval()
    keep = card.model_copy(update={"features": card.features.model_copy(update={"select": "cls_patch"})})
    with_cls = build_vision_tower(keep).eval()
    with_cls.load_state_dict(tower.state_dict())
    x = pixels(tower)
    full = with_cls(x)
    assert full.shape[1] == tower.num_tokens + 1 == with_cls.num_tokens
    torch.testing.assert_close(full[:, 1:], tower(x))


def test_timm_tower_matches_a_manual_block_loop():
    tower = build_vision_tower(VISION.get("tiny-timm-siglip-so400m-384")).eval()
    vit, x = tower.backbone, pixels(tower)
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for block in vit.blocks[:-1]:
        h = block(h)
    torch.testing.assert_close(tower(x), h)


def test_open_clip_tower_matches_a_manual_block_loop():
    tower = build_vision_tower(VISION.get("tiny-openclip-vit-b-16-laion2b")).eval()
    visual, x = tower.backbone, pixels(tower)
    h = visual.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([visual.class_embedding.expand(h.shape[0], 1, -1), h], dim=1) + visual.positional_embedding
    h = visual.ln_pre(visual.patch_dropout(h))
    for block in visual.transformer.resblocks[:-1]:
        h = block(h)
    torch.testing.assert_close(tower(x), h[:, 1:])


@pytest.mark.parametrize("name", TINY_TOWERS)
def test_towers_stop_at_the_feature_layer_and_keep_every_block(name):
    """The blocks after the feature layer never run (wasted compute) but stay (released checkpoints)."""
    tower = build_vision_tower(VISION.get(name)).eval()
    blocks, ran = tower.blocks, []
    used = tower.absolute_layer(len(blocks)) + 1
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, index=index: ran.append(index))
    tower(pixels(tower))
    assert ran == list(range(used)) and used < len(blocks)
    assert len(tower.blocks) == len(blocks) and any(k.startswith("backbone.") for k in tower.state_dict())
    assert sum(1 for k in tower.state_dict() if f".{used}." in k) > 0


@pytest.mark.parametrize("name", TINY_TOWERS)
def test_tiny_towers_output_grid_and_reject_wrong_sizes(name):
    tower = build_vision_tower(VISION.get(name)).eval()
    assert sum(p.numel() for p in tower.parameters()) < 5_000_000
    out = tower(pixels(tower, 3))
    assert out.shape == (3, tower.num_tokens, tower.hidden_size)
    with pytest.raises(InputError, match=f"'{name}' expects images of shape \\(N, 3, 32, 32\\)"):
        tower(torch.randn(1, 3, 48, 48))


def test_projector_shapes_and_token_counts():
    x = torch.randn(2, 27 * 27, 24)
    for name, tokens in [("linear", 729), ("mlp2x_gelu", 729), ("ldp-v2", 144), ("avgpool", 144)]:
        projector = PROJECTORS.build(name, in_dim=24, out_dim=16, grid=27)
        assert projector(x).shape == (2, tokens, 16) and projector.num_tokens(729) == tokens
    four = PROJECTORS.build("avgpool", in_dim=24, out_dim=16, grid=27, tokens_per_side=4)
    assert four(x).shape == (2, 16, 16)
    with pytest.raises(ValueError, match="equal widths"):
        PROJECTORS.build("identity", in_dim=24, out_dim=16)
    with pytest.raises(ValueError, match="square token grid"):
        PROJECTORS.build("ldp-v2", in_dim=24, out_dim=16, grid=None)


def test_mlp2x_gelu_keeps_llava_layout_and_math():
    projector = PROJECTORS.build("mlp2x_gelu", in_dim=8, out_dim=6)
    assert sorted(projector.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    x = torch.randn(3, 8)
    expected = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, projector[0].weight, projector[0].bias)),
        projector[2].weight,
        projector[2].bias,
    )
    torch.testing.assert_close(projector(x), expected)


def test_ldp_v2_pools_then_adds_depthwise_position_encoding():
    projector = PROJECTORS.build("ldp-v2", in_dim=8, out_dim=6, grid=4, tokens_per_side=2)
    x = torch.randn(1, 16, 8)
    mapped = projector.mlp(x).reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    pooled = mapped.reshape(1, 6, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 blocks, exact for 4 -> 2
    expected = pooled + projector.peg(pooled)
    torch.testing.assert_close(projector(x), expected.flatten(2).transpose(1, 2))


def _with_hub_id(card, hub_id):
    return card.model_copy(update={"hub_id": hub_id}).named(card.name)


def test_transformers_tower_loads_weights_from_a_local_folder(tmp_path):
    card = VISION.get("tiny-siglip-so400m-384")
    source = build_vision_tower(card)
    source.backbone.save_pretrained(tmp_path)
    loaded = build_vision_tower(_with_hub_id(card, str(tmp_path)), pretrained=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_timm_tower_loads_weights_from_a_local_file(tmp_path):
    card = VISION.get("tiny-timm-siglip-so400m-384")
    source = build_vision_tower(card)
    save_file(source.backbone.state_dict(), tmp_path / "model.safetensors")
    loaded = build_vision_tower(_with_hub_id(card, str(tmp_path / "model.safetensors")), pretrained=True)
    x = pixels(source)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_open_clip_tower_loads_the_visual_keys_of_a_full_checkpoint(tmp_path):
    card = VISION.get("tiny-openclip-vit-b-16-laion2b")
    source = build_vision_tower(card)
    state = {f"visual.{k}": v.contiguous() for k, v in source.backbone.state_dict().items()}
    state["logit_scale"] = torch.ones(())  # text-side keys are ignored
    save_file(state, tmp_path / "open_clip_model.safetensors")
    loaded = build_vision_tower(_with_hub_id(card, str(tmp_path)), pretrained=True)
    x = pixels(source)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_language_model_loads_from_a_local_folder(tmp_path):
    card = LLM.get("tiny-qwen2.5-0.5b")
    source = build_language_model(card)
    source.save_pretrained(tmp_path)
    loaded = build_language_model(_with_hub_id(card, str(tmp_path)), pretrained=True)
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(loaded(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_gemma_head_is_tied_and_tokenizers_have_card_special_tokens():
    gemma = build_language_model(LLM.get("tiny-gemma-2b"))
    assert gemma.get_output_embeddings().weight is gemma.get_input_embeddings().weight
    tokenizer = load_tokenizer(LLM.get("tiny-gemma-2b"))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    phi = load_tokenizer(LLM.get("tiny-phi-2"))
    assert phi.eos_token == "<|endoftext|>" and phi.pad_token is None
    assert len(phi) <= LLM.get("tiny-phi-2").architecture["vocab_size"]


def test_tiny_tokenizer_merges_the_space_into_the_next_word():
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    tokens = tokenizer.tokenize("ASSISTANT: red circle")
    assert "Ġred" in tokens or any(t.startswith("Ġr") for t in tokens)
    encoded = tokenizer("USER: hi<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert encoded[-1] == tokenizer.eos_token_id
    again = load_tokenizer(LLM.get("tiny-phi-2"))
    assert again.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize(
    "name", ["tiny-siglip-so400m-384", "tiny-timm-siglip-so400m-384", "tiny-openclip-vit-b-16-laion2b"]
)
def test_vision_activation_checkpointing_recomputes_with_equal_gradients(name):
    from mipha_lab.train.speed import tower_checkpointing

    tower = build_vision_tower(VISION.get(name)).train()
    calls = []
    first_child = next(iter(tower.blocks[0].children()))  # transformers recomputes `forward`, not the block's hooks
    first_child.register_forward_pre_hook(lambda *_: calls.append(1))
    x, grads = pixels(tower), []
    for checkpointing in (False, True):
        if checkpointing:
            tower_checkpointing(SimpleNamespace(vision_tower=tower), True)
        calls.clear()
        tower.zero_grad()
        tower(x).square().sum().backward()
        grads.append([p.grad.clone() for p in tower.parameters() if p.grad is not None])
        assert len(calls) == (2 if checkpointing else 1)  # the block's forward runs again in backward
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_pixel_shuffle_matches_idefics3_and_a_hand_written_reference():
    """Idefics3's own pixel shuffle (transformers) and the definition: token (i, j) of the reduced grid is
    the concatenation, row by row, of the features of the r x r block at (i r, j r)."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    from mipha_lab.model.projectors import pixel_shuffle

    x = torch.randn(2, 36, 5)
    for ratio in (2, 3):
        ours = pixel_shuffle(x, 6, ratio)
        torch.testing.assert_close(ours, Idefics3Connector.pixel_shuffle(None, x, ratio), rtol=0, atol=0)
        side = 6 // ratio
        grid = x.reshape(2, 6, 6, 5)
        for i in range(side):
            for j in range(side):
                block = [grid[:, i * ratio + a, j * ratio + c] for a in range(ratio) for c in range(ratio)]
                torch.testing.assert_close(ours[:, i * side + j], torch.cat(block, dim=-1), rtol=0, atol=0)
    projector = PROJECTORS.build("pixel-shuffle", in_dim=24, out_dim=16, grid=27, ratio=3)
    assert projector.num_tokens(729) == 81 and projector(torch.randn(1, 729, 24)).shape == (1, 81, 16)
    with pytest.raises(ValueError, match=r"ratio 2 .* 27 x 27"):
        PROJECTORS.build("pixel-shuffle", in_dim=24, out_dim=16, grid=27, ratio=2)
