"""Peak memory of whole-image and tiled restoration on the CPU, each run in its own process.

Why a separate process per run: peak RSS is a high-water mark, so only a fresh process
measures one configuration. Seeded random weights: memory does not depend on their values.

    python benchmarks/memory.py                       # the cases below, in a table
    python benchmarks/memory.py --case derain-24mp    # one case

Cases:
- derain-24mp: a 6000x4000 photo with the published derain width, `--tile auto` (the
  default); the tiling issue's bound is a peak RSS under 2.5 GB.
- tiny-12mp: a 4000x3000 photo with the tiny test model, tiled at 512, against the whole
  image run at 1 and 3 megapixels (whole-image memory grows linearly with the pixels, so
  the 12-megapixel need is extrapolated from those two instead of exhausting the machine).
- per-pixel: whole-image forwards at 512x512 for each published width in fp32 and bf16,
  the measurement behind `estimate_bytes_per_pixel` in mprnet_cli/model/restorer.py.
- tlc: whole-image derain forwards at 512x512 and 1024x1024 in fp32 and bf16, with and
  without TLC, the measurement behind its term (`TLC_BYTES_PER_CHANNEL`) in the same
  estimate. TLC runs with windows for 8-pixel crops, which keep nearly every row and
  column of each map: the most memory TLC takes at any size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1024**3
SIZE_MULTIPLE = 8  # mprnet_cli.model.network's, without importing torch here

#: name -> (width preset or "tiny", height, width, tile: None auto / 0 whole / N, precision,
#: TLC train size or None)
RUNS = {
    "derain-24mp": ("derain", 4000, 6000, None, "auto", None),
    "tiny-12mp-tiled": ("tiny", 3000, 4000, 512, "fp32", None),
    "tiny-1mp-whole": ("tiny", 750, 1000, 0, "fp32", None),
    "tiny-3mp-whole": ("tiny", 1500, 2000, 0, "fp32", None),
}
CASES = {
    "derain-24mp": ["derain-24mp"],
    "tiny-12mp": ["tiny-12mp-tiled", "tiny-1mp-whole", "tiny-3mp-whole"],
    "per-pixel": [f"{task}-512-{precision}" for task in ("derain", "denoise", "deblur") for precision in ("fp32", "bf16")],
    "tlc": [f"derain-{side}-{precision}{tlc}" for precision in ("fp32", "bf16") for side in (512, 1024)
            for tlc in ("", "-tlc")],
}
for _task in ("derain", "denoise", "deblur"):
    for _precision in ("fp32", "bf16"):
        RUNS[f"{_task}-512-{_precision}"] = (_task, 512, 512, 0, _precision, None)
for _precision in ("fp32", "bf16"):
    for _side in (512, 1024):
        RUNS.setdefault(f"derain-{_side}-{_precision}", ("derain", _side, _side, 0, _precision, None))
        RUNS[f"derain-{_side}-{_precision}-tlc"] = ("derain", _side, _side, 0, _precision, SIZE_MULTIPLE)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_one(name: str) -> dict[str, object]:
    """In the worker process: build the model, restore a synthetic photo, report memory."""
    import numpy as np
    import torch

    from mprnet_cli.model.config import TASK_CONFIGS, MPRNetConfig
    from mprnet_cli.model.network import MPRNet
    from mprnet_cli.model.restorer import Restorer

    preset, height, width, tile, precision, tlc_train_size = RUNS[name]
    torch.manual_seed(0)
    config = MPRNetConfig(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8) if preset == "tiny" else TASK_CONFIGS[preset]
    restorer = Restorer(MPRNet(config), device="cpu", precision=precision, tile=tile, tlc_train_size=tlc_train_size)
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    image = ((rows + cols) / 2 + np.zeros(3, dtype=np.float32)).astype(np.uint8)
    ready = current_rss()
    started = time.perf_counter()
    restored = restorer.restore(image)
    seconds = time.perf_counter() - started
    assert restored.shape == image.shape
    chosen = restorer.tile_shape_for(height, width)
    return {
        "run": name, "pixels": height * width, "tile": "whole" if chosen is None else f"{chosen[1]}x{chosen[0]}",
        "precision": str(restorer.dtype).removeprefix("torch."),
        "seconds": round(seconds, 1), "rss_before": ready, "peak_rss": _peak_rss(),
        "estimated_bytes_per_pixel": restorer.bytes_per_pixel(),
    }


def measure(name: str) -> dict[str, object]:
    finished = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{name} failed:\n{finished.stderr}")
    return json.loads(finished.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        print(json.dumps(run_one(arguments.worker)))
        return
    results = [measure(name) for case in arguments.case or list(CASES) for name in CASES[case]]
    print(f"{'run':<22} {'pixels':>11} {'tile':>9} {'prec':>8} {'seconds':>8} {'peak RSS':>9} {'forward':>9} "
          f"{'B/px meas.':>10} {'B/px est.':>9}")
    for result in results:
        forward = result["peak_rss"] - result["rss_before"]
        measured = forward / result["pixels"] if result["tile"] == "whole" else float("nan")
        print(f"{result['run']:<22} {result['pixels']:>11,} {result['tile']:>9} {result['precision']:>8} "
              f"{result['seconds']:>8} {result['peak_rss'] / GIB:>8.2f}G {forward / GIB:>8.2f}G "
              f"{measured:>10.0f} {result['estimated_bytes_per_pixel']:>9.0f}")
    by_name = {result["run"]: result for result in results}
    for name, result in by_name.items():
        plain = by_name.get(name.removesuffix("-tlc"))
        if name.endswith("-tlc") and plain is not None:
            extra = (result["peak_rss"] - result["rss_before"] - plain["peak_rss"] + plain["rss_before"]) / result["pixels"]
            print(f"{name}: TLC adds {extra:.0f} B/pixel")
    if {"tiny-1mp-whole", "tiny-3mp-whole", "tiny-12mp-tiled"} <= by_name.keys():
        small, large = by_name["tiny-1mp-whole"], by_name["tiny-3mp-whole"]
        slope = (large["peak_rss"] - small["peak_rss"]) / (large["pixels"] - small["pixels"])
        whole = large["peak_rss"] + slope * (12_000_000 - large["pixels"])
        print(f"tiny model at 4000x3000: tiled peak {by_name['tiny-12mp-tiled']['peak_rss'] / GIB:.2f} GiB, "
              f"whole image would need about {whole / GIB:.2f} GiB (extrapolated, {slope:.0f} B/pixel)")


if __name__ == "__main__":
    main()
