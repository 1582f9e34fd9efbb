"""FLOPs: our analytic count per sample (mipha_lab/train/flops.py, which the MFU we log divides) over
torch's FLOP counter (`torch.utils.flop_counter.FlopCounterMode`) on one sample's forward+backward.

Two models: tiny (the tiny SigLIP at 216 px, 729 tokens, + tiny-phi-2) and mid-size (SigLIP-SO400M and
Phi-2 at their real widths, cut to 3 and 2 layers; in --smoke at 112 px and 1 LM layer), each under the
released stage 1 (the projector and Phi-2's untied head train, quirk 1) and stage 2 (everything trains).
Attention runs eager: torch has no FLOP formula for the CPU SDPA kernels. Ours is what runs: `useful +
recompute` (MFU divides `useful` only). A last case, the tiny model's stage 2 with LM
activation checkpointing, compares torch's extra count against our `recompute`. `ratio` is ours /
measured for the case furthest from 1 (`tiny_ratio`, `mid_ratio` per model).
Prints `flops: <ratio> (...)` and writes bench/results/flops.json.

    python bench/flops.py [--smoke] [--text N] [--out DIR]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench._common import TINY_729, parser, tiny_vlm_729
from bench._results import report
from mipha_lab.config import QuirksConfig, StageConfig
from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.model import MultimodalModel, build_vlm
from mipha_lab.model.language import LLM
from mipha_lab.model.vision import VISION
from mipha_lab.registry.cards import Card
from mipha_lab.registry.core import Registry
from mipha_lab.train.flops import Flops, sample_flops
from mipha_lab.train.policy import apply_policy
from mipha_lab.train.speed import set_layers

FULL = {"vision": "full", "projector": "full", "lm_body": "full", "lm_embeddings": "full", "lm_head": "full"}
STAGES = {"stage 1": {"projector": "full"}, "stage 2": FULL}
RELEASED_QUIRKS = QuirksConfig(stage1_trains_lm_head=True)


def stage(trainable: dict[str, str], lm_checkpointing: bool = False) -> StageConfig:
    """A stage with these trainable modules (only the policy and checkpointing matter here)."""
    return StageConfig(
        name="bench",
        mixture="shapes-instruct",
        template="phi",
        global_batch=1,
        micro_batch=1,
        optimizer={"lr": 1e-3},
        trainable=trainable,
        activation_checkpointing={"lm": lm_checkpointing},
    )


def cut(registry: Registry, name: str, layers: int) -> Card:
    """A registry card with fewer layers (same widths)."""
    card = registry.get(name)
    return card.model_copy(update={"architecture": {**card.architecture, "num_hidden_layers": layers}}).named(
        card.name, card.source
    )


def mid_vlm(smoke: bool) -> MultimodalModel:
    """SO400M + Phi-2 widths. Weights are zeros, not random: counts do not depend on values, and
    initialising half a billion parameters would take most of the run."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = build_vlm(
            cut(VISION, "siglip-so400m-384", 3),
            cut(LLM, "phi-2", 1 if smoke else 2),
            attn_implementation="eager",
            with_tokenizer=False,
            image_size=112 if smoke else None,
        )
    for param in model.parameters():
        param.data.zero_()
    return model


def eager(model: MultimodalModel) -> MultimodalModel:
    """Eager attention in the tower too (the LM's is chosen when it is built)."""
    model.vision_tower.backbone.set_attn_implementation("eager")
    return model.train()


def measure(model: MultimodalModel, text: int) -> tuple[float, int]:
    """torch's count over one sample (one image, `text` text positions, the second half supervised)."""
    ids = torch.randint(1, 1000, (1, text + 1), generator=torch.Generator().manual_seed(0))
    ids[0, 1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[0, : text // 2 + 2] = IGNORE_INDEX
    size = model.vision_tower.image_size
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        out = model(ids, torch.ones_like(ids), torch.zeros(1, 3, size, size), labels, return_logits=False)
        out.loss_sum.backward()
    return float(counter.get_total_flops()), int(out.num_supervised)


def case(
    model: MultimodalModel, name: str, stage_name: str, text: int, lm_checkpointing: bool = False
) -> dict[str, Any]:
    config = stage(STAGES[stage_name], lm_checkpointing)
    apply_policy(model, config, name, RELEASED_QUIRKS)
    set_layers(model, config, "full" if lm_checkpointing else "none")
    measured, supervised = measure(model, text)
    ours: Flops = sample_flops(model, text, 1, supervised, config.activation_checkpointing.model_dump())
    return {
        "model": name,
        "stage": stage_name,
        "lm_checkpointing": lm_checkpointing,
        "text_tokens": text,
        "supervised": supervised,
        "measured": measured,
        "useful": ours.useful,
        "recompute": ours.recompute,
        "ratio": (ours.useful + ours.recompute) / measured,
    }


def furthest(cases: list[dict[str, Any]]) -> float:
    """The ratio furthest from 1 (too high or too low)."""
    return max((c["ratio"] for c in cases), key=lambda r: abs(r - 1.0))


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__, "the mid-size model at 112 px with 1 LM layer (what CI runs)")
    cli.add_argument("--text", type=int, default=None, help="text positions of the sample")
    args = cli.parse_args(argv)
    text = args.text or (64 if args.smoke else 200)
    tiny = eager(tiny_vlm_729(attn_implementation="eager"))
    cases = [case(tiny, "tiny", name, text) for name in STAGES]
    checkpointed = case(tiny, "tiny", "stage 2", text, lm_checkpointing=True)
    mid = eager(mid_vlm(args.smoke))
    cases += [case(mid, "mid", name, text) for name in STAGES]
    measured_recompute = checkpointed["measured"] - cases[1]["measured"]
    figures = {
        "ratio": furthest(cases),
        "tiny_ratio": furthest(cases[:2]),
        "mid_ratio": furthest(cases[2:]),
        "recompute_ratio": checkpointed["recompute"] / measured_recompute,
        "cases": [*cases, checkpointed],
        "models": {
            "tiny": TINY_729,
            "mid": f"siglip-so400m-384 with 3 layers{' at 112 px' if args.smoke else ''} + mlp2x_gelu + "
            f"phi-2 with {1 if args.smoke else 2} layer(s)",
        },
        "smoke": args.smoke,
    }
    return report(
        "flops",
        figures,
        args.out,
        f"{figures['ratio']:.3f} (our analytic FLOPs over torch's FLOP counter, forward+backward of one "
        f"sample, the case furthest from 1; tiny {figures['tiny_ratio']:.3f}, mid-size {figures['mid_ratio']:.3f}; "
        f"recompute under LM checkpointing {figures['recompute_ratio']:.2f})",
    )


if __name__ == "__main__":
    sys.exit(main())
