"""The `quirks:` block reproduces the original's behaviours 1, 2 and 3 (5 is tested with the templates)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mipha_lab.config import QuirksConfig, StageConfig, load_experiment
from mipha_lab.model import build_vlm
from mipha_lab.model.loader import NO_TRUNCATION, build_model
from mipha_lab.train.policy import apply_policy

MICRO = Path(__file__).resolve().parents[1] / "experiments" / "micro.yaml"
STAGE1 = {
    "name": "align",
    "mixture": "shapes-captions",
    "template": "plain",
    "global_batch": 8,
    "micro_batch": 8,
    "optimizer": {"lr": 1e-3},
    "trainable": {"projector": {"mode": "full", "lr": 5e-4}},
}


def trainable(model, module: str) -> int:
    return sum(p.numel() for p in getattr(model, module).parameters() if p.requires_grad)


@pytest.mark.parametrize("quirk", [False, True])
def test_quirk_1_stage_one_trains_an_untied_head(quirk):
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    groups, _ = apply_policy(model, StageConfig(**STAGE1), "tiny-phi-2", QuirksConfig(stage1_trains_lm_head=quirk))
    head = model.language_model.get_output_embeddings()
    assert head.weight.requires_grad is quirk
    assert ("lm_head" in {g["name"] for g in groups}) is quirk
    assert trainable(model, "vision_tower") == 0


def test_quirk_1_leaves_a_tied_head_alone():
    model = build_vlm("tiny-siglip-so400m-384", "tiny-gemma-2b")
    apply_policy(model, StageConfig(**STAGE1), "tiny-gemma-2b", QuirksConfig(stage1_trains_lm_head=True))
    assert not model.language_model.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("quirk,expected", [(False, 5e-4), (True, 1e-3)])
def test_quirk_2_one_shared_learning_rate(quirk, expected):
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    groups, _ = apply_policy(model, StageConfig(**STAGE1), "tiny-phi-2", QuirksConfig(shared_learning_rate=quirk))
    assert {g["lr"] for g in groups if g["name"].startswith("projector")} == {expected}


def test_quirk_3_no_truncation_after_splicing():
    micro = load_experiment(MICRO, ["model.max_positions=20"])
    assert build_model(micro).config.max_positions == 20
    quirky = load_experiment(MICRO, ["model.max_positions=20", "quirks.no_truncation_after_splice=true"])
    model = build_model(quirky)
    assert model.config.max_positions == NO_TRUNCATION
    ids = torch.tensor([[-200, *list(range(1, 30))]])
    out = model(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), labels=ids.clamp(min=0))
    assert out.logits.shape[1] == 29 + model.num_image_tokens  # 45 positions, nothing cut
