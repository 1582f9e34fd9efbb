"""The vision tower interface: pixels in, the selected layer's token grid out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mipha_lab.errors import InputError
from mipha_lab.registry import Registry
from mipha_lab.registry.cards import ImageSpec

# cards from registry/vision/, and VisionTower classes registered in Python (`@VISION.register("my-encoder")`)
VISION: Registry[Any] = Registry("vision encoder", "vision towers (cards in registry/vision/)", cards="vision")


class VisionTower(nn.Module):
    """Base of every vision encoder.

    Subclasses implement `encode` (all tokens of the hidden layer `feature_layer`, prefix tokens such
    as CLS first); the base class checks the input size and applies the feature selection:
    `patch` drops prefix tokens, `cls_patch` keeps them. Layers after `feature_layer` and pooling
    heads stay in the module so that released checkpoints load completely.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        image_size: int,
        patch_size: int,
        num_prefix_tokens: int,
        feature_layer: int = -2,
        select: str = "patch",
        image_spec: ImageSpec | None = None,  # None: a square resize to image_size, mean and std 0.5
        name: str = "",
    ) -> None:
        super().__init__()
        if select not in ("patch", "cls_patch"):
            raise ValueError(f"feature selection must be 'patch' or 'cls_patch', got {select!r}")
        self.hidden_size = hidden_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.feature_layer = feature_layer
        self.select = select
        self.image_spec = image_spec or ImageSpec(
            resize="square", resize_size=image_size, mean=(0.5,) * 3, std=(0.5,) * 3
        )
        self.name = name or type(self).__name__
        self.in_channels = 3  # a fused tower takes its towers' images stacked on this axis

    @property
    def image_specs(self) -> tuple[ImageSpec, ...]:
        """The preprocessing of each image the tower takes (several for a fused tower)."""
        return (self.image_spec,)

    @property
    def parts(self) -> list[VisionTower]:
        """The towers that run (a fused tower's own towers; otherwise itself)."""
        return [self]

    @property
    def grid(self) -> int:
        """Patches per side of the square token grid."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image after feature selection."""
        extra = self.num_prefix_tokens if self.select == "cls_patch" else 0
        return self.grid**2 + extra

    @property
    def is_square_grid(self) -> bool:
        return self.select == "patch" or self.num_prefix_tokens == 0

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's repeated layers (for `partial` training and activation checkpointing)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its layers")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise InputError(
                f"vision encoder '{self.name}' expects images of shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}; preprocess them with the card's image processor"
            )
        hidden = self.encode(pixel_values)
        return hidden[:, self.num_prefix_tokens :] if self.select == "patch" else hidden

    def absolute_layer(self, num_layers: int) -> int:
        """`feature_layer` as a 0-based block index (-1 = last block), checked against the depth."""
        index = self.feature_layer + num_layers if self.feature_layer < 0 else self.feature_layer - 1
        if not 0 <= index < num_layers:
            raise ValueError(
                f"feature layer {self.feature_layer} is out of range for '{self.name}' with {num_layers} layers"
            )
        return index
