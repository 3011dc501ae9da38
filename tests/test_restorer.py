"""The Restorer: the published recipe end to end, and every pixel layout it accepts."""

from __future__ import annotations

import logging
import types
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from mprnet_cli import Restorer
from mprnet_cli.errors import DeviceError
from mprnet_cli.model import restorer as restorer_module
from mprnet_cli.model.config import MPRNetConfig
from mprnet_cli.model.network import MPRNet
from mprnet_cli.model.restorer import pad_to_multiple

from .conftest import PARITY, TINY_CHECKPOINT


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    return Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu")


@pytest.mark.parametrize("size", ["64x48", "61x45"])
def test_eight_bit_result_matches_the_authors_recipe(restorer: Restorer, size: str) -> None:
    source = np.asarray(Image.open(PARITY / f"input_{size}.png"))
    expected = np.asarray(Image.open(PARITY / f"restored_{size}.png")).astype(int)
    restored = restorer.restore(source)
    assert restored.dtype == np.uint8 and restored.shape == source.shape
    assert np.abs(restored.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16"])
def test_sixteen_bit_pil_images_stay_sixteen_bit(restorer: Restorer, mode: str) -> None:
    pixels = np.random.default_rng(3).integers(0, 65536, (24, 32), dtype=np.uint16)
    image = Image.frombytes(mode, (32, 24), pixels.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    restored = np.asarray(restorer.restore(image))
    assert restored.dtype == np.uint16 and restored.max() > 255
    np.testing.assert_array_equal(restored, restorer.restore(pixels))


def test_pil_images_are_taken_as_the_command_line_reads_files(restorer: Restorer) -> None:
    assert restorer.restore(Image.new("1", (16, 12), 1)).mode == "L"
    keyed = Image.new("RGB", (16, 12), (0, 255, 0))
    keyed.info["transparency"] = (0, 255, 0)
    assert restorer.restore(keyed).mode == "RGBA"
    for mode in ("I", "F"):
        with pytest.raises(ValueError, match="32-bit integer and float images are not supported"):
            restorer.restore(Image.new(mode, (16, 12)))


def test_byte_order_and_a_single_channel_axis_are_kept(restorer: Restorer) -> None:
    pixels = np.random.default_rng(4).integers(0, 65536, (24, 32), dtype=np.uint16)
    big_endian = restorer.restore(pixels.astype(">u2"))
    assert big_endian.dtype == np.dtype(">u2")
    np.testing.assert_array_equal(big_endian, restorer.restore(pixels))
    column = restorer.restore(pixels[..., None])
    assert column.shape == (24, 32, 1)
    np.testing.assert_array_equal(column[..., 0], restorer.restore(pixels))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_pixels_are_refused(restorer: Restorer, value: float) -> None:
    pixels = np.full((24, 32, 3), 0.5, dtype=np.float32)
    pixels[3, 4, 1] = value
    with pytest.raises(ValueError, match="NaN or infinite pixels"):
        restorer.restore(pixels)


def test_padding_reflects_like_the_recipe() -> None:
    image = torch.arange(6.0 * 5).reshape(1, 1, 6, 5)
    padded = pad_to_multiple(image)
    assert padded.shape == (1, 1, 8, 8)
    torch.testing.assert_close(padded, torch.nn.functional.pad(image, (0, 3, 0, 2), mode="reflect"))
    assert pad_to_multiple(torch.zeros(1, 3, 16, 8)).shape == (1, 3, 16, 8)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 2), (1, 9), (2, 17), (7, 7)])
def test_padding_works_for_sides_too_short_to_reflect(height: int, width: int) -> None:
    image = torch.rand(1, 3, height, width)
    padded = pad_to_multiple(image)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    torch.testing.assert_close(padded[..., :height, :width], image)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 2), (5, 13), (9, 1)])
def test_tiny_images_are_restored(restorer: Restorer, height: int, width: int) -> None:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert restorer.restore(image).shape == (height, width, 3)


