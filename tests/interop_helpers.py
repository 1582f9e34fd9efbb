"""Helpers of the interoperability tests: write a tiny checkpoint in the released Mipha / LLaVA-Phi layout
(mipha-reference.md section 7) from one of our models - tensor names, nested vision_config and quirks,
written independently of the loader - and compare our logits and tokens with plain transformers'."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from mipha_lab.data.templates import encode_prompt, get_template
from mipha_lab.model import MultimodalModel
from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.model.language import LLM
from mipha_lab.serve.cli import EXAMPLE_IMAGE

VISION_HUB = {
    "siglip_vision_model": "google/siglip-so400m-patch14-384",
    "clip_vision_model": "openai/clip-vit-large-patch14-336",
}
LM_FIELDS_DROPPED = (
    "model_type",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "tie_word_embeddings",
    "_name_or_path",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
)


def gelu_gemma():
    """tiny Gemma as Mipha-2.4B ran it: `hidden_act: gelu`, the exact (erf) GELU."""
    card = LLM.get("tiny-gemma-2b")
    return card.model_copy(update={"architecture": {**card.architecture, "hidden_act": "gelu"}}).named(
        "tiny-gemma-gelu"
    )


def released_name(ours: str) -> str:
    """Our tensor name -> the released one (transformers 5 drops SigLIP/CLIP's `vision_model.` level)."""
    if ours.startswith("vision_tower.backbone."):
        rest = ours[len("vision_tower.backbone.") :]
        return "model.vision_tower.vision_model." + rest.removeprefix("vision_model.")
    if ours.startswith("projector."):
        return "model.mm_projector." + ours[len("projector.") :]
    return ours[len("language_model.") :]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The vendored Phi's layout: output rows ordered (head, q/k/v, head_dim)."""
    rest = q.shape[1:]
    return torch.stack([t.reshape(heads, -1, *rest) for t in (q, k, v)], dim=1).reshape(-1, *rest)


def write_released(model, folder: Path, model_type: str, *, fused_qkv: bool = False, gemma: bool = False) -> dict:
    """Save `model` as a released checkpoint; returns the stored tensors by released name."""
    folder.mkdir(parents=True, exist_ok=True)
    lm_config = model.language_model.config
    heads = lm_config.num_attention_heads
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if gemma and name == "language_model.lm_head.weight":
            continue  # tied to the embeddings, not stored
        state[released_name(name)] = tensor.clone()
    if fused_qkv:
        for i in range(lm_config.num_hidden_layers):
            prefix = f"model.layers.{i}.self_attn."
            for kind in ("weight", "bias"):
                parts = [state.pop(f"{prefix}{p}_proj.{kind}") for p in "qkv"]
                state[f"{prefix}query_key_value.{kind}"] = fuse_qkv(*parts, heads)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tower = model.vision_tower.backbone.config.to_dict()
    vision_tower = {**tower, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2}
    if model_type != "llava_phi":
        vision_tower["vision_model_name_or_path"] = VISION_HUB[tower["model_type"]]
    lm_fields = {k: v for k, v in lm_config.to_dict().items() if k not in LM_FIELDS_DROPPED}
    config = {
        "model_type": model_type,
        "architectures": [
            {
                "mipha_phi": "MiphaPhiForCausalLM",
                "mipha_gemma": "MiphaGemmaForCausalLM",
                "llava_phi": "LlavaPhiForCausalLM",
            }[model_type]
        ],
        **lm_fields,
        "vision_config": {
            "vision_tower": vision_tower,
            "mm_projector": {
                "mm_projector_type": "mlp2x_gelu",
                "mm_hidden_size": tower["hidden_size"],
                "hidden_size": lm_config.hidden_size,
            },
        },
        "image_aspect_ratio": "pad",
        "freeze_vision_tower": True,
        "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }
    if gemma:
        config["hidden_act"] = "gelu"  # what Mipha-2.4B's config says (exact GELU in its transformers)
    else:
        config["eos_token_id"] = 2  # the released Phi configs' wrong eos
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    processor = ImageProcessor(model.vision_tower.image_spec).hf_config()
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    model.tokenizer.save_pretrained(folder)
    return state


QUESTION = "What color is the shape on the left?"


def inputs(model: MultimodalModel, image: Image.Image | None = None):
    """(ids, mask, pixels) of the example question for our model; a tiled model's pixels are the image's frames
    (its size: `EXAMPLE_SIZE`)."""
    image = image or Image.open(EXAMPLE_IMAGE).convert("RGB")
    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    ids = torch.tensor([encode_prompt(get_template(model.config.template), model.tokenizer, messages)])
    frames = model.image_processor("pad")(image)
    return ids, torch.ones_like(ids), frames if model.config.tiling else frames[None]


def example_size() -> list[tuple[int, int]]:
    """[(height, width)] of the example image."""
    width, height = Image.open(EXAMPLE_IMAGE).size
    return [(height, width)]


@torch.no_grad()
def logits(model: MultimodalModel) -> torch.Tensor:
    return model(*inputs(model), image_sizes=example_size()).logits


def hf_llava_outputs(folder: Path, backend: str | None):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(folder).eval()  # Llava, or LlavaNext for an anyres model
    processor = AutoProcessor.from_pretrained(folder, **({"backend": backend} if backend else {}))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=Image.open(EXAMPLE_IMAGE).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf(**batch).logits
    tokens = hf.generate(**batch, max_new_tokens=8, do_sample=False)[0, batch["input_ids"].shape[1] :]
    return prompt, out, tokens.tolist()
