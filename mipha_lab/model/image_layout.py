"""How one image reaches the LM under the model's tiling: how many frames the encoder sees, how many visual
tokens follow, the frames themselves, and (anyres) the arrangement of the frames' features with the learned
newline. Without tiling an image is one frame of `frame_tokens` tokens, as before; the geometry is in
tiling.py."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from mipha_lab.config import AnyresTiling, SplitTiling, Tiling
from mipha_lab.model.image_processing import RESAMPLE, ImageProcessor, StackedProcessor
from mipha_lab.model.tiling import (
    Size,
    arrange_features,
    feature_count,
    grid_shape,
    split_grid,
    split_image,
    tile_image,
)


class ImageLayout:
    """Frames and visual tokens per image for a tiling (or none), an encoder input side `tile` and the
    projector's `frame_tokens` tokens per frame."""

    def __init__(self, tiling: Tiling | None, tile: int, frame_tokens: int) -> None:
        self.tiling, self.tile, self.frame_tokens = tiling, tile, frame_tokens
        self.side = math.isqrt(frame_tokens)
        if isinstance(tiling, AnyresTiling) and self.side**2 != frame_tokens:
            raise ValueError(
                f"anyres tiling needs a square grid of tokens per tile to place them; the projector gives "
                f"{frame_tokens} tokens per tile"
            )

    @property
    def pinpoints(self) -> list[Size]:
        """Anyres grids in pixels (transformers' `image_grid_pinpoints`)."""
        assert isinstance(self.tiling, AnyresTiling)
        return [(rows * self.tile, columns * self.tile) for rows, columns in self.tiling.grids]

    def split_grid(self, size: Size) -> Size:
        """(rows, columns) of a split image's tiles; (0, 0) when the whole image is its only frame."""
        assert isinstance(self.tiling, SplitTiling)
        return split_grid(size, self.tiling.max_side * self.tile, self.tile)

    def frames(self, size: Size) -> int:
        """Encoder passes for an image of (height, width) `size`."""
        if isinstance(self.tiling, AnyresTiling):
            rows, columns = grid_shape(size, self.pinpoints, self.tile)
            return 1 + rows * columns
        if isinstance(self.tiling, SplitTiling):
            rows, columns = self.split_grid(size)
            return rows * columns + 1
        return 1

    def visual_tokens(self, size: Size) -> int:
        """LM positions the image's features take (a split image's text markers not included)."""
        if isinstance(self.tiling, AnyresTiling):
            return feature_count(size, self.pinpoints, self.tile, self.side)
        return self.frames(size) * self.frame_tokens

    @property
    def max_frames(self) -> int:
        return 1 if self.tiling is None else self.tiling.max_tiles + 1

    @property
    def max_visual_tokens(self) -> int:
        """The budget: the most positions an image can take (anyres: the largest grid before unpadding)."""
        if isinstance(self.tiling, AnyresTiling):
            side = self.side
            return side * side + max(rows * side * (columns * side + 1) for rows, columns in self.tiling.grids)
        return self.max_frames * self.frame_tokens

    def frame_images(self, image: Image.Image, resample: str) -> list[Image.Image]:
        """The frames the encoder sees, in the order their features are placed."""
        method = RESAMPLE[resample]
        if isinstance(self.tiling, AnyresTiling):
            return tile_image(image, self.pinpoints, self.tile, method)
        if isinstance(self.tiling, SplitTiling):
            return split_image(image, self.tiling.max_side * self.tile, self.tile, method)[0]
        return [image]


class TiledProcessor:
    """An image -> its frames (F, C, S, S), each through the tower's own preprocessing."""

    def __init__(self, frame_processor: ImageProcessor | StackedProcessor, layout: ImageLayout) -> None:
        self.frame_processor, self.layout = frame_processor, layout
        first = frame_processor if isinstance(frame_processor, ImageProcessor) else frame_processor.parts[0]
        self.resample = first.spec.resample

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image if image.mode == "RGB" else image.convert("RGB")
        return torch.stack([self.frame_processor(frame) for frame in self.layout.frame_images(image, self.resample)])


class AnyresArranger(nn.Module):
    """The learned newline (LLaVA-NeXT's `image_newline`) and the placing of each image's frame features."""

    def __init__(self, layout: ImageLayout, width: int) -> None:
        super().__init__()
        self.layout = layout
        self.newline = nn.Parameter(torch.randn(width) / math.sqrt(width))

    def forward(self, features: torch.Tensor, sizes: Sequence[Size]) -> list[torch.Tensor]:
        """(frames of all images, T, D) -> one (tokens_i, D) tensor per image, in order."""
        counts = [self.layout.frames(size) for size in sizes]
        if sum(counts) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} frames for images of sizes {list(sizes)} (expected {sum(counts)})")
        layout = self.layout
        return [
            arrange_features(part, size, layout.pinpoints, layout.tile, self.newline)
            for part, size in zip(features.split(counts), sizes, strict=True)
        ]
