"""Pillow images as the pixel arrays a `Restorer` takes, one rule for every mode.

Both the file reader (`mprnet_cli.imageio`) and the Python API (`Restorer.restore` given a
PIL image) take images through here, so a mode is kept, converted or refused the same way
whether it came from a file or from a caller.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class UnsupportedMode(ValueError):
    """A mode whose values the network's [0, 1] range cannot hold."""


def pil_pixels(image: Image.Image) -> np.ndarray:
    """16 bits kept, black and white as grayscale, palettes and colour keys resolved (with
    alpha where they have transparency), 32-bit modes refused."""
    key = image.info.get("transparency")
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.uint16)
        return with_colour_key(pixels, key) if isinstance(key, int) else pixels
    if image.mode in ("I", "F"):
        raise UnsupportedMode("32-bit integer and float images are not supported; convert to 8 or 16 bits")
    if image.mode == "1":  # grayscale can hold what restoring makes of it
        gray = np.asarray(image.convert("L"))
        return with_colour_key(gray, 255 if key else 0) if isinstance(key, int) else gray
    if image.mode in ("L", "RGB") and "transparency" in image.info:  # a colour key
        image = image.convert(image.mode + "A")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    return np.asarray(image)


def with_colour_key(pixels: np.ndarray, key: int | tuple[int, ...]) -> np.ndarray:
    """Gray (HxW) or RGB (HxWx3) pixels with an alpha channel added: transparent where a
    pixel equals the colour key (PNG's tRNS, in the pixels' own units), opaque elsewhere.
    Pillow resolves keys for 8-bit images, but not for 1-bit or 16-bit ones."""
    matches = pixels == key if pixels.ndim == 2 else np.all(pixels == np.asarray(key, pixels.dtype), axis=-1)
    alpha = np.where(matches, 0, np.iinfo(pixels.dtype).max).astype(pixels.dtype)
    return np.dstack([pixels, alpha])
