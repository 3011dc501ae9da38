"""Where tiles go and how much each of their pixels counts: pure geometry, no model.

A restored tile is least trustworthy near its "bad lines": its edges inside the image
(less context than the whole-image run had) and, for MPRNet, its own centre lines, where
the network cuts its input into 4 and 2 patches. Every blend here is one rule applied per
axis: place tiles so that each pixel lies at least `margin` pixels from the bad lines of
some tile, then weight each tile's pixels by their distance to its bad lines.

- `feather` (the default): a raised-cosine fade towards every bad line, so tiles
  cross-fade across each overlap, and where a neighbour happens to cover a tile's centre
  line (the last tile, shifted back, always does) the neighbour's pixels are taken there.
- `core`: each pixel comes from the tile where it is farthest from an edge (Real-ESRGAN's
  "context, then keep the core"): a hard cut in the middle of every overlap.
- `split`: the feather weights, with tiles placed densely enough that every pixel is far
  from the centre lines of some tile, so the model's own patch seams are blended away
  everywhere; it costs more compute.

Measured on the small trained denoiser (768x1024, tiles of 256 overlapping by 32, PSNR
against the whole-image run; benchmarks/tiling_quality.py): core 47.6 dB, feather
49.7 dB, split 54.9 dB at 1.75x the tiles of the other two. What feather and core leave
sits on each tile's centre lines, the model's own seams; what split leaves sits on the
whole image's centre lines, where the whole-image run has those seams itself.

Weights are separable and normalised per axis, so the 2-D weights of all tiles add up to
exactly one at every pixel: no weight buffer the size of the image is needed, and the
result does not depend on the order tiles are stitched in.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

BLENDS = ("feather", "core", "split")
DEFAULT_BLEND = "feather"
DEFAULT_OVERLAP = 32

#: Smallest tile the network can use: a multiple of 8 (its two halvings of half-size
#: patches) large enough to give the U-Nets something to see.
MIN_TILE = 32


def max_overlap(tile: int, blend: str) -> int:
    """Each tile must keep some pixels far from its bad lines: half a tile between edges,
    a quarter when the centre line counts too."""
    return tile // 4 if blend == "split" else tile // 2


class TileOptionError(ValueError):
    """A tiling option that no tiling can honour; `option` is its `Restorer` argument name."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def _is_whole(value: object) -> bool:
    """Python's and numpy's integers; not floats, strings or booleans (`tile=False` is no size)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_tile_options(tile: int | None, overlap: int, blend: str) -> None:
    """Raise TileOptionError, in words a user can act on, for options no tiling can honour."""
    if blend not in BLENDS:
        raise TileOptionError("tile_blend", f"unknown tile blend {blend!r}: expected one of {', '.join(BLENDS)}")
    if tile is not None and not _is_whole(tile):
        raise TileOptionError("tile", f"tile size {tile!r}: expected a whole number of pixels, 0 for none, or None for auto")
    if not _is_whole(overlap):
        raise TileOptionError("tile_overlap", f"tile overlap {overlap!r}: expected a whole number of pixels")
    if tile is not None and tile != 0 and (tile < MIN_TILE or tile % 8):
        raise TileOptionError("tile",
                              f"tile size {tile}: must be a multiple of 8 and at least {MIN_TILE} (or 0 for none)")
    if overlap < 0:
        raise TileOptionError("tile_overlap", f"tile overlap {overlap}: must not be negative")
    if tile and overlap > max_overlap(tile, blend):
        raise TileOptionError("tile_overlap", f"tile overlap {overlap} is too large for {tile}-pixel tiles with the "
                              f"{blend} blend (at most {max_overlap(tile, blend)}: a quarter of the tile with split, "
                              "else half)")


def plan_tile_shape(height: int, width: int, max_pixels: float, overlap: int) -> tuple[int, int] | None:
    """The tile shape for an image when at most `max_pixels` fit in one forward: None when
    the whole image fits, else the fewest tiles per axis (none larger than a square of
    `max_pixels`), each made just large enough to cover its share, so the overlap adds
    as little compute as possible (1920x1080 in four 560x976 tiles, not six 1024-pixel
    squares)."""
    if round_up(height) * round_up(width) <= max_pixels:
        return None
    side = max(MIN_TILE, int(math.sqrt(max_pixels)) // 8 * 8)
    # The shorter axis first: when it needs no cut, the other axis gets the pixels it leaves.
    short, long = sorted((height, width))
    short_tile = _share(short, side, overlap)
    long_tile = _share(long, max(side, int(max_pixels / round_up(short_tile)) // 8 * 8), overlap)
    return (short_tile, long_tile) if height <= width else (long_tile, short_tile)


def _share(length: int, side: int, overlap: int) -> int:
    if length <= side:
        return max(MIN_TILE, round_up(length))
    stride = side - overlap
    count = math.ceil((length - overlap) / stride)
    return min(side, round_up(math.ceil((length + (count - 1) * overlap) / count)))


def round_up(side: int) -> int:
    """The next multiple of 8 (the network's size multiple) from `side`."""
    return side + -side % 8


def _bad_lines(start: int, tile: int, length: int, centre: bool) -> list[int]:
    """A tile's edges that lie inside the image, and with `centre` its centre line."""
    lines = [start] if start > 0 else []
    if start + tile < length:
        lines.append(start + tile)
    if centre:
        lines.append(start + tile // 2)
    return lines


def _good_intervals(start: int, tile: int, length: int, margin: int, split: bool) -> list[tuple[int, int]]:
    """Pixel ranges [a, b) of a tile, in image coordinates, at least `margin` from its bad lines."""
    good, cursor = [], start
    for line in sorted(_bad_lines(start, tile, length, split)):
        if line - margin > cursor:
            good.append((cursor, line - margin))
        cursor = max(cursor, line + margin)
    if cursor < start + tile:
        good.append((cursor, start + tile))
    return good


def _reach(position: int, intervals: list[tuple[int, int]]) -> int:
    """How far the union of `intervals` covers contiguously from `position`."""
    moved = True
    while moved:
        moved = False
        for low, high in intervals:
            if low <= position < high:
                position, moved = high, True
    return position


def place_tiles(length: int, tile: int, margin: int, split: bool = False) -> list[int]:
    """Tile starts along one axis, so that every pixel is at least `margin` from the bad
    lines of some tile (wherever the side is long enough for that), with as few tiles as
    a greedy sweep finds.

    Without `split` this is the familiar layout: a stride of `tile - 2 * margin`, and the
    last tile shifted back inside the image rather than padded. A side no longer than
    `tile` is one tile.
    """
    if length <= tile:
        return [0]
    if 2 * margin >= (tile // 2 if split else tile):
        raise ValueError(f"an overlap of {2 * margin} is too large for {tile}-pixel tiles")
    starts: list[int] = []
    covered: list[tuple[int, int]] = []
    reach = 0
    while reach < length:
        covered = [(low, high) for low, high in covered if high > reach]
        best_start, best_reach = -1, reach
        for start in range(min(reach, length - tile), max(0, reach - tile + 1) - 1, -1):
            candidate = _reach(reach, covered + _good_intervals(start, tile, length, margin, split))
            if candidate > best_reach:
                best_start, best_reach = start, candidate
        if best_start < 0:
            # No tile can keep this pixel that far from its bad lines (a split layout on a
            # side barely longer than a tile): make sure a tile holds it, and move on.
            best_start, best_reach = min(reach, length - tile), reach + 1
        if best_start not in starts:
            starts.append(best_start)
            covered += _good_intervals(best_start, tile, length, margin, split)
        reach = best_reach
    return sorted(starts)


def axis_weights(length: int, starts: list[int], tile: int, margin: int, blend: str) -> Tensor:
    """One row per tile: the weight of each of its pixels (zero outside it), columns summing to one."""
    centre = blend != "core"
    positions = torch.arange(length, dtype=torch.float64) + 0.5  # pixel centres
    distance = torch.full((len(starts), length), -1.0, dtype=torch.float64)  # -1: outside the tile
    for row, start in enumerate(starts):
        inside = slice(start, start + tile)
        nearest = torch.full((min(tile, length),), math.inf, dtype=torch.float64)
        for line in _bad_lines(start, tile, length, centre):
            nearest = torch.minimum(nearest, (positions[inside] - line).abs())
        distance[row, inside] = nearest
    if blend == "core":
        weights = torch.zeros_like(distance)
        weights[distance.argmax(dim=0), torch.arange(length)] = 1.0  # ties go to the earlier tile
    else:
        ramp = (distance / max(2 * margin, 1)).clamp(0.0, 1.0)
        weights = torch.where(distance >= 0, torch.sin(ramp * math.pi / 2) ** 2 + 1e-6, 0.0)
    return (weights / weights.sum(dim=0, keepdim=True)).float()


@dataclass(frozen=True)
class Tile:
    """One tile: where it is cut from the image, and the part of it that counts (non-zero weight)."""

    #: Its place in the grid: which row and column of tiles.
    row: int
    col: int
    top: int
    left: int
    height: int
    width: int
    #: Rows and columns of the tile (tile coordinates) whose weights are not zero.
    rows: slice
    cols: slice


class TileGrid:
    """The tiles covering a `height` x `width` image, and their blend weights. `tile` is a
    side (square tiles) or (height, width)."""

    def __init__(self, height: int, width: int, tile: int | tuple[int, int], overlap: int,
                 blend: str = DEFAULT_BLEND) -> None:
        tile_height, tile_width = (tile, tile) if isinstance(tile, int) else tile
        for side in {tile_height, tile_width}:
            check_tile_options(side, overlap, blend)
        self.height, self.width = height, width
        self.tile_height, self.tile_width = min(tile_height, height), min(tile_width, width)
        margin = overlap // 2
        split = blend == "split"
        self.row_starts = place_tiles(height, tile_height, margin, split)
        self.col_starts = place_tiles(width, tile_width, margin, split)
        self.row_weights = axis_weights(height, self.row_starts, self.tile_height, margin, blend)
        self.col_weights = axis_weights(width, self.col_starts, self.tile_width, margin, blend)
        self.tiles = [
            Tile(i, j, top, left, self.tile_height, self.tile_width,
                 _support(self.row_weights[i, top:top + self.tile_height]),
                 _support(self.col_weights[j, left:left + self.tile_width]))
            for i, top in enumerate(self.row_starts)
            for j, left in enumerate(self.col_starts)
        ]

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def accumulate(self, output: Tensor, tile: Tile, restored: Tensor) -> None:
        """Add a restored tile (Cxhxw, float) into `output` (CxHxW) with its weights."""
        rows = slice(tile.top + tile.rows.start, tile.top + tile.rows.stop)
        cols = slice(tile.left + tile.cols.start, tile.left + tile.cols.stop)
        window = self.row_weights[tile.row, rows, None] * self.col_weights[tile.col, None, cols]
        output[:, rows, cols] += restored[:, tile.rows, tile.cols] * window


def _support(weights: Tensor) -> slice:
    nonzero = torch.nonzero(weights).flatten()
    return slice(int(nonzero[0]), int(nonzero[-1]) + 1)
