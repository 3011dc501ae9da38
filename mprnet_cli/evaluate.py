"""Score restorations against their targets, by the protocol of the task's published table.

`plan_pairs` pairs files by relative path (or by sorted order, as the authors' scripts
do) and checks what can be checked before any work; `score_pairs` restores each input
through a `Restorer` (or reads a finished output) and yields one `ImageScore` per pair;
`Evaluation` holds the means; `evaluate` does it all from Python. Nothing here prints.

Restoring works from float pixels and keeps the float result, so each protocol applies
its own rounding: `matlab-rgb` and `matlab-y` round to 8 bits as the authors' saved PNGs
did (half to even, as the `Restorer` rounds 8-bit output), `matlab-float` does not.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mprnet_cli.errors import InputError
from mprnet_cli.imageio import read_image
from mprnet_cli.metrics import PROTOCOLS, TASK_PROTOCOLS, Protocol
from mprnet_cli.model.restorer import Restorer, split_alpha
from mprnet_cli.pipeline import list_images

#: `--metric auto`: the protocol of the task's published table.
AUTO = "auto"
METRICS = (AUTO, *PROTOCOLS)


@dataclass(frozen=True)
class Pair:
    """One image to score: its name (the relative path the pairing used), the file to
    restore or the finished output, and the target."""

    name: str
    source: Path
    target: Path


@dataclass(frozen=True)
class ImageScore:
    name: str
    psnr: float
    ssim: float
    #: Seconds the network spent on the image; None when a finished output was scored.
    seconds: float | None = None


@dataclass(frozen=True)
class Evaluation:
    protocol: Protocol
    scores: list[ImageScore]

    @property
    def count(self) -> int:
        return len(self.scores)

    @property
    def psnr(self) -> float:
        """The mean of per-image PSNRs, as the papers report it (infinite if any pair is identical)."""
        return float(np.mean([score.psnr for score in self.scores]))

    @property
    def ssim(self) -> float:
        return float(np.mean([score.ssim for score in self.scores]))

    def worst(self, count: int = 3) -> list[ImageScore]:
        return sorted(self.scores, key=lambda score: score.psnr)[:count]

    def slowest(self, count: int = 3) -> list[ImageScore]:
        timed = [score for score in self.scores if score.seconds is not None]
        return sorted(timed, key=lambda score: -score.seconds)[:count]  # type: ignore[operator]


def resolve_protocol(task: str, metric: str = AUTO) -> Protocol:
    """`auto` is the task's published protocol; otherwise one of `PROTOCOLS` by name."""
    name = TASK_PROTOCOLS[task] if metric == AUTO else metric
    if name not in PROTOCOLS:
        raise InputError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    return PROTOCOLS[name]


def plan_pairs(sources: str, targets: str, *, by_order: bool = False, what: str = "restored") -> list[Pair]:
    """Pair the images under `sources` with those under `targets` (folders walked
    recursively, hidden and non-image files left out, or single files).

    By relative path without the extension (`a/b.png` pairs with `a/b.jpg`), or with
    `by_order`, the n-th of each sorted list; two single files pair with each other, whatever
    their names, as whoever named them meant. Every image must find its pair: a mean over a
    silently smaller set would not be the dataset's score.
    """
    source_files, target_files = _images(sources, what), _images(targets, "target")
    if by_order or (Path(sources).is_file() and Path(targets).is_file()):
        if len(source_files) != len(target_files):
            raise InputError(f"{len(source_files)} {what} images but {len(target_files)} targets: "
                             "pairing by order needs as many of each")
        return [Pair(relative, source, target)
                for (source, relative), (target, _) in zip(source_files, target_files)]
    by_name = _by_stem(target_files, targets)
    pairs, unpaired = [], []
    for source, relative in _by_stem(source_files, sources).values():
        key = _stem(relative)
        if key in by_name:
            pairs.append(Pair(relative, source, by_name.pop(key)[0]))
        else:
            unpaired.append(relative)
    if unpaired:
        raise InputError(f"{len(unpaired)} {what} image(s) have no target of the same name in {targets} (first: "
                         f"{unpaired[0]}); use --pair-by-order to pair the sorted lists")
    if by_name:
        first = next(iter(by_name.values()))[1]
        raise InputError(f"{len(by_name)} target(s) have no {what} image of the same name in {sources} (first: "
                         f"{first}); use --pair-by-order to pair the sorted lists")
    return pairs


