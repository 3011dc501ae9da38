"""Tile geometry and blend weights, checked on their own, without a network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mprnet_cli import Restorer
from mprnet_cli.tiling import (
    BLENDS,
    DEFAULT_BLEND,
    TileGrid,
    check_tile_options,
    max_overlap,
    place_tiles,
    plan_tile_shape,
)

from .trained_model import CHECKPOINT, noisy_photo, outside_centre_lines, psnr


def test_plain_layout_strides_by_tile_minus_overlap_and_shifts_the_last_tile_back() -> None:
    assert place_tiles(1024, 256, margin=16) == [0, 224, 448, 672, 768]
    assert place_tiles(1000, 256, margin=16) == [0, 224, 448, 672, 744]
    assert place_tiles(256, 256, margin=16) == [0]
    assert place_tiles(100, 256, margin=16) == [0]  # smaller than a tile: one tile
    assert place_tiles(500, 256, margin=0) == [0, 244]


@pytest.mark.parametrize(("length", "split"), [(257, False), (513, False), (6000, False), (400, True), (777, True), (6000, True)])
def test_every_pixel_is_far_from_the_bad_lines_of_some_tile(length: int, split: bool) -> None:
    tile, margin = 256, 16
    starts = place_tiles(length, tile, margin, split)
    assert starts[0] == 0 and starts[-1] == length - tile
    best = torch.zeros(length)
    for start in starts:
        positions = torch.arange(start, start + tile) + 0.5
        lines = [line for line in (start, start + tile) if 0 < line < length]
        lines += [start + tile // 2] if split else []
        distance = torch.stack([(positions - line).abs() for line in lines]).min(dim=0).values
        best[start:start + tile] = torch.maximum(best[start:start + tile], distance)
    assert best.min() >= margin


@pytest.mark.parametrize("length", [257, 300, 350])
def test_a_split_layout_too_short_to_avoid_the_centre_still_covers_every_pixel(length: int) -> None:
    starts = place_tiles(length, 256, margin=16, split=True)
    assert starts[0] == 0 and starts[-1] == length - 256
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start:start + 256] = True
    assert covered.all()


def test_split_layout_avoids_tile_centres_at_about_three_times_the_whole_image_compute() -> None:
    grid = TileGrid(768, 1024, 256, 32, "split")
    plain = TileGrid(768, 1024, 256, 32, "core")
    assert len(plain) == 4 * 5
    assert len(grid) == 5 * 7
    assert 2.5 < len(grid) * 256 * 256 / (768 * 1024) < 3.2


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize(("height", "width", "tile"), [(1, 1, 32), (7, 9, 32), (257, 513, 64), (100, 300, 96)])
def test_weights_add_up_to_one_everywhere(blend: str, height: int, width: int, tile: int) -> None:
    grid = TileGrid(height, width, tile, min(16, max_overlap(tile, blend)), blend)
    total = torch.zeros(1, height, width)
    for placed in grid:
        grid.accumulate(total, placed, torch.ones(1, placed.height, placed.width))
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


@pytest.mark.parametrize("blend", BLENDS)
def test_stitching_does_not_depend_on_tile_order(blend: str) -> None:
    grid = TileGrid(200, 300, 64, 16, blend)
    restored = {id(t): torch.rand(3, t.height, t.width, generator=torch.Generator().manual_seed(i))
                for i, t in enumerate(grid)}
    forward, backward = torch.zeros(3, 200, 300), torch.zeros(3, 200, 300)
    for placed in grid:
        grid.accumulate(forward, placed, restored[id(placed)])
    for placed in reversed(grid.tiles):
        grid.accumulate(backward, placed, restored[id(placed)])
    torch.testing.assert_close(forward, backward, atol=1e-6, rtol=0)


def test_core_blend_takes_each_pixel_from_exactly_one_tile_with_a_cut_mid_overlap() -> None:
    grid = TileGrid(64, 480, 256, 32, "core")
    assert grid.col_starts == [0, 224]
    weights = grid.col_weights
    assert set(weights.unique().tolist()) == {0.0, 1.0}
    # The overlap is 224..256; the cut falls in its middle, at 240.
    assert weights[0, :240].eq(1).all() and weights[1, 240:].eq(1).all()
    # Only the used part of a tile is stitched.
    assert [t.cols for t in grid] == [slice(0, 240), slice(16, 256)]


def test_feather_blend_cross_fades_smoothly_across_the_overlap() -> None:
    weights = TileGrid(64, 480, 256, 32, "feather").col_weights
    fade_in = weights[1, 224:256]
    assert fade_in[0] < 0.01 and fade_in[-1] > 0.99
    assert (fade_in.diff() > 0).all()


def test_feather_takes_a_tiles_centre_line_from_a_neighbour_that_covers_it() -> None:
    # The second tile is shifted back over the first: each covers the other's centre line,
    # where the model cuts its input, far from its own bad lines.
    grid = TileGrid(64, 300, 256, 32, "feather")
    assert grid.col_starts == [0, 44]
    weights = grid.col_weights
    assert weights[1, 128] > 0.99 and weights[0, 44 + 128] > 0.99
    # Where no other tile covers it, the centre line stays with its own tile.
    assert TileGrid(64, 480, 256, 32, "feather").col_weights[0, 128] == 1.0


def test_numpy_integers_are_whole_numbers() -> None:
    check_tile_options(np.int64(256), np.int32(32), "feather")


@pytest.mark.parametrize(
    ("tile", "overlap", "blend", "message"),
    [
        (33, 8, "core", "tile size 33: must be a multiple of 8 and at least 32"),
        (24, 8, "core", "tile size 24: must be a multiple of 8 and at least 32"),
        (64, -1, "core", "tile overlap -1: must not be negative"),
        (64, 40, "core", "tile overlap 40 is too large for 64-pixel tiles with the core blend (at most 32: "
         "a quarter of the tile with split, else half)"),
        (64, 32, "split", "tile overlap 32 is too large for 64-pixel tiles with the split blend (at most 16: "
         "a quarter of the tile with split, else half)"),
        (64, 8, "smooth", "unknown tile blend 'smooth': expected one of feather, core, split"),
        ("auto", 8, "core", "tile size 'auto': expected a whole number of pixels, 0 for none, or None for auto"),
        (64.0, 8, "core", "tile size 64.0: expected a whole number of pixels"),
        (64, "8", "core", "tile overlap '8': expected a whole number of pixels"),
        (False, 8, "core", "tile size False: expected a whole number of pixels"),
        (64, True, "core", "tile overlap True: expected a whole number of pixels"),
    ],
)
def test_impossible_options_are_refused_in_words(tile: int, overlap: int, blend: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tile_options(tile, overlap, blend)


@pytest.mark.parametrize(
    ("height", "width", "max_pixels", "shape"),
    [
        (500, 500, 1024**2, None),  # fits: no tiles
        (1080, 1920, 1024**2, (560, 976)),  # 4 tiles covering 2.19 MP, not 6 squares of 1024
        (1920, 1080, 1024**2, (976, 560)),
        (300, 6000, 1024**2, (304, 3016)),  # a short side needs no cut: the long one gets its pixels
        (4000, 6000, 512**2, (480, 536)),
    ],
)
def test_auto_tile_shape_wastes_little_on_overlap(height: int, width: int, max_pixels: int,
                                                  shape: tuple[int, int] | None) -> None:
    assert plan_tile_shape(height, width, max_pixels, overlap=32) == shape
    if shape is not None:
        assert shape[0] * shape[1] <= max_pixels
        grid = TileGrid(height, width, shape, 32)
        side = int(max_pixels**0.5) // 8 * 8
        squares = TileGrid(height, width, side, 32)
        assert len(grid) <= len(squares)
        assert len(grid) * grid.tile_height * grid.tile_width < len(squares) * squares.tile_height * squares.tile_width


# --- On a trained model ------------------------------------------------------------------
# A seeded random network outputs noise, which hides seams; the small trained denoiser in
# tests/data/trained restores a real photo, so a misplaced or badly blended tile shows.


@pytest.fixture(scope="module")
def photo() -> tuple[np.ndarray, np.ndarray]:
    return noisy_photo()


@pytest.fixture(scope="module")
def denoiser() -> Restorer:
    return Restorer.from_checkpoint(CHECKPOINT, device="cpu", precision="fp32", tile=0)


@pytest.fixture(scope="module")
def whole(photo: tuple[np.ndarray, np.ndarray], denoiser: Restorer) -> np.ndarray:
    return denoiser.restore(photo[1])


def _tiled(denoiser: Restorer, noisy: np.ndarray, tile: int, blend: str = DEFAULT_BLEND) -> np.ndarray:
    return Restorer(denoiser.model, device="cpu", precision="fp32", tile=tile, tile_overlap=32,
                    tile_blend=blend).restore(noisy)


@pytest.fixture(scope="module")
def tiled_256(photo: tuple[np.ndarray, np.ndarray], denoiser: Restorer) -> np.ndarray:
    return _tiled(denoiser, photo[1], 256)


def test_default_tiling_is_close_to_the_whole_image_and_as_good_against_the_truth(
    photo: tuple[np.ndarray, np.ndarray], whole: np.ndarray, tiled_256: np.ndarray
) -> None:
    clean, _ = photo
    assert psnr(tiled_256, whole) >= 49.0  # measured 49.66 dB
    assert abs(psnr(tiled_256, clean) - psnr(whole, clean)) <= 0.05  # measured 0.042 dB below


def test_split_aware_blend_hides_the_models_own_patch_seams(
    photo: tuple[np.ndarray, np.ndarray], denoiser: Restorer, whole: np.ndarray
) -> None:
    clean, noisy = photo
    split = _tiled(denoiser, noisy, 256, "split")
    # Over the whole frame 54.93 dB: nearly all of the difference is the whole-image run's
    # own patch seams on the image's centre lines, which the split blend removes.
    assert psnr(split, whole) >= 54.5
    assert psnr(outside_centre_lines(split), outside_centre_lines(whole)) >= 55.0  # measured 77.8 dB
    assert psnr(split, clean) >= psnr(whole, clean)  # measured 0.032 dB better


def test_no_seam_where_tiles_meet(photo: tuple[np.ndarray, np.ndarray], whole: np.ndarray,
                                  tiled_256: np.ndarray) -> None:
    grid = TileGrid(*photo[1].shape[:2], 256, 32, DEFAULT_BLEND)
    difference = np.abs(tiled_256 - whole).mean(axis=2)

    def lines(starts: list[int], length: int, weights: torch.Tensor) -> tuple[set[int], set[int]]:
        """Pixels on both sides of where one tile hands over to the next, and the
        tiles' own centre lines (the model's seams, left out of both sides)."""
        handovers = {p for p in range(1, length) if weights[:, p].argmax() != weights[:, p - 1].argmax()}
        joins = {q for p in handovers for q in (p - 1, p)}
        centres = {start + 256 // 2 + d for start in starts for d in range(-3, 3)}
        return joins, centres

    row_joins, row_centres = lines(grid.row_starts, grid.height, grid.row_weights)
    col_joins, col_centres = lines(grid.col_starts, grid.width, grid.col_weights)
    at_join = np.zeros_like(difference, dtype=bool)
    at_join[sorted(row_joins), :] = True
    at_join[:, sorted(col_joins)] = True
    excluded = np.zeros_like(at_join)
    excluded[sorted(row_centres), :] = True
    excluded[:, sorted(col_centres)] = True
    assert at_join.sum() > 0
    assert difference[at_join & ~excluded].mean() <= 1.5 * difference[~at_join & ~excluded].mean()


def test_tile_size_barely_changes_the_result(photo: tuple[np.ndarray, np.ndarray], denoiser: Restorer,
                                             tiled_256: np.ndarray) -> None:
    assert psnr(_tiled(denoiser, photo[1], 128), tiled_256) >= 45.0
