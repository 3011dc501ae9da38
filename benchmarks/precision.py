"""How far bf16 (and, on a GPU, fp16) output lies from the exact fp32 path, for each
published width.

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
    print(f"{'task':<8}" + "".join(f" {name + ' vs fp32':>13} {'max abs diff':>13}" for name in formats))
    for task, config in TASK_CONFIGS.items():
        torch.manual_seed(0)
        model = MPRNet(config)
        exact = Restorer(model, device=arguments.device, precision="fp32", tile=0).restore(photo)
        row = f"{task:<8}"
        for name in formats:
            # A copy: a Restorer casts the model it is given in place (fp32 to fp32 is lossless).
            fast = Restorer(copy.deepcopy(model), device=arguments.device, precision=name, tile=0).restore(photo)
            row += f" {psnr(fast, exact):>10.2f} dB {np.abs(fast - exact).max():>13.4f}"
        print(row)


if __name__ == "__main__":
    main()
