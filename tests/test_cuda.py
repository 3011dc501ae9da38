"""The CUDA path on a real GPU: skipped where there is none (CI has none).

What runs without a GPU (device and precision choice, tile batching, out-of-memory
fallback through a simulated error) is tested in test_devices.py and test_restorer.py;
these check the same things against CUDA itself: its kernels, its memory and its errors.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mprnet_cli import Restorer
from mprnet_cli.model import graphs
from mprnet_cli.model.config import TASK_CONFIGS
from mprnet_cli.model.network import MPRNet
from mprnet_cli.model.restorer import MAX_TILE_BATCH

from .conftest import PARITY, TINY_CHECKPOINT
from .trained_model import CHECKPOINT, noisy_photo, outside_centre_lines, psnr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def empty_device() -> Iterator[None]:
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


@pytest.mark.parametrize("size", ["64x48", "61x45"])
def test_fp32_on_cuda_matches_the_authors_code(size: str) -> None:
    """fp32 is the exact reference on the GPU too: no TF32 in the convolutions."""
    expected = np.load(PARITY / f"expected_{size}.npz")
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cuda", precision="fp32", tile=0)
    restored = restorer.restore_tensor(torch.from_numpy(expected["padded_input"])[None])
    np.testing.assert_allclose(restored[0].numpy(), expected["stage3"].clip(0, 1), atol=1e-5, rtol=0)


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="PyTorch before 2.9: no per-operator setting")
@pytest.mark.parametrize("owner", ["cudnn.conv", "cuda.matmul", "backends"])
def test_fp32_stays_exact_when_the_caller_turned_tf32_on(owner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's TF32 (for their convolutions, their matrix products, or everything) is
    not used by our forward, and their setting is left as they made it."""
    settings = {"cudnn.conv": torch.backends.cudnn.conv, "cuda.matmul": torch.backends.cuda.matmul,
                "backends": torch.backends}[owner]
    monkeypatch.setattr(settings, "fp32_precision", "tf32")
    expected = np.load(PARITY / "expected_64x48.npz")
    image = torch.from_numpy(expected["padded_input"])[None]
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cuda", precision="fp32", tile=0)
    with torch.inference_mode():  # the caller's own forward does run in TF32
        loose = restorer.model(image.cuda().contiguous(memory_format=torch.channels_last))[0].clamp(0, 1).cpu()
    assert np.abs(loose[0].numpy() - expected["stage3"].clip(0, 1)).max() > 1e-5
    restored = restorer.restore_tensor(image)
    np.testing.assert_allclose(restored[0].numpy(), expected["stage3"].clip(0, 1), atol=1e-5, rtol=0)
    assert settings.fp32_precision == "tf32"


def test_auto_precision_on_cuda_is_bf16_within_45_db_of_fp32() -> None:
    _, noisy = noisy_photo(256, 320)
    exact = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="fp32", tile=0).restore(noisy)
    fast = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="auto", tile=0)
    assert fast.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    assert psnr(fast.restore(noisy), exact) >= 45.0


def test_fp16_on_cuda_is_finite_and_within_40_db_of_fp32() -> None:
    _, noisy = noisy_photo(256, 320)
    exact = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="fp32", tile=0).restore(noisy)
    half = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="fp16", tile=0).restore(noisy)
    assert np.isfinite(half).all() and psnr(half, exact) >= 40.0


def test_tiles_batched_on_cuda_equal_tiles_one_at_a_time() -> None:
    _, noisy = noisy_photo(300, 420)
    batched = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="fp32", tile=128)
    assert batched.tiles_per_batch((128, 128)) == MAX_TILE_BATCH  # a GPU has room for many
    single = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="fp32", tile=128, tile_batch=1)
    np.testing.assert_allclose(batched.restore(noisy), single.restore(noisy), atol=1e-4, rtol=0)


