"""Our forward pass against a reference built from plain transformers modules and a hand-written splice,
the original's computation (mipha-reference.md sections 1 and 7), never from our own model:

tower (SiglipVisionModel / CLIPVisionModel, hidden state of layer -2, CLS dropped) -> the projector written
out (linear, exact GELU, linear) -> the features put in place of `<image>` among the raw embedding rows ->
for Gemma the whole sequence x sqrt(hidden_size) in the hidden dtype (the original's transformers 4.38
scaled spliced features with the text) -> the plain transformers causal LM.

Whether the installed transformers scales Gemma's embeddings at lookup or in the forward is read off
transformers itself (is `lm(input_ids)` equal to `lm(inputs_embeds=rows)`?), so the reference holds
under any version and a model that scales features twice, or not at all, fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mipha_lab.constants import IMAGE_TOKEN_INDEX
from mipha_lab.model import MultimodalModel, build_vlm
from tests.interop_helpers import gelu_gemma, inputs, write_released

TOWER, PROJECTOR = "model.vision_tower.", "model.mm_projector."
TOWER_EXTRAS = ("mm_vision_select_feature", "mm_vision_select_layer", "vision_model_name_or_path")


CASES = {
    "phi-2 + siglip": ("mipha_phi", "tiny-siglip-so400m-384", "tiny-phi-2", {}),
    "gemma (tied head not stored, exact gelu) + siglip": (
        "mipha_gemma",
        "tiny-siglip-so400m-384",
        gelu_gemma,
        {"gemma": True},
    ),
    "phi-2 + clip (llava-phi)": ("llava_phi", "tiny-clip-vit-l-336", "tiny-phi-2", {}),
}


def reference_tower(config: dict, state: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, bool]:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    fields = {k: v for k, v in config["vision_config"]["vision_tower"].items() if k not in TOWER_EXTRAS}
    is_clip = fields.pop("model_type") == "clip_vision_model"
    config_class, model_class = (
        (CLIPVisionConfig, CLIPVisionModel) if is_clip else (SiglipVisionConfig, SiglipVisionModel)
    )
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        fields.pop(key, None)
    tower = model_class(config_class(**fields)).eval()
    weights = {k[len(TOWER) :]: v for k, v in state.items() if k.startswith(TOWER)}
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):  # transformers 5 keeps no such level
        weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    missing, unexpected = tower.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return tower, is_clip


def reference_lm(config: dict, state: dict[str, torch.Tensor], gemma: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {
        k: v
        for k, v in config.items()
        if k not in ("vision_config", "model_type", "architectures")
        and not k.startswith(("image_", "freeze_", "tune_", "tokenizer_"))
    }
    lm_config = AutoConfig.for_model("gemma" if gemma else "phi", **fields)
    if gemma:  # the exact GELU Mipha-2.4B ran (transformers 5 would read "gelu" as the tanh approximation)
        lm_config.hidden_act = lm_config.hidden_activation = "gelu"
    lm = AutoModelForCausalLM.from_config(lm_config, attn_implementation="eager").eval()
    weights = {k: v for k, v in state.items() if not k.startswith((TOWER, PROJECTOR))}
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if gemma else []), (missing, unexpected)
    if gemma:
        assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied, as the original (head not stored)
    return lm


@torch.no_grad()
def reference_logits(folder: Path, ids: torch.Tensor, pixels: torch.Tensor, gemma: bool) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    tower, is_clip = reference_tower(config, state)
    features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    features = features[:, 1:] if is_clip else features
    hidden = F.gelu(F.linear(features, state[PROJECTOR + "0.weight"], state[PROJECTOR + "0.bias"]))
    features = F.linear(hidden, state[PROJECTOR + "2.weight"], state[PROJECTOR + "2.bias"])

    lm = reference_lm(config, state, gemma)
    rows = lm.get_input_embeddings().weight  # the raw table, never the (version-dependent) module call
    ids = ids[0]
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    sequence = torch.cat([rows[ids[:at]], features[0], rows[ids[at + 1 :]]])[None]
    text = ids[ids != IMAGE_TOKEN_INDEX][None]
    forward_scales = torch.allclose(lm(input_ids=text).logits, lm(inputs_embeds=rows[text]).logits, atol=1e-6)
    if gemma and not forward_scales:  # the installed Gemma scales at lookup: feed the original's scaled sequence
        sequence = sequence * torch.tensor(math.sqrt(config["hidden_size"]), dtype=sequence.dtype)
    return lm(inputs_embeds=sequence).logits


@pytest.mark.parametrize("case", list(CASES))
def test_our_forward_equals_plain_transformers_and_a_hand_written_splice(case, tmp_path):
    model_type, vision, llm, options = CASES[case]
    torch.manual_seed(0)
    source = build_vlm(vision, llm() if callable(llm) else llm).eval()
    write_released(source, tmp_path / "released", model_type, **options)
    ours = MultimodalModel.from_pretrained(tmp_path / "released")
    ids, mask, pixels = inputs(ours)
    expected = reference_logits(tmp_path / "released", ids, pixels, gemma=model_type == "mipha_gemma")
    with torch.no_grad():
        got = ours(ids, mask, pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    ours.save_pretrained(tmp_path / "converted")  # our own format gives the same logits
    with torch.no_grad():
        again = MultimodalModel.from_pretrained(tmp_path / "converted")(ids, mask, pixels).logits
    torch.testing.assert_close(again, expected, atol=1e-4, rtol=1e-4)


def test_unscaled_features_would_fail_the_reference(tmp_path):
    """The test above can fail: Gemma with the features left unscaled (transformers 5's default splice)
    is well outside the tolerance the test above allows."""
    torch.manual_seed(0)
    source = build_vlm("tiny-siglip-so400m-384", gelu_gemma()).eval()
    write_released(source, tmp_path / "released", "mipha_gemma", gemma=True)
    ours = MultimodalModel.from_pretrained(tmp_path / "released")
    ids, mask, pixels = inputs(ours)
    expected = reference_logits(tmp_path / "released", ids, pixels, gemma=True)
    ours.image_feature_factor = 1.0 / ours.image_feature_factor if ours.image_feature_factor != 1.0 else 8.0
    with torch.no_grad():
        wrong = ours(ids, mask, pixels).logits
    assert (wrong - expected).abs().max() > 1e-3  # ten times the tolerance the test above allows
