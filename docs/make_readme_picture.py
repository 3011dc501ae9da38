"""Make the README's before/after picture: docs/images/denoise_before_after.png.

A noisy photo (scikit-image's CC0 `chelsea`, held out of training, plus Gaussian noise of
sigma 25/255: tests/trained_model.py) restored by the `mprnet denoise` command with the
small denoiser trained for the tests (tests/data/trained/tiny_denoiser.pth, 16 features
wide, trained for minutes on a CPU), not with a published checkpoint, which cannot be
fetched here. The picture says so.

Run from the repository root, after `pip install -r requirements-dev.txt`:

    python docs/make_readme_picture.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.trained_model import CHECKPOINT, noisy_photo, psnr  # noqa: E402 - needs the repository on the path

OUTPUT = ROOT / "docs" / "images" / "denoise_before_after.png"
HEIGHT, WIDTH = 204, 272
GAP, LABEL = 8, 22


def restore(noisy: np.ndarray, folder: Path) -> np.ndarray:
    """Through the command line, as a user would run it."""
    source, target = folder / "noisy.png", folder / "restored.png"
    Image.fromarray(noisy).save(source)
    subprocess.run([sys.executable, "-m", "mprnet_cli", "denoise", str(source), "-o", str(target),
                    "--weights", str(CHECKPOINT), "--precision", "fp32", "--quiet"], check=True, cwd=ROOT)
    return np.asarray(Image.open(target).convert("RGB"))


def main() -> None:
    clean, noisy_float = noisy_photo(HEIGHT, WIDTH)
    noisy = np.round(noisy_float * 255).astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        restored = restore(noisy, Path(folder))
    before = psnr(noisy.astype(np.float32) / 255, clean)
    after = psnr(restored.astype(np.float32) / 255, clean)

    canvas = Image.new("RGB", (2 * WIDTH + GAP, HEIGHT + 2 * LABEL), "white")
    canvas.paste(Image.fromarray(noisy), (0, 0))
    canvas.paste(Image.fromarray(restored), (WIDTH + GAP, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    draw.text((4, HEIGHT + 4), f"noisy input ({before:.1f} dB)", fill="black", font=font)
    draw.text((WIDTH + GAP + 4, HEIGHT + 4), f"mprnet denoise ({after:.1f} dB)", fill="black", font=font)
    draw.text((4, HEIGHT + LABEL + 3), "restored by the small test denoiser in tests/data/trained, "
              "not the published checkpoint", fill="dimgray", font=font)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(OUTPUT, optimize=True)
    print(f"{OUTPUT.relative_to(ROOT)}: {OUTPUT.stat().st_size / 1000:.0f} KB; PSNR {before:.2f} -> {after:.2f} dB")


if __name__ == "__main__":
    main()
