"""Any-resolution tiling (mipha_lab/model/tiling.py) against transformers' LlavaNext: the processor's pixels
for many image sizes, its best-resolution choice and token count, and the model's feature packing
(`LlavaNextModel.pack_image_features`: stitch, unpad, newline per row)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.model.tiling import (
    arrange_features,
    best_resolution,
    feature_count,
    fitted_size,
    longest_edge_size,
    split_image,
    tile_image,
)
from mipha_lab.model.vision import VISION

OLD_TRANSFORMERS = int(transformers.__version__.split(".")[0]) < 5
TILE = 32
PINPOINTS = [[TILE * r, TILE * c] for r, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]  # LLaVA-NeXT's, scaled
SIDE = 4  # features per tile side (a 32-px tile, patch 8)


def sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """(height, width): random, plus the pinpoints themselves, squares, and extreme aspect ratios."""
    rng = random.Random(seed)
    fixed = [(32, 64), (64, 32), (64, 64), (96, 32), (7, 200), (200, 7), (5, 5), (33, 65), (31, 95)]
    return fixed + [(rng.randint(5, 240), rng.randint(5, 240)) for _ in range(count)]


def llava_next_pil_processor():
    """transformers' PIL LlavaNext processor: `LlavaNextImageProcessorPil` in 5.x, the plain class in 4.x."""
    try:
        from transformers import LlavaNextImageProcessorPil
    except ImportError:
        from transformers import LlavaNextImageProcessor as LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil


@pytest.mark.parametrize("card_name", ["tiny-siglip-so400m-384", "tiny-clip-vit-l-336"])
def test_tiles_equal_transformers_llava_next_processor(card_name):
    spec = VISION.get(card_name).image
    at_tile = {"size": TILE, "resize_size": TILE, "crop_size": spec.crop_size and TILE}
    ours = ImageProcessor(spec.model_copy(update=at_tile))
    square = {"height": TILE, "width": TILE}
    theirs = llava_next_pil_processor()(
        size=square if spec.resize == "square" else {"shortest_edge": TILE},
        crop_size=square,
        do_center_crop=spec.resize != "square",
        image_grid_pinpoints=PINPOINTS,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        resample=3,
    )
    rng = np.random.default_rng(0)
    for height, width in sizes(25, seed=1):
        fitted = fitted_size((height, width), best_resolution((height, width), PINPOINTS))
        if OLD_TRANSFORMERS and min(fitted) <= 4:
            continue  # transformers 4.x takes a resized image 3 pixels high for channels-first and cuts it wrongly
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = theirs(image, return_tensors="pt")
        tiles = torch.stack([ours(tile) for tile in tile_image(image, PINPOINTS, TILE, Image.Resampling.BICUBIC)])
        assert expected["image_sizes"][0].tolist() == [height, width]
        assert tiles.shape == expected["pixel_values"][0].shape, (height, width)
        torch.testing.assert_close(tiles, expected["pixel_values"][0], atol=1e-6, rtol=0, msg=str((height, width)))


def test_best_resolution_and_token_count_equal_transformers():
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    processor = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS), patch_size=8)
    processor.num_additional_image_tokens = 0
    processor._get_unpadded_features = LlavaNextProcessor._get_unpadded_features.__get__(processor)
    for size in sizes(400, seed=2):
        assert best_resolution(size, PINPOINTS) == tuple(select_best_resolution(size, PINPOINTS)), size
        expected = LlavaNextProcessor._get_number_of_features(processor, *size, TILE, TILE)
        assert feature_count(size, PINPOINTS, TILE, SIDE) == expected, size


def test_arranged_features_equal_llava_next_packing():
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=TILE, patch_size=TILE // SIDE), image_grid_pinpoints=PINPOINTS
    )
    owner = SimpleNamespace(config=config)
    newline = torch.randn(6)
    for size in sizes(40, seed=3):
        height, width = best_resolution(size, PINPOINTS)
        tiles = 1 + (height // TILE) * (width // TILE)
        features = torch.randn(tiles, SIDE * SIDE, 6)
        packed, lengths = LlavaNextModel.pack_image_features(owner, [features], torch.tensor([size]), "full", newline)
        packed = torch.cat(packed) if isinstance(packed, (list, tuple)) else packed  # a list since transformers 5
        ours = arrange_features(features, size, PINPOINTS, TILE, newline)
        assert ours.shape[0] == lengths[0] == feature_count(size, PINPOINTS, TILE, SIDE), size
        torch.testing.assert_close(ours, packed, atol=0, rtol=0)


def idefics3_pil_processor():
    """transformers' PIL Idefics3 processor: `Idefics3ImageProcessorPil` in 5.x, the plain class in 4.x."""
    try:
        from transformers import Idefics3ImageProcessorPil
    except ImportError:
        from transformers import Idefics3ImageProcessor as Idefics3ImageProcessorPil
    return Idefics3ImageProcessorPil


@pytest.mark.parametrize("tiles_per_side", [1, 2, 3])
def test_split_frames_equal_transformers_idefics3_processor(tiles_per_side):
    spec = VISION.get("tiny-siglip-so400m-384").image.model_copy(update={"size": TILE, "resize_size": TILE})
    ours = ImageProcessor(spec)
    theirs = idefics3_pil_processor()(
        size={"longest_edge": tiles_per_side * TILE},
        max_image_size={"longest_edge": TILE},
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        resample=3,
        do_pad=False,
    )
    rng = np.random.default_rng(tiles_per_side)
    for height, width in sizes(12, seed=4 + tiles_per_side):
        fitted = longest_edge_size((height, width), tiles_per_side * TILE)
        if OLD_TRANSFORMERS and min(fitted) <= 4:
            continue  # transformers 4.x takes an image 3 pixels high for channels-first (as above)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = theirs(image, return_tensors="pt", return_row_col_info=True)
        frames, rows, columns = split_image(image, tiles_per_side * TILE, TILE, Image.Resampling.BICUBIC)
        assert (rows, columns) == (expected["rows"][0][0], expected["cols"][0][0]), (height, width)
        want = torch.as_tensor(np.asarray(expected["pixel_values"][0]))
        got = torch.stack([ours(frame) for frame in frames])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=str((height, width)))
