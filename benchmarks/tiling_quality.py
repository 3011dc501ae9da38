"""How close tiled restoration comes to the whole-image run, per blend: the measurement
behind the default `--tile-blend` and the numbers in the README.

Uses the small trained denoiser in tests/data/trained (sigma 25) on a noisy 768x1024
photo (scikit-image's CC0 `chelsea`, held out of its training, enlarged), in fp32.
"away from its seams" leaves out 12-pixel bands on the image's centre lines, where the
whole-image run has the model's own patch seams.

    python benchmarks/tiling_quality.py [--tile 256] [--overlap 32] [--tlc-train-size 64]

With --tlc-train-size (the denoiser's crops were 64), both the whole-image and the tiled
runs use TLC: its local windows should make a tile's attention less dependent on the tile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from mprnet_cli import Restorer
from mprnet_cli.tiling import BLENDS, TileGrid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.trained_model import CHECKPOINT, noisy_photo, outside_centre_lines, psnr  # noqa: E402 - needs the repository on the path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--tlc-train-size", type=int, default=None)
    arguments = parser.parse_args()
    clean, noisy = noisy_photo()
    whole_restorer = Restorer.from_checkpoint(CHECKPOINT, device="cpu", precision="fp32", tile=0,
                                              tlc_train_size=arguments.tlc_train_size)
    started = time.perf_counter()
    whole = whole_restorer.restore(noisy)
    whole_seconds = time.perf_counter() - started
    print(f"noisy vs clean {psnr(noisy, clean):.2f} dB; whole image vs clean {psnr(whole, clean):.2f} dB "
          f"({whole_seconds:.1f} s)")
    print(f"{'blend':<8} {'tiles':>5} {'compute':>8} {'vs whole':>9} {'away from its seams':>20} {'vs clean':>9} "
          f"{'seconds':>8}")
    for blend in BLENDS:
        grid = TileGrid(*noisy.shape[:2], arguments.tile, arguments.overlap, blend)
        restorer = Restorer(whole_restorer.model, device="cpu", precision="fp32", tile=arguments.tile,
                            tile_overlap=arguments.overlap, tile_blend=blend, tlc_train_size=arguments.tlc_train_size)
        started = time.perf_counter()
        tiled = restorer.restore(noisy)
        seconds = time.perf_counter() - started
        compute = len(grid) * grid.tile_height * grid.tile_width / noisy.shape[0] / noisy.shape[1]
        away = psnr(outside_centre_lines(tiled), outside_centre_lines(whole))
        print(f"{blend:<8} {len(grid):>5} {compute:>7.2f}x {psnr(tiled, whole):>8.2f}dB {away:>18.2f}dB "
              f"{psnr(tiled, clean):>8.2f}dB {seconds:>8.1f}")


if __name__ == "__main__":
    main()
