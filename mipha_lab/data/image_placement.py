"""Where a sample's images go in its tokens under the model's tiling: the text each image becomes (a split
image's tiles and row/column markers, from the template) and the visual tokens at each <image> placeholder
that results - what lengths, packing budgets and the loss count need before any image is decoded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

from PIL import Image

from mipha_lab.config import SplitTiling
from mipha_lab.data.templates import Template
from mipha_lab.model.image_layout import ImageLayout
from mipha_lab.model.tiling import Size


def header_size(source: str | Path | IO[bytes]) -> Size:
    """(height, width) from the file's header (nothing decoded)."""
    with Image.open(source) as image:
        width, height = image.size
    return height, width


def image_markup(layout: ImageLayout, template: Template, sizes: Sequence[Size]) -> list[str] | None:
    """The text replacing each image under split tiling (None otherwise: one <image> per image)."""
    if not isinstance(layout.tiling, SplitTiling):
        return None
    return [template.split_markup(*layout.split_grid(size)) for size in sizes]


def placeholders(layout: ImageLayout, sizes: Sequence[Size]) -> tuple[list[int], list[int], list[Size]]:
    """(visual tokens, encoder frames, original image size) at each <image> placeholder after `image_markup`:
    one placeholder per image, or one per frame of a split image."""
    if isinstance(layout.tiling, SplitTiling):
        split = [size for size in sizes for _ in range(layout.frames(size))]
        return [layout.frame_tokens] * len(split), [1] * len(split), split
    return [layout.visual_tokens(size) for size in sizes], [layout.frames(size) for size in sizes], list(sizes)