def test_sixteen_bit_is_restored_in_float_not_squashed(restorer: Restorer) -> None:
    eight = np.asarray(Image.open(PARITY / "input_64x48.png"))
    sixteen = eight.astype(np.uint16) * 257 + np.random.default_rng(1).integers(0, 200, eight.shape).astype(np.uint16)
    restored = restorer.restore(sixteen)
    assert restored.dtype == np.uint16
    # Values between the 8-bit levels survive: the output is not an 8-bit image scaled up.
    assert np.count_nonzero(restored % 257) > restored.size // 2
    expected = restorer.restore_tensor(torch.from_numpy(sixteen / 65535.0).float().permute(2, 0, 1)[None])
    np.testing.assert_array_equal(restored, np.round(expected[0].permute(1, 2, 0).numpy() * 65535).astype(np.uint16))


def test_float_arrays_stay_float(restorer: Restorer) -> None:
    image = np.random.default_rng(2).random((16, 24, 3), dtype=np.float32)
    restored = restorer.restore(image)
    assert restored.dtype == np.float32 and 0.0 <= restored.min() and restored.max() <= 1.0


def test_alpha_passes_through_untouched(restorer: Restorer) -> None:
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    restored = restorer.restore(rgba)
    np.testing.assert_array_equal(restored[..., 3], rgba[..., 3])
    np.testing.assert_array_equal(restored[..., :3], restorer.restore(np.ascontiguousarray(rgba[..., :3])))


def test_gray_in_gray_out(restorer: Restorer) -> None:
    gray = np.random.default_rng(4).integers(0, 256, (20, 30), dtype=np.uint8)
    restored = restorer.restore(gray)
    assert restored.shape == (20, 30) and restored.dtype == np.uint8
    as_rgb = restorer.restore(np.repeat(gray[..., None], 3, axis=2)).astype(float).mean(axis=2)
    assert np.abs(restored - as_rgb).max() <= 1.0  # rounding the mean vs the mean of rounded channels
    gray_alpha = np.stack([gray, np.full_like(gray, 77)], axis=-1)
    restored_ga = restorer.restore(gray_alpha)
    np.testing.assert_array_equal(restored_ga[..., 0], restored)
    assert (restored_ga[..., 1] == 77).all()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "I;16", "P", "CMYK"])
def test_pil_images_keep_their_mode(restorer: Restorer, mode: str) -> None:
    image = Image.new("RGB", (24, 16), (120, 60, 30)).convert(mode)
    restored = restorer.restore(image)
    assert isinstance(restored, Image.Image) and restored.size == image.size
    expected_mode = {"P": "RGB", "CMYK": "RGB"}.get(mode, mode)
    assert restored.mode == expected_mode


def test_unsupported_inputs_are_refused(restorer: Restorer) -> None:
    with pytest.raises(TypeError, match="expected a numpy array or a PIL image, got list"):
        restorer.restore([[1, 2], [3, 4]])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="got shape"):
        restorer.restore(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="expected uint8, uint16 or float pixels, got int64"):
        restorer.restore(np.zeros((4, 4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"^an empty image \(0x5 pixels\) has nothing to restore$"):
        restorer.restore(np.zeros((0, 5, 3), dtype=np.uint8))


def _identity_model() -> MPRNet:
    """A small MPRNet whose last convolution is zero: its output is exactly its input."""
    model = MPRNet(MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1))
    torch.nn.init.zeros_(model.tail.weight)
    return model


@pytest.mark.parametrize("blend", ["core", "feather", "split"])
@pytest.mark.parametrize(("height", "width", "tile"), [(1, 1, 32), (7, 9, 32), (257, 513, 64), (100, 45, 40)])
def test_tiling_an_identity_model_gives_back_the_input_exactly(height: int, width: int, tile: int, blend: str) -> None:
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    restorer = Restorer(_identity_model(), device="cpu", tile=tile, tile_overlap=8, tile_blend=blend)
    np.testing.assert_array_equal(restorer.restore(image), image)


def test_tiled_result_does_not_depend_on_tiles_per_batch() -> None:
    image = np.random.default_rng(5).integers(0, 256, (96, 136, 3), dtype=np.uint8).astype(np.float32) / 255
    model = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu").model
    one = Restorer(model, device="cpu", tile=48, tile_overlap=16, tile_batch=1).restore(image)
    three = Restorer(model, device="cpu", tile=48, tile_overlap=16, tile_batch=3).restore(image)
    np.testing.assert_allclose(one, three, atol=1e-5)


def test_progress_is_reported_per_batch_of_tiles() -> None:
    calls: list[tuple[int, int]] = []
    restorer = Restorer(_identity_model(), device="cpu", tile=32, tile_overlap=8, tile_batch=2)
    restorer.restore(np.zeros((40, 60, 3), dtype=np.uint8), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 6), (2, 6), (4, 6), (6, 6)]  # 2 rows x 3 columns of tiles, two per call


