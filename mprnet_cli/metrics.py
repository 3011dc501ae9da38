"""PSNR and SSIM as the MPRNet authors computed their tables, and as scikit-image does.

Each `Protocol` turns a restored image and its target (float RGB, HxWx3 in [0, 1]) into
the arrays the authors scored and scores them with their formulas. The rounding and
border rules are part of each protocol because they move results by hundredths of a dB:

- `matlab-rgb` (deblurring: GoPro, HIDE): outputs as 8-bit files (x255, round half to
  even, as scikit-image's `img_as_ubyte`); PSNR over all HxWx3 values, peak 255; MATLAB's
  `ssim` on the HxWx3 array, which treats it as a volume: a Gaussian of sigma 1.5 and 11
  taps along rows, columns and channels, replicate padding, the whole map averaged.
- `matlab-y` (deraining: Rain100L/H, Test100/1200/2800): the 8-bit image's Y channel as
  MATLAB's `rgb2ycbcr` gives it (rounded half away from zero to uint8); PSNR, peak 255;
  Wang's `SSIM_index`: an 11x11 Gaussian, sigma 1.5, 'valid' filtering, so the 5 pixels
  at each border are not scored.
- `matlab-float` (SIDD): the float outputs, not rounded; PSNR with peak 1 and the 3-D
  SSIM of `matlab-rgb` with L = 1.
- `skimage`: plain RGB on 8-bit values, as scikit-image's `peak_signal_noise_ratio` and
  `structural_similarity(channel_axis=-1)` compute them (a 7x7 uniform window, sample
  covariance, 3 pixels cropped at each border, the mean over channels).

Identical images have an infinite PSNR, as MATLAB's `psnr` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: SSIM's stabilising constants, as fractions of the dynamic range (Wang et al. 2004).
K1, K2 = 0.01, 0.03
#: The Gaussian window of MATLAB's `ssim` and of Wang's `SSIM_index`: sigma 1.5, 11 taps.
GAUSSIAN_SIGMA, GAUSSIAN_TAPS = 1.5, 11
#: scikit-image's default uniform window.
UNIFORM_TAPS = 7


@dataclass(frozen=True)
class Protocol:
    """A way to score a restored image against its target: `score(restored, target)`
    takes float RGB HxWx3 in [0, 1] and returns (PSNR in dB, SSIM)."""

    name: str
    description: str
    score: Callable[[np.ndarray, np.ndarray], tuple[float, float]]
    #: Fewest pixels a side may have (Wang's valid filtering needs a whole window).
    min_side: int = 1


def to_8bit(image: np.ndarray) -> np.ndarray:
    """Float in [0, 1] to 8-bit values as `img_as_ubyte` writes them: clipped, x255,
    rounded half to even; as float64 for the formulas."""
    return np.rint(np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0)


def matlab_luma(image8: np.ndarray) -> np.ndarray:
    """Y of MATLAB's `rgb2ycbcr` on 8-bit RGB values, rounded to uint8 as MATLAB rounds
    (half away from zero; every value here is positive)."""
    red, green, blue = image8[..., 0], image8[..., 1], image8[..., 2]
    luma = 16.0 + (65.481 * red + 128.553 * green + 24.966 * blue) / 255.0
    return np.clip(np.floor(luma + 0.5), 0, 255)


def psnr(restored: np.ndarray, target: np.ndarray, peak: float) -> float:
    """10 log10(peak^2 / MSE) over every value; infinite for identical arrays."""
    mse = float(np.mean((restored.astype(np.float64) - target.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def gaussian_taps(taps: int = GAUSSIAN_TAPS, sigma: float = GAUSSIAN_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian whose outer product is MATLAB's `fspecial('gaussian')`."""
    offsets = np.arange(taps, dtype=np.float64) - (taps - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma * sigma))
    return weights / weights.sum()


