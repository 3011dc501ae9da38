"""Train the tiny MPRNet denoiser stored next to this file as `tiny_denoiser.pth`.

Why it exists: tiling tests need a model whose output is a real image, not noise, so
that seams or misplaced tiles show up as a drop in quality. A randomly initialised
network cannot tell us that; this one, trained for a few minutes on CPU, can.

What it does: trains `MPRNet(MPRNetConfig(n_feat=16, scale_unetfeats=8,
scale_orsnetfeats=8))` to remove additive Gaussian noise of sigma 25/255 from images in
[0, 1]. The noisy input is clean + N(0, 25/255) and is NOT clipped (the usual synthetic
benchmark setting). Loss: Charbonnier loss of each of the three stage outputs against
the clean crop, summed, as the MPRNet authors do. Everything is seeded, so a rerun on
the same torch version and thread count writes the same file.

Images, all shipped inside scikit-image (`skimage.data`), licences as stated in their
docstrings:
    training:  astronaut  -- NASA, public domain
               coffee     -- Rachel Michetti, CC0
               rocket     -- SpaceX, public domain
    held out:  chelsea    -- Stefan van der Walt, CC0
Other CC0 / public-domain colour images there (retina, hubble_deep_field) are mostly
black background and are left out.

Run from the repository root:  python tests/data/trained/make_tiny_denoiser.py
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data
from torch import Tensor

from mprnet_cli.model.config import MPRNetConfig
from mprnet_cli.model.network import SIZE_MULTIPLE, MPRNet

OUTPUT = Path(__file__).with_name("tiny_denoiser.pth")
CONFIG = MPRNetConfig(n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8)
SIGMA = 25 / 255
SEED = 0
STEPS = 300
BATCH = 8
CROP = 64
LR = 2e-3
MIN_LR = 1e-5
CHARBONNIER_EPS = 1e-3


def to_float(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> HxWx3 float32 in [0, 1]."""
    return image.astype(np.float32) / 255.0


def random_crops(images: list[np.ndarray], rng: np.random.Generator) -> Tensor:
    """A Bx3xCROPxCROP batch of random crops, randomly flipped and rotated."""
    crops = []
    for _ in range(BATCH):
        image = images[rng.integers(len(images))]
        top = rng.integers(image.shape[0] - CROP + 1)
        left = rng.integers(image.shape[1] - CROP + 1)
        crop = image[top : top + CROP, left : left + CROP]
        crop = np.rot90(crop, k=rng.integers(4))
        if rng.integers(2):
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop.transpose(2, 0, 1)))
    return torch.from_numpy(np.stack(crops))


def add_noise(clean: Tensor, generator: torch.Generator) -> Tensor:
    return clean + SIGMA * torch.randn(clean.shape, generator=generator)


def charbonnier(output: Tensor, target: Tensor) -> Tensor:
    return torch.sqrt((output - target) ** 2 + CHARBONNIER_EPS**2).mean()


def psnr(output: Tensor, target: Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    return 10 * math.log10(1.0 / torch.mean((output - target) ** 2).item())


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)
    noise = torch.Generator().manual_seed(SEED)

    training = [to_float(data.astronaut()), to_float(data.coffee()), to_float(data.rocket())]
    held_out = to_float(data.chelsea())
    height = held_out.shape[0] // SIZE_MULTIPLE * SIZE_MULTIPLE
    width = held_out.shape[1] // SIZE_MULTIPLE * SIZE_MULTIPLE
    test_clean = torch.from_numpy(held_out[:height, :width].transpose(2, 0, 1).copy())[None]
    test_noisy = add_noise(test_clean, torch.Generator().manual_seed(SEED + 1))

    model = MPRNet(CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS, eta_min=MIN_LR)

    start = time.perf_counter()
    model.train()
    for step in range(1, STEPS + 1):
        clean = random_crops(training, rng)
        outputs = model(add_noise(clean, noise))
        loss = sum(charbonnier(output, clean) for output in outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        denoised = model(test_noisy)[0].clamp(0, 1)
    torch.save({"state_dict": model.state_dict()}, OUTPUT)

    print(f"steps: {STEPS}")
    print(f"training wall time: {seconds:.1f} s")
    print(f"held-out chelsea {height}x{width}, sigma 25/255:")
    print(f"  PSNR noisy    vs clean: {psnr(test_noisy, test_clean):.2f} dB")
    print(f"  PSNR denoised vs clean: {psnr(denoised, test_clean):.2f} dB")
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
