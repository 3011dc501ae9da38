"""The metrics against straightforward implementations written here from the formulas
(full 3-D and 2-D Gaussian kernels, SciPy's correlation, scikit-image itself), and
against answers known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, signal
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mprnet_cli import metrics
from mprnet_cli.metrics import PROTOCOLS


def _gaussian_kernel(dimensions: int) -> np.ndarray:
    """exp(-|offset|^2 / (2 sigma^2)) on an 11^d grid, normalised: MATLAB's window."""
    axis = np.arange(-5, 6, dtype=np.float64)
    grids = np.meshgrid(*([axis] * dimensions), indexing="ij")
    kernel = np.exp(-sum(grid**2 for grid in grids) / (2 * 1.5**2))
    return kernel / kernel.sum()


def _ssim_from_moments(mu_x, mu_y, xx, yy, xy, dynamic_range: float) -> np.ndarray:
    c1, c2 = (0.01 * dynamic_range) ** 2, (0.03 * dynamic_range) ** 2
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    return (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def reference_ssim_3d(x: np.ndarray, y: np.ndarray, dynamic_range: float) -> float:
    """MATLAB's `ssim` on a volume: one 11x11x11 kernel, edges replicated ('nearest')."""
    kernel = _gaussian_kernel(3)

    def blur(volume: np.ndarray) -> np.ndarray:
        return ndimage.correlate(volume, kernel, mode="nearest")

    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(_ssim_from_moments(blur(x), blur(y), blur(x * x), blur(y * y), blur(x * y), dynamic_range).mean())


def reference_ssim_wang(x: np.ndarray, y: np.ndarray) -> float:
    """Wang's `SSIM_index`: `filter2(window, img, 'valid')` with an 11x11 window."""
    kernel = _gaussian_kernel(2)

    def blur(plane: np.ndarray) -> np.ndarray:
        return signal.correlate2d(plane, kernel, mode="valid")

    x, y = x.astype(np.float64), y.astype(np.float64)
    return float(_ssim_from_moments(blur(x), blur(y), blur(x * x), blur(y * y), blur(x * y), 255.0).mean())


def reference_luma(rgb8: np.ndarray) -> np.ndarray:
    """MATLAB's rgb2ycbcr Y, pixel by pixel, rounded half away from zero."""
    out = np.empty(rgb8.shape[:2])
    for index in np.ndindex(*rgb8.shape[:2]):
        red, green, blue = (float(v) for v in rgb8[index])
        value = 16 + (65.481 * red + 128.553 * green + 24.966 * blue) / 255
        out[index] = math.floor(value + 0.5)
    return out


def _pair(height: int = 23, width: int = 19, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-ish target and a noisy restoration of it, float RGB in [0, 1]."""
    rng = np.random.default_rng(seed)
    target = ndimage.uniform_filter(rng.random((height, width, 3)), size=(5, 5, 1))
    restored = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    return restored, target


def test_matlab_rgb_matches_the_3d_reference_on_8_bit_values() -> None:
    restored, target = _pair()
    psnr, ssim = PROTOCOLS["matlab-rgb"].score(restored, target)
    restored8, target8 = np.rint(restored * 255), np.rint(target * 255)
    assert ssim == pytest.approx(reference_ssim_3d(restored8, target8, 255.0), abs=1e-12)
    assert psnr == pytest.approx(10 * math.log10(255**2 / np.mean((restored8 - target8) ** 2)), abs=1e-12)


def test_matlab_float_is_unrounded_with_peak_one() -> None:
    restored, target = _pair(seed=1)
    psnr, ssim = PROTOCOLS["matlab-float"].score(restored, target)
    assert ssim == pytest.approx(reference_ssim_3d(restored, target, 1.0), abs=1e-12)
    assert psnr == pytest.approx(peak_signal_noise_ratio(target, restored, data_range=1.0), abs=1e-10)


def test_matlab_y_matches_a_pixel_by_pixel_luma_and_wangs_valid_ssim() -> None:
    restored, target = _pair(seed=2)
    restored_y = reference_luma(np.rint(restored * 255))
    target_y = reference_luma(np.rint(target * 255))
    psnr, ssim = PROTOCOLS["matlab-y"].score(restored, target)
    assert ssim == pytest.approx(reference_ssim_wang(restored_y, target_y), abs=1e-12)
    assert psnr == pytest.approx(20 * math.log10(255 / math.sqrt(np.mean((restored_y - target_y) ** 2))), abs=1e-10)


def test_skimage_protocol_is_scikit_image() -> None:
    restored, target = _pair(seed=3)
    psnr, ssim = PROTOCOLS["skimage"].score(restored, target)
    restored8, target8 = np.rint(restored * 255).astype(np.uint8), np.rint(target * 255).astype(np.uint8)
    assert psnr == pytest.approx(peak_signal_noise_ratio(target8, restored8), abs=1e-10)
    assert ssim == pytest.approx(structural_similarity(target8, restored8, channel_axis=-1), abs=1e-10)


def test_luma_of_known_colours() -> None:
    colours = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], float)
    # 16; 16 + 219; 16 + 65.481; 16 + 128.553 (rounds up); 16 + 24.966; 16 + 219 * 128 / 255 = 125.93
    np.testing.assert_array_equal(metrics.matlab_luma(colours), [[16, 235, 81, 145, 41, 126]])


def test_8_bit_rounding_is_half_to_even_as_img_as_ubyte() -> None:
    values = np.array([0.5, 1.5, 2.5, 254.5]) / 255
    assert np.all(values * 255 == [0.5, 1.5, 2.5, 254.5])  # exact in float64, so the rule decides
    np.testing.assert_array_equal(metrics.to_8bit(values), [0, 2, 2, 254])
    np.testing.assert_array_equal(metrics.to_8bit(np.array([-0.2, 1.3])), [0, 255])


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_identical_images_score_infinity_and_one(name: str) -> None:
    _, target = _pair(seed=4)
    assert PROTOCOLS[name].score(target, target) == (math.inf, pytest.approx(1.0, abs=1e-12))


@pytest.mark.parametrize("name", ["matlab-rgb", "skimage"])
@pytest.mark.parametrize("offset", [1, 3, 10])
def test_a_constant_offset_on_a_flat_image(name: str, offset: int) -> None:
    """No variance: SSIM is the luminance term alone, (2ab + C1) / (a^2 + b^2 + C1)."""
    target = np.full((16, 16, 3), 100 / 255)
    restored = target + offset / 255
    psnr, ssim = PROTOCOLS[name].score(restored, target)
    c1 = (0.01 * 255) ** 2
    assert psnr == pytest.approx(20 * math.log10(255 / offset), abs=1e-9)
    assert ssim == pytest.approx((2 * 100 * (100 + offset) + c1) / (100**2 + (100 + offset) ** 2 + c1), abs=1e-12)


def test_a_known_noise_level() -> None:
    """Gaussian noise of sigma 5/255 on an unclipped float image: PSNR near 20 log10(255 / 5)."""
    rng = np.random.default_rng(5)
    target = np.full((256, 256, 3), 0.5)
    restored = target + rng.normal(0, 5 / 255, target.shape)
    psnr, _ = PROTOCOLS["matlab-float"].score(restored, target)
    assert psnr == pytest.approx(20 * math.log10(255 / 5), abs=0.03)


def test_rounding_to_8_bits_is_part_of_the_deblur_protocol() -> None:
    """Off by 0.4 of a level everywhere: the 8-bit files are identical, the floats are not."""
    _, target = _pair(seed=6)
    target = np.rint(target * 255) / 255
    restored = target + 0.4 / 255
    assert PROTOCOLS["matlab-rgb"].score(restored, target)[0] == math.inf
    assert PROTOCOLS["matlab-float"].score(restored, target)[0] == pytest.approx(20 * math.log10(255 / 0.4), abs=0.2)


def test_wangs_valid_ssim_pads_nothing() -> None:
    """On an 11x11 plane the 'valid' map is the one window: SSIM from the Gaussian-weighted
    moments of the whole plane, with no padded pixel in them."""
    rng = np.random.default_rng(7)
    x, y = rng.integers(0, 256, (11, 11)).astype(float), rng.integers(0, 256, (11, 11)).astype(float)
    weights = _gaussian_kernel(2)
    moments = [float((weights * value).sum()) for value in (x, y, x * x, y * y, x * y)]
    assert metrics.ssim_wang(x, y) == pytest.approx(float(_ssim_from_moments(*moments, 255.0)), abs=1e-12)
