"""Vision towers, projectors, language models and the assembled multimodal model."""
from mipha_lab.model.build import build_vlm, load_model_folder
from mipha_lab.model.vision import VisionTower
from mipha_lab.model.vlm import MultimodalModel, VLMConfig

__all__ = ["MultimodalModel", "VLMConfig", "VisionTower", "build_vlm", "load_model_folder"]
