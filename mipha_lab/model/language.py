"""Language-model backend: a Hugging Face causal LM and its tokenizer, built from a card."""

from __future__ import annotations

import logging
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import AutoConfig, AutoModelForCausalLM

from mipha_lab.constants import IMAGE_TOKEN
from mipha_lab.model.packed_attention import PACKED_SDPA
from mipha_lab.model.remote_code import load_folder_tokenizer
from mipha_lab.model.tiny_tokenizer import tiny_tokenizer
from mipha_lab.registry import Registry
from mipha_lab.registry.cards import LLMCard

log = logging.getLogger(__name__)

TINY_TOKENIZER = "builtin:tiny-bpe"

LLM: Registry[Any] = Registry("language model", "causal language models (cards in registry/llm/)", cards="llm")
LLM_BACKENDS: Registry[Any] = Registry("language-model backend", "libraries that build a language-model card")


def resolve_attn_implementation(requested: str = "auto") -> str:
    """`auto` picks flash-attention 2 when it imports and a GPU is present, else SDPA."""
    if requested != "auto":
        return requested

    try:
        import flash_attn  # noqa: F401 - optional (the `flash` extra): is it installed?
    except ImportError:
        return "sdpa"
    return "flash_attention_2" if torch.cuda.is_available() else "sdpa"


def transformers_attention(requested: str = "auto") -> str:
    """The attention implementation the LM is built with: SDPA runs as `sdpa_packed` (plain SDPA, and
    per-sample attention on packed rows)."""

    resolved = resolve_attn_implementation(requested)
    return PACKED_SDPA if resolved == "sdpa" else resolved


def lm_config(card: LLMCard, attn_implementation: str = "sdpa"):

    arch = dict(card.architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    if "hidden_act" in arch and config.hidden_act != arch["hidden_act"]:
        # transformers 5 rewrites Gemma's "gelu" to the tanh approximation; the card's activation is what runs
        # (Mipha-2.4B was trained with the exact GELU its config names)
        log.info(
            "%s: keeping hidden_act=%s (transformers changed it to %s)",
            card.name,
            arch["hidden_act"],
            config.hidden_act,
        )
        config.hidden_act = arch["hidden_act"]
    if "hidden_act" in arch and hasattr(config, "hidden_activation"):
        config.hidden_activation = arch["hidden_act"]  # transformers 4's Gemma runs this key, not hidden_act
    config._attn_implementation = transformers_attention(attn_implementation)
    return config


@LLM_BACKENDS.register("transformers")
def build_transformers_lm(card: LLMCard, pretrained: bool = False, attn_implementation: str = "sdpa"):
    """`AutoModelForCausalLM` from the card's architecture; weights from `hub_id` (hub or folder) if asked."""

    config = lm_config(card, attn_implementation)
    if pretrained and card.hub_id:
        return AutoModelForCausalLM.from_pretrained(
            card.hub_id, config=config, attn_implementation=config._attn_implementation, trust_remote_code=False
        )
    return AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)


def build_language_model(card: LLMCard, pretrained: bool = False, attn_implementation: str = "sdpa"):
    return LLM_BACKENDS.build(card.builder, card=card, pretrained=pretrained, attn_implementation=attn_implementation)


def load_tokenizer(card: LLMCard):
    """The card's tokenizer (hub id, local folder or the built-in tiny BPE) with the card's special tokens."""
    tokens = card.special_tokens
    if card.tokenizer == TINY_TOKENIZER:
        return tiny_tokenizer(eos=tokens.eos, bos=tokens.bos, pad=tokens.pad)

    tokenizer = load_folder_tokenizer(card.tokenizer)
    if tokenizer.eos_token != tokens.eos:
        raise ValueError(
            f"{card.source}: special_tokens.eos is {tokens.eos!r} but the tokenizer of "
            f"{card.tokenizer} has eos {tokenizer.eos_token!r}"
        )
    return with_image_token(tokenizer)


def with_image_token(tokenizer):
    """`<image>` as one special token, so a whole rendered conversation tokenizes in one call; its id is
    replaced by IMAGE_TOKEN_INDEX before embedding (the LM's embedding matrix is never resized)."""

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer
