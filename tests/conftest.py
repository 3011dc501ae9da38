"""Every test runs with its own caches and config, offline from the real hub."""

from __future__ import annotations

import io
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent / "data"
PARITY = DATA / "parity"
TINY_CHECKPOINT = PARITY / "tiny_checkpoint.pth"


def interruptible() -> None:
    """`preexec_fn` of a child that a test sends SIGINT: a shell starts background jobs (a
    test run with `&`) with SIGINT ignored, children inherit that, and Python then leaves
    it ignored, as it should for a user's background job."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pil_bytes(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """`image` encoded by Pillow, as a file of that format would hold it."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def isolated_user_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every cache and config location at a fresh folder, and drop user overrides."""
    home = tmp_path_factory.mktemp("home")
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "MPRNET_DEBUG", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in __import__("os").environ if n.startswith("MPRNET_")]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return home


@pytest.fixture
def tiny_checkpoint() -> Path:
    """The seeded random tiny MPRNet (n_feat 16/8/8) saved as the authors save checkpoints."""
    return TINY_CHECKPOINT


@pytest.fixture(autouse=True)
def restored_logger() -> Iterator[None]:
    """The CLI configures the `mprnet` logger for its process; undo that between tests."""
    logger = logging.getLogger("mprnet")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def write_image(path: Path, width: int = 12, height: int = 10, fmt: str | None = None, *, noise: bool = False) -> Path:
    """Save a small RGB image at `path` (folders made as needed): flat grey, or with
    `noise` pixels seeded by the path, so that every file differs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise:
        pixels = np.random.default_rng(len(str(path))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        pixels = np.full((height, width, 3), 90, dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path
