"""`launch --dry-run`: the released recipes plan offline, stdout holds only JSON, and the analytic
FLOPs per sample agree with torch's FLOP counter on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mipha_lab.config import StageConfig
from mipha_lab.model import build_vlm
from mipha_lab.train.flops import sample_flops
from mipha_lab.train.policy import apply_policy

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RELEASED = ["siglip_phi2_fullft", "mipha_1.6b_phi15", "mipha_2.4b_gemma2b", "llava_phi_clip_phi2", "siglip_phi2_lora"]


def launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "mipha_lab.launch", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def plan(name: str, tmp_path: Path, *extra: str) -> dict:
    out = launch(
        str(EXPERIMENTS / f"{name}.yaml"), "--dry-run", "--json", f"data_root={tmp_path / 'none'}", *extra, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)  # the whole of stdout is the one JSON object


def test_mipha_3b_plan(tmp_path):
    result = plan("siglip_phi2_fullft", tmp_path, "--gpu", "H100", "--num-gpus", "8", "--mfu", "0.4")
    assert result["params"]["llm"] == 2_779_683_840
    assert result["params"]["vision"] == 428_225_600
    assert result["params"]["total"] == sum(result["params"][k] for k in ("vision", "projector", "llm"))
    assert result["visual_tokens"] == 729
    assert result["assumptions"] == {"gpu": "H100", "num_gpus": 8, "mfu": 0.4, "peak_tflops": 989.0}
    pretrain, finetune = result["stages"]
    assert (pretrain["samples"], pretrain["steps"]) == (558_128, 2_181)  # about 2.18K steps, as the original
    assert (finetune["samples"], finetune["steps"]) == (665_298, 2 * 5_198)  # about 5.2K per epoch
    # stage 1: the projector, plus Phi-2's untied head under quirk 1 (as the original trained it)
    assert pretrain["trainable"]["projector"] == result["params"]["projector"]
    assert pretrain["trainable"]["lm_head"] == 2560 * 51200 + 51200
    assert pretrain["trainable"]["vision"] == pretrain["trainable"]["lm_body"] == 0
    assert sum(finetune["trainable"].values()) == result["params"]["total"]
    for stage in result["stages"]:
        hours = stage["steps"] * {"pretrain": 256, "finetune": 128}[stage["name"]] * stage["flops_per_sample"]
        assert stage["gpu_hours"] == pytest.approx(hours / (989e12 * 0.4) / 3600, rel=1e-3)
    assert result["total_gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in result["stages"]), abs=1e-3)


def plan_in_process(name: str, tmp_path: Path) -> dict:
    from mipha_lab.config import load_experiment
    from mipha_lab.plan import plan_experiment

    return plan_experiment(load_experiment(EXPERIMENTS / f"{name}.yaml", [f"data_root={tmp_path / 'none'}"]))


@pytest.mark.parametrize("name", RELEASED[1:])
def test_every_released_recipe_plans_offline(name, tmp_path):
    result = plan_in_process(name, tmp_path)
    assert result["visual_tokens"] == (576 if "clip" in name else 729)
    assert [s["name"] for s in result["stages"]] == ["pretrain", "finetune"]
    assert all(s["flops_per_sample"] > 0 and s["memory_per_gpu_gib"] > 0 for s in result["stages"])


def test_lora_recipe_trains_adapters_not_the_lm(tmp_path):
    finetune = plan_in_process("siglip_phi2_lora", tmp_path)["stages"][1]
    lora = finetune["trainable"]["lm_body"]
    # r=64 on q, k, v, dense, fc1, fc2 of 32 Phi-2 layers: 64 x (in + out) each
    assert lora == 32 * 64 * (4 * (2560 + 2560) + (2560 + 10240) + (10240 + 2560))
    assert finetune["trainable"]["lm_head"] == finetune["trainable"]["lm_embeddings"] == 0


def test_a_released_recipe_without_data_or_weights_fails_at_once(tmp_path):
    out = launch(str(EXPERIMENTS / "siglip_phi2_fullft.yaml"), f"data_root={tmp_path / 'none'}", cwd=tmp_path)
    assert out.returncode == 2
    assert "blip_laion_cc_sbu_558k.json" in out.stderr and "huggingface.co/datasets/liuhaotian" in out.stderr
    assert "microsoft/phi-2" in out.stderr and "google/siglip-so400m-patch14-384" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created


def measured_training_flops(model, stage: StageConfig, text: int, images: int) -> tuple[float, float]:
    """torch's count of one forward+backward on one sample vs ours."""
    apply_policy(model, stage, "tiny")
    ids = torch.randint(0, 500, (1, text + images))
    ids[0, 1 : 1 + images] = -200
    labels = ids.clone()
    labels[0, : text // 2 + images] = -100
    pixels = torch.randn(images, model.vision_tower.in_channels, 32, 32) if images else None
    with FlopCounterMode(display=False) as counter:
        out = model(ids, torch.ones_like(ids), pixels, labels, return_logits=False)
        out.loss.backward()
    supervised = int((labels[0, 1:] != -100).sum())
    return float(counter.get_total_flops()), sample_flops(model, text, images, supervised).useful


@pytest.mark.parametrize(
    "vision,trainable,text,images",
    [
        (
            "tiny-siglip-so400m-384",
            {"vision": "full", "projector": "full", "lm_body": "full", "lm_embeddings": "full", "lm_head": "full"},
            200,
            1,
        ),
        ("tiny-siglip-so400m-384", {"projector": "full"}, 120, 1),
        ("tiny-siglip-so400m-384", {"projector": "full", "lm_body": "full", "lm_head": "full"}, 300, 0),
        # a fused encoder, one tower trained: the frozen tower's input gradients are not computed
        ("tiny-dinosiglip-384", {"vision.dinov2": "full", "projector": "full"}, 150, 2),
        ("tiny-dinosiglip-384", {"vision.siglip": "full", "projector": "full"}, 150, 1),
    ],
)
def test_analytic_flops_match_the_flop_counter(vision, trainable, text, images):
    torch.manual_seed(0)
    model = build_vlm(vision, "tiny-phi-2", attn_implementation="eager")
    stage = StageConfig(
        name="s",
        mixture="shapes-instruct",
        template="phi",
        global_batch=1,
        micro_batch=1,
        optimizer={"lr": 1e-3},
        trainable=trainable,
    )
    measured, ours = measured_training_flops(model, stage, text, images)
    assert ours == pytest.approx(measured, rel=0.05)
