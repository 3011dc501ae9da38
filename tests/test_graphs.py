"""When a repeated shape is replayed from a CUDA graph: the policy, with a stand-in for
the graph and the clock (the real capture runs in test_cuda.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from mprnet_cli import Restorer
from mprnet_cli.model.graphs import MAX_GRAPHS, Forward, GraphReplay

from .conftest import TINY_CHECKPOINT


class _Device:
    """A network and its graphs on a pretend device whose clock each forward moves on."""

    def __init__(self, eager: float = 10.0, replayed: float = 3.0, capture_fails: bool = False,
                 network: Forward | None = None) -> None:
        self.eager, self.replayed, self.capture_fails = eager, replayed, capture_fails
        self.network = network or (lambda batch: (batch * 2,))
        self.now = 0.0
        self.log: list[tuple[str, tuple[int, ...]]] = []

    def clock(self) -> float:
        return self.now

    def model(self, batch: torch.Tensor) -> Sequence[torch.Tensor]:
        self.now += self.eager
        self.log.append(("eager", tuple(batch.shape)))
        return self.network(batch)

    def capture(self, model: Forward, example: torch.Tensor) -> Forward:
        assert model == self.model
        if self.capture_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.log.append(("capture", tuple(example.shape)))

        def replay(batch: torch.Tensor) -> Sequence[torch.Tensor]:
            self.now += self.replayed
            self.log.append(("replay", tuple(batch.shape)))
            return self.network(batch)

        return replay

    def graphs(self, fits: bool = True) -> GraphReplay:
        return GraphReplay(self.model, torch.device("cpu"), lambda batch: fits, capture=self.capture,
                           clock=self.clock)


def _batch(side: int = 8) -> torch.Tensor:
    return torch.rand(1, 3, side, side)


SHAPE = (1, 3, 8, 8)


def test_a_shape_seen_twice_is_replayed_from_then_on_when_the_graph_is_faster() -> None:
    device = _Device(eager=10.0, replayed=3.0)
    graphs = device.graphs()
    for _ in range(4):
        batch = _batch()
        torch.testing.assert_close(graphs(batch)[0], batch * 2)
    assert device.log == [
        ("eager", SHAPE),  # cuDNN picks its kernels on the first call
        ("eager", SHAPE), ("capture", SHAPE), ("replay", SHAPE),  # the second: timed both ways
        ("replay", SHAPE), ("replay", SHAPE),
    ]


def test_a_graph_that_is_not_clearly_faster_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    device = _Device(eager=10.0, replayed=9.5)  # above KEEP_RATIO: the GPU was busy anyway
    graphs = device.graphs()
    with caplog.at_level(logging.DEBUG, logger="mprnet"):
        for _ in range(4):
            graphs(_batch())
    assert [step for step, _ in device.log] == ["eager", "eager", "capture", "replay", "eager", "eager"]
    assert "10000.0 ms eager, 9500.0 ms replayed: dropped" in caplog.text


def test_a_shape_whose_capture_fails_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    device = _Device(capture_fails=True)
    graphs = device.graphs()
    with caplog.at_level(logging.DEBUG, logger="mprnet"):
        results = [graphs(batch)[0] for batch in [_batch()] * 3]
    assert all(torch.equal(result, results[0]) for result in results)
    assert [step for step, _ in device.log] == ["eager"] * 3
    assert "no CUDA graph for (1, 3, 8, 8): operation not permitted when stream is capturing" in caplog.text


def test_a_shape_too_large_to_hold_in_a_graph_is_never_captured() -> None:
    device = _Device()
    graphs = device.graphs(fits=False)
    for _ in range(3):
        graphs(_batch())
    assert [step for step, _ in device.log] == ["eager"] * 3


def test_shapes_are_followed_each_on_its_own() -> None:
    device = _Device()
    graphs = device.graphs()
    for side in (8, 16, 8, 16, 8):
        graphs(_batch(side))
    small, large = SHAPE, (1, 3, 16, 16)
    assert device.log == [
        ("eager", small), ("eager", large),
        ("eager", small), ("capture", small), ("replay", small),
        ("eager", large), ("capture", large), ("replay", large),
        ("replay", small),
    ]


def test_only_the_most_recently_used_graphs_are_kept() -> None:
    device = _Device()
    graphs = device.graphs()
    sides = [8 * (index + 1) for index in range(MAX_GRAPHS + 1)]
    for side in sides:
        graphs(_batch(side))
        graphs(_batch(side))
    assert [step for step, _ in device.log].count("capture") == MAX_GRAPHS + 1
    device.log.clear()
    for side in sides:
        graphs(_batch(side))
    assert [step for step, _ in device.log] == ["eager"] + ["replay"] * MAX_GRAPHS  # the first was let go


def test_tiles_of_one_shape_are_replayed_by_the_restorer() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 88, 3), dtype=np.uint8)
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile=32, tile_overlap=8, tile_batch=1)
    eager = restorer.restore(image)
    device = _Device(network=restorer.model)
    restorer._graphs = device.graphs()  # what a CUDA device gets
    tiles = []
    np.testing.assert_array_equal(restorer.restore(image, progress=lambda done, total: tiles.append(total)), eager)
    steps = [step for step, _ in device.log]
    assert steps[:4] == ["eager", "eager", "capture", "replay"]  # the second tile, both ways
    assert steps[4:] == ["replay"] * (tiles[0] - 2)


def test_running_out_of_memory_turns_the_graphs_off() -> None:
    """Graphs that were kept would hold memory that the retries need (seen on an H100 with
    the device capped: kept graphs drove 256x192 tiles down to 64x48)."""
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile_overlap=8)
    expected = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile=32, tile_overlap=8).restore(image)

    def out_of_memory(batch: torch.Tensor) -> Sequence[torch.Tensor]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    device = _Device(network=out_of_memory)
    restorer._graphs = device.graphs()
    np.testing.assert_array_equal(restorer.restore(image), expected)
    assert device.log == [("eager", (1, 3, 48, 64))]  # the tiles ran without it