def _filter_planes(planes: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable filtering of HxW or HxWxC float64 along rows and columns, replicating the
    edges (MATLAB's 'replicate' padding; a 'valid' caller crops what the padding touched)."""
    # Imported here, as in imageio: OpenCV reads its pixel limit from the environment once,
    # as it loads, and `imageio.limit_decoders` sets it at the first decode, after this
    # module is imported.
    import cv2

    return cv2.sepFilter2D(planes, cv2.CV_64F, taps, taps, borderType=cv2.BORDER_REPLICATE)


def _mix_channels(volume: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """The 3-D Gaussian's pass along the channel axis, with replicate padding: channel c
    takes tap k from channel clip(c + k - radius)."""
    channels, radius = volume.shape[-1], len(taps) // 2
    mixing = np.zeros((channels, channels))
    for out_channel in range(channels):
        for tap, weight in enumerate(taps):
            mixing[out_channel, min(max(out_channel + tap - radius, 0), channels - 1)] += weight
    return volume @ mixing.T


def _ssim_map(x: np.ndarray, y: np.ndarray, dynamic_range: float, blur: Callable[[np.ndarray], np.ndarray],
              covariance_scale: float = 1.0) -> np.ndarray:
    """SSIM's per-pixel map with the means and (co)variances taken by `blur`."""
    c1, c2 = (K1 * dynamic_range) ** 2, (K2 * dynamic_range) ** 2
    mean_x, mean_y = blur(x), blur(y)
    var_x = covariance_scale * (blur(x * x) - mean_x * mean_x)
    var_y = covariance_scale * (blur(y * y) - mean_y * mean_y)
    cov = covariance_scale * (blur(x * y) - mean_x * mean_y)
    return ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))


def ssim_matlab_3d(restored: np.ndarray, target: np.ndarray, dynamic_range: float) -> float:
    """MATLAB's `ssim` on an HxWx3 array: the 3-D Gaussian, replicate padding, the mean of
    the full map."""
    taps = gaussian_taps()

    def blur(volume: np.ndarray) -> np.ndarray:
        return _mix_channels(_filter_planes(volume, taps), taps)

    return float(_ssim_map(restored.astype(np.float64), target.astype(np.float64), dynamic_range, blur).mean())


def ssim_wang(restored: np.ndarray, target: np.ndarray, dynamic_range: float = 255.0) -> float:
    """Wang's `SSIM_index` on one HxW plane: the 11x11 Gaussian, 'valid' filtering (the
    map is 10 pixels smaller on each axis), the mean of the map."""
    taps, radius = gaussian_taps(), GAUSSIAN_TAPS // 2
    inner = (slice(radius, -radius), slice(radius, -radius))

    def blur(plane: np.ndarray) -> np.ndarray:
        return _filter_planes(plane, taps)[inner]

    return float(_ssim_map(restored.astype(np.float64), target.astype(np.float64), dynamic_range, blur).mean())


def ssim_skimage(restored: np.ndarray, target: np.ndarray, dynamic_range: float = 255.0) -> float:
    """scikit-image's `structural_similarity` with its defaults and `channel_axis=-1`."""
    pixels, crop = UNIFORM_TAPS**2, UNIFORM_TAPS // 2
    inner = (slice(crop, -crop), slice(crop, -crop))

    def blur(planes: np.ndarray) -> np.ndarray:
        import cv2  # loaded late, as in `_filter_planes`

        # The crop below drops every pixel the border rule touches, so any rule will do.
        return cv2.blur(planes, (UNIFORM_TAPS, UNIFORM_TAPS), borderType=cv2.BORDER_REFLECT)

    ssim_map = _ssim_map(restored.astype(np.float64), target.astype(np.float64), dynamic_range, blur,
                         covariance_scale=pixels / (pixels - 1))
    return float(ssim_map[inner].mean())


def _score_matlab_rgb(restored: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    restored8, target8 = to_8bit(restored), to_8bit(target)
    return psnr(restored8, target8, 255.0), ssim_matlab_3d(restored8, target8, 255.0)


def _score_matlab_y(restored: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    restored_y, target_y = matlab_luma(to_8bit(restored)), matlab_luma(to_8bit(target))
    return psnr(restored_y, target_y, 255.0), ssim_wang(restored_y, target_y, 255.0)


def _score_matlab_float(restored: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    restored, target = np.clip(restored, 0.0, 1.0), np.clip(target, 0.0, 1.0)
    return psnr(restored, target, 1.0), ssim_matlab_3d(restored, target, 1.0)


def _score_skimage(restored: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    restored8, target8 = to_8bit(restored), to_8bit(target)
    return psnr(restored8, target8, 255.0), ssim_skimage(restored8, target8, 255.0)


PROTOCOLS: dict[str, Protocol] = {
    protocol.name: protocol
    for protocol in (
        Protocol("matlab-rgb", "the deblurring tables: 8-bit RGB, PSNR and MATLAB's 3-D SSIM", _score_matlab_rgb),
        Protocol("matlab-y", "the deraining tables: Y of rgb2ycbcr rounded to 8 bits, PSNR and Wang's SSIM "
                 "(5-pixel borders unscored)", _score_matlab_y, min_side=GAUSSIAN_TAPS),
        Protocol("matlab-float", "the SIDD table: unrounded float RGB, PSNR (peak 1) and MATLAB's 3-D SSIM",
                 _score_matlab_float),
        Protocol("skimage", "plain 8-bit RGB PSNR and SSIM as scikit-image computes them", _score_skimage,
                 min_side=UNIFORM_TAPS),
    )
}

#: The protocol of each task's published table.
TASK_PROTOCOLS = {"deblur": "matlab-rgb", "derain": "matlab-y", "denoise": "matlab-float"}
