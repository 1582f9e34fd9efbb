"""Getting a MultimodalModel: built from component names, cards or objects (`build_vlm`), built for an
experiment (`build_model`), or loaded from a model folder or a run folder (`load_model`). Everything
that needs a model comes here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mipha_lab.config import Experiment, Tiling
from mipha_lab.model.build import LLMSpec, VisionSpec, build_llm, build_projector, build_vision
from mipha_lab.model.language import resolve_attn_implementation
from mipha_lab.model.lm_interface import LanguageModel
from mipha_lab.model.spec import VLMConfig
from mipha_lab.model.vlm import MultimodalModel

NO_TRUNCATION = 2**31 - 1  # quirk 3: positions are never cut after splicing


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
    imports: list[str] | None = None,
    tiling: Tiling | None = None,
) -> MultimodalModel:
    """Build a model from registry names (`build_vlm("tiny-siglip-so400m-384", "tiny-phi-2")`), cards
    or objects. `pretrained` loads the cards' hub weights (the tiny cards have none: random init);
    `imports` records the modules that registered Python components (config.json's `imports`); `tiling`
    cuts each image into encoder-sized tiles (config.py's AnyresTiling / SplitTiling)."""
    tower, vision_spec = build_vision(
        vision, pretrained=pretrained, feature_layer=feature_layer, select=select, image_size=image_size
    )
    lm, card_tokenizer, llm_spec, card_template = build_llm(
        llm, pretrained=pretrained, attn_implementation=attn_implementation, with_tokenizer=with_tokenizer
    )
    lm_width = LanguageModel(lm).width
    proj, proj_spec = build_projector(projector, tower, lm_width, projector_args)
    config = VLMConfig(
        vision=vision_spec,
        projector=proj_spec,
        llm=llm_spec,
        template=template or card_template,
        max_positions=max_positions or LanguageModel(lm).config.max_position_embeddings,
        attn_implementation=attn_implementation,
        imports=list(imports or []),
        tiling=tiling,
    )
    return MultimodalModel(tower, proj, lm, config, tokenizer if tokenizer is not None else card_tokenizer)


def build_model(experiment: Experiment, with_tokenizer: bool = True) -> MultimodalModel:
    """The model an experiment describes, initialised from its seed (pretrained weights where it says so)."""
    m = experiment.model
    torch.manual_seed(experiment.seed)
    return build_vlm(
        m.vision,
        m.llm,
        m.projector,
        projector_args=m.projector_args,
        pretrained=m.pretrained,
        attn_implementation=resolve_attn_implementation(m.attn_implementation),
        max_positions=NO_TRUNCATION if experiment.quirks.no_truncation_after_splice else m.max_positions,
        feature_layer=m.feature_layer,
        select=m.feature_select,
        with_tokenizer=with_tokenizer,
        image_size=m.image_size,
        imports=experiment.imports,
        tiling=m.tiling,
    )


def load_model(path: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> MultimodalModel:
    """A run folder (its final/) or a model folder, ours or released."""
    path = Path(path)
    if (path / "final" / "config.json").is_file():
        path = path / "final"
    return MultimodalModel.from_pretrained(path, dtype=dtype, allow_pickle=allow_pickle)
