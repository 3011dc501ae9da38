"""The small trained denoiser (tests/data/trained) and the noisy photo it is judged on.

Shared by the tiling tests and benchmarks/tiling_quality.py, so both measure the same thing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHECKPOINT = Path(__file__).parent / "data" / "trained" / "tiny_denoiser.pth"
SIGMA = 25 / 255


def noisy_photo(height: int = 768, width: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) float32 HxWx3 in [0, 1], the same every run: scikit-image's CC0
    `chelsea` (held out of the denoiser's training), enlarged, plus Gaussian noise."""
    from PIL import Image
    from skimage import data

    cat = Image.fromarray(data.chelsea())
    scale = max(height / cat.height, width / cat.width)
    cat = cat.resize((round(cat.width * scale), round(cat.height * scale)), Image.Resampling.BICUBIC)
    clean = np.asarray(cat, dtype=np.float32)[:height, :width] / 255
    noise = np.random.default_rng(0).normal(0, SIGMA, clean.shape).astype(np.float32)
    return clean, np.clip(clean + noise, 0, 1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a.astype(np.float64) - b) ** 2)))


def outside_centre_lines(image: np.ndarray) -> np.ndarray:
    """The pixels away from the image's own centre lines, where the whole-image run has the
    model's patch seams; no tiling reproduces those, nor should it."""
    height, width = image.shape[:2]
    keep = np.ones((height, width), dtype=bool)
    keep[height // 2 - 6:height // 2 + 6, :] = False
    keep[:, width // 2 - 6:width // 2 + 6] = False
    return image[keep]
