"""Trainability policies: frozen stays, trainable moves, LoRA trains adapters and merges, per-module lr."""

from __future__ import annotations

import pytest
import torch

from mipha_lab.config import StageConfig
from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.errors import ConfigError
from mipha_lab.model import build_vlm
from mipha_lab.model.adapters import merge_lora
from mipha_lab.train.engine import TorchEngine
from mipha_lab.train.policy import apply_policy, module_parameters


def stage(**trainable) -> StageConfig:
    return StageConfig(
        name="s",
        mixture="shapes-instruct",
        template="phi",
        global_batch=2,
        micro_batch=2,
        max_steps=1,
        optimizer={"lr": 1e-2},
        schedule={"kind": "constant", "warmup_ratio": 0.0},
        trainable=trainable,
    )


def batch(model):
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 5, 6, 7, 8, 9], [11, IMAGE_TOKEN_INDEX, 12, 13, 14, 15]])
    labels = torch.where(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX, ids)
    return ids, torch.ones_like(ids), torch.randn(2, 3, 32, 32), labels


def train_step(model, st: StageConfig) -> None:
    groups, _ = apply_policy(model, st, "tiny")
    engine = TorchEngine(model, groups, st, total_steps=1)
    model.train()
    ids, mask, pixels, labels = batch(model)
    engine.backward(model(ids, mask, pixels, labels).loss)
    engine.step()


def snapshot(model):
    return {name: [p.detach().clone() for _, p in params] for name, params in module_parameters(model).items()}


def changed(before, after) -> dict[str, bool]:
    return {m: any(not torch.equal(a, b) for a, b in zip(before[m], after[m], strict=True)) for m in before}


def test_frozen_modules_stay_and_trainable_ones_move():
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    before = snapshot(model)
    train_step(model, stage(projector="full", lm_head="full"))
    assert changed(before, snapshot(model)) == {
        "vision": False,
        "projector": True,
        "lm_body": False,
        "lm_embeddings": False,
        "lm_head": True,
    }


def test_per_module_learning_rates_reach_the_optimizer():
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    st = stage(projector={"mode": "full", "lr": 1e-3}, vision={"mode": "full", "lr_scale": 0.1}, lm_body="full")
    groups, rows = apply_policy(model, st, "tiny")
    lrs = {g["name"]: g["lr"] for g in TorchEngine(model, groups, st, 1).optimizer.param_groups}
    assert lrs["projector"] == 1e-3 and lrs["vision"] == pytest.approx(1e-3) and lrs["lm_body"] == 1e-2
    assert {r.module: r.lr for r in rows}["lm_head"] is None
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("no_decay"))


def test_partial_trains_layers_from_k():
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    apply_policy(model, stage(lm_body={"mode": "partial", "from_layer": 1}), "tiny")
    layers = model.language_model.get_decoder().layers
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    with pytest.raises(ConfigError, match=r"trainable.lm_body: from_layer 5 is outside the module.s layers 0..1"):
        apply_policy(
            build_vlm("tiny-siglip-so400m-384", "tiny-phi-2"), stage(lm_body={"mode": "partial", "from_layer": 5})
        )


def test_lora_trains_only_adapters_and_merges_to_the_same_outputs():
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    base = {n: p.detach().clone() for n, p in model.language_model.named_parameters()}
    st = stage(lm_body={"mode": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    train_step(model, st)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector") for n in trainable)
    model.eval()
    ids, mask, pixels, _ = batch(model)
    with torch.no_grad():
        adapted = model(ids, mask, pixels).logits
    assert merge_lora(model) > 0
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, pixels).logits, adapted, rtol=1e-5, atol=1e-5)
    merged = dict(model.language_model.named_parameters())
    assert any(not torch.equal(merged[n], base[n]) for n in base if n in merged)


def test_tied_head_must_share_the_embedding_policy():
    model = build_vlm("tiny-siglip-so400m-384", "tiny-gemma-2b")
    with pytest.raises(ConfigError, match="'tiny-gemma-2b' ties lm_head to lm_embeddings"):
        apply_policy(model, stage(lm_head="full"), "tiny-gemma-2b")
    _groups, rows = apply_policy(model, stage(lm_head="full", lm_embeddings="full"), "tiny-gemma-2b")
    assert {r.module: r.total for r in rows}["lm_head"] == 0  # counted once, under lm_embeddings


def test_nothing_trainable_is_an_error():
    model = build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")
    with pytest.raises(ConfigError, match="every module is frozen"):
        apply_policy(model, stage(projector="frozen"))
