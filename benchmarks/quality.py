"""What each way of running costs in quality and time: plain fp32, bf16, tiles (each
blend), --tlc (whole and tiled), --ensemble 2/4/8, one table.

By default on the small trained denoiser in tests/data/trained (sigma 25, trained on
64x64 crops, hence --tlc-train-size 64) and the noisy photo of
benchmarks/tiling_quality.py at 384x512 (--size), scored against the clean photo. Each
variant runs twice and the second run is timed. With --checkpoint, --task,
--input and --target, on any checkpoint and dataset instead (pairs by name, as `mprnet
eval` does; --limit takes the first N pairs).

    python benchmarks/quality.py
    python benchmarks/quality.py --checkpoint model_deblurring.pth --task deblur \\
        --input GoPro/test/input --target GoPro/test/target --tlc-train-size 256

Run it under the shared CPU lock (flock /tmp/mprnet-cpu.lock ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mprnet_cli import Restorer
from mprnet_cli.evaluate import plan_pairs, resolve_protocol, score_pairs
from mprnet_cli.metrics import PROTOCOLS
from mprnet_cli.tiling import BLENDS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.trained_model import CHECKPOINT, noisy_photo  # noqa: E402 - needs the repository on the path


def variants(tile: int, train_size: int) -> list[tuple[str, dict[str, object]]]:
    tiled = [(f"tiles {tile}, {blend}", {"tile": tile, "tile_blend": blend}) for blend in BLENDS]
    return [
        ("plain fp32 (reference)", {}),
        ("bf16", {"precision": "bf16"}),
        *tiled,
        ("--tlc", {"tlc_train_size": train_size}),
        (f"--tlc, tiles {tile}, feather", {"tlc_train_size": train_size, "tile": tile}),
        ("--ensemble 2", {"ensemble": 2}),
        ("--ensemble 4", {"ensemble": 4}),
        ("--ensemble 8", {"ensemble": 8}),
        ("--tlc --ensemble 8", {"tlc_train_size": train_size, "ensemble": 8}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--task", default="denoise", help="with --input: the task whose protocol scores it")
    parser.add_argument("--input", help="a folder of degraded images (with --target)")
    parser.add_argument("--target", help="their ground truth")
    parser.add_argument("--limit", type=int, default=0, help="score the first N pairs only")
    parser.add_argument("--metric", default="auto", help="a protocol of mprnet_cli.metrics (default: the task's; "
                        "matlab-float for the built-in photo)")
    parser.add_argument("--size", default="384x512", help="HxW of the built-in photo")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--tlc-train-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()

    if arguments.input:
        protocol = resolve_protocol(arguments.task, arguments.metric)
        pairs = plan_pairs(arguments.input, arguments.target, what="input")[:arguments.limit or None]
        description = f"{len(pairs)} pairs from {arguments.input}"

        def score(restorer: Restorer) -> tuple[float, float]:
            scores = list(score_pairs(pairs, protocol, restorer))
            return float(np.mean([s.psnr for s in scores])), float(np.mean([s.ssim for s in scores]))
    else:
        protocol = PROTOCOLS["matlab-float" if arguments.metric == "auto" else arguments.metric]
        clean, noisy = noisy_photo(*map(int, arguments.size.split("x")))
        description = f"noisy {noisy.shape[1]}x{noisy.shape[0]} photo, sigma 25"

        def score(restorer: Restorer) -> tuple[float, float]:
            return protocol.score(restorer.restore(noisy), clean)

    reference = Restorer.from_checkpoint(arguments.checkpoint, device=arguments.device, precision="fp32", tile=0)
    print(f"{arguments.checkpoint.name} on {description}; {protocol.name}: {protocol.description}")
    print(f"{'variant':<28} {'PSNR':>8} {'vs plain':>9} {'SSIM':>7} {'seconds':>8}")
    plain_psnr = None
    for name, options in variants(arguments.tile, arguments.tlc_train_size):
        settings = {"precision": "fp32", "tile": 0, "tile_overlap": 32, **options}
        restorer = Restorer(reference.model, device=arguments.device, **settings)  # type: ignore[arg-type]
        score(restorer)  # untimed: a shape's first forward also builds oneDNN's kernels for it
        started = time.perf_counter()
        psnr, ssim = score(restorer)
        seconds = time.perf_counter() - started
        plain_psnr = psnr if plain_psnr is None else plain_psnr
        print(f"{name:<28} {psnr:>7.3f}  {psnr - plain_psnr:>+8.3f} {ssim:>7.4f} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
