"""How far --tlc moves the small trained denoiser's output on the 768x1024 noisy photo
(fp32, whole image), with windows for its 64-pixel training crops and for 32-pixel ones.

    python benchmarks/tlc_effect.py

Run it under the shared CPU lock (flock /tmp/mprnet-cpu.lock ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mprnet_cli import Restorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.trained_model import CHECKPOINT, noisy_photo, psnr  # noqa: E402 - needs the repository on the path


def main() -> None:
    clean, noisy = noisy_photo()
    plain = Restorer.from_checkpoint(CHECKPOINT, device="cpu", precision="fp32", tile=0)
    base = plain.restore(noisy)
    for size in (64, 32):
        local = Restorer(plain.model, device="cpu", precision="fp32", tile=0, tlc_train_size=size).restore(noisy)
        print(f"tlc train {size}: vs plain {psnr(local, base):.2f} dB, max diff {np.abs(local - base).max():.4f}, "
              f"vs clean {psnr(local, clean):.3f} (plain {psnr(base, clean):.3f})")


if __name__ == "__main__":
    main()
