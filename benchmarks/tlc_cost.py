"""The time --tlc adds to a forward, whole image, at 512x512 and 1080p.

Weights do not change the time, so the published widths are built with random weights
(no download). Plain and TLC forwards alternate, each going first in every other round,
after one untimed forward of each (the first of a shape builds oneDNN's kernels); the
median of --rounds of each is reported, in seconds of wall time and of the process's CPU
time (both threads): other work on a shared machine stretches the first more than the
second. Last, the median of each round's own overhead (its TLC forward against its plain
one), which a machine that slows and speeds up over minutes moves less.

    python benchmarks/tlc_cost.py [--task derain] [--precision auto] [--rounds 3] [--sizes 512x512 1080x1920]

`--tile auto` tiles as the command line does by default (on this CPU, tiles of at most
0.25 MP), rather than running the whole image. TLC runs through its compiled kernel where
it builds (mprnet_cli/model/kernels.py; the first line says whether it did), and as tensor
operations with MPRNET_TLC_KERNEL=0.

Run it under the shared CPU lock (flock /tmp/mprnet-cpu.lock ...).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mprnet_cli import Restorer
from mprnet_cli.model import kernels
from mprnet_cli.model.config import TASK_CONFIGS
from mprnet_cli.model.network import MPRNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="derain", choices=sorted(TASK_CONFIGS))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1080x1920"])
    parser.add_argument("--tile", default="0", help="0: the whole image (default); auto; or a tile size")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    model = MPRNet(TASK_CONFIGS[arguments.task])
    tile = None if arguments.tile == "auto" else int(arguments.tile)
    plain = Restorer(model, device="cpu", precision=arguments.precision, tile=tile)
    local = Restorer(model, device="cpu", precision=arguments.precision, tile=tile, tlc_train_size=256)
    print(f"{arguments.task} widths, {str(plain.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads, "
          f"tile {arguments.tile}, TLC {'compiled kernel' if kernels.library() else 'tensor operations'}")
    print(f"{'size':>10} {'plain s':>8} {'--tlc s':>8} {'overhead':>9} {'CPU s: plain':>13} {'--tlc':>6} {'overhead':>9}")
    for size in arguments.sizes:
        height, width = map(int, size.split("x"))
        # 8-bit, as photos are: under precision auto, deeper images run in fp32.
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        times: dict[str, list[float]] = {"plain": [], "tlc": []}
        cpu_times: dict[str, list[float]] = {"plain": [], "tlc": []}
        for restorer in (plain, local):
            restorer.restore(image)
        for index in range(arguments.rounds):
            pair = (("plain", plain), ("tlc", local))
            for name, restorer in pair[::-1] if index % 2 else pair:  # each goes first in every other round
                started, cpu_started = time.perf_counter(), time.process_time()
                restorer.restore(image)
                times[name].append(time.perf_counter() - started)
                cpu_times[name].append(time.process_time() - cpu_started)
        base, tlc = statistics.median(times["plain"]), statistics.median(times["tlc"])
        cpu_base, cpu_tlc = statistics.median(cpu_times["plain"]), statistics.median(cpu_times["tlc"])
        paired = statistics.median(t / p - 1 for p, t in zip(times["plain"], times["tlc"], strict=True))
        print(f"{size:>10} {base:>8.2f} {tlc:>8.2f} {100 * (tlc / base - 1):>+8.1f}% {cpu_base:>13.2f} {cpu_tlc:>6.2f} "
              f"{100 * (cpu_tlc / cpu_base - 1):>+8.1f}%  (wall: plain {', '.join(f'{t:.2f}' for t in times['plain'])}; "
              f"tlc {', '.join(f'{t:.2f}' for t in times['tlc'])}; median of each round's own overhead "
              f"{100 * paired:+.1f}%)", flush=True)


if __name__ == "__main__":
    main()
