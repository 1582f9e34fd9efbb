"""Our PIL pipelines equal the transformers PIL processors built from the same card values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.model.vision import VISION

CARDS = [
    "siglip-so400m-384",
    "siglip-base-224",
    "clip-vit-l-336",
    "dinov2-large",
    "openclip-vit-b-16-laion2b",
    "tiny-siglip-so400m-384",
    "tiny-dinov2-large",
]


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:389, 0:517]
    gradient = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    return [
        Image.fromarray(gradient),  # landscape
        Image.fromarray(noise),  # portrait
        Image.fromarray(noise[:, :, 0]),  # grayscale
        Image.fromarray(np.dstack([noise, noise[:, :, :1]]), "RGBA"),
        Image.fromarray(gradient).convert("P"),  # palette
        Image.fromarray(noise[:64, :64]),  # square, small
    ]


def pil_processors() -> tuple[type, type]:
    """transformers' PIL processors of SigLIP and CLIP: named apart in transformers 5, the plain classes in 4."""
    try:
        from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil
        from transformers import SiglipImageProcessor as SiglipImageProcessorPil
    return SiglipImageProcessorPil, CLIPImageProcessorPil


def hf_processor(card_name: str):
    SiglipImageProcessorPil, CLIPImageProcessorPil = pil_processors()

    spec = VISION.get(card_name).image
    common = {
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "resample": 3,
        "rescale_factor": spec.rescale_factor,
    }
    if spec.resize == "square":
        return SiglipImageProcessorPil(size={"height": spec.size, "width": spec.size}, **common)
    return CLIPImageProcessorPil(
        size={"shortest_edge": spec.resize_size}, crop_size={"height": spec.size, "width": spec.size}, **common
    )


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's original code, verbatim in behaviour."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), fill)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), fill)
    result.paste(image, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("card_name", CARDS)
def test_square_strategy_equals_the_pil_processor(card_name):
    ours, theirs = ImageProcessor(VISION.get(card_name).image), hf_processor(card_name)
    for image in images():
        # LLaVA opens every image with .convert("RGB") (alpha dropped, not composited on white)
        rgb = image.convert("RGB")
        expected = torch.as_tensor(np.asarray(theirs(rgb, return_tensors="np")["pixel_values"][0]))
        got = ours(image)
        assert got.shape == expected.shape == (3, ours.spec.size, ours.spec.size)
        assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("card_name", ["siglip-so400m-384", "clip-vit-l-336"])
def test_pad_strategy_equals_expand2square_then_the_pil_processor(card_name):
    spec = VISION.get(card_name).image
    ours, theirs = ImageProcessor(spec, "pad"), hf_processor(card_name)
    for image in images():
        padded = expand2square(image.convert("RGB"), spec.fill_color)
        expected = torch.as_tensor(np.asarray(theirs(padded, return_tensors="np")["pixel_values"][0]))
        assert (ours(image) - expected).abs().max() < 1e-5


def test_fill_colours_are_the_originals():
    assert VISION.get("siglip-so400m-384").image.fill_color == (127, 127, 127)
    assert VISION.get("clip-vit-l-336").image.fill_color == (122, 116, 104)


def test_hf_config_round_trips_through_transformers(tmp_path):
    import json

    from transformers import AutoImageProcessor

    ours = ImageProcessor(VISION.get("clip-vit-l-336").image)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(ours.hf_config()))
    theirs = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    image = images()[0]
    expected = torch.as_tensor(np.asarray(theirs(image, return_tensors="np")["pixel_values"][0]))
    assert (ours(image) - expected).abs().max() < 1e-5


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="allowed: square, pad, resize-naive, resize-crop"):
        ImageProcessor(VISION.get("siglip-so400m-384").image, "stretch")


@pytest.mark.parametrize("card_name", ["siglip-so400m-384", "clip-vit-l-336"])
def test_resize_strategies_equal_the_pil_processors(card_name):
    """`resize-naive` is a plain square resize, `resize-crop` short side then centre crop, for any encoder."""
    SiglipImageProcessorPil, CLIPImageProcessorPil = pil_processors()

    spec = VISION.get(card_name).image
    common = {"image_mean": list(spec.mean), "image_std": list(spec.std), "resample": 3}
    naive = SiglipImageProcessorPil(size={"height": spec.size, "width": spec.size}, **common)
    crop = CLIPImageProcessorPil(
        size={"shortest_edge": spec.size}, crop_size={"height": spec.size, "width": spec.size}, **common
    )
    for strategy, theirs in [("resize-naive", naive), ("resize-crop", crop)]:
        ours = ImageProcessor(spec, strategy)
        for image in images():
            expected = torch.as_tensor(np.asarray(theirs(image.convert("RGB"), return_tensors="np")["pixel_values"][0]))
            assert (ours(image) - expected).abs().max() < 1e-5, strategy
