"""Image files to RGB, for every mode PIL opens, with the right scaling.

PIL's own `convert("RGB")` clips 16-bit and 32-bit greyscale at 255 (a 16-bit scan becomes almost white)
and reads float images as raw numbers. Here the full range of the mode maps to 0..255: `I;16*` / 16-bit `I`
divide by 257 (65535 -> 255), 32-bit `I` beyond 16 bits by 2**32 - 1 / 255, `F` from 0..1 when it stays
there. Palette, CMYK and images with alpha convert as LLaVA does (alpha dropped, the colour kept).

Images with more pixels than a limit (PIL's decompression-bomb guard, 89,478,485 by default) are refused
before they are decoded; the limit is the experiment's `max_image_pixels`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from mipha_lab.constants import MAX_IMAGE_PIXELS


class ImageTooLarge(ValueError):
    """More pixels than the limit; the image was not decoded."""


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, each mode's full range mapped onto 0..255."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        return _grey_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if mode == "I":
        values = np.asarray(image, dtype=np.float64)
        top = values.max(initial=0.0)
        return _grey_to_rgb(
            values if top <= 255 else values / 257.0 if top <= 65535 else values / ((2**32 - 1) / 255.0)
        )
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return _grey_to_rgb(values * 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else values)
    return image.convert("RGB")


def open_rgb(source: str | Path | IO[bytes], max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file to RGB; raises ImageTooLarge (before decoding), or PIL's / the OS's errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit below is the one that counts
        try:
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(
                        f"{width} x {height} = {width * height:,} pixels > max_image_pixels {max_pixels:,}"
                    )
                image.load()
                return to_rgb(image)
        finally:
            Image.MAX_IMAGE_PIXELS = previous
