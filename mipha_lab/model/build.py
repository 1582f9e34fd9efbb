"""Build the three components (vision tower, projector, language model) from names, cards or objects, and
rebuild them from a saved config; each comes with the spec that rebuilds it."""

from __future__ import annotations

from typing import Any, cast

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mipha_lab.errors import ConfigError
from mipha_lab.model.fused_vision import FusedVisionTower
from mipha_lab.model.language import LLM, build_language_model, load_tokenizer, transformers_attention
from mipha_lab.model.lm_interface import LanguageModel
from mipha_lab.model.projectors import PROJECTORS, grid_side
from mipha_lab.model.spec import ComponentSpec, VLMConfig
from mipha_lab.model.vision import VISION, VisionTower
from mipha_lab.model.vision_backends import build_vision_tower
from mipha_lab.registry import Registry
from mipha_lab.registry.cards import Card, FeatureSpec, FusedVisionCard, LLMCard, SubTower, VisionCard, card_schema
from mipha_lab.validation import validate

VisionSpec = str | VisionCard | FusedVisionCard | VisionTower
LLMSpec = str | LLMCard | nn.Module


def _registered_name(registry: Registry[Any], obj: object) -> str:
    """The name a Python-registered class is known by, so a saved model can be rebuilt."""
    for entry in registry:
        if entry.obj is type(obj):
            return entry.name
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _lookup(registry: Registry[Any], spec: str | Card) -> Any:
    return registry.get(spec) if isinstance(spec, str) else spec


def _python_tower(name: str, factory: Any, overrides: dict[str, Any]) -> VisionTower:
    """A VisionTower class registered in Python, given the experiment's overrides as keyword arguments."""
    try:
        return factory(**overrides)
    except TypeError as err:
        if not overrides:
            raise
        raise ConfigError(
            f"vision encoder '{name}' ({getattr(factory, '__qualname__', factory)}) does not take "
            f"{', '.join(f'{k}={v!r}' for k, v in overrides.items())}: add the argument(s) to its "
            f"__init__ and pass them to VisionTower ({err})"
        ) from None


def build_vision(
    spec: VisionSpec,
    *,
    pretrained: bool = False,
    feature_layer: int | None = None,
    select: str | None = None,
    image_size: int | None = None,
) -> tuple[VisionTower, ComponentSpec]:
    """A vision tower from a card name, a card, a registered class name, or a ready module. `image_size`
    changes the input side (the resolution axis; a card's position embeddings are then interpolated);
    `feature_layer`, `select` and `image_size` go to a Python class as keyword arguments."""
    if isinstance(spec, nn.Module):
        return spec, ComponentSpec(name=_registered_name(VISION, spec))
    found = _lookup(VISION, spec)
    overrides = {
        k: v
        for k, v in {"feature_layer": feature_layer, "select": select, "image_size": image_size}.items()
        if v is not None
    }
    if isinstance(found, FusedVisionCard):
        return _fused_tower(found, pretrained, feature_layer, select, image_size)
    if not isinstance(found, VisionCard):
        name = spec if isinstance(spec, str) else type(found).__name__
        return _python_tower(name, found, overrides), ComponentSpec(name=name, args=overrides)
    features = found.features.model_dump()
    features.update({k: v for k, v in {"layer": feature_layer, "select": select}.items() if v is not None})
    update: dict[str, Any] = {"features": FeatureSpec(**features)}
    if image_size is not None and image_size != found.image.size:
        side = {"crop_size": image_size} if found.image.crop_size else {}
        update["image"] = found.image.model_copy(update={"resize_size": image_size, **side})
    card = found.model_copy(update=update).named(found.name, found.source)
    return build_vision_tower(card, pretrained), ComponentSpec(name=card.name, card=card.to_dict())


def _fused_tower(
    card: FusedVisionCard, pretrained: bool, feature_layer: int | None, select: str | None, image_size: int | None
) -> tuple[VisionTower, ComponentSpec]:
    """Each sub-tower built from its own card (at the card's or the given input side); the spec keeps the
    resolved sub-cards, so config.json rebuilds it without the registry."""
    if feature_layer is not None or select is not None:
        raise ConfigError(
            f"fused vision encoder '{card.name}': set the feature layer of each tower in its own card, not "
            "for the fused one"
        )
    towers, resolved = {}, {}
    for key, sub in card.towers.items():
        side = image_size if image_size is not None else sub.image_size
        towers[key], spec = build_vision(sub.card, pretrained=pretrained, image_size=side)
        if spec.card is None:
            raise ConfigError(f"fused vision encoder '{card.name}': tower '{key}' must be a card, got {sub.card!r}")
        resolved[key] = SubTower.model_validate({"card": spec.card})
    tower = FusedVisionTower(towers, card.grid, card.name)
    fused = card.model_copy(update={"towers": resolved}).named(card.name, card.source)
    return tower, ComponentSpec(name=card.name, card=fused.to_dict())


def build_llm(
    spec: LLMSpec, *, pretrained: bool = False, attn_implementation: str = "sdpa", with_tokenizer: bool = True
) -> tuple[nn.Module, Any, ComponentSpec, str | None]:
    """The LM, its tokenizer (None for a ready module or when not wanted, as in an offline plan), how to
    rebuild it, and its template name."""
    if isinstance(spec, nn.Module):
        config = LanguageModel(spec).config.to_dict()
        return spec, None, ComponentSpec(name=f"transformers:{config['model_type']}", args={"config": config}), None
    card = _lookup(LLM, spec)
    if not isinstance(card, LLMCard):
        raise ConfigError(f"language model '{spec}' must be a card (registry/llm/*.yaml) or a model object")
    lm = build_language_model(card, pretrained, attn_implementation)
    return (
        lm,
        load_tokenizer(card) if with_tokenizer else None,
        ComponentSpec(name=card.name, card=card.to_dict()),
        card.template,
    )


def build_projector(
    spec: str | nn.Module, tower: VisionTower, lm_width: int, args: dict[str, Any] | None = None
) -> tuple[nn.Module, ComponentSpec]:
    if isinstance(spec, nn.Module):
        return spec, ComponentSpec(name=_registered_name(PROJECTORS, spec))
    grid = grid_side(tower.num_tokens, tower.is_square_grid)
    module = PROJECTORS.build(spec, in_dim=tower.hidden_size, out_dim=lm_width, grid=grid, **(args or {}))
    return module, ComponentSpec(name=spec, args=dict(args or {}))


def _rebuild_llm(spec: ComponentSpec, attn_implementation: str) -> nn.Module:
    if spec.card is not None:
        card = validate(LLMCard, spec.card, "config.json: llm.card").named(spec.name, "config.json")
        return build_llm(card, attn_implementation=attn_implementation, with_tokenizer=False)[0]

    config = dict(spec.args["config"])
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=transformers_attention(attn_implementation))


def components_from_config(config: VLMConfig) -> tuple[VisionTower, nn.Module, nn.Module]:
    """The tower, projector and LM a VLMConfig describes, with fresh weights (loading places them after)."""
    vision: VisionSpec = config.vision.name
    if config.vision.card is not None:
        schema = card_schema("vision", config.vision.card)
        vision = cast(
            VisionCard | FusedVisionCard,
            validate(schema, config.vision.card, "config.json: vision.card").named(config.vision.name),
        )
    tower, _ = build_vision(vision, **config.vision.args)
    lm = _rebuild_llm(config.llm, config.attn_implementation)
    proj, _ = build_projector(config.projector.name, tower, LanguageModel(lm).width, config.projector.args)
    return tower, proj, lm
