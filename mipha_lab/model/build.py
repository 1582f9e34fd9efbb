"""Assemble a MultimodalModel from names, cards or objects, and rebuild one from a saved folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mipha_lab.errors import ConfigError
from mipha_lab.model.adapters import restore_adapters
from mipha_lab.model.folder_files import load_folder_tokenizer, read_weights, refuse_folder_code
from mipha_lab.model.projectors import grid_side
from mipha_lab.model.released import RELEASED, is_released, load_released
from mipha_lab.model.vlm import ComponentSpec, MultimodalModel, VLMConfig
from mipha_lab.registry import LLM, PROJECTORS, VISION
from mipha_lab.registry.cards import Card, FeatureSpec, LLMCard, VisionCard
from mipha_lab.registry.core import Registry
from mipha_lab.validation import validate

VisionSpec = str | VisionCard | nn.Module
LLMSpec = str | LLMCard | nn.Module


def _registered_name(registry: Registry[Any], obj: object) -> str:
    """The name a Python-registered class is known by, so a saved model can be rebuilt."""
    for entry in registry:
        if entry.obj is type(obj):
            return entry.name
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _lookup(registry: Registry[Any], spec: str | Card) -> Any:
    return registry.get(spec) if isinstance(spec, str) else spec


def build_vision(
    spec: VisionSpec, *, pretrained: bool = False, feature_layer: int | None = None, select: str | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, ComponentSpec]:
    """A vision tower from a card name, a card, a registered class name, or a ready module. `image_size`
    changes the card's input side (the resolution axis); position embeddings are then interpolated."""
    if isinstance(spec, nn.Module):
        return spec, ComponentSpec(name=_registered_name(VISION, spec))
    from mipha_lab.model.vision_backends import build_vision_tower

    found = _lookup(VISION, spec)
    if not isinstance(found, VisionCard):
        return found(), ComponentSpec(name=spec if isinstance(spec, str) else type(found).__name__)
    features = found.features.model_dump()
    features.update({k: v for k, v in {"layer": feature_layer, "select": select}.items() if v is not None})
    update: dict[str, Any] = {"features": FeatureSpec(**features)}
    if image_size is not None and image_size != found.image.size:
        side = {"crop_size": image_size} if found.image.crop_size else {}
        update["image"] = found.image.model_copy(update={"resize_size": image_size, **side})
    card = found.model_copy(update=update).named(found.name, found.source)
    return build_vision_tower(card, pretrained), ComponentSpec(name=card.name, card=card.to_dict())


def build_llm(
    spec: LLMSpec, *, pretrained: bool = False, attn_implementation: str = "sdpa", with_tokenizer: bool = True
) -> tuple[nn.Module, Any, ComponentSpec, str | None]:
    """The LM, its tokenizer (None for a ready module or when not wanted, as in an offline plan), how to
    rebuild it, and its template name."""
    from mipha_lab.model.language import build_language_model, load_tokenizer

    if isinstance(spec, nn.Module):
        config = spec.config.to_dict()
        return spec, None, ComponentSpec(name=f"transformers:{config['model_type']}", args={"config": config}), None
    card = _lookup(LLM, spec)
    if not isinstance(card, LLMCard):
        raise ConfigError(f"language model '{spec}' must be a card (registry/llm/*.yaml) or a model object")
    lm = build_language_model(card, pretrained, attn_implementation)
    return lm, load_tokenizer(card) if with_tokenizer else None, ComponentSpec(name=card.name, card=card.to_dict()), card.template


def build_projector(spec: str | nn.Module, tower: nn.Module, lm_width: int, args: dict[str, Any] | None = None):
    if isinstance(spec, nn.Module):
        return spec, ComponentSpec(name=_registered_name(PROJECTORS, spec))
    grid = grid_side(tower.num_tokens, getattr(tower, "is_square_grid", False))
    module = PROJECTORS.build(spec, in_dim=tower.hidden_size, out_dim=lm_width, grid=grid, **(args or {}))
    return module, ComponentSpec(name=spec, args=dict(args or {}))


