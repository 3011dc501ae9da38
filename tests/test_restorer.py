"""The Restorer: the published recipe end to end, and every pixel layout it accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mprnet_cli import Restorer
from mprnet_cli.model.restorer import pad_to_multiple

from .conftest import PARITY, TINY_CHECKPOINT


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    return Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu")


@pytest.mark.parametrize("size", ["64x48", "61x45"])
def test_eight_bit_result_matches_the_authors_recipe(restorer: Restorer, size: str) -> None:
    source = np.asarray(Image.open(PARITY / f"input_{size}.png"))
    expected = np.asarray(Image.open(PARITY / f"restored_{size}.png")).astype(int)
    restored = restorer.restore(source)
    assert restored.dtype == np.uint8 and restored.shape == source.shape
    assert np.abs(restored.astype(int) - expected).max() <= 1


def test_padding_reflects_like_the_recipe() -> None:
    image = torch.arange(6.0 * 5).reshape(1, 1, 6, 5)
    padded = pad_to_multiple(image)
    assert padded.shape == (1, 1, 8, 8)
    torch.testing.assert_close(padded, torch.nn.functional.pad(image, (0, 3, 0, 2), mode="reflect"))
    assert pad_to_multiple(torch.zeros(1, 3, 16, 8)).shape == (1, 3, 16, 8)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 2), (1, 9), (2, 17), (7, 7)])
def test_padding_works_for_sides_too_short_to_reflect(height: int, width: int) -> None:
    image = torch.rand(1, 3, height, width)
    padded = pad_to_multiple(image)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    torch.testing.assert_close(padded[..., :height, :width], image)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 2), (5, 13), (9, 1)])
def test_tiny_images_are_restored(restorer: Restorer, height: int, width: int) -> None:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert restorer.restore(image).shape == (height, width, 3)


def test_sixteen_bit_is_restored_in_float_not_squashed(restorer: Restorer) -> None:
    eight = np.asarray(Image.open(PARITY / "input_64x48.png"))
    sixteen = eight.astype(np.uint16) * 257 + np.random.default_rng(1).integers(0, 200, eight.shape).astype(np.uint16)
    restored = restorer.restore(sixteen)
    assert restored.dtype == np.uint16
    # Values between the 8-bit levels survive: the output is not an 8-bit image scaled up.
    assert np.count_nonzero(restored % 257) > restored.size // 2
    expected = restorer.restore_tensor(torch.from_numpy(sixteen / 65535.0).float().permute(2, 0, 1)[None])
    np.testing.assert_array_equal(restored, np.round(expected[0].permute(1, 2, 0).numpy() * 65535).astype(np.uint16))


def test_float_arrays_stay_float(restorer: Restorer) -> None:
    image = np.random.default_rng(2).random((16, 24, 3), dtype=np.float32)
    restored = restorer.restore(image)
    assert restored.dtype == np.float32 and 0.0 <= restored.min() and restored.max() <= 1.0


def test_alpha_passes_through_untouched(restorer: Restorer) -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    restored = restorer.restore(rgba)
    np.testing.assert_array_equal(restored[..., 3], rgba[..., 3])
    np.testing.assert_array_equal(restored[..., :3], restorer.restore(np.ascontiguousarray(rgba[..., :3])))


def test_gray_in_gray_out(restorer: Restorer) -> None:
    gray = np.random.default_rng(4).integers(0, 256, (20, 30), dtype=np.uint8)
    restored = restorer.restore(gray)
    assert restored.shape == (20, 30) and restored.dtype == np.uint8
    as_rgb = restorer.restore(np.repeat(gray[..., None], 3, axis=2)).astype(float).mean(axis=2)
    assert np.abs(restored - as_rgb).max() <= 1.0  # rounding the mean vs the mean of rounded channels
    gray_alpha = np.stack([gray, np.full_like(gray, 77)], axis=-1)
    restored_ga = restorer.restore(gray_alpha)
    np.testing.assert_array_equal(restored_ga[..., 0], restored)
    assert (restored_ga[..., 1] == 77).all()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16", "P", "CMYK"])
def test_pil_images_keep_their_mode(restorer: Restorer, mode: str) -> None:
    image = Image.new("RGB", (24, 16), (120, 60, 30)).convert(mode)
    restored = restorer.restore(image)
    assert isinstance(restored, Image.Image) and restored.size == image.size
    expected_mode = {"P": "RGB", "CMYK": "RGB"}.get(mode, mode)
    assert restored.mode == expected_mode


def test_unsupported_inputs_are_refused(restorer: Restorer) -> None:
    with pytest.raises(TypeError, match="expected a numpy array or a PIL image, got list"):
        restorer.restore([[1, 2], [3, 4]])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="got shape"):
        restorer.restore(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8, uint16 or float pixels, got int64"):
        restorer.restore(np.zeros((4, 4, 3), dtype=np.int64))
