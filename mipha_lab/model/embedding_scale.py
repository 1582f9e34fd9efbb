"""The project's rule for LMs that scale their input embeddings (Gemma: x sqrt(hidden_size)).

The original Mipha ran on transformers 4.38, whose `GemmaModel.forward` multiplied the *whole* input
sequence by sqrt(hidden_size), spliced image features included. transformers 5 moved the factor into the
embedding layer (`GemmaTextScaledWordEmbedding`), so text is scaled when looked up and features spliced
in afterwards are not. The rule owned here, whatever the installed version: image features get the same
factor as the text, exactly once.

Where the installed transformers applies the factor is measured on the LM itself, not read from its
version: one row is looked up through the embedding layer (scaled at lookup?) and one vector is fed to
the decoder with a hook before its first layer (scaled in the forward?). Features are then multiplied by
the lookup factor only - the forward, where it scales, scales them with the text. A card declares the
factor (`embedding_scale`), and a measured factor that disagrees with the card is an error, so no model
runs with the features scaled twice, or not at all.
"""

from __future__ import annotations

import copy
import math
from typing import cast

import torch
from torch import nn

from mipha_lab.errors import ConfigError
from mipha_lab.model.lm_interface import LanguageModel

SCALES = ("none", "sqrt_hidden_size")


def declared_factor(rule: str, hidden_size: int) -> float:
    return math.sqrt(hidden_size) if rule == "sqrt_hidden_size" else 1.0


class _StopBeforeFirstLayer(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("probe")
        self.hidden = hidden


def _first_layer(lm: nn.Module) -> nn.Module | None:
    layers = getattr(LanguageModel(lm).decoder, "layers", None)
    return layers[0] if layers is not None and len(layers) else None


def _lookup_factor(embedding: nn.Module) -> float:
    """The embedding layer's own forward on a one-row table of ones (a shallow copy: the model's weights,
    which may be uninitialised, are not involved and not touched)."""
    weight = cast(torch.Tensor, embedding.weight)
    probe = copy.copy(embedding)
    probe._parameters = dict(embedding._parameters)
    probe.weight = nn.Parameter(
        torch.ones(1, weight.shape[1], dtype=weight.dtype, device=weight.device), requires_grad=False
    )
    if hasattr(probe, "padding_idx"):
        probe.padding_idx = None  # type: ignore[assignment]  # nn.Embedding's is int | None; the attribute is typed loosely
    return float(probe(torch.zeros(1, 1, dtype=torch.long, device=weight.device)).double().mean())


@torch.no_grad()
def measured_factors(lm: nn.Module) -> tuple[float, float] | None:
    """(factor applied at lookup, factor applied by the decoder's forward before its first layer), measured
    on this module; None on the meta device (nothing to measure, nothing computed)."""
    embedding = LanguageModel(lm).embeddings
    weight = LanguageModel(lm).embedding_matrix
    if weight.is_meta:
        return None
    at_lookup = _lookup_factor(embedding)
    layer = _first_layer(lm)
    if layer is None:
        return at_lookup, 1.0

    def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _StopBeforeFirstLayer(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
    decoder = LanguageModel(lm).decoder
    was_training = decoder.training
    decoder.eval()
    try:
        decoder(
            inputs_embeds=torch.ones(1, 1, weight.shape[1], dtype=weight.dtype, device=weight.device), use_cache=False
        )
        raise ConfigError(f"{type(lm).__name__}: could not observe the input of its first decoder layer")
    except _StopBeforeFirstLayer as seen:
        in_forward = float(seen.hidden.double().mean())
    finally:
        handle.remove()
        decoder.train(was_training)
    return at_lookup, in_forward


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-2 * max(abs(b), 1.0)


def image_feature_factor(lm: nn.Module, rule: str | None, name: str) -> float:
    """The factor spliced image features need so that they end up scaled as the text is (1.0 when the LM
    does not scale, or when its forward scales the whole sequence itself). `rule` None (an LM given as a
    module, without a card) takes the measured factor as declared."""
    hidden = LanguageModel(lm).width
    measured = measured_factors(lm)
    if measured is None:
        return 1.0
    at_lookup, in_forward = measured
    if rule is None:
        rule = "sqrt_hidden_size" if _close(at_lookup * in_forward, math.sqrt(hidden)) else "none"
    target = declared_factor(rule, hidden)
    if not _close(at_lookup * in_forward, target):
        where = "when its embeddings are looked up" if not _close(at_lookup, 1.0) else "in its forward"
        raise ConfigError(
            f"{name}: the installed transformers multiplies this LM's input embeddings by {at_lookup * in_forward:.4g} "
            f"({where}), but its card declares embedding_scale: {rule} (x{target:.4g}); set `embedding_scale: "
            f"{'sqrt_hidden_size' if _close(at_lookup * in_forward, math.sqrt(hidden)) else 'none'}` in the card "
            "so that image features get the same scale as the text"
        )
    return target if _close(at_lookup, target) and target != 1.0 else 1.0


def scale_features(features: torch.Tensor, factor: float) -> torch.Tensor:
    """x factor rounded to the features' dtype, as the original rounded sqrt(hidden_size) to the hidden dtype."""
    if factor == 1.0:
        return features
    return features * torch.tensor(factor, dtype=features.dtype, device=features.device)
