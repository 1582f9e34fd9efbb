"""The generic `Registry` type and the component cards (YAML files) that registries read.

Each registry is declared in the module that owns its kind of component: VISION in model/vision.py,
LLM and LLM_BACKENDS in model/language.py, VISION_BACKENDS in model/vision_backends.py, PROJECTORS in
model/projectors.py, TEMPLATES in data/templates.py, MIXTURES in data/mixtures.py, BENCHMARKS in
eval/benchmarks.py. `python -m mipha_lab.registry list` shows them all.
"""

from __future__ import annotations

from mipha_lab.registry.cards import CARD_SCHEMAS, Card, LLMCard, MixtureCard, VisionCard, add_card_dir, read_card
from mipha_lab.registry.core import Entry, Registry

__all__ = [
    "CARD_SCHEMAS",
    "Card",
    "Entry",
    "LLMCard",
    "MixtureCard",
    "Registry",
    "VisionCard",
    "add_card_dir",
    "read_card",
]
