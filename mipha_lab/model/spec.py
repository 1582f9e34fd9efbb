"""What config.json of a saved model holds: how to rebuild each component, and the model's settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mipha_lab.config import Tiling
from mipha_lab.constants import IMAGE_TOKEN_INDEX
from mipha_lab.validation import StrictModel

FORMAT = "mipha-lab"


AdapterModule = Literal["vision", "lm_body"]


class LoraSpec(StrictModel):
    """One module's LoRA adapters, as config.json records them (target modules resolved to names)."""

    module: AdapterModule
    r: int
    alpha: int
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=list)


class ComponentSpec(StrictModel):
    """How to rebuild one component: a registry name, the resolved card it was built from, arguments."""

    name: str
    card: dict[str, Any] | None = None
    args: dict[str, Any] = Field(default_factory=dict)


class VLMConfig(StrictModel):
    """What config.json of a saved model holds: enough to rebuild it without the registry's folders."""

    format: Literal["mipha-lab"] = "mipha-lab"
    format_version: int = 1
    vision: ComponentSpec
    projector: ComponentSpec
    llm: ComponentSpec
    template: str | None = None
    max_positions: int
    image_token_index: int = IMAGE_TOKEN_INDEX
    attn_implementation: str = "sdpa"
    adapters: list[LoraSpec] = Field(default_factory=list)  # LoRA adapters held unmerged in the weights
    imports: list[str] = Field(default_factory=list)  # modules that registered its Python components (recorded only)
    tiling: Tiling | None = None  # how an image becomes tiles (config.py); none: one square image
