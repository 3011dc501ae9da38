"""Start-up latency: how long `mprnet --help` takes, and how long a run takes to reach
its first tile, each timed from the launch of a fresh process.

The first-tile run does what `mprnet <task> photo.png` does before compute (import,
resolve the device, load the checkpoint, decode the image) and then restores a
1920x1080 photo until its first tile is done: it reports when the tiles start (the
progress callback's first call, at 0 of N) and when the first one is finished. It uses a checkpoint of the task's
published width with seeded random weights, written to a temporary folder, so no
download is timed.

    python benchmarks/startup.py [--task derain] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mprnet_cli.model.config import TASK_CONFIGS
from mprnet_cli.model.network import MPRNet

#: Runs in the child: timestamps (seconds since its launch) of each step up to the first tile.
FIRST_TILE = """
import json, sys, time
from pathlib import Path
launched = float(sys.argv[1])
from mprnet_cli.imageio import read_image
from mprnet_cli.pipeline import load_restorer, restore_picture
imported = time.time()
restorer = load_restorer(sys.argv[2], sys.argv[3], "auto", "auto")
loaded = time.time()
picture = read_image(Path(sys.argv[4]))
decoded = time.time()

class FirstTile(Exception):
    pass

started = None

def progress(done, total):
    global started
    started = started or time.time()
    if done:
        raise FirstTile(total)

try:
    restore_picture(restorer, picture, progress)
    tiles = 1
except FirstTile as stop:
    tiles = stop.args[0]
print(json.dumps({"imported": imported - launched, "loaded": loaded - launched, "decoded": decoded - launched,
                  "tiles_started": None if started is None else started - launched,  # None: not tiled
                  "first_tile_done": time.time() - launched,
                  "tiles": tiles}))
"""


def _help_seconds() -> float:
    started = time.time()
    subprocess.run([sys.executable, "-m", "mprnet_cli", "--help"], capture_output=True, check=True)
    return time.time() - started


def _first_tile(task: str, weights: Path, image: Path) -> dict[str, float]:
    command = [sys.executable, "-c", FIRST_TILE, repr(time.time()), task, str(weights), str(image)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(finished.stderr[-2000:])
    return json.loads(finished.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="derain", choices=sorted(TASK_CONFIGS))
    parser.add_argument("--runs", type=int, default=3)
    arguments = parser.parse_args()
    helps = [_help_seconds() for _ in range(arguments.runs)]
    print(f"mprnet --help: median {statistics.median(helps):.2f} s over {arguments.runs} runs "
          f"({', '.join(f'{s:.2f}' for s in helps)})")
    with tempfile.TemporaryDirectory() as folder:
        weights, image = Path(folder) / "weights.pth", Path(folder) / "photo.png"
        torch.manual_seed(0)
        torch.save(MPRNet(TASK_CONFIGS[arguments.task]).state_dict(), weights)
        pixels = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
        runs = [_first_tile(arguments.task, weights, image) for _ in range(arguments.runs)]
    print(f"mprnet {arguments.task} on 1920x1080 ({runs[0]['tiles']} tiles), seconds from launch, median of "
          f"{arguments.runs} runs:")
    for step in ("imported", "loaded", "decoded", "tiles_started", "first_tile_done"):
        times = [run[step] for run in runs if run[step] is not None]
        print(f"  {step:<15} {statistics.median(times):6.2f} s" if times else f"  {step:<15}      - (one forward, not tiled)")


if __name__ == "__main__":
    main()
