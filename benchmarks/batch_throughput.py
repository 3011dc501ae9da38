"""How much of a folder run keeps the device busy: the threaded pipeline against one-by-one.

Why: `run_jobs` decodes in a reader thread and encodes and writes in a writer thread, so
that in a batch only the network should set the pace. The target (from the issue tracker)
is the device busy at least 90% of the wall time after the first image. This script makes
a folder of synthetic photo-like images, restores it with `run_jobs`, then again one image
after another (read, restore, write) so the gain of overlapping shows. The model is the
task's published width with seeded random weights (the timing does not depend on their
values), on the CPU.

    python benchmarks/batch_throughput.py                          # 32 JPEGs of 640x480, derain
    python benchmarks/batch_throughput.py --images 3 --size 64x48  # a quick check that it runs

On the CPU the "device" is the same cores that decode and encode: while the reader and
writer threads work, the network's threads get less, so its compute seconds grow and a
high busy share alone does not mean a faster run. Compare the wall times of the two runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mprnet_cli.errors import MprnetError
from mprnet_cli.imageio import FORMATS, Picture, encode_image, format_for, read_image, write_atomic
from mprnet_cli.model.config import TASK_CONFIGS, TASKS
from mprnet_cli.model.network import MPRNet
from mprnet_cli.model.restorer import Restorer
from mprnet_cli.pipeline import Job, OutputNaming, plan_jobs, restore_picture, run_jobs

#: The CLI's default --quality, used for the synthetic inputs and the restored outputs.
QUALITY = 95
#: The issue's target for the threaded run's busy share after the first image.
TARGET_BUSY = 0.90


@dataclass(frozen=True)
class Timing:
    """One run over the folder, in seconds from its start."""

    wall: float
    #: Network seconds of each image, in the order the network took them.
    compute: list[float]
    #: When the network finished the first image.
    first_done: float

    def busy(self) -> float:
        """Sum of all compute seconds over the whole wall time."""
        return sum(self.compute) / self.wall

    def busy_after_first(self) -> float:
        """Compute seconds of images 2..N over the wall time from the moment the network
        finished image 1 to the moment the last file was written (the end of the run).

        Waiting for the next decoded image inside that window counts as idle, and so does
        the last image's encode and write, which nothing can hide. The window does not open
        when the first `Outcome` arrives: `run_jobs` yields outcomes only after handing the
        next restored image to the writer, so the first one arrives once image 2 has already
        been computed, and counting image 2's compute in that window could pass 100%.
        """
        return sum(self.compute[1:]) / (self.wall - self.first_done)


def parse_size(text: str) -> tuple[int, int]:
    width, separator, height = text.lower().partition("x")
    if not (separator and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, for example 640x480")
    return int(width), int(height)


def make_photos(folder: Path, count: int, width: int, height: int, extension: str) -> None:
    """Smooth colour gradients with a soft ripple and sensor-like noise: content that costs
    the codecs about what a photo does, unlike a flat image or pure noise."""
    rng = np.random.default_rng(0)
    rows = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    for index in range(count):
        base, down, across = rng.uniform(60, 190, 3), rng.uniform(-80, 80, 3), rng.uniform(-80, 80, 3)
        ripple = 20 * np.sin(2 * np.pi * (rng.uniform(1, 4) * rows + rng.uniform(1, 4) * cols))
        noise = rng.normal(0, 6, (height, width, 3))
        pixels = np.clip(base + down * rows + across * cols + ripple + noise, 0, 255).astype(np.uint8)
        path = folder / f"photo_{index:03d}.{extension}"
        path.write_bytes(encode_image(Picture(pixels), format_for(path), QUALITY))


def run_threaded(restorer: Restorer, jobs: list[Job]) -> tuple[Timing, float]:
    """The CLI's path: `run_jobs` with its reader and writer threads. Returns the timing
    and the megapixels restored; exits if any job failed."""
    reached: list[tuple[Job, float]] = []

    def on_start(job: Job) -> None:
        reached.append((job, time.perf_counter()))

    started = time.perf_counter()
    outcomes = list(run_jobs(restorer, jobs, quality=QUALITY, on_start=on_start))
    wall = time.perf_counter() - started
    failures = [str(outcome.error) for outcome in outcomes if not outcome.ok]
    if failures or len(outcomes) != len(jobs):
        failures = failures or [f"only {len(outcomes)} of {len(jobs)} jobs reported back"]
        raise SystemExit("threaded run failed:\n" + "\n".join(failures))
    compute_by_job = {outcome.job: outcome.compute_seconds for outcome in outcomes}
    compute = [compute_by_job[job] for job, _ in reached]
    first_done = reached[0][1] - started + compute[0]
    return Timing(wall, compute, first_done), sum(outcome.megapixels for outcome in outcomes)


def run_sequential(restorer: Restorer, jobs: list[Job]) -> tuple[Timing, list[float], list[float]]:
    """Read, restore, write, one image after another on the calling thread. Returns the
    timing and each image's read+decode and encode+write seconds."""
    compute: list[float] = []
    reads: list[float] = []
    writes: list[float] = []
    first_done = 0.0
    started = time.perf_counter()
    for job in jobs:
        read_at = time.perf_counter()
        picture = read_image(Path(job.source))
        compute_at = time.perf_counter()
        restored = restore_picture(restorer, picture)
        write_at = time.perf_counter()
        target = Path(job.target)
        write_atomic(target, encode_image(restored, format_for(target), QUALITY))
        done_at = time.perf_counter()
        if not compute:
            first_done = write_at - started
        reads.append(compute_at - read_at)
        compute.append(write_at - compute_at)
        writes.append(done_at - write_at)
    return Timing(time.perf_counter() - started, compute, first_done), reads, writes


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="how many images (at least 2; default 32)")
    parser.add_argument("--size", type=parse_size, default=(640, 480), metavar="WxH", help="default 640x480")
    parser.add_argument("--task", choices=TASKS, default="derain", help="whose published width (default derain)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="default auto")
    parser.add_argument("--format", choices=sorted({ext.lstrip(".") for ext in FORMATS}), default="jpg",
                        help="the images' format, in and out (default jpg)")
    arguments = parser.parse_args()
    if arguments.images < 2:
        parser.error("--images: at least 2, so that there is something after the first image")
    width, height = arguments.size

    torch.manual_seed(0)
    restorer = Restorer(MPRNet(TASK_CONFIGS[arguments.task]), device="cpu", precision=arguments.precision)
    tile = restorer.tile_shape_for(height, width)

    with tempfile.TemporaryDirectory(prefix="mprnet-throughput-") as temporary:
        root = Path(temporary)
        inputs, threaded_out, sequential_out = root / "in", root / "threaded", root / "sequential"
        for folder in (inputs, threaded_out, sequential_out):
            folder.mkdir()
        make_photos(inputs, arguments.images, width, height, arguments.format)
        threaded_jobs = plan_jobs([str(inputs)], OutputNaming(arguments.task, output=str(threaded_out))).jobs
        sequential_jobs = plan_jobs([str(inputs)], OutputNaming(arguments.task, output=str(sequential_out))).jobs
        try:
            # The first forward sets up the kernels; pay for it before either timed run,
            # so neither is charged for it and their order does not matter.
            restore_picture(restorer, read_image(Path(threaded_jobs[0].source)))
            threaded, megapixels = run_threaded(restorer, threaded_jobs)
            sequential, reads, writes = run_sequential(restorer, sequential_jobs)
        except MprnetError as error:
            raise SystemExit(f"benchmark failed: {error}") from None

    print(f"torch:        {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"{len(os.sched_getaffinity(0))} CPUs usable")
    print(f"cpu:          {cpu_model()}")
    tiling = "whole image" if tile is None else f"{tile[1]}x{tile[0]} tiles"
    print(f"model:        {arguments.task} published width, random weights, "
          f"{str(restorer.dtype).removeprefix('torch.')}, {tiling}")
    print(f"images:       {arguments.images} {arguments.format} of {width}x{height}, "
          f"{megapixels:.2f} megapixels in all")
    print(f"sequential:   read+decode median {statistics.median(reads):.3f} s, "
          f"encode+write median {statistics.median(writes):.3f} s per image")
    print()
    print(f"{'run':<11} {'wall s':>8} {'images/s':>9} {'compute s':>10} {'median s':>9} {'busy':>6} {'after 1st':>9}")
    for name, timing in (("threaded", threaded), ("sequential", sequential)):
        print(f"{name:<11} {timing.wall:>8.2f} {arguments.images / timing.wall:>9.2f} {sum(timing.compute):>10.2f} "
              f"{statistics.median(timing.compute):>9.3f} {timing.busy():>6.1%} {timing.busy_after_first():>9.1%}")
    print("compute s: network seconds, summed; median s: per image; busy: compute s / wall s;")
    print("after 1st: compute of images 2..N / wall time from the end of image 1's compute to the end")
    print()
    print(f"threaded speed-up over sequential: {sequential.wall / threaded.wall:.2f}x wall time")
    busy = threaded.busy_after_first()
    print(f"target busy after the first image >= {TARGET_BUSY:.0%} (threaded): {busy:.1%}, "
          f"{'met' if busy >= TARGET_BUSY else 'not met'}")


if __name__ == "__main__":
    main()
