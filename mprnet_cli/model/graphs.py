"""CUDA graphs for input shapes that repeat: tiles of one size, many images of one size.

An MPRNet forward launches a few thousand small kernels. On an H100 in bf16, below about
a quarter of a megapixel, launching them takes longer than running them: at 256x256 an
eager forward took 29 ms (derain) and 19 ms (deblur), the same kernels replayed from a
CUDA graph 6 and 9 ms. Larger forwards keep the GPU busy and gain little or nothing
(at 512x512: derain 24 ms eager, 22 ms with graphs; deblur 31 ms both), while a graph
holds its forward's memory for as long as it is kept. So each shape that repeats is tried
once, and its graph kept only where it replayed faster
(`benchmarks/speed.py --device cuda --sizes 256 512 --variants eager default`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

logger = logging.getLogger("mprnet")

Forward = Callable[[Tensor], Sequence[Tensor]]
#: `capture(model, example)`: a function that replays `model` on inputs shaped like `example`.
Capture = Callable[[Forward, Tensor], Forward]

#: A graph is kept when it replays in at most this share of the eager forward's time.
KEEP_RATIO = 0.9
#: Graphs kept at once (each holds its forward's memory); the least recently used goes first.
MAX_GRAPHS = 4
#: Shapes whose decision is remembered.
MAX_SHAPES = 64


def capture_cuda_graph(model: Forward, example: Tensor) -> Forward:
    """Record one forward of `model` on a copy of `example`; the returned function copies
    its input into that copy and replays. Its outputs are the graph's own buffers, written
    again by the next replay."""
    static = example.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = model(static)

    def replay(batch: Tensor) -> Sequence[Tensor]:
        static.copy_(batch)
        graph.replay()
        return outputs

    return replay


def _synchronized_clock(device: torch.device) -> Callable[[], float]:
    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


class GraphReplay:
    """Runs `model`, from a CUDA graph for the shapes where one measured faster.

    The first call of a shape runs eagerly: cuDNN tries its kernels then. The second runs
    eagerly and timed, then captures a graph and replays it once, timed, and keeps it if
    that took at most `KEEP_RATIO` of the eager time. Later calls of the shape replay it.
    Shapes for which `fits(batch)` is false (the graph's memory would be too much to hold)
    always run eagerly. Callers copy what they need out of a replay's outputs before the
    next call.
    """

    def __init__(self, model: Forward, device: torch.device, fits: Callable[[Tensor], bool], *,
                 capture: Capture = capture_cuda_graph, clock: Callable[[], float] | None = None) -> None:
        self.model = model
        self._fits = fits
        self._capture = capture
        self._clock = clock or _synchronized_clock(device)
        self._seen_once: OrderedDict[torch.Size, None] = OrderedDict()
        #: Per decided shape, least recently used first: its graph, or None to run eagerly.
        self._decided: OrderedDict[torch.Size, Forward | None] = OrderedDict()

    def __call__(self, batch: Tensor) -> Sequence[Tensor]:
        shape = batch.shape
        if shape in self._decided:
            self._decided.move_to_end(shape)
            replay = self._decided[shape]
            return self.model(batch) if replay is None else replay(batch)
        if shape in self._seen_once:
            del self._seen_once[shape]
            return self._try_graph(batch)
        self._seen_once[shape] = None
        _keep_newest(self._seen_once, MAX_SHAPES)
        return self.model(batch)

    def _try_graph(self, batch: Tensor) -> Sequence[Tensor]:
        if not self._fits(batch):
            self._decide(batch.shape, None)
            return self.model(batch)
        started = self._clock()
        outputs = self.model(batch)
        eager = self._clock() - started
        replay: Forward | None = None
        replayed = float("inf")
        try:
            replay = self._capture(self.model, batch)
            started = self._clock()
            replay(batch)
            replayed = self._clock() - started
        except RuntimeError as error:  # out of memory, or an operation that a graph cannot hold
            logger.debug("no CUDA graph for %s: %s", tuple(batch.shape), str(error))
        keep = replayed <= KEEP_RATIO * eager
        logger.debug("CUDA graph for %s: %.1f ms eager, %.1f ms replayed: %s", tuple(batch.shape), eager * 1e3,
                     replayed * 1e3, "kept" if keep else "dropped")
        self._decide(batch.shape, replay if keep else None)
        return outputs

    def _decide(self, shape: torch.Size, replay: Forward | None) -> None:
        self._decided[shape] = replay
        graphs = [kept for kept, graph in self._decided.items() if graph is not None]
        for kept in graphs[:-MAX_GRAPHS]:
            del self._decided[kept]  # seen again, it starts over
        _keep_newest(self._decided, MAX_SHAPES)


def _keep_newest(shapes: OrderedDict[torch.Size, object], count: int) -> None:
    while len(shapes) > count:
        shapes.popitem(last=False)
