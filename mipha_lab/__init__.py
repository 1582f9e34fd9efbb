"""mipha-lab: a research sandbox for small multimodal models (vision encoder + projector + small LM).

Importing the package is light: torch and transformers are imported only by the modules that need
them, and deepspeed, submitit, wandb, timm, open_clip and peft only where they are used.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# PyTorch's CPU threads (libgomp) spin 300,000 times after each parallel region before sleeping: alone that
# saves a wake-up, but next to another busy process the spinning threads hold the cores it needs and both
# jobs slow 4-5x instead of 2x. 3,000 spins keep a job alone as fast and two jobs at about 2x each (1,000,
# libgomp's own count for oversubscribed cores, cost 30% alone here; bench/contention.py, bench/NOTES.md).
# It must be set before torch loads libgomp: importing mipha_lab first (every entry point does) is
# enough; a value you set yourself wins.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

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
