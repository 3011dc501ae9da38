"""When a repeated shape is replayed from a CUDA graph: the policy, with a stand-in for
the graph and the clock (the real capture runs in test_cuda.py). The stand-in's replays
return fresh tensors, so that a replay's outputs are copied out before the next one is
checked there too."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from mprnet_cli import Restorer
from mprnet_cli.model.graphs import MAX_GRAPHS, Forward, GraphReplay

from .conftest import TINY_CHECKPOINT


class _Device(torch.nn.Module):
    """A network on a pretend device whose clock each forward moves on, and its graphs."""

    def __init__(self, eager: float = 10.0, replayed: float = 3.0, capture_error: str | None = None,
                 network: Forward | None = None) -> None:
        super().__init__()
        self.eager, self.replayed, self.capture_error = eager, replayed, capture_error
        self.network = network or (lambda batch: (batch * 2,))
        self.config = getattr(network, "config", None)
        self.now = 0.0
        self.log: list[tuple[str, tuple[int, ...]]] = []
        self.replays = GraphReplay(torch.device("cpu"), capture=self.capture, clock=lambda: self.now)

    def forward(self, batch: torch.Tensor) -> Sequence[torch.Tensor]:
        self.now += self.eager
        self.log.append(("eager", tuple(batch.shape)))
        return self.network(batch)

    def capture(self, model: Forward, example: torch.Tensor) -> Forward:
        if self.capture_error:
            raise torch.cuda.OutOfMemoryError(self.capture_error) if "memory" in self.capture_error \
                else RuntimeError(self.capture_error)
        self.log.append(("capture", tuple(example.shape)))

        def replay(batch: torch.Tensor) -> Sequence[torch.Tensor]:
            self.now += self.replayed
            self.log.append(("replay", tuple(batch.shape)))
            return self.network(batch)

        return replay

    def run(self, batch: torch.Tensor, fits: bool = True) -> Sequence[torch.Tensor]:
        return self.replays(self, batch, lambda _batch: fits)

    def steps(self) -> list[str]:
        return [step for step, _ in self.log]


def _batch(side: int = 8) -> torch.Tensor:
    return torch.rand(1, 3, side, side)


SHAPE = (1, 3, 8, 8)


def test_a_shape_seen_twice_is_replayed_from_then_on_when_the_graph_is_faster() -> None:
    device = _Device(eager=10.0, replayed=3.0)
    for _ in range(4):
        batch = _batch()
        torch.testing.assert_close(device.run(batch)[0], batch * 2)
    assert device.log == [
        ("eager", SHAPE),  # cuDNN picks its kernels on the first call
        ("eager", SHAPE), ("capture", SHAPE), ("replay", SHAPE), ("replay", SHAPE),  # loaded, then timed
        ("replay", SHAPE), ("replay", SHAPE),
    ]


def test_a_graph_that_is_not_clearly_faster_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    device = _Device(eager=10.0, replayed=9.5)  # above KEEP_RATIO: the GPU was busy anyway
    with caplog.at_level(logging.DEBUG, logger="mprnet"):
        for _ in range(4):
            device.run(_batch())
    assert device.steps() == ["eager", "eager", "capture", "replay", "replay", "eager", "eager"]
    assert "CUDA graph for (1, 3, 8, 8): 10000.0 ms eager, 9500.0 ms replayed: dropped" in caplog.text


def test_a_failed_capture_turns_graphs_off(caplog: pytest.LogCaptureFixture) -> None:
    device = _Device(capture_error="operation not permitted when stream is capturing\nmore detail")
    results = [device.run(_batch(side))[0] for side in (8, 8, 8, 16, 16, 16)]
    assert [result.shape[-1] for result in results] == [8, 8, 8, 16, 16, 16]
    assert device.steps() == ["eager"] * 6  # no other shape is tried either
    assert caplog.messages == ["CUDA graphs off, running eagerly: capturing one failed: "
                               "operation not permitted when stream is capturing"]


def test_running_out_of_memory_while_capturing_turns_graphs_off_quietly(caplog: pytest.LogCaptureFixture) -> None:
    device = _Device(capture_error="CUDA out of memory. Tried to allocate 2.00 GiB")
    with caplog.at_level(logging.DEBUG, logger="mprnet"):
        for side in (8, 8, 8, 16, 16):
            device.run(_batch(side))
    assert device.steps() == ["eager"] * 5
    assert [record.levelname for record in caplog.records] == ["DEBUG"]


def test_a_shape_too_large_to_hold_in_a_graph_is_never_captured() -> None:
    device = _Device()
    for _ in range(3):
        device.run(_batch(), fits=False)
    assert device.steps() == ["eager"] * 3


def test_shapes_are_followed_each_on_its_own() -> None:
    device = _Device()
    for side in (8, 16, 8, 16, 8):
        device.run(_batch(side))
    small, large = SHAPE, (1, 3, 16, 16)
    assert device.log == [
        ("eager", small), ("eager", large),
        ("eager", small), ("capture", small), ("replay", small), ("replay", small),
        ("eager", large), ("capture", large), ("replay", large), ("replay", large),
        ("replay", small),
    ]


def test_only_the_most_recently_used_graphs_are_kept_and_the_others_run_eagerly() -> None:
    device = _Device()
    sides = [8 * (index + 1) for index in range(MAX_GRAPHS + 1)]
    for side in sides:
        device.run(_batch(side))
        device.run(_batch(side))
    assert device.steps().count("capture") == MAX_GRAPHS + 1
    device.log.clear()
    for _ in range(2):
        for side in sides:
            device.run(_batch(side))
    assert device.steps() == (["eager"] + ["replay"] * MAX_GRAPHS) * 2  # the first let go, not captured again


def test_another_model_starts_afresh() -> None:
    device = _Device()
    for _ in range(3):
        device.run(_batch())
    device.log.clear()
    other = torch.nn.Sequential(device)  # a model the graphs were not made of
    for _ in range(2):
        device.replays(other, _batch(), lambda _batch: True)
    assert device.steps() == ["eager", "eager", "capture", "replay", "replay"]


def test_tiles_of_one_shape_are_replayed_by_the_restorer() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 88, 3), dtype=np.uint8)
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile=32, tile_overlap=8, tile_batch=1)
    eager = restorer.restore(image)
    device = _Device(network=restorer.model)
    restorer.model, restorer._graphs = device, device.replays  # what a CUDA device gets
    tiles = []
    np.testing.assert_array_equal(restorer.restore(image, progress=lambda done, total: tiles.append(total)), eager)
    steps = device.steps()
    assert steps[:5] == ["eager", "eager", "capture", "replay", "replay"]  # the second tile, every way
    assert steps[5:] == ["replay"] * (tiles[0] - 2)


def test_running_out_of_memory_turns_the_restorers_graphs_off() -> None:
    """Graphs that were kept would hold memory that the retries need (seen on an H100 with
    the device capped: kept graphs drove 256x192 tiles down to 64x48)."""
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile_overlap=8)
    expected = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile=32, tile_overlap=8).restore(image)
    network = restorer.model

    def out_of_memory_above_32x32(batch: torch.Tensor) -> Sequence[torch.Tensor]:
        if batch.shape[-2] * batch.shape[-1] > 32 * 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return network(batch)

    device = _Device(network=out_of_memory_above_32x32)
    device.config = network.config
    restorer.model, restorer._graphs = device, device.replays
    tiles = []
    np.testing.assert_array_equal(restorer.restore(image, progress=lambda done, total: tiles.append(total)), expected)
    assert restorer._graphs is None
    assert device.steps() == ["eager"] * (1 + tiles[0])  # the whole image, then its tiles, none replayed
