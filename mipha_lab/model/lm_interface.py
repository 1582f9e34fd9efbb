"""The language model as the rest of the project sees it: any transformers causal LM through one small
interface, as VisionTower is for encoders. The model, the policies, LoRA, FLOPs, packing and the plan ask
it for embeddings, decoder layers, the head, the attention implementation, a forward over embeddings
with position ids, and generation - never `get_decoder()` or the private `config._attn_implementation`
themselves, which change between transformers versions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:  # the annotation only; transformers is imported by whoever built the LM
    from transformers import PreTrainedModel


class LanguageModel:
    """A view of a transformers causal LM; not a module of its own, so the LM's weights keep their names."""

    def __init__(self, lm: nn.Module) -> None:
        self.module = cast("PreTrainedModel", lm)

    @property
    def embeddings(self) -> nn.Module:
        return self.module.get_input_embeddings()

    @property
    def head(self) -> nn.Module:
        return self.module.get_output_embeddings()

    @property
    def decoder(self) -> nn.Module:
        """The body: embeddings and decoder layers, without the head."""
        return self.module.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.decoder.layers)

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return cast(torch.Tensor, self.embeddings.weight)

    @property
    def width(self) -> int:
        return int(self.embedding_matrix.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.embedding_matrix.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_matrix.dtype

    @property
    def tied(self) -> bool:
        """The head shares the embedding matrix (saved once, counted once)."""
        return self.head.weight is self.embedding_matrix

    @property
    def attention(self) -> str:
        """The attention implementation the LM runs (`sdpa_packed`, `flash_attention_2`, `eager`, ...)."""
        return str(self.module.config._attn_implementation)

    @property
    def config(self) -> Any:
        """The transformers config (sizes for FLOPs and memory plans; token ids for generation)."""
        return self.module.config

    def hidden_states(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, **attention: Any) -> torch.Tensor:
        """The last hidden states of a forward over embeddings (no cache); `attention` is what
        MultimodalModel chooses to keep samples apart (a mask, or packed spans)."""
        return self.decoder(
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False, **attention
        ).last_hidden_state

    def generate(self, **kwargs: Any) -> Any:
        return cast(Any, self.module).generate(**kwargs)  # causal LMs mix in GenerationMixin
