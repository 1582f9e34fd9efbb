"""The assembled multimodal model: vision tower -> projector -> features spliced into a causal LM."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from mipha_lab.config import AnyresTiling
from mipha_lab.constants import IGNORE_INDEX
from mipha_lab.errors import ConfigError, UnknownNameError
from mipha_lab.model.adapters import restore_adapters
from mipha_lab.model.build import components_from_config
from mipha_lab.model.embedding_scale import image_feature_factor, scale_features
from mipha_lab.model.folder import read_model_folder
from mipha_lab.model.fused_loss import FusedLoss, supervised_loss_sum
from mipha_lab.model.image_layout import AnyresArranger, ImageLayout, TiledProcessor
from mipha_lab.model.image_processing import ImageProcessor, StackedProcessor, Strategy, image_processor
from mipha_lab.model.lm_interface import LanguageModel
from mipha_lab.model.packed_attention import PACKED_SDPA, PackedSegments, without_cudnn_attention
from mipha_lab.model.spec import VLMConfig
from mipha_lab.model.splice import (
    LossReduction,
    Spliced,
    block_causal_mask,
    check_image_counts,
    splice,
    target_weights,
)
from mipha_lab.model.tiling import Size
from mipha_lab.model.vision import VisionTower
from mipha_lab.model.weights import WEIGHTS_NAME, place_weights

log = logging.getLogger(__name__)


@dataclass
class VLMOutput:
    """What a forward pass returns: the loss (mean and sum over supervised tokens), logits, the inputs."""

    loss: torch.Tensor | None  # mean over supervised tokens of this batch (weighted: see loss_reduction)
    loss_sum: torch.Tensor | None  # (weighted) sum over supervised tokens (for global-batch normalisation)
    num_supervised: torch.Tensor | None  # the weights' sum under loss_reduction sample / square
    logits: torch.Tensor | None  # (B, L, V) over the spliced sequence, when asked for
    spliced: Spliced


class MultimodalModel(nn.Module):
    """A vision tower, a projector and a Hugging Face causal LM, assembled.

    Inputs are token ids with one `IMAGE_TOKEN_INDEX` per image, an attention mask built from
    sequence lengths, and the images of the batch in order of appearance. Any number of images per
    sample works, including none.
    """

    vision_tower: VisionTower
    projector: Any  # any module mapping (N, T, D_vision) features and reporting num_tokens(); no base class needed
    language_model: nn.Module  # a transformers causal LM, reached through `lm` (lm_interface.py)

    def __init__(
        self,
        vision_tower: VisionTower,
        projector: nn.Module,
        language_model: nn.Module,
        config: VLMConfig,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.config = config
        self.tokenizer = tokenizer
        self.truncated_samples = 0
        self.truncated_tokens = 0
        self.fused_loss: FusedLoss = "off"  # how the training loss runs the head (fused_loss.py); a stage sets it
        self.loss_reduction: LossReduction = "token"  # how token losses are weighted (splice.target_weights)
        self.layout = ImageLayout(config.tiling, vision_tower.image_size, self.num_image_tokens)
        # anyres: the learned newline after each row of tiles' features (trained with the projector)
        self.tiles = AnyresArranger(self.layout, self.lm.width) if isinstance(config.tiling, AnyresTiling) else None
        card = config.llm.card
        self.image_feature_factor = image_feature_factor(
            language_model, card.get("embedding_scale", "none") if card is not None else None, config.llm.name
        )

    @property
    def lm(self) -> LanguageModel:
        """The language model through its interface (lm_interface.py)."""
        return LanguageModel(self.language_model)

    # ----------------------------------------------------------------- inputs
    @property
    def num_image_tokens(self) -> int:
        """Visual tokens of one frame (the projector's output); a tiled image has several (`layout`)."""
        return self.projector.num_tokens(self.vision_tower.num_tokens)

    def image_processor(self, strategy: Strategy = "square") -> ImageProcessor | StackedProcessor | TiledProcessor:
        """PIL image -> what `pixel_values` holds for it: one frame, or a tiled image's frames (whose tiles and
        whole view are squashed, never padded, so `strategy` applies only without tiling)."""
        specs = self.vision_tower.image_specs
        if self.config.tiling is None:
            return image_processor(specs, strategy)
        return TiledProcessor(image_processor(specs, "square"), self.layout)

    def frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(frames, C, S, S) pixels -> (frames, T, D_lm): tower, projector, the LM's dtype and scale."""
        dtype = next(self.vision_tower.parameters()).dtype
        features = self.projector(self.vision_tower(pixel_values.to(dtype)))
        return scale_features(features.to(self.lm.dtype), self.image_feature_factor)

    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes: Sequence[Size] | torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """(frames, C, S, S) pixels -> (N, T, D_lm) projected features in the LM's dtype, scaled as the LM's text
        embeddings are when looked up (Gemma under transformers 5; see embedding_scale.py). Under anyres the
        frames of each image (of (height, width) `image_sizes`) become its own (T_i, D_lm) tokens."""
        features = self.frame_features(pixel_values)
        if self.tiles is None:
            return features
        if image_sizes is None:
            raise ValueError("an anyres model needs each image's (height, width) as image_sizes to place its tiles")
        sizes = [(int(h), int(w)) for h, w in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
        return self.tiles(features, sizes)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        padding_side: Literal["right", "left"] = "right",
        image_counts: Sequence[int] | torch.Tensor | None = None,
        sample_ids: Sequence[str] | None = None,
        segment_ids: torch.Tensor | None = None,
        image_sizes: Sequence[Size] | torch.Tensor | None = None,
    ) -> Spliced:
        """Token ids + images -> the LM's input embeddings (with labels, mask and positions)."""
        idx = self.config.image_token_index
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if self.tiles is not None and pixel_values is not None:  # frames of several tiles per image
            if image_sizes is None:
                raise ValueError("an anyres model needs each image's (height, width) as image_sizes to place its tiles")
            num_images = len(image_sizes)
        check_image_counts((input_ids == idx) & attention_mask.bool(), num_images, image_counts, sample_ids)
        text = self.lm.embeddings(input_ids.clamp(min=0))
        features = self.encode_images(pixel_values, image_sizes) if pixel_values is not None and num_images else None
        out = splice(
            input_ids,
            attention_mask,
            text,
            features,
            labels,
            padding_side=padding_side,
            max_length=self.config.max_positions,
            image_token_index=idx,
            segment_ids=segment_ids,
        )
        if features is None and self.training and torch.is_grad_enabled():
            # Every rank runs the tower on every step (ZeRO-3 gathers its weights collectively).
            size = self.vision_tower.image_size
            dummy = self.frame_features(text.new_zeros(1, self.vision_tower.in_channels, size, size)).sum()
            if self.tiles is not None:
                dummy = dummy + self.tiles.newline.sum()
            out.inputs_embeds = out.inputs_embeds + 0.0 * dummy
        self._count_truncation(out.truncated)
        return out

    def _count_truncation(self, truncated: torch.Tensor) -> None:
        rows = int((truncated > 0).sum())
        if rows:
            tokens = int(truncated.sum())
            self.truncated_samples += rows
            self.truncated_tokens += tokens
            log.warning(
                "truncated %d sample(s) by %d token(s) to the model's %d positions after splicing images "
                "(so far: %d samples, %d tokens)",
                rows,
                tokens,
                self.config.max_positions,
                self.truncated_samples,
                self.truncated_tokens,
            )

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        image_counts: Sequence[int] | torch.Tensor | None = None,
        sample_ids: Sequence[str] | None = None,
        return_logits: bool = True,
        padding_side: Literal["right", "left"] = "right",
        segment_ids: torch.Tensor | None = None,
        image_sizes: Sequence[Size] | torch.Tensor | None = None,
    ) -> VLMOutput:
        """Loss over supervised tokens (the head runs only on those) and, if asked, all logits.

        `segment_ids` marks packed rows (several samples per row): positions restart per sample and
        attention stays within each sample (see `_attention_inputs`)."""
        spliced = self.embed(
            input_ids,
            attention_mask,
            pixel_values,
            labels,
            padding_side=padding_side,
            image_counts=image_counts,
            sample_ids=sample_ids,
            segment_ids=segment_ids,
            image_sizes=image_sizes,
        )
        hidden = self.lm.hidden_states(spliced.inputs_embeds, spliced.position_ids, **self._attention_inputs(spliced))
        head = self.lm.head
        loss = loss_sum = count = None
        if spliced.labels is not None:
            targets = spliced.labels[:, 1:]
            supervised = targets != IGNORE_INDEX
            weights = None
            if self.loss_reduction != "token":
                segments = spliced.segment_ids[:, 1:] if spliced.segment_ids is not None else None
                weights = target_weights(supervised, segments, self.loss_reduction)[supervised]
            loss_sum = supervised_loss_sum(
                head, hidden[:, :-1][supervised], targets[supervised], self.fused_loss, weights=weights
            )
            count = supervised.sum() if weights is None else weights.sum()
            loss = loss_sum / count.clamp(min=1)
        logits = head(hidden).float() if return_logits else None
        return VLMOutput(loss, loss_sum, count, logits, spliced)

    def _attention_inputs(self, spliced: Spliced) -> dict[str, Any]:
        """How the LM keeps packed samples apart: flash-attention from the restarting position ids (no
        mask), `sdpa_packed` from the spans, any other implementation from a block-causal mask."""
        if spliced.segment_ids is None:
            return {"attention_mask": spliced.attention_mask}
        implementation = self.lm.attention
        if implementation.startswith("flash"):
            return {"attention_mask": None}
        if implementation == PACKED_SDPA:
            # an all-ones 2D mask: transformers builds no (L, L) mask, the spans do the masking
            return {
                "attention_mask": torch.ones_like(spliced.attention_mask),
                "packed_segments": PackedSegments.from_ids(spliced.segment_ids),
            }
        allowed = block_causal_mask(spliced.segment_ids)  # additive, as eager attention adds the mask to its scores
        dtype = spliced.inputs_embeds.dtype
        return {
            "attention_mask": torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        }

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        streamer: Any = None,
        output_scores: bool = False,
        image_sizes: Sequence[Size] | torch.Tensor | None = None,
    ) -> Any:
        """Batched generation with KV cache: greedy when `temperature` is 0, else sampling with top-p.

        Prompts are left-padded after splicing, so a batch gives each sample's answer alone.
        Returns the new tokens (B, T) padded with the pad/eos id, or the full generate output when
        `output_scores` is set.
        """
        spliced = self.embed(input_ids, attention_mask, pixel_values, padding_side="left", image_sizes=image_sizes)
        tok = self.tokenizer
        eos = eos_token_id if eos_token_id is not None else (tok.eos_token_id if tok is not None else None)
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else eos
        sampling = temperature > 0
        kwargs: dict[str, Any] = {
            "inputs_embeds": spliced.inputs_embeds,
            "attention_mask": spliced.attention_mask,
            "max_new_tokens": max_new_tokens,
            "do_sample": sampling,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "streamer": streamer,
        }
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_strings:
            if tok is None:
                raise ValueError("stop strings need the model's tokenizer")
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tok)
        if output_scores:
            kwargs.update(output_scores=True, output_logits=True, return_dict_in_generate=True)
        with without_cudnn_attention():
            return self.lm.generate(**kwargs)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json (component specs and resolved cards), safetensors weights, tokenizer, image processor."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
        save_file(self.weights_to_save(), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        specs = self.vision_tower.image_specs
        if len(specs) == 1 and self.config.tiling is None:  # transformers' processor would neither fuse nor tile
            processor = ImageProcessor(specs[0]).hf_config()
            (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        return folder

    def weights_to_save(self) -> dict[str, torch.Tensor]:
        """The state dict with tied tensors once (loading re-ties them) and every tensor owning its
        memory (DeepSpeed keeps parameters as views into flat buffers)."""
        state: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for name, tensor in self.state_dict().items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key not in seen:
                seen.add(key)
                state[name] = tensor.detach().contiguous().clone()
        return state

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False
    ) -> MultimodalModel:
        """Rebuilt from config.json alone - our format or a released Mipha / LLaVA-Phi checkpoint - with
        every stored tensor placed (folder.py, weights.py); nothing from the folder runs as code."""
        contents = read_model_folder(folder, allow_pickle)
        try:
            components = components_from_config(contents.config)
        except UnknownNameError as err:
            if not contents.config.imports:
                raise
            raise ConfigError(
                f"{folder}: {err}. Its components were registered in Python by "
                f"{', '.join(contents.config.imports)} (config.json 'imports'): import them first "
                "(on the command line: --import MODULE)"
            ) from None
        model = cls(*components, contents.config, contents.tokenizer)
        restore_adapters(model, contents.config.adapters)
        place_weights(model, contents.weights_for(set(model.state_dict())), Path(folder))
        if dtype is not None:
            model.to(dtype)
        return model.eval()
