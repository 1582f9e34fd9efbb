"""Fused vision encoders (model/fused_vision.py, `builder: fused` cards): the fused features are each tower's
own features on its own preprocessing, concatenated; grids are checked or pooled; each tower has its own
trainability; the model saves and loads with the towers' cards inside config.json."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoModel

from mipha_lab.config import StageConfig
from mipha_lab.errors import ConfigError
from mipha_lab.model import MultimodalModel, build_vlm
from mipha_lab.model.build import build_vision
from mipha_lab.model.fused_vision import FusedVisionTower
from mipha_lab.model.image_processing import ImageProcessor, image_processor
from mipha_lab.model.vision import VISION
from mipha_lab.model.vision_backends import build_vision_tower
from mipha_lab.train.policy import apply_policy

TOWERS = {
    "tiny-dinosiglip-384": {"dinov2": "tiny-dinov2-large", "siglip": "tiny-siglip-so400m-384"},
    "tiny-dinoclip-336": {"dinov2": "tiny-dinov2-large", "clip": "tiny-clip-vit-l-336"},
}


def photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))  # landscape: `pad` letterboxes it


@pytest.mark.parametrize("card", sorted(TOWERS))
def test_fused_features_are_each_towers_own_concatenated(card):
    torch.manual_seed(0)
    fused, _ = build_vision(card)
    images = [photo(1), photo(2)]
    pixels = torch.stack([image_processor(fused.image_specs, "pad")(image) for image in images])
    with torch.no_grad():
        got = fused(pixels)
    expected = []
    for key, name in TOWERS[card].items():
        alone, _ = build_vision(name, image_size=32)  # the tower by itself, with its own card's preprocessing
        alone.load_state_dict(fused.towers[key].state_dict())
        own = torch.stack([ImageProcessor(alone.image_spec, "pad")(image) for image in images])
        with torch.no_grad():
            expected.append(alone(own))
    assert got.shape == (2, 16, sum(e.shape[-1] for e in expected))
    torch.testing.assert_close(got, torch.cat(expected, dim=-1), atol=0, rtol=0)


def test_towers_on_different_grids_are_pooled_or_refused():
    siglip = VISION.get("tiny-siglip-so400m-384")
    coarse_card = siglip.model_copy(update={"architecture": {**siglip.architecture, "patch_size": 16}})
    coarse = build_vision_tower(coarse_card.named("coarse"))  # 32 px / 16 = a 2 x 2 grid
    fine, _ = build_vision("tiny-dinov2-large", image_size=32)  # a 4 x 4 grid
    with pytest.raises(ConfigError, match=r"grids differ \(\{'coarse': 2, 'fine': 4\}"):
        FusedVisionTower({"coarse": coarse, "fine": fine}, "equal", "mixed")
    pooled = FusedVisionTower({"coarse": coarse, "fine": fine}, "pool", "mixed")
    pixels = torch.randn(3, 6, 32, 32)
    with torch.no_grad():
        got = pooled(pixels)
        fine_grid = fine(pixels[:, 3:]).transpose(1, 2).reshape(3, -1, 4, 4)
        expected = torch.cat([coarse(pixels[:, :3]), F.avg_pool2d(fine_grid, 2).flatten(2).transpose(1, 2)], -1)
    assert pooled.num_tokens == 4
    torch.testing.assert_close(got, expected)
    bigger, _ = build_vision("tiny-dinov2-large", image_size=48)
    with pytest.raises(ConfigError, match=r"same input side, got \{'coarse': 32, 'big': 48\}"):
        FusedVisionTower({"coarse": coarse, "big": bigger}, "pool", "mixed")


def stage(trainable: dict) -> StageConfig:
    return StageConfig(name="s", mixture="m", template="phi", global_batch=1, micro_batch=1, optimizer={"lr": 1e-3},
                       trainable=trainable)  # fmt: skip


def test_each_tower_trains_by_its_own_policy():
    model = build_vlm("tiny-dinosiglip-384", "tiny-phi-2", with_tokenizer=False)
    groups, rows = apply_policy(
        model, stage({"vision": "full", "vision.dinov2": "frozen", "vision.siglip": {"mode": "full", "lr": 1e-5}})
    )
    towers = model.vision_tower.towers
    assert not any(p.requires_grad for p in towers["dinov2"].parameters())
    assert all(p.requires_grad for p in towers["siglip"].parameters())
    assert [r.module for r in rows][:3] == ["vision", "vision.dinov2", "vision.siglip"]
    assert {g["name"]: g["lr"] for g in groups}["vision.siglip"] == 1e-5
    with pytest.raises(ConfigError, match=r"no tower 'clip' \(its towers are dinov2, siglip\)"):
        apply_policy(model, stage({"vision.clip": "full"}))
    single = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2", with_tokenizer=False)
    with pytest.raises(ConfigError, match="has no tower 'dinov2' \\(it has one tower\\)"):
        apply_policy(single, stage({"vision.dinov2": "full"}))


def test_fused_model_saves_and_loads_with_its_towers_cards(tmp_path):
    torch.manual_seed(0)
    model = build_vlm("tiny-dinosiglip-384", "tiny-phi-2").eval()
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalModel.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[5, -200, 7, 9]])
    pixels = torch.stack([image_processor(model.vision_tower.image_specs, "pad")(photo())])
    with torch.no_grad():
        a = model(ids, torch.ones_like(ids), pixels).logits
        b = loaded(ids, torch.ones_like(ids), pixels).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not (tmp_path / "m" / "preprocessor_config.json").exists()  # transformers has none for two towers


def transformers_parameters(card_name: str) -> int:
    """Parameters of transformers' own vision model built from the card's architecture (on the meta device)."""
    architecture = dict(VISION.get(card_name).architecture)
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.for_model(architecture.pop("model_type"), **architecture))
    return sum(p.numel() for p in model.parameters())


def test_real_fused_cards_plan_on_the_meta_device_with_exact_parameter_counts():
    with torch.device("meta"):
        dinosiglip, _ = build_vision("dinosiglip-384")
        dinoclip, _ = build_vision("dinoclip-336")
    dinov2 = transformers_parameters("dinov2-large")
    assert sum(p.numel() for p in dinosiglip.parameters()) == dinov2 + transformers_parameters("siglip-so400m-384")
    assert sum(p.numel() for p in dinoclip.parameters()) == dinov2 + transformers_parameters("clip-vit-l-336")
    assert (dinosiglip.hidden_size, dinosiglip.num_tokens) == (1024 + 1152, 729)
    assert (dinoclip.hidden_size, dinoclip.num_tokens) == (1024 + 1024, 576)