def build_vlm(
    vision: VisionSpec,
    llm: LLMSpec,
    projector: str | nn.Module = "mlp2x_gelu",
    *,
    projector_args: dict[str, Any] | None = None,
    pretrained: bool = False,
    attn_implementation: str = "sdpa",
    tokenizer: Any = None,
    template: str | None = None,
    max_positions: int | None = None,
    feature_layer: int | None = None,
    select: str | None = None,
    with_tokenizer: bool = True,
    image_size: int | None = None,
) -> MultimodalModel:
    """Build a model from registry names (`build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")`), cards
    or objects. `pretrained` loads the cards' hub weights (the tiny cards have none: random init)."""
    tower, vision_spec = build_vision(vision, pretrained=pretrained, feature_layer=feature_layer, select=select,
                                      image_size=image_size)
    lm, card_tokenizer, llm_spec, card_template = build_llm(
        llm, pretrained=pretrained, attn_implementation=attn_implementation, with_tokenizer=with_tokenizer
    )
    lm_width = lm.get_input_embeddings().weight.shape[1]
    proj, proj_spec = build_projector(projector, tower, lm_width, projector_args)
    config = VLMConfig(
        vision=vision_spec, projector=proj_spec, llm=llm_spec,
        template=template or card_template,
        max_positions=max_positions or lm.config.max_position_embeddings,
        attn_implementation=attn_implementation,
    )
    return MultimodalModel(tower, proj, lm, config, tokenizer if tokenizer is not None else card_tokenizer)


def _rebuild_llm(spec: ComponentSpec, attn_implementation: str) -> nn.Module:
    if spec.card is not None:
        card = validate(LLMCard, spec.card, "config.json: llm.card").named(spec.name, "config.json")
        return build_llm(card, attn_implementation=attn_implementation, with_tokenizer=False)[0]
    from transformers import AutoConfig, AutoModelForCausalLM

    from mipha_lab.model.language import transformers_attention

    config = dict(spec.args["config"])
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=transformers_attention(attn_implementation))


def build_from_config(config: VLMConfig, tokenizer: Any = None) -> MultimodalModel:
    """The model a VLMConfig describes, with fresh weights (from_pretrained loads them after)."""
    vision: VisionSpec = config.vision.name
    if config.vision.card is not None:
        vision = validate(VisionCard, config.vision.card, "config.json: vision.card").named(config.vision.name)
    tower, _ = build_vision(vision)
    lm = _rebuild_llm(config.llm, config.attn_implementation)
    proj, _ = build_projector(config.projector.name, tower, lm.get_input_embeddings().weight.shape[1], config.projector.args)
    return MultimodalModel(tower, proj, lm, config, tokenizer)


def place_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model`: every stored tensor must land in place (same name, same shape) and every
    parameter must be stored, except those tied to one stored earlier."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - _tied_names(model))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or wrong:
        raise ConfigError(f"{source}: the weights do not match the model - stored but without a place: "
                          f"{unexpected[:5]}, not stored: {missing[:5]}, wrong shape (stored vs model): {wrong[:5]}")
    model.load_state_dict(state, strict=False)


def load_weights(model: nn.Module, folder: Path, allow_pickle: bool = False) -> None:
    place_weights(model, read_weights(folder, allow_pickle), folder)


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share memory with an earlier one (saved once, re-tied on load)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(tensor.data_ptr(), name)
    return tied


def load_model_folder(folder: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> MultimodalModel:
    """Rebuild from config.json alone (never from the folder's name) - our format or a released Mipha /
    LLaVA-Phi checkpoint - then load the weights (its own weight files, folder_files.py; pickle files only
    with `allow_pickle`). No code from the folder is ever run."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} is not a model folder: it has no config.json")
    raw = json.loads(config_path.read_text())
    refuse_folder_code(folder)
    if is_released(raw):
        model = load_released(folder, raw, allow_pickle)
        return (model.to(dtype) if dtype is not None else model).eval()
    if raw.get("format") != "mipha-lab":
        raise ConfigError(
            f"{config_path}: unknown model format (format={raw.get('format')!r}, model_type={raw.get('model_type')!r}); "
            f"expected a mipha-lab model or a released checkpoint with model_type one of {', '.join(RELEASED)}"
        )
    config = validate(VLMConfig, raw, config_path)
    refuse_folder_code(folder)
    tokenizer = load_folder_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    model = build_from_config(config, tokenizer)
    restore_adapters(model, config.adapters)
    load_weights(model, folder, allow_pickle)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
