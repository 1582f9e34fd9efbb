"""The real architectures, instantiated on the meta device from the cards alone (no network)."""

from __future__ import annotations

import pytest
import torch

from mipha_lab.model.language import LLM, build_language_model
from mipha_lab.model.vision import VISION
from mipha_lab.model.vision_backends import build_vision_tower

PUBLISHED_LLM = {
    "phi-2": 2_779_683_840,
    "phi-1.5": 1_418_270_720,
    "gemma-2b": 2_506_172_416,
}
PUBLISHED_VISION = {  # (parameters, visual tokens with the card's feature selection)
    "siglip-so400m-384": (428_225_600, 729),
    "clip-vit-l-336": (303_507_456, 576),
    "dinov2-large": (304_368_640, 256),
    "siglip-base-224": (92_884_224, 196),
    "clip-vit-l-224": (None, 256),
    "timm-siglip-so400m-384": (428_225_600, 729),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors counted once


@pytest.mark.parametrize("name,expected", PUBLISHED_LLM.items())
def test_language_model_parameter_counts(name, expected):
    with torch.device("meta"):
        model = build_language_model(LLM.get(name))
    assert count(model) == expected


@pytest.mark.parametrize("name,expected", PUBLISHED_VISION.items())
def test_vision_parameter_and_token_counts(name, expected):
    params, tokens = expected
    with torch.device("meta"):
        tower = build_vision_tower(VISION.get(name))
    if params is not None:
        assert count(tower) == params
    assert tower.num_tokens == tokens


def test_cls_patch_keeps_the_cls_token():
    card = VISION.get("clip-vit-l-336")
    card = card.model_copy(update={"features": card.features.model_copy(update={"select": "cls_patch"})})
    with torch.device("meta"):
        assert build_vision_tower(card).num_tokens == 577