def _images(argument: str, what: str) -> list[tuple[Path, str]]:
    if not Path(argument).exists():
        raise InputError(f"{argument}: no such file or directory (the {what} images)")
    images = [(path, relative.as_posix()) for path, relative in list_images(argument)]
    if not images:
        raise InputError(f"{argument}: no images found (the {what} images)")
    return images


def _stem(relative: str) -> str:
    return relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative


def _by_stem(files: list[tuple[Path, str]], root: str) -> dict[str, tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    for path, relative in files:
        key = _stem(relative)
        if key in found:
            raise InputError(f"{found[key][1]} and {relative} in {root} share a name: pairing by name cannot tell "
                             "them apart (use --pair-by-order)")
        found[key] = (path, relative)
    return found


def score_pairs(pairs: list[Pair], protocol: Protocol, restorer: Restorer | None = None,
                max_pixels: int | None = None) -> Iterator[ImageScore]:
    """One score per pair, in order: each source restored by `restorer` when given
    (timed), else read as a finished output."""
    for pair in pairs:
        pixels = read_image(pair.source, max_pixels).pixels
        source = _float_rgb(pixels)
        seconds = None
        if restorer is not None:
            started = time.perf_counter()
            # Restored in float, so that each protocol rounds as it says; in the precision
            # the file's own depth gets from the task commands (bf16 for 8-bit under auto).
            source = restorer.restore_array(source, source_dtype=pixels.dtype)
            seconds = time.perf_counter() - started
        target = _float_rgb(read_image(pair.target, max_pixels).pixels)
        _check_shapes(pair, source, target, protocol, "restored" if restorer is None else "input")
        psnr, ssim = protocol.score(source, target)
        yield ImageScore(pair.name, psnr, ssim, seconds)


def evaluate(task: str, targets: str, *, restored: str | None = None, inputs: str | None = None,
             restorer: Restorer | None = None, metric: str = AUTO, by_order: bool = False,
             max_pixels: int | None = None) -> Evaluation:
    """From Python: score finished outputs (`restored`), or restore `inputs` with
    `restorer` and score the results; either way against `targets`."""
    if (restored is None) == (inputs is None):
        raise ValueError("give either restored (finished outputs) or inputs (with a restorer)")
    if inputs is not None and restorer is None:
        raise ValueError("inputs need a restorer to restore them")
    protocol = resolve_protocol(task, metric)
    pairs = plan_pairs(inputs or restored or "", targets, by_order=by_order,
                       what="input" if inputs is not None else "restored")
    return Evaluation(protocol, list(score_pairs(pairs, protocol, restorer if inputs else None, max_pixels)))


def _float_rgb(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels as float32 RGB in [0, 1]: alpha dropped, gray repeated."""
    color, _ = split_alpha(pixels)
    scale = 65535.0 if color.dtype == np.uint16 else 255.0
    color = color.astype(np.float32) / scale
    return np.repeat(color[..., None], 3, axis=2) if color.ndim == 2 else color


def _check_shapes(pair: Pair, source: np.ndarray, target: np.ndarray, protocol: Protocol, what: str) -> None:
    if source.shape != target.shape:
        raise InputError(f"{pair.name}: the {what} image is {source.shape[1]}x{source.shape[0]} but its target "
                         f"{pair.target} is {target.shape[1]}x{target.shape[0]}")
    if min(source.shape[:2]) < protocol.min_side:
        raise InputError(f"{pair.name}: {source.shape[1]}x{source.shape[0]} is too small for {protocol.name}, "
                         f"which needs sides of {protocol.min_side} pixels")


def to_json(evaluation: Evaluation, task: str, settings: dict[str, object]) -> str:
    """The means and every image's scores. JSON has no infinity: an infinite PSNR
    (identical images) is written as null."""
    def number(value: float | None) -> float | None:
        return None if value is None or math.isinf(value) else value

    document = {
        "task": task,
        "protocol": evaluation.protocol.name,
        "description": evaluation.protocol.description,
        "settings": settings,
        "count": evaluation.count,
        "psnr": number(evaluation.psnr),
        "ssim": evaluation.ssim,
        "images": [{"name": s.name, "psnr": number(s.psnr), "ssim": s.ssim, "seconds": s.seconds}
                   for s in evaluation.scores],
    }
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def to_csv(evaluation: Evaluation) -> str:
    """One row per image: name, psnr (`inf` for identical images), ssim, seconds (empty
    when a finished output was scored)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "psnr", "ssim", "seconds"])
    for score in evaluation.scores:
        writer.writerow([score.name, repr(score.psnr), repr(score.ssim), "" if score.seconds is None else
                         f"{score.seconds:.3f}"])
    return buffer.getvalue()