class _RunsOutOfMemory(torch.nn.Module):
    """Wraps a network and fails like CUDA does when a call holds more than `limit` pixels,
    after making a tensor, as a real forward has made its activations when it fails."""

    def __init__(self, model: MPRNet, limit: int) -> None:
        super().__init__()
        self.inner, self.config, self.limit = model, model.config, limit
        self.sizes: list[tuple[int, ...]] = []
        self.failed_forwards: list[weakref.ref[torch.Tensor]] = []
        self.retried_beside_a_failed_forward = False

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.sizes.append(tuple(image.shape))
        if any(activations() is not None for activations in self.failed_forwards):
            self.retried_beside_a_failed_forward = True
        if image.shape[0] * image.shape[2] * image.shape[3] > self.limit:
            activations = torch.empty(image.shape)
            self.failed_forwards.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(image)


def test_out_of_memory_splits_the_batch_then_the_tile(caplog: pytest.LogCaptureFixture) -> None:
    image = np.random.default_rng(6).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    network = _RunsOutOfMemory(_identity_model(), limit=40 * 40)
    restorer = Restorer(_identity_model(), device="cpu", tile=64, tile_overlap=8, tile_batch=4)
    restorer.model = network
    np.testing.assert_array_equal(restorer.restore(image), image)
    assert network.sizes[:2] == [(4, 3, 64, 64), (2, 3, 64, 64)]
    assert (1, 3, 32, 32) in network.sizes
    assert not network.retried_beside_a_failed_forward  # its memory was freed first
    assert "out of memory with 4 tiles per batch; retrying with 2" in caplog.text
    assert "out of memory on a 64x64 tile; retrying it as 32x32 tiles" in caplog.text


def test_out_of_memory_halves_the_tiles_that_were_tried_not_the_batch_size() -> None:
    image = np.random.default_rng(6).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    restorer = Restorer(_identity_model(), device="cpu", tile=64, tile_overlap=8, tile_batch=16)
    network = _RunsOutOfMemory(restorer.model, limit=4 * 64 * 64)
    restorer.model = network
    np.testing.assert_array_equal(restorer.restore(image), image)
    assert [size[0] for size in network.sizes] == [9, 4, 4, 1]  # 9 tiles: not 16 // 2 = 8 next


def test_out_of_memory_below_the_smallest_tile_is_a_clear_error() -> None:
    restorer = Restorer(_identity_model(), device="cpu", tile=32, tile_overlap=8)
    restorer.model = _RunsOutOfMemory(restorer.model, limit=0)
    with pytest.raises(DeviceError, match="out of memory on the device running 32x32 tiles"):
        restorer.restore(np.zeros((40, 40, 3), dtype=np.uint8))


def test_whole_image_out_of_memory_falls_back_to_tiles_in_auto_mode(caplog: pytest.LogCaptureFixture) -> None:
    image = np.random.default_rng(7).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    restorer = Restorer(_identity_model(), device="cpu", tile_overlap=8)
    network = _RunsOutOfMemory(restorer.model, limit=48 * 48)
    restorer.model = network
    caplog.set_level(logging.DEBUG, logger="mprnet")
    np.testing.assert_array_equal(restorer.restore(image), image)
    assert network.sizes[0] == (1, 3, 80, 96) and network.sizes[1] == (1, 3, 40, 48)
    assert not network.retried_beside_a_failed_forward
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in caplog.text  # the allocator's account, for debugging
    exact = Restorer(_identity_model(), device="cpu", tile=0)
    exact.model = _RunsOutOfMemory(exact.model, limit=48 * 48)
    with pytest.raises(DeviceError, match="out of memory on the device running the whole image; use --tile auto"):
        exact.restore(image)


