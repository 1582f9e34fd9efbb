"""Vision backends: build a VisionTower from a card with transformers, timm or open_clip.

Each backend builds the architecture from the card's values alone (offline, also on the meta device)
and loads weights from the card's hub id or a local path when `pretrained` is set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mipha_lab.model.vision import VisionTower
from mipha_lab.registry import Registry
from mipha_lab.registry.cards import VisionCard

log = logging.getLogger(__name__)

VISION_BACKENDS: Registry[Any] = Registry("vision backend", "libraries that build a vision card")


def _tower_kwargs(card: VisionCard) -> dict:
    return {
        "image_size": card.image.size,
        "feature_layer": card.features.layer,
        "select": card.features.select,
        "image_spec": card.image,
        "name": card.name,
    }


@VISION_BACKENDS.register("transformers")
class TransformersVisionTower(VisionTower):
    """A Hugging Face vision model (SigLIP, CLIP, DINOv2...) chosen by the card's `model_type`."""

    backbone: Any  # the transformers vision model (its own API: config, encoder layers)

    def __init__(self, card: VisionCard, pretrained: bool = False) -> None:

        arch = dict(card.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        model_type = config.model_type
        prefix = 0 if model_type.startswith("siglip") else 1 + getattr(config, "num_register_tokens", 0)
        super().__init__(
            hidden_size=config.hidden_size,
            patch_size=config.patch_size,
            num_prefix_tokens=prefix,
            **_tower_kwargs(card),
        )
        if pretrained and card.hub_id:
            model_class: Any = MODEL_MAPPING[type(config)]  # the vision model class of this config type
            self.backbone = model_class.from_pretrained(card.hub_id, config=config, trust_remote_code=False)
        else:
            self.backbone = AutoModel.from_config(config)
        self.num_layers = config.num_hidden_layers
        self.absolute_layer(self.num_layers)
        # SigLIP and CLIP interpolate position embeddings only when asked; DINOv2 always does.
        self._interpolate = card.image.size != config.image_size and model_type != "dinov2"

    @property
    def _encoder(self) -> tuple[nn.Module, str]:
        encoder = getattr(self.backbone, "vision_model", self.backbone).encoder  # transformers 4 nests vision_model
        return encoder, "layers" if hasattr(encoder, "layers") else "layer"

    @property
    def blocks(self) -> nn.ModuleList:
        encoder, name = self._encoder
        return getattr(encoder, name)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Runs the blocks up to the feature layer only: the encoder loops over a shortened list of the
        same modules (the released towers' last block is never used; it stays, unrun, for checkpoints).
        The feature is that block's own output, taken by a hook: the `hidden_states` tuple is not used,
        because transformers 4.5x puts the post-layernormed state in its last entry."""
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        index = self.absolute_layer(self.num_layers)
        encoder, name = self._encoder
        blocks = getattr(encoder, name)
        taken: list[torch.Tensor] = []

        def take(_module: nn.Module, _args: tuple, output: Any) -> None:
            taken.append(output[0] if isinstance(output, tuple) else output)

        handle = blocks[index].register_forward_hook(take)
        setattr(encoder, name, blocks[: index + 1])
        try:
            self.backbone(pixel_values=pixel_values, **kwargs)
        finally:
            setattr(encoder, name, blocks)
            handle.remove()
        return taken[-1]


@VISION_BACKENDS.register("timm")
class TimmVisionTower(VisionTower):
    """A timm ViT: `architecture` holds `model_name` plus timm keyword arguments."""

    backbone: Any  # the timm model (its own API: blocks, forward_intermediates)

    def __init__(self, card: VisionCard, pretrained: bool = False) -> None:
        import timm  # heavy, and absent on the lent GPU machine: only for timm cards

        arch = dict(card.architecture)
        name = arch.pop("model_name")
        load = bool(pretrained and card.hub_id)
        if load:
            assert card.hub_id is not None
            source = "file" if Path(card.hub_id).exists() else "hf_hub_id"
            arch["pretrained_cfg_overlay"] = {source: card.hub_id}
        model: Any = timm.create_model(name, pretrained=load, num_classes=0, **arch)  # a timm ViT (its own API)
        super().__init__(
            hidden_size=model.embed_dim,
            patch_size=model.patch_embed.patch_size[0],
            num_prefix_tokens=model.num_prefix_tokens,
            **_tower_kwargs(card),
        )
        self.backbone = model
        self.absolute_layer(len(model.blocks))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        index = self.absolute_layer(len(self.backbone.blocks))
        (out,) = self.backbone.forward_intermediates(
            pixel_values,
            indices=[index],
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=True,
        )
        if isinstance(out, tuple):
            spatial, prefix = out
            return spatial if prefix is None else torch.cat([prefix, spatial], dim=1)
        return out


@VISION_BACKENDS.register("open_clip")
class OpenClipVisionTower(VisionTower):
    """The image tower of an open_clip model: `architecture` holds `embed_dim` and `vision_cfg`."""

    backbone: Any  # open_clip's VisionTransformer (its own API: transformer.resblocks, forward_intermediates)

    def __init__(self, card: VisionCard, pretrained: bool = False) -> None:
        from open_clip.model import _build_vision_tower  # heavy, absent on the GPU machine: open_clip cards only

        arch = dict(card.architecture)
        visual = _build_vision_tower(arch["embed_dim"], arch["vision_cfg"])
        patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
        super().__init__(
            hidden_size=arch["vision_cfg"]["width"],
            patch_size=patch,
            num_prefix_tokens=0 if arch["vision_cfg"].get("no_cls") else 1,
            **_tower_kwargs(card),
        )
        self.backbone = visual
        self.absolute_layer(len(visual.transformer.resblocks))
        if pretrained and card.hub_id:
            self._load(card.hub_id)

    def _load(self, hub_id: str) -> None:

        path = Path(hub_id)
        if path.is_dir():
            path = path / "open_clip_model.safetensors"
        elif not path.exists():
            path = Path(hf_hub_download(hub_id, "open_clip_model.safetensors"))
        state = {k[len("visual.") :]: v for k, v in load_file(path).items() if k.startswith("visual.")}
        self.backbone.load_state_dict(state, strict=True)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.transformer.resblocks

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        index = self.absolute_layer(len(self.backbone.transformer.resblocks))
        out = self.backbone.forward_intermediates(
            pixel_values,
            indices=[index],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
            stop_early=True,
        )
        spatial, prefix = out["image_intermediates"][0], out.get("image_intermediates_prefix")
        return spatial if not prefix else torch.cat([prefix[0], spatial], dim=1)


def build_vision_tower(card: VisionCard, pretrained: bool = False) -> VisionTower:
    """The tower a card describes, through the backend it names."""
    return VISION_BACKENDS.build(card.builder, card=card, pretrained=pretrained)
