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

from mprnet_cli.devices import is_out_of_memory

logger = logging.getLogger("mprnet")

Forward = Callable[[Tensor], Sequence[Tensor]]
#: `capture(model, example)`: a function that replays `model` on inputs shaped like `example`.
Capture = Callable[[Forward, Tensor], Forward]

#: A graph is kept when it replays in at most this share of the eager forward's time.
KEEP_RATIO = 0.9
#: Graphs kept at once (each holds its forward's memory); the least recently used goes
#: first, and its shape runs eagerly from then on (no capture over and over).
MAX_GRAPHS = 4
#: Shapes whose decision is remembered.
MAX_SHAPES = 64


def capture_cuda_graph(model: Forward, example: Tensor) -> Forward:
    """Record one forward of `model` on a copy of `example`; the returned function copies
    its input into that copy and replays. Its outputs are the graph's own buffers, written
    again by the next replay.

    Captured on a stream of its own, entered here as well as by `torch.cuda.graph`: if
    ending a capture fails, the graph's exit leaves its stream current, and ours puts the
    caller's back. Errors are those of this thread only (a host application's other
    threads may use CUDA meanwhile).
    """
    static = example.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(example.device)
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
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
    """Runs a model, from a CUDA graph for the shapes where one measured faster.

    The first call of a shape runs eagerly: cuDNN tries its kernels then. The second runs
    eagerly and timed; then, if `fits(batch)` (the graph's memory is affordable), a graph
    is captured, replayed once to load it, and replayed again, timed, and kept if that took
    at most `KEEP_RATIO` of the eager time. Later calls of the shape replay it. A failed
    capture turns graphs off for good. Callers copy what they need out of a replay's
    outputs before the next call. Another model starts everything afresh.
    """

    def __init__(self, device: torch.device, *, capture: Capture = capture_cuda_graph,
                 clock: Callable[[], float] | None = None) -> None:
        self._model: Forward | None = None
        self._capture = capture
        self._clock = clock or _synchronized_clock(device)
        self._seen_once: OrderedDict[torch.Size, None] = OrderedDict()
        #: Per decided shape, least recently used first: its graph, or None to run eagerly.
        self._decided: OrderedDict[torch.Size, Forward | None] = OrderedDict()
        self._off = False

    def __call__(self, model: Forward, batch: Tensor, fits: Callable[[Tensor], bool]) -> Sequence[Tensor]:
        """`fits` is asked only when a shape comes to be tried (so it may be costly)."""
        if model is not self._model:
            self._model = model
            self._seen_once.clear()
            self._decided.clear()
        shape = batch.shape
        if self._off:
            return model(batch)
        if shape in self._decided:
            self._decided.move_to_end(shape)
            replay = self._decided[shape]
            return model(batch) if replay is None else replay(batch)
        if shape in self._seen_once:
            del self._seen_once[shape]
            return self._try_graph(model, batch, fits)
        self._seen_once[shape] = None
        _keep_newest(self._seen_once, MAX_SHAPES)
        return model(batch)

    def _try_graph(self, model: Forward, batch: Tensor, fits: Callable[[Tensor], bool]) -> Sequence[Tensor]:
        started = self._clock()
        outputs = model(batch)
        eager = self._clock() - started
        if not fits(batch):
            self._decide(batch.shape, None)
            return outputs
        try:
            replay = self._capture(model, batch)
            replay(batch)  # the first launch also uploads the graph
            started = self._clock()
            replay(batch)
            replayed = self._clock() - started
        except RuntimeError as error:
            self._turn_off(error)
            return outputs
        keep = replayed <= KEEP_RATIO * eager
        logger.debug("CUDA graph for %s: %.1f ms eager, %.1f ms replayed: %s", tuple(batch.shape), eager * 1e3,
                     replayed * 1e3, "kept" if keep else "dropped")
        self._decide(batch.shape, replay if keep else None)
        return outputs

    def _turn_off(self, error: RuntimeError) -> None:
        """Out of memory, the device has none to spare for graphs; anything else, graphs
        are not to be trusted here (an operation a graph cannot hold, a driver's refusal)."""
        self._off = True
        self._seen_once.clear()
        self._decided.clear()
        if is_out_of_memory(error):
            logger.debug("CUDA graphs off: out of memory while capturing one (%s)", str(error))
        else:
            reason = next(iter(str(error).splitlines()), type(error).__name__)
            logger.warning("CUDA graphs off, running eagerly: capturing one failed: %s", reason)

    def _decide(self, shape: torch.Size, replay: Forward | None) -> None:
        self._decided[shape] = replay
        graphs = [kept for kept, graph in self._decided.items() if graph is not None]
        for kept in graphs[:-MAX_GRAPHS]:
            self._decided[kept] = None
        _keep_newest(self._decided, MAX_SHAPES)


def _keep_newest(shapes: OrderedDict[torch.Size, object], count: int) -> None:
    while len(shapes) > count:
        shapes.popitem(last=False)