def test_auto_tile_shape_follows_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    restorer = Restorer(_identity_model(), device="cpu")
    per_pixel = restorer.bytes_per_pixel()
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: per_pixel * 300 * 300)
    assert restorer.tile_shape_for(200, 300) is None  # fits: the exact whole-image recipe
    assert restorer.tile_shape_for(400, 300) == (400, 168)  # two tiles, each no larger than needed
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: per_pixel * 4000 * 4000)
    assert restorer.tile_shape_for(1080, 1920) == (384, 664)  # the CPU cap: 9 tiles of 0.25 MP
    assert restorer.tiles_per_batch((560, 976)) == 1


def test_tlc_makes_auto_tiles_smaller_when_memory_is_tight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its buffers count: a budget the plain forward exactly fits leaves TLC short."""
    plain = Restorer(_identity_model(), device="cpu")
    local = Restorer(_identity_model(), device="cpu", tlc_train_size=16)
    assert (plain.bytes_per_pixel(), local.bytes_per_pixel()) == (960.0, 972.0)  # 12 ORSNet channels, 1 byte each
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: 960.0 * 304 * 304)  # sides round up to 8s
    assert plain.tile_shape_for(300, 300) is None
    assert local.tile_shape_for(300, 300) == (168, 304)  # two tiles
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: 972.0 * 304 * 304)
    assert local.tile_shape_for(300, 300) is None


def test_same_tiles_holds_one_shape_while_the_free_memory_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip's frames keep one tile grid, so its seams stay still from frame to frame."""
    restorer = Restorer(_identity_model(), device="cpu")
    per_pixel = restorer.bytes_per_pixel()
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: per_pixel * 300 * 300)
    with restorer.same_tiles(400, 300) as shape:
        monkeypatch.setattr(restorer_module, "memory_budget", lambda device: per_pixel * 4000 * 4000)
        assert shape == restorer.tile_shape_for(400, 300) == (400, 168)
        assert restorer.tile_shape_for(200, 300) is None  # other sizes follow the memory as before
    assert restorer.tile_shape_for(400, 300) is None  # released: the whole image fits now


def test_auto_tiles_per_batch_on_cuda_fill_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    restorer = Restorer(_identity_model(), device="cpu")
    restorer.device = torch.device("cuda")
    restorer._bytes_per_pixel = 1000.0
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: 1000.0 * 256 * 256 * 5.5)
    assert restorer.tiles_per_batch((256, 256)) == 5
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: 1000.0 * 256 * 256 * 100)
    assert restorer.tiles_per_batch((256, 256)) == restorer_module.MAX_TILE_BATCH
    assert restorer.tile_shape_for(1080, 1920) is None  # no CPU latency cap on a GPU: 6.5 MP fit


def test_frames_per_forward_fill_a_gpu_and_stay_one_on_the_cpu_or_when_tiled(monkeypatch: pytest.MonkeyPatch) -> None:
    restorer = Restorer(_identity_model(), device="cpu")
    assert restorer.frames_per_forward(64, 48) == 1
    restorer.device = torch.device("cuda")
    restorer._bytes_per_pixel = 1000.0
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: 1000.0 * 1080 * 1920 * 3.5)
    assert restorer.frames_per_forward(1080, 1920) == 3  # 1080 rounds up to 1088: 3 fit, not 3.5
    monkeypatch.setattr(restorer_module, "memory_budget", lambda device: 1000.0 * 1080 * 1920 * 0.9)
    assert restorer.frames_per_forward(1080, 1920) == 1  # tiled: one frame's tiles fill each forward
    assert Restorer(_identity_model(), device="cpu", tile=64, tile_batch=4).frames_per_forward(128, 128) == 1


