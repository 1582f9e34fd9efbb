"""Tiling an image into encoder-sized tiles, two ways.

`anyres` (LLaVA-NeXT): which grid of tiles an image gets, how it is resized and padded onto that grid, how
it is cut, and how the tiles' features go back into reading order with the padding's features removed and
a learned newline vector after each row; the whole image squashed to one tile comes first.
`split` (Idefics3 / SmolVLM): the image resized so its longest edge is a given size, then up to multiples of
the tile, cut into tiles, the whole image squashed to one tile last.

The rules are transformers' (`LlavaNextImageProcessor` and `LlavaNextModel.pack_image_features`,
`Idefics3ImageProcessor`), owned here so that no transformers release changes them under a trained model;
`tests/test_tiling.py` checks them against the installed transformers on many image sizes. Sizes are
(height, width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

Size = tuple[int, int]  # (height, width)


def best_resolution(image: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The pinpoint that keeps the most of the image's pixels when the image is scaled (aspect kept) to fit
    inside it; among equals, the one that wastes the least area."""
    height, width = image
    best, most_kept, least_wasted = None, 0, math.inf
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (int(target_height), int(target_width)), kept, wasted
    if best is None:
        raise ValueError(f"no grid pinpoint fits an image of {height}x{width} (pinpoints: {list(pinpoints)})")
    return best


def fitted_size(image: Size, target: Size) -> Size:
    """The image's size scaled to fit inside `target`, aspect kept: one side equals the target's, the other is
    rounded up (never past the target)."""
    (height, width), (target_height, target_width) = image, target
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


def grid_shape(image: Size, pinpoints: Sequence[Sequence[int]], tile: int) -> Size:
    """(rows, columns) of tiles the image is cut into."""
    height, width = best_resolution(image, pinpoints)
    return height // tile, width // tile


def tile_image(
    image: Image.Image, pinpoints: Sequence[Sequence[int]], tile: int, resample: Image.Resampling
) -> list[Image.Image]:
    """The whole image squashed to tile x tile, then the tiles of the image fitted into its best pinpoint and
    centred on black, row by row."""
    width, height = image.size
    target_height, target_width = best_resolution((height, width), pinpoints)
    fitted_height, fitted_width = fitted_size((height, width), (target_height, target_width))
    canvas = Image.new(image.mode, (target_width, target_height), 0)
    left, top = (target_width - fitted_width) // 2, (target_height - fitted_height) // 2
    canvas.paste(image.resize((fitted_width, fitted_height), resample), (left, top))
    tiles = grid_tiles(canvas, target_height // tile, target_width // tile, tile)
    return [image.resize((tile, tile), resample), *tiles]


def grid_tiles(image: Image.Image, rows: int, columns: int, tile: int) -> list[Image.Image]:
    """The rows x columns tiles of tile x tile pixels from the top left, row by row."""
    corners = [(c * tile, r * tile) for r in range(rows) for c in range(columns)]
    return [image.crop((x, y, x + tile, y + tile)) for x, y in corners]


def unpadded_span(rows: int, columns: int, image: Size) -> tuple[slice, slice]:
    """The rows and columns of a (rows x columns) feature map that show the image rather than its padding:
    the padding is cut evenly from both sides of the axis the image does not fill."""
    height, width = image
    if width / height > columns / rows:
        kept = int(round(height * columns / width, 7))
        cut = (rows - kept) // 2
        return slice(cut, rows - cut), slice(0, columns)
    kept = int(round(width * rows / height, 7))
    cut = (columns - kept) // 2
    return slice(0, rows), slice(cut, columns - cut)


def feature_count(image: Size, pinpoints: Sequence[Sequence[int]], tile: int, side: int) -> int:
    """Visual tokens of one image: the whole view's side x side, then the unpadded rows of the tiles'
    features, each followed by a newline."""
    grid_rows, grid_columns = grid_shape(image, pinpoints, tile)
    rows, columns = unpadded_span(grid_rows * side, grid_columns * side, image)
    return side * side + (rows.stop - rows.start) * (columns.stop - columns.start + 1)


def arrange_features(
    features: torch.Tensor, image: Size, pinpoints: Sequence[Sequence[int]], tile: int, newline: torch.Tensor
) -> torch.Tensor:
    """(1 + tiles, side * side, C) features of one image -> (feature_count, C) tokens: the whole view's, then
    the tiles' stitched into one map in reading order, unpadded, with `newline` after each row."""
    whole, tiles = features[0], features[1:]
    side = math.isqrt(whole.shape[0])
    grid_rows, grid_columns = grid_shape(image, pinpoints, tile)
    channels = features.shape[-1]
    stitched = (
        tiles.reshape(grid_rows, grid_columns, side, side, channels)
        .permute(0, 2, 1, 3, 4)
        .reshape(grid_rows * side, grid_columns * side, channels)
    )
    rows, columns = unpadded_span(grid_rows * side, grid_columns * side, image)
    kept = stitched[rows, columns]
    ends = newline.to(kept.dtype).expand(kept.shape[0], 1, channels)
    return torch.cat([whole, torch.cat([kept, ends], dim=1).reshape(-1, channels)])


LARGEST_SIDE = 4096  # Idefics3's cap on any side after the longest-edge resize


def longest_edge_size(image: Size, longest_edge: int) -> Size:
    """The size with the longest side at `longest_edge`, the other side scaled, truncated and rounded up to
    even, then both capped at LARGEST_SIDE (aspect kept)."""
    height, width = image
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height  # of the size just computed, as Idefics3 does
    if max(height, width) > LARGEST_SIDE:
        if width >= height:
            width, height = LARGEST_SIDE, int(LARGEST_SIDE / aspect)
        else:
            height, width = LARGEST_SIDE, int(LARGEST_SIDE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(image: Size, tile: int) -> Size:
    """The size rounded up to multiples of the tile: the longer side first, the other from the aspect ratio."""
    height, width = image
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def split_grid(image: Size, longest_edge: int, tile: int) -> Size:
    """(rows, columns) of tiles `split_image` cuts an image of this size into; (0, 0) when it fits one tile."""
    height, width = tile_multiple_size(longest_edge_size(image, longest_edge), tile)
    if height <= tile and width <= tile:
        return 0, 0
    return height // tile, width // tile


def split_image(
    image: Image.Image, longest_edge: int, tile: int, resample: Image.Resampling
) -> tuple[list[Image.Image], int, int]:
    """(frames, rows, columns): the tiles row by row, then the whole image squashed to tile x tile; an image
    that fits one tile is that one frame (0 rows, 0 columns)."""
    width, height = image.size
    first_height, first_width = longest_edge_size((height, width), longest_edge)
    image = image.resize((first_width, first_height), resample)
    tiled_height, tiled_width = tile_multiple_size((first_height, first_width), tile)
    image = image.resize((tiled_width, tiled_height), resample)
    rows, columns = split_grid((height, width), longest_edge, tile)
    if not rows:
        return [image], 0, 0
    return [*grid_tiles(image, rows, columns, tile), image.resize((tile, tile), resample)], rows, columns
