"""Vision towers, projectors, language models and the assembled multimodal model."""

from mipha_lab.model.loader import build_model, build_vlm, load_model
from mipha_lab.model.spec import VLMConfig
from mipha_lab.model.vision import VisionTower
from mipha_lab.model.vlm import MultimodalModel

__all__ = ["MultimodalModel", "VLMConfig", "VisionTower", "build_model", "build_vlm", "load_model"]
