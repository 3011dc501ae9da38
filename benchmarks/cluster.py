"""What `--ray` costs against the local batch: start-up, and throughput once running.

Why: the issue asks that Ray's throughput after start-up stay within 10% of the local
batch on this 2-core machine, with the start-up seconds reported apart. Both runs are the
real CLI in a subprocess, on the same folder (photo-like PNGs), with the task's published
width and seeded random weights (timing does not depend on their values). Runs alternate,
local then Ray, for `--rounds` rounds, so that a change in the machine's load falls on both.

Each restored image's line is timestamped as it reaches stderr. Start-up is the time from
launch to the first image's line less one image's time; throughput is images 2..N over
the time from the first line to the last.

    python benchmarks/cluster.py                       # 64 images of 512x512, derain, 1 round
    python benchmarks/cluster.py --images 4 --size 64  # a quick check that it runs
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from batch_throughput import make_photos

from mprnet_cli.model.config import TASK_CONFIGS, TASKS
from mprnet_cli.model.network import MPRNet

MPRNET = Path(sys.executable).parent / "mprnet"
#: The issue's bound on Ray's throughput loss after start-up.
TARGET_LOSS = 0.10


@dataclass(frozen=True)
class Run:
    wall: float
    #: Seconds from launch to each image's line, in the order they came.
    lines: list[float]

    def per_image(self) -> float:
        return (self.lines[-1] - self.lines[0]) / (len(self.lines) - 1)

    def throughput(self) -> float:
        return 1 / self.per_image()

    def startup(self) -> float:
        return self.lines[0] - self.per_image()


def run(arguments: list[str], expected: int) -> Run:
    """One CLI run, its stderr read line by line as it comes."""
    started = time.perf_counter()
    process = subprocess.Popen([str(MPRNET), *arguments], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "NO_COLOR": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    assert process.stderr is not None
    lines, errors = [], []
    for line in process.stderr:
        if " -> " in line:
            lines.append(time.perf_counter() - started)
        elif line.startswith("error:"):
            errors.append(line.strip())
    process.wait()
    wall = time.perf_counter() - started
    if process.returncode or errors or len(lines) != expected:
        raise SystemExit(f"mprnet {' '.join(arguments)} failed (exit {process.returncode}, {len(lines)} of "
                         f"{expected} images):\n" + "\n".join(errors))
    return Run(wall, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="derain")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="square images of this side")
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args()
    if options.images < 2:
        parser.error("--images: at least 2, to time images after the first")

    with tempfile.TemporaryDirectory(prefix="mprnet-cluster-bench-") as folder:
        root = Path(folder)
        torch.manual_seed(0)
        weights = root / f"{options.task}.pth"
        torch.save(MPRNet(TASK_CONFIGS[options.task]).state_dict(), weights)
        (root / "in").mkdir()
        make_photos(root / "in", options.images, options.size, options.size, "png")
        common = [options.task, str(root / "in"), "--weights", str(weights), "--overwrite"]
        runs: dict[str, list[Run]] = {"local": [], "ray": []}
        for round_ in range(options.rounds):
            for name, extra in (("local", []), ("ray", ["--ray"])):
                outcome = run([*common, "-o", str(root / name), *extra], options.images)
                runs[name].append(outcome)
                print(f"round {round_ + 1} {name:5}: wall {outcome.wall:7.1f} s, start-up {outcome.startup():5.1f} s, "
                      f"{outcome.per_image():6.2f} s/image after the first", flush=True)

    print(f"\n{options.images} images of {options.size}x{options.size}, {options.task} width, "
          f"{options.rounds} round(s); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    local = statistics.median(run_.throughput() for run_ in runs["local"])
    ray = statistics.median(run_.throughput() for run_ in runs["ray"])
    loss = 1 - ray / local
    print(f"throughput after start-up: local {local * 60:.2f} images/min, ray {ray * 60:.2f} images/min "
          f"({loss:+.1%} loss; target under {TARGET_LOSS:.0%}: {'met' if loss < TARGET_LOSS else 'MISSED'})")
    for name in runs:
        print(f"start-up {name:5}: median {statistics.median(r.startup() for r in runs[name]):.1f} s")


if __name__ == "__main__":
    main()
