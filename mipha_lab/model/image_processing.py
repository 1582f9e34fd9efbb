"""Image preprocessing from a vision card, reproducing the PIL pipelines the original used.

Strategies (Prismatic's study adds the last two as an ablation axis):
- `square`: the processor's own rule (SigLIP resizes to a square; CLIP resizes the short side and
  centre-crops);
- `pad`: paste the image centred on a square of its longer side filled with the processor's mean
  colour (LLaVA's `expand2square`), then the processor's rule;
- `resize-naive`: a plain resize to the square input size, whatever the encoder;
- `resize-crop`: resize the short side to the input size, then centre-crop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from mipha_lab.registry.cards import ImageSpec

Strategy = Literal["square", "pad", "resize-naive", "resize-crop"]
STRATEGIES = ("square", "pad", "resize-naive", "resize-crop")
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImageProcessor:
    """PIL image -> normalized float tensor (3, S, S) for one vision card."""

    def __init__(self, spec: ImageSpec, strategy: Strategy = "square") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown image strategy {strategy!r} (allowed: {', '.join(STRATEGIES)})")
        self.spec, self.strategy = spec, strategy
        self._scale = np.float32(spec.rescale_factor)
        self._mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(spec.std, dtype=np.float32)[:, None, None]

    def _resize(self, image: Image.Image, mode: str, size: int) -> Image.Image:
        resample = RESAMPLE[self.spec.resample]
        if mode == "square":
            return image.resize((size, size), resample)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        return image.resize((size, new_long) if width <= height else (new_long, size), resample)

    @staticmethod
    def _center_crop(image: Image.Image, crop: int | None) -> Image.Image:
        if crop is None:
            return image
        width, height = image.size
        top, left = (height - crop) // 2, (width - crop) // 2
        return image.crop((left, top, left + crop, top + crop))

    def geometry(self, image: Image.Image) -> Image.Image:
        """The resized and cropped RGB image, before rescaling and normalisation."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        spec, size = self.spec, self.spec.size
        if self.strategy == "resize-naive":
            return self._resize(image, "square", size)
        if self.strategy == "resize-crop":
            return self._center_crop(self._resize(image, "shortest_edge", size), size)
        if self.strategy == "pad":
            return self._center_crop(self._pad_then_resize(image), spec.crop_size)
        return self._center_crop(self._resize(image, spec.resize, spec.resize_size), spec.crop_size)

    def _pad_then_resize(self, image: Image.Image) -> Image.Image:
        """expand_to_square + resize to the processor's square. For landscape images the horizontal pass
        runs on the image rows only and the fill rows are added before the vertical pass: PIL resizes in
        two separable passes (horizontal first), so the pixels are identical (tested) at a quarter less
        work and no full-size padded copy."""
        width, height = image.size
        target, resample = self.spec.resize_size, RESAMPLE[self.spec.resample]
        if width <= height:
            return expand_to_square(image, self.spec.fill_color).resize((target, target), resample)
        rows = image.resize((target, height), resample)
        canvas = Image.new("RGB", (target, width), self.spec.fill_color)
        canvas.paste(rows, (0, (width - height) // 2))
        return canvas.resize((target, target), resample)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(self.geometry(image)).transpose(2, 0, 1)  # a view: channels first
        out = np.empty(pixels.shape, dtype=np.float32)
        np.multiply(pixels, self._scale, out=out)  # (x * rescale - mean) / std, in place
        out -= self._mean
        out /= self._std
        return torch.from_numpy(out)

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    def hf_config(self) -> dict:
        """The same preprocessing as a transformers `preprocessor_config.json` (for interoperability)."""
        spec = self.spec
        config = {
            "do_convert_rgb": True,
            "do_resize": True,
            "resample": int(RESAMPLE[spec.resample]),
            "do_rescale": True,
            "rescale_factor": spec.rescale_factor,
            "do_normalize": True,
            "image_mean": list(spec.mean),
            "image_std": list(spec.std),
        }
        if spec.resize == "square":
            config.update(
                image_processor_type="SiglipImageProcessor",
                size={"height": spec.size, "width": spec.size},
                do_center_crop=False,
            )
        else:
            config.update(
                image_processor_type="CLIPImageProcessor",
                size={"shortest_edge": spec.resize_size},
                do_center_crop=spec.crop_size is not None,
                crop_size={"height": spec.size, "width": spec.size},
            )
        return config


class StackedProcessor:
    """One image through each tower's own preprocessing of a fused encoder, stacked on the channel axis
    (3 channels per tower, in the towers' order)."""

    def __init__(self, specs: Sequence[ImageSpec], strategy: Strategy = "square") -> None:
        self.parts = [ImageProcessor(spec, strategy) for spec in specs]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.cat([part(image) for part in self.parts])


def image_processor(specs: Sequence[ImageSpec], strategy: Strategy = "square") -> ImageProcessor | StackedProcessor:
    """The processor of a tower's `image_specs`: one spec, or a fused tower's several."""
    return ImageProcessor(specs[0], strategy) if len(specs) == 1 else StackedProcessor(specs, strategy)


def spec_from_hf_config(config: dict, fallback_size: int) -> ImageSpec:
    """The ImageSpec a transformers `preprocessor_config.json` describes (SigLIP: a square resize; CLIP and
    DINOv2: shortest edge, then a centre crop), so a released checkpoint keeps its own preprocessing."""
    size = config.get("size", fallback_size)
    names = {int(v): k for k, v in RESAMPLE.items()}
    crop = config.get("crop_size") if config.get("do_center_crop", "crop_size" in config) else None
    crop_side = crop if isinstance(crop, int) or crop is None else crop.get("height", crop.get("shortest_edge"))
    if isinstance(size, dict) and "shortest_edge" in size:
        resize, side = "shortest_edge", size["shortest_edge"]
    else:
        resize, side = "square", size if isinstance(size, int) else size["height"]
    return ImageSpec(
        resize=resize,
        resize_size=side,
        crop_size=crop_side,
        resample=names.get(int(config.get("resample", Image.Resampling.BICUBIC)), "bicubic"),
        rescale_factor=config.get("rescale_factor", 1 / 255),
        mean=tuple(config["image_mean"]),
        std=tuple(config["image_std"]),
    )
