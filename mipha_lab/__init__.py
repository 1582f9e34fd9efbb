"""mipha-lab: a research sandbox for small multimodal models (vision encoder + projector + small LM).

Importing the package is light: torch and transformers are imported only by the modules that need
them, and deepspeed, submitit, wandb, timm, open_clip and peft only where they are used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_vlm": "mipha_lab.model.loader",
    "MultimodalModel": "mipha_lab.model.vlm",
    "VisionTower": "mipha_lab.model.vision",
    "Projector": "mipha_lab.model.projectors",
    "ImageProcessor": "mipha_lab.model.image_processing",
    "VISION": "mipha_lab.model.vision",
    "LLM": "mipha_lab.model.language",
    "PROJECTORS": "mipha_lab.model.projectors",
    "add_card_dir": "mipha_lab.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mipha_lab' has no attribute {name!r}")


__all__ = sorted(_LAZY)