def test_tiles_replayed_from_a_cuda_graph_equal_eager_ones(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each replay's output is copied out before the next tile (or image) overwrites it."""
    monkeypatch.setattr(graphs, "KEEP_RATIO", float("inf"))  # kept however the timing falls
    _, noisy = noisy_photo(200, 264)
    images = [noisy, np.ascontiguousarray(noisy[::-1])]
    options = {"device": "cuda", "precision": "fp32", "tile": 64, "tile_batch": 1}
    eager = Restorer.from_checkpoint(CHECKPOINT, cuda_graphs=False, **options)
    graphed = Restorer.from_checkpoint(CHECKPOINT, **options)
    with caplog.at_level(logging.DEBUG, logger="mprnet"):
        for image in images:
            np.testing.assert_allclose(graphed.restore(image), eager.restore(image), atol=1e-6, rtol=0)
    assert "CUDA graph for (1, 3, 64, 64)" in caplog.text and "replayed: kept" in caplog.text


def test_tlc_replayed_from_a_cuda_graph_equals_tlc_run_eagerly_and_on_the_cpu(caplog: pytest.LogCaptureFixture,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The windows are set around the capture as around an eager forward (train size 16:
    windows smaller than the maps of 64x64 tiles), and the GPU's running sums (`cumsum`)
    agree with the CPU's."""
    monkeypatch.setattr(graphs, "KEEP_RATIO", float("inf"))  # kept however the timing falls
    _, noisy = noisy_photo(200, 264)
    options = {"precision": "fp32", "tile": 64, "tile_batch": 1, "tlc_train_size": 16}
    eager = Restorer.from_checkpoint(CHECKPOINT, device="cuda", cuda_graphs=False, **options)
    graphed = Restorer.from_checkpoint(CHECKPOINT, device="cuda", **options)
    with caplog.at_level(logging.DEBUG, logger="mprnet"):
        for image in (noisy, np.ascontiguousarray(noisy[::-1])):
            np.testing.assert_allclose(graphed.restore(image), eager.restore(image), atol=1e-6, rtol=0)
    assert "CUDA graph for (1, 3, 64, 64)" in caplog.text and "replayed: kept" in caplog.text
    on_cpu = Restorer.from_checkpoint(CHECKPOINT, device="cpu", **options).restore(noisy)
    np.testing.assert_allclose(eager.restore(noisy), on_cpu, atol=1e-5, rtol=0)
    plain = Restorer.from_checkpoint(CHECKPOINT, device="cpu", precision="fp32", tile=64, tile_batch=1).restore(noisy)
    assert np.abs(on_cpu - plain).max() > 5e-4  # 8e-4 on the CPU: TLC does change it


@pytest.mark.parametrize("tlc_train_size", [None, 64])
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_the_memory_probe_bounds_a_larger_forward(precision: str, tlc_train_size: int | None) -> None:
    """Auto tiling sizes tiles from a forward at 256x256: it must not under-estimate larger
    ones, nor count the workspaces that cuDNN tries once per shape. With TLC too, whose
    windows (96 pixels in stage 3 for train size 64) are smaller than the larger forward's
    maps: the local means' buffers count."""
    torch.manual_seed(0)
    restorer = Restorer(MPRNet(TASK_CONFIGS["derain"]), device="cuda", precision=precision, cuda_graphs=False,
                        tlc_train_size=tlc_train_size)
    per_pixel = restorer.bytes_per_pixel()
    image = torch.rand(1, 3, 512, 768)
    restorer.restore_tensor(image)  # cuDNN's first call per shape tries its kernels' workspaces
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    restorer.restore_tensor(image)
    measured = (torch.cuda.max_memory_allocated() - before) / (512 * 768)
    assert 0.3 * per_pixel <= measured <= per_pixel


def test_real_out_of_memory_falls_back_to_fewer_and_smaller_tiles(caplog: pytest.LogCaptureFixture) -> None:
    """The device is capped to room for about two 256x256 tiles; free memory, which plans
    the tiles, does not know the cap, so the plan runs out of memory for real."""
    clean, noisy = noisy_photo(768, 1024)
    whole = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="fp32", tile=0).restore(noisy)
    restorer = Restorer.from_checkpoint(CHECKPOINT, device="cuda", precision="fp32")
    room = restorer.bytes_per_pixel() * 256 * 256 * 2
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + room) / total)
    with caplog.at_level(logging.WARNING, logger="mprnet"):
        tiled = restorer.restore(noisy)
    assert "out of memory" in caplog.text
    assert "as 128x96 tiles" not in caplog.text  # 256x192 tiles fit once failed forwards are freed
    assert psnr(outside_centre_lines(tiled), outside_centre_lines(whole)) >= 40.0
    assert abs(psnr(tiled, clean) - psnr(whole, clean)) <= 0.1


def test_the_command_line_runs_on_cuda(tmp_path: Path) -> None:
    _, noisy = noisy_photo(200, 300)
    source, target = tmp_path / "noisy.png", tmp_path / "clean.png"
    Image.fromarray((noisy * 255).round().astype(np.uint8)).save(source)
    command = [str(Path(sys.executable).parent / "mprnet"), "denoise", str(source), "-o", str(target),
               "--weights", str(CHECKPOINT), "--device", "cuda"]
    finished = subprocess.run(command, capture_output=True, env={**os.environ, "NO_COLOR": "1"}, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()
    assert np.asarray(Image.open(target)).shape == (200, 300, 3)
