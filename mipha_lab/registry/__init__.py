"""The registries of interchangeable components, and the cards that fill them.

Entries of the component registries (VISION, LLM) are cards read from YAML, or Python factories
registered by a user (`@VISION.register("my-encoder")` on a VisionTower subclass). Backends
(VISION_BACKENDS, LLM_BACKENDS) turn a card into a module; PROJECTORS holds projector classes.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mipha_lab.registry.cards import (
    CARD_SCHEMAS,
    Card,
    LLMCard,
    MixtureCard,
    VisionCard,
    add_card_dir,
    card_dirs,
    iter_card_files,
    read_card,
)
from mipha_lab.registry.core import Entry, Registry


def _import(module: str):
    return lambda _registry: importlib.import_module(module)


def _load_cards(kind: str):
    def load(registry: Registry[Any]) -> None:
        for path in iter_card_files(kind):
            card = read_card(path, kind)
            registry.add(card.name, card, card.description, replace=True)

    return load


VISION: Registry[Any] = Registry("vision encoder", "vision towers (cards in registry/vision/)", _load_cards("vision"))
LLM: Registry[Any] = Registry("language model", "causal language models (cards in registry/llm/)", _load_cards("llm"))
PROJECTORS: Registry[Any] = Registry("projector", "vision-to-language connectors", _import("mipha_lab.model.projectors"))
VISION_BACKENDS: Registry[Any] = Registry(
    "vision backend", "libraries that build a vision card", _import("mipha_lab.model.vision_backends")
)
LLM_BACKENDS: Registry[Any] = Registry(
    "language-model backend", "libraries that build a language-model card", _import("mipha_lab.model.language")
)
TEMPLATES: Registry[Any] = Registry(
    "chat template", "conversation templates with label masks", _import("mipha_lab.data.templates")
)
MIXTURES: Registry[Any] = Registry("data mixture", "weighted training data sources (cards in registry/mixtures/)", _load_cards("mixtures"))
BENCHMARKS: Registry[Any] = Registry(
    "benchmark", "evaluation benchmarks: files, prompts, scorer", _import("mipha_lab.eval.benchmarks")
)

ALL: dict[str, Registry[Any]] = {
    "vision": VISION,
    "projector": PROJECTORS,
    "llm": LLM,
    "template": TEMPLATES,
    "mixture": MIXTURES,
    "benchmark": BENCHMARKS,
    "vision-backend": VISION_BACKENDS,
    "llm-backend": LLM_BACKENDS,
}
_CARD_REGISTRIES: dict[str, Registry[Any]] = {"vision": VISION, "llm": LLM, "mixtures": MIXTURES}


def load_cards_from(dirs: list[Path]) -> None:
    """Register the cards of extra folders into already-loaded registries (later folders win)."""
    for kind, registry in _CARD_REGISTRIES.items():
        registry.names()  # load the built-in cards first so that these override them
        for path in iter_card_files(kind, dirs):
            card = read_card(path, kind)
            registry.add(card.name, card, card.description, replace=True)


__all__ = [
    "ALL", "BENCHMARKS", "CARD_SCHEMAS", "Card", "Entry", "LLM", "LLMCard", "LLM_BACKENDS", "MIXTURES", "MixtureCard",
    "PROJECTORS", "Registry", "TEMPLATES", "VISION", "VISION_BACKENDS", "VisionCard", "add_card_dir",
    "card_dirs", "read_card",
]