def test_frames_in_one_forward_equal_frames_one_at_a_time(restorer: Restorer) -> None:
    frames = list(np.random.default_rng(8).integers(0, 256, (5, 24, 40, 3), dtype=np.uint8))
    batched = Restorer(restorer.model, device="cpu", tile_batch=5)
    calls: list[int] = []
    forward = batched._try_forward
    batched._try_forward = lambda batch: calls.append(len(batch)) or forward(batch)  # type: ignore[method-assign]
    restored = batched.restore_frames(frames)
    assert calls == [5]
    for got, frame in zip(restored, frames):
        np.testing.assert_array_equal(got, restorer.restore_array(frame))


def test_out_of_memory_splits_a_batch_of_frames() -> None:
    frames = list(np.random.default_rng(9).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    restorer = Restorer(_identity_model(), device="cpu", tile_batch=5)
    network = _RunsOutOfMemory(restorer.model, limit=2 * 32 * 32)
    restorer.model = network
    restored = restorer.restore_frames(frames)
    assert [size[0] for size in network.sizes] == [5, 2, 3, 1, 2]
    assert all(np.array_equal(got, frame) for got, frame in zip(restored, frames))
    assert not network.retried_beside_a_failed_forward


def test_freed_host_memory_is_released_before_stage_3_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _identity_model()
    stages: list[str] = []
    model.stage3_orsnet.register_forward_hook(lambda *_: stages.append("stage 3"))
    monkeypatch.setattr(restorer_module, "release_freed_host_memory", lambda: stages.append("release"))
    restorer = Restorer(model, device="cpu", tile=0)
    for height in (40, 40, 48):
        restorer.restore(np.zeros((height, 40, 3), dtype=np.uint8))
    Restorer(model, device="cpu", tile=0).restore(np.zeros((40, 40, 3), dtype=np.uint8))  # same model
    assert stages == ["release", "stage 3", "stage 3", "release", "stage 3", "stage 3"]


def _on_cuda(precision: str) -> Restorer:
    restorer = Restorer(_identity_model(), device="cpu", precision=precision)
    restorer.device = torch.device("cuda")  # the settings are flags of the CPU build too
    return restorer


@pytest.mark.parametrize("caller", [None, "conv tf32", "global tf32"])
def test_cudnn_autotunes_and_keeps_fp32_exact_only_inside_the_forward(caller: str | None) -> None:
    """Whatever precision setting the caller made, PyTorch's per-operator one or its global
    one, fp32 convolutions are IEEE inside, and every setting is as it was after."""
    cudnn, backends = torch.backends.cudnn, torch.backends
    before = (cudnn.benchmark, cudnn.conv.fp32_precision, backends.fp32_precision)
    try:
        if caller == "conv tf32":
            cudnn.conv.fp32_precision = "tf32"
        elif caller == "global tf32":
            backends.fp32_precision = "tf32"
        expected = (False, cudnn.conv.fp32_precision, backends.fp32_precision)
        cudnn.benchmark = False
        with _on_cuda("fp32").cudnn_settings():
            assert cudnn.benchmark and cudnn.conv.fp32_precision == "ieee"
        assert (cudnn.benchmark, cudnn.conv.fp32_precision, backends.fp32_precision) == expected
        with _on_cuda("bf16").cudnn_settings():  # no fp32 convolutions: precision left alone
            assert cudnn.benchmark and cudnn.conv.fp32_precision == expected[1]
    finally:
        cudnn.benchmark, cudnn.conv.fp32_precision, backends.fp32_precision = before


def test_cudnn_settings_use_the_tf32_switch_on_older_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    older = types.SimpleNamespace(benchmark=False, allow_tf32=True)  # before PyTorch 2.9: no `conv`
    monkeypatch.setattr(torch.backends, "cudnn", older)
    with _on_cuda("fp32").cudnn_settings():
        assert older.benchmark and not older.allow_tf32
    assert not older.benchmark and older.allow_tf32


@pytest.mark.parametrize(
    ("options", "message"),
    [({"tile": 33}, "tile size 33"), ({"tile": 64, "tile_overlap": 40}, "tile overlap 40 is too large"),
     ({"tile_blend": "x"}, "unknown tile blend"), ({"tile_batch": 0}, "tile_batch must be at least 1")],
)
def test_bad_tile_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Restorer(_identity_model(), device="cpu", **options)  # type: ignore[arg-type]


def test_bf16_stays_within_45_db_of_fp32_on_a_trained_model() -> None:
    from .trained_model import CHECKPOINT, noisy_photo, psnr

    _, noisy = noisy_photo(256, 320)
    exact = Restorer.from_checkpoint(CHECKPOINT, device="cpu", precision="fp32", tile=0).restore(noisy)
    fast = Restorer.from_checkpoint(CHECKPOINT, device="cpu", precision="bf16", tile=0)
    assert fast.dtype == torch.bfloat16
    assert psnr(fast.restore(noisy), exact) >= 45.0


def test_fp16_neither_overflows_nor_drops_below_40_db_on_a_trained_model() -> None:
    """fp16 is offered on GPUs only, but what it risks there (values past 65504, lost
    precision) comes from storing activations in fp16, which the CPU does alike: so the
    trained model is run in fp16 here, through the network directly."""
    from mprnet_cli.checkpoints import load_model
    from mprnet_cli.model.restorer import array_to_tensor

    from .trained_model import CHECKPOINT, noisy_photo, psnr

    _, noisy = noisy_photo(64, 96)  # small: the CPU has no fast fp16 convolution
    exact = Restorer.from_checkpoint(CHECKPOINT, device="cpu", precision="fp32", tile=0).restore(noisy)
    model = load_model(CHECKPOINT).half()
    with torch.inference_mode():
        stages = model(array_to_tensor(noisy).half())
    assert all(torch.isfinite(stage).all() for stage in stages)
    half = stages[0][0].float().clamp(0, 1).permute(1, 2, 0).numpy()
    assert psnr(half, exact) >= 40.0


def test_bf16_channel_means_match_fp32() -> None:
    from mprnet_cli.model.network import _spatial_mean

    x = torch.rand(2, 5, 24, 40)
    expected = x.mean(dim=(2, 3), keepdim=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        fast = _spatial_mean(x.to(torch.bfloat16).contiguous(memory_format=layout))
        assert fast.shape == (2, 5, 1, 1) and fast.dtype == torch.bfloat16
        torch.testing.assert_close(fast.float(), expected, atol=4e-3, rtol=0)


def test_auto_runs_deep_images_in_fp32_and_eight_bit_ones_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 keeps about 8 bits: a 16-bit image restored in it is 8-bit noise in 16-bit dress."""
    monkeypatch.setattr("mprnet_cli.devices.cpu_has_native_bf16", lambda: True)
    rng = np.random.default_rng(11)
    deep = rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16)
    eight = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    auto = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="auto", tile=0)
    exact = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="fp32", tile=0)
    fast = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="bf16", tile=0)
    assert auto.dtype == torch.bfloat16 and auto.restorer_for(np.dtype(np.uint8)) is auto
    np.testing.assert_array_equal(auto.restore(eight), fast.restore(eight))
    np.testing.assert_array_equal(auto.restore(deep), exact.restore(deep))
    assert not np.array_equal(fast.restore(deep), exact.restore(deep))  # bf16 is asked for by name only
    floats = deep.astype(np.float32) / 65535
    np.testing.assert_array_equal(auto.restore(floats), exact.restore(floats))
    twin = auto.restorer_for(np.dtype(">u2"))
    assert twin.dtype == torch.float32 and twin is auto.restorer_for(np.dtype(np.float32))
    batched = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="auto", tile=0, tile_batch=2)
    for got in batched.restore_frames([deep, deep]):  # frames of a clip take the same route: fp32, not bf16
        # A batch of two sums in another order than one image: 16-bit results may move by 1.
        assert np.abs(got.astype(np.int64) - exact.restore(deep)).max() <= 1


@pytest.mark.parametrize(("native", "precision", "warned"),
                         [(False, "bf16", True), (True, "bf16", False), (False, "fp32", False), (False, "auto", False)])
def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native: bool, precision: str,
        warned: bool) -> None:
    monkeypatch.setattr("mprnet_cli.devices.cpu_has_native_bf16", lambda: native)
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision=precision)
    assert restorer.dtype == (torch.bfloat16 if precision == "bf16" or (native and precision == "auto") else torch.float32)
    assert ("this CPU has no bf16 instructions: bf16 runs emulated here" in caplog.text) is warned


def test_the_fp32_twin_is_made_only_under_auto_and_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mprnet_cli.devices.cpu_has_native_bf16", lambda: True)
    auto = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="auto")
    assert auto._fp32_twin is None and auto._fp32_model is not None
    assert (auto.dtype, auto.deep_dtype) == (torch.bfloat16, torch.float32)
    auto.restorer_for(np.dtype(np.uint16))
    assert auto.deep_dtype == torch.float32
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        named = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision=precision)
        assert named.restorer_for(np.dtype(np.uint16)) is named and named._fp32_model is None
        assert named.deep_dtype == dtype


# --- Self-ensemble ------------------------------------------------------------------------


class _EquivariantNet(MPRNet):
    """Not MPRNet inside (whose patches make it equivariant to flips but not to quarter
    turns): a blur whose kernel every flip and turn leaves alone, then a sigmoid. It
    commutes with all eight poses of an image whose sides are multiples of 8."""

    def __init__(self) -> None:
        super().__init__(MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1))
        self.register_buffer("kernel", torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]).div(16).expand(3, 1, 3, 3))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = torch.sigmoid(4 * torch.nn.functional.conv2d(image, self.kernel, padding=1, groups=3) - 2)
        return out, out, out


@pytest.mark.parametrize("ensemble", [2, 4, 8])
def test_an_equivariant_model_gains_nothing_from_the_ensemble(ensemble: int) -> None:
    model = _EquivariantNet()
    image = np.random.default_rng(0).random((48, 64, 3), dtype=np.float32)
    plain = Restorer(model, device="cpu", precision="fp32", tile=0).restore(image)
    assert np.abs(plain - image).max() > 0.2  # the model does something
    averaged = Restorer(model, device="cpu", precision="fp32", tile=0, ensemble=ensemble).restore(image)
    np.testing.assert_allclose(averaged, plain, atol=2e-6, rtol=0)


def test_ensemble_of_one_is_todays_result_and_two_adds_the_mirror_image(restorer: Restorer) -> None:
    image = np.random.default_rng(1).random((45, 61, 3), dtype=np.float32)
    plain = restorer.restore(image)
    np.testing.assert_array_equal(Restorer(restorer.model, device="cpu", ensemble=1).restore(image), plain)
    mirrored = restorer.restore(np.ascontiguousarray(image[:, ::-1]))[:, ::-1]
    two = Restorer(restorer.model, device="cpu", ensemble=2).restore(image)
    assert np.abs(mirrored - plain).max() > 0.01  # the tiny model is not equivariant
    np.testing.assert_allclose(two, (plain + mirrored) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tile", [0, 32])
def test_ensemble_runs_one_forward_at_a_time_per_tile(tile: int) -> None:
    """Accumulated, not stacked: each forward takes one tile (or image) in one of its eight
    poses, so memory stays that of a plain forward."""
    model = _identity_model()
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _, inputs: shapes.append(tuple(inputs[0].shape)))
    image = np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    restored = Restorer(model, device="cpu", tile=tile, tile_overlap=8, ensemble=8).restore(image)
    np.testing.assert_array_equal(restored, image)  # every pose turned back exactly
    tiles = 1 if tile == 0 else len(shapes) // 8
    side = (40, 56) if tile == 0 else (32, 32)
    assert len(shapes) == 8 * tiles
    assert set(shapes) == {(1, 3, *side), (1, 3, *side[::-1])}


def test_ensemble_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="ensemble must be one of 1, 2, 4, 8, got 3"):
        Restorer(_identity_model(), device="cpu", ensemble=3)


def test_the_fp32_twin_restores_as_its_restorer_was_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mprnet_cli.devices.cpu_has_native_bf16", lambda: True)
    auto = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="auto", tile=32, tile_overlap=8,
                                    tile_blend="core", tlc_train_size=64, ensemble=2)
    twin = auto.restorer_for(np.dtype(np.uint16))
    assert (twin.tile, twin.tile_overlap, twin.tile_blend, twin.tlc_train_size, twin.ensemble) == (32, 8, "core", 64, 2)
