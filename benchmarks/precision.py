"""How far bf16 (and, on a GPU, fp16) output lies from the exact fp32 path, for each
published width; and what bf16 leaves of a 16-bit image, which is why `--precision auto`
runs 16-bit inputs in fp32.

Seeded random weights (the published checkpoints cannot be fetched here) on a photo:
scikit-image's CC0 `astronaut`, cropped. The trained-model guard is a test
(tests/test_restorer.py); this is the full-width row beside it.

    python benchmarks/precision.py [--size 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from skimage import data

from mprnet_cli.model.config import TASK_CONFIGS
from mprnet_cli.model.network import MPRNet
from mprnet_cli.model.restorer import Restorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.trained_model import psnr  # noqa: E402 - needs the repository on the path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    arguments = parser.parse_args()
    photo = data.astronaut()[: arguments.size, : arguments.size].astype(np.float32) / 255
    formats = ["bf16", "fp16"] if arguments.device == "cuda" else ["bf16"]  # no fp16 on the CPU
    deep = np.round(photo * 65535).astype(np.uint16)
    print(f"{'task':<8}" + "".join(f" {name + ' vs fp32':>13} {'max abs diff':>13}" for name in formats)
          + f" {'16-bit: bf16 off by':>20} {'bits kept':>9} {'auto off by':>11}")
    for task, config in TASK_CONFIGS.items():
        torch.manual_seed(0)
        model = MPRNet(config)
        # Copies: a Restorer casts the model it is given in place (fp32 to fp32 is lossless).
        exact_restorer = Restorer(copy.deepcopy(model), device=arguments.device, precision="fp32", tile=0)
        exact = exact_restorer.restore(photo)
        row = f"{task:<8}"
        for name in formats:
            fast = Restorer(copy.deepcopy(model), device=arguments.device, precision=name, tile=0).restore(photo)
            row += f" {psnr(fast, exact):>10.2f} dB {np.abs(fast - exact).max():>13.4f}"
        deep_exact = exact_restorer.restore(deep).astype(np.float64)
        deep_bf16 = Restorer(copy.deepcopy(model), device=arguments.device, precision="bf16", tile=0).restore(deep)
        deep_auto = Restorer(copy.deepcopy(model), device=arguments.device, precision="auto", tile=0).restore(deep)
        error = np.abs(deep_bf16 - deep_exact)
        # Bits kept: the full scale over the RMS error, in powers of two.
        bits = np.log2(65535 / np.sqrt(np.mean(error**2)))
        row += f" {error.mean():>13.1f} levels {bits:>9.2f} {np.abs(deep_auto - deep_exact).max():>11.0f}"
        print(row)


if __name__ == "__main__":
    main()
