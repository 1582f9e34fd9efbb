"""Image preprocessing from a vision card, reproducing the PIL pipelines the original used.

`square` is the processor's own rule (SigLIP resizes to a square; CLIP resizes the short side and
centre-crops); `pad` first pastes the image centred on a square of its longer side filled with the
processor's mean colour (LLaVA's `expand2square`).
"""
from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
import torch
from PIL import Image

from mipha_lab.registry.cards import ImageSpec

Strategy = Literal["square", "pad"]
_RESAMPLE = {
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
        if strategy not in ("square", "pad"):
            raise ValueError(f"unknown image strategy {strategy!r} (allowed: square, pad)")
        self.spec, self.strategy = spec, strategy
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._std = np.asarray(spec.std, dtype=np.float32)

    def _resize(self, image: Image.Image) -> Image.Image:
        spec, resample = self.spec, _RESAMPLE[self.spec.resample]
        if spec.resize == "square":
            return image.resize((spec.resize_size, spec.resize_size), resample)
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        return image.resize(size, resample)

    def _center_crop(self, image: Image.Image) -> Image.Image:
        crop = self.spec.crop_size
        if crop is None:
            return image
        width, height = image.size
        top, left = (height - crop) // 2, (width - crop) // 2
        return image.crop((left, top, left + crop, top + crop))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.strategy == "pad":
            image = expand_to_square(image, self.spec.fill_color)
        image = self._center_crop(self._resize(image))
        pixels = np.asarray(image, dtype=np.float32) * np.float32(self.spec.rescale_factor)
        pixels = (pixels - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        return torch.stack([self(image) for image in images])

    def hf_config(self) -> dict:
        """The same preprocessing as a transformers `preprocessor_config.json` (for interoperability)."""
        spec = self.spec
        config = {
            "do_convert_rgb": True,
            "do_resize": True,
            "resample": int(_RESAMPLE[spec.resample]),
            "do_rescale": True,
            "rescale_factor": spec.rescale_factor,
            "do_normalize": True,
            "image_mean": list(spec.mean),
            "image_std": list(spec.std),
        }
        if spec.resize == "square":
            config.update(image_processor_type="SiglipImageProcessor", size={"height": spec.size, "width": spec.size})
        else:
            config.update(
                image_processor_type="CLIPImageProcessor",
                size={"shortest_edge": spec.resize_size},
                do_center_crop=spec.crop_size is not None,
                crop_size={"height": spec.size, "width": spec.size},
            )
        return config
