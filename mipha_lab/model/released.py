"""Load the released Mipha / LLaVA-Phi checkpoints (`mipha_phi`, `mipha_gemma`, `mipha_phi3`, `llava_phi`) into
our model, with every stored tensor in place.

Routing reads config.json (`model_type`, the nested `vision_config`) and the tensor names present, never
the folder's name (the original's substring test on the name is a known source of failures). The tower
kind comes from its keys (CLIP has `class_embedding`, DINOv2 lives under `dinov2.`); Phi-1.5 checkpoints of
the vendored older Phi store one fused, head-interleaved `query_key_value`, which is split into our
q/k/v projections. Quirks of the released configs are corrected here, each said in the log: Phi's
`eos_token_id` 2 (Phi's eos is 50256; the tokenizer's wins when the folder has one) and Gemma's
`"hidden_act": "gelu"`, which the training-time transformers ran as the exact (erf) GELU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from mipha_lab.model.image_processing import spec_from_hf_config
from mipha_lab.model.spec import ComponentSpec, VLMConfig
from mipha_lab.registry.cards import FeatureSpec, ImageSpec, LLMCard, SpecialTokens, VisionCard

log = logging.getLogger(__name__)

# model_type -> (transformers model_type of the LM, our template)
RELEASED = {
    "mipha_phi": ("phi", "phi"),
    "llava_phi": ("phi", "phi"),
    "mipha_gemma": ("gemma", "gemma"),
    "mipha_phi3": ("phi3", "phi-3"),
}
TOWER = "model.vision_tower."
PROJECTOR = "model.mm_projector."
PHI_EOS = 50256
# config.json keys that describe the multimodal wrapper or the file, not the language model
NOT_LM = {
    "vision_config",
    "image_aspect_ratio",
    "freeze_vision_tower",
    "tune_mm_mlp_adapter",
    "architectures",
    "model_type",
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_projector_lr",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
}
NOT_VISION = {
    "mm_vision_select_feature",
    "mm_vision_select_layer",
    "vision_model_name_or_path",
    "model_type",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
}
DEFAULT_PROCESSORS = {
    "siglip_vision_model": {"size": None, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "clip_vision_model": {
        "size": {"shortest_edge": None},
        "crop_size": None,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
    "dinov2": {
        "size": {"shortest_edge": None},
        "crop_size": None,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    },
}


def is_released(config: dict[str, Any]) -> bool:
    return config.get("model_type") in RELEASED


def tower_type(config: dict[str, Any], keys: set[str]) -> str:
    """SigLIP, CLIP or DINOv2, from the stored tensor names (LLaVA-Phi is always CLIP)."""
    if any(k.startswith(TOWER + "dinov2.") for k in keys):
        return "dinov2"
    if config["model_type"] == "llava_phi" or TOWER + "vision_model.embeddings.class_embedding" in keys:
        return "clip_vision_model"
    return "siglip_vision_model"


def _processor_config(folder: Path, kind: str, image_size: int) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    log.warning("%s: no preprocessor_config.json; using the %s processor's defaults", folder, kind)
    default = json.loads(json.dumps(DEFAULT_PROCESSORS[kind]))
    for key in ("size", "crop_size"):
        if key in default:
            default[key] = {"shortest_edge": image_size} if isinstance(default[key], dict) else image_size
    return default


def vision_card(folder: Path, config: dict[str, Any], keys: set[str]) -> VisionCard:
    tower = config["vision_config"]["vision_tower"]
    kind = tower_type(config, keys)
    architecture = {"model_type": kind, **{k: v for k, v in tower.items() if k not in NOT_VISION}}
    select = "patch" if tower.get("mm_vision_select_feature", "patch") == "patch" else "cls_patch"
    image: ImageSpec = spec_from_hf_config(_processor_config(folder, kind, tower["image_size"]), tower["image_size"])
    card = VisionCard(
        description=f"{kind} tower of {folder}",
        builder="transformers",
        hub_id=tower.get("vision_model_name_or_path"),
        architecture=architecture,
        image=image,
        features=FeatureSpec(layer=tower.get("mm_vision_select_layer", -2), select=select),
    )
    return card.named(f"released:{kind}", str(folder / "config.json"))


def llm_card(folder: Path, config: dict[str, Any], tokenizer: Any) -> LLMCard:
    lm_type, template = RELEASED[config["model_type"]]
    architecture = {"model_type": lm_type, **{k: v for k, v in config.items() if k not in NOT_LM}}
    if tokenizer is not None:
        architecture.update(
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        )
    elif lm_type == "phi" and architecture.get("eos_token_id") != PHI_EOS:
        log.warning("%s: eos_token_id %s is wrong for Phi; using %d", folder, architecture.get("eos_token_id"), PHI_EOS)
        architecture.update(eos_token_id=PHI_EOS, bos_token_id=PHI_EOS)
    if lm_type == "gemma" and architecture.get("hidden_act") == "gelu":
        architecture["hidden_activation"] = "gelu"  # older transformers read this key; newer ones hidden_act
    eos = tokenizer.eos_token if tokenizer is not None else ("<eos>" if lm_type == "gemma" else "<|endoftext|>")
    card = LLMCard(
        description=f"language model of {folder}",
        hub_id=None,
        architecture=architecture,
        tokenizer=str(folder),
        template=template,
        special_tokens=SpecialTokens(eos=eos),
        embedding_scale="sqrt_hidden_size" if lm_type == "gemma" else "none",
    )
    return card.named(f"released:{lm_type}", str(folder / "config.json"))


def split_fused_qkv(weight: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vendored Phi's `query_key_value` rows are (num_heads, 3, head_dim): q, k, v interleaved per head."""
    rest = weight.shape[1:]
    per_head = weight.reshape(num_heads, 3, weight.shape[0] // (3 * num_heads), *rest)
    return tuple(per_head[:, i].reshape(-1, *rest).contiguous() for i in range(3))  # type: ignore[return-value]


def our_names(state: dict[str, torch.Tensor], model_keys: set[str], num_heads: int) -> dict[str, torch.Tensor]:
    """Released tensor names -> ours: tower under `vision_tower.backbone.`, projector, LM under
    `language_model.`; fused q/k/v split. A name that maps nowhere is an error later (nothing is dropped)."""
    nested = any(k.startswith("vision_tower.backbone.vision_model.") for k in model_keys)  # transformers 4
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("embeddings.position_ids"):
            continue  # an arange older transformers saved as a buffer: not a weight, rebuilt by the model
        if name.startswith(TOWER):
            rest = name[len(TOWER) :]
            for prefix in ("vision_model.", "dinov2."):
                if rest.startswith(prefix) and not (nested and prefix == "vision_model."):
                    rest = rest[len(prefix) :]
            out["vision_tower.backbone." + rest] = tensor
        elif name.startswith(PROJECTOR):
            out["projector." + name[len(PROJECTOR) :]] = tensor
        elif ".self_attn.query_key_value." in name:
            head, kind = name.split(".self_attn.query_key_value.")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_fused_qkv(tensor, num_heads), strict=True):
                out[f"language_model.{head}.self_attn.{proj}.{kind}"] = part
        else:
            out["language_model." + name] = tensor
    return out


def released_config(folder: Path, config: dict[str, Any], keys: set[str], tokenizer: Any) -> VLMConfig:
    """Our config for a released checkpoint: its tower, projector and LM as cards, its template, and the
    features of `mm_vision_select_layer` (-2 in every release); the processor comes from the folder."""

    lm = llm_card(folder, config, tokenizer)
    vision = vision_card(folder, config, keys)
    lm_config = AutoConfig.for_model(**lm.architecture)
    return VLMConfig(
        vision=ComponentSpec(name=vision.name, card=vision.to_dict()),
        projector=ComponentSpec(name=config["vision_config"]["mm_projector"].get("mm_projector_type", "mlp2x_gelu")),
        llm=ComponentSpec(name=lm.name, card=lm.to_dict()),
        template=lm.template,
        max_positions=lm_config.max_position_embeddings,
    )
