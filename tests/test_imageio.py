"""Decoding and encoding: pixel formats, frames, errors, and atomic writes (metadata: test_metadata.py)."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from mprnet_cli import imageio
from mprnet_cli.errors import InputError, OutputError
from mprnet_cli.imageio import Picture, decode_image, encode_image, format_for, read_image, write_atomic

from . import hostile_corpus
from .conftest import pil_bytes

RNG = np.random.default_rng(7)


def _cv2_bytes(pixels_rgb: np.ndarray, ext: str) -> bytes:
    order = cv2.COLOR_RGBA2BGRA if pixels_rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(pixels_rgb, order))
    assert ok
    return encoded.tobytes()


@pytest.mark.parametrize(("shape", "mode"), [((5, 7, 3), "RGB"), ((5, 7), "L"), ((5, 7, 4), "RGBA"), ((5, 7, 2), "LA")])
def test_eight_bit_modes_round_trip_exactly(shape: tuple[int, ...], mode: str) -> None:
    pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    picture = decode_image(pil_bytes(Image.fromarray(pixels)), "x")
    assert Image.open(io.BytesIO(encode_image(picture, "PNG"))).mode == mode
    assert picture.pixels.dtype == np.uint8
    np.testing.assert_array_equal(picture.pixels, pixels)
    again = decode_image(encode_image(picture, "PNG"), "y")
    np.testing.assert_array_equal(again.pixels, pixels)


def test_black_and_white_becomes_grayscale() -> None:
    bits = RNG.integers(0, 2, (5, 7)).astype(bool)
    picture = decode_image(pil_bytes(Image.fromarray(bits)), "bits.png")
    np.testing.assert_array_equal(picture.pixels, np.where(bits, 255, 0).astype(np.uint8))


def test_sixteen_bit_gray_png_stays_sixteen_bit() -> None:
    pixels = RNG.integers(0, 65536, (6, 4), dtype=np.uint16)
    picture = decode_image(pil_bytes(Image.fromarray(pixels)), "gray16.png")
    assert picture.pixels.dtype == np.uint16
    np.testing.assert_array_equal(picture.pixels, pixels)
    np.testing.assert_array_equal(decode_image(encode_image(picture, "PNG"), "again").pixels, pixels)


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_sixteen_bit_colour_is_read_and_written_as_sixteen_bit(channels: int, ext: str) -> None:
    pixels = RNG.integers(0, 65536, (6, 5, channels), dtype=np.uint16)
    picture = decode_image(_cv2_bytes(pixels, ext), f"colour16{ext}")
    assert picture.pixels.dtype == np.uint16
    np.testing.assert_array_equal(picture.pixels, pixels)
    fmt = "PNG" if ext == ".png" else "TIFF"
    np.testing.assert_array_equal(decode_image(encode_image(picture, fmt), "again").pixels, pixels)


def test_sixteen_bit_to_jpeg_is_written_as_eight_bit(caplog: pytest.LogCaptureFixture) -> None:
    picture = Picture(np.full((4, 4, 3), 65535, dtype=np.uint16))
    decoded = decode_image(encode_image(picture, "JPEG"), "x")
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.min() >= 250
    assert "JPEG cannot store 16 bits per channel; writing 8 bits" in caplog.text


def test_alpha_is_dropped_with_a_warning_where_the_format_has_none(caplog: pytest.LogCaptureFixture) -> None:
    picture = Picture(np.zeros((4, 4, 4), dtype=np.uint8))
    assert decode_image(encode_image(picture, "JPEG"), "x").pixels.shape == (4, 4, 3)
    assert "JPEG cannot store transparency; the alpha channel is dropped" in caplog.text


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_cleared(orientation: int) -> None:
    pixels = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    source = pil_bytes(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(source))))
    picture = decode_image(source, "x")
    np.testing.assert_array_equal(picture.pixels, expected)
    # The 16-bit path orients with numpy; it must agree with Pillow.
    np.testing.assert_array_equal(imageio._orient(pixels, orientation), expected)
    written = Image.open(io.BytesIO(encode_image(picture, "PNG")))
    assert written.getexif().get(0x0112, 1) == 1


def test_palette_image_becomes_rgb() -> None:
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 0, 0])
    picture = decode_image(pil_bytes(palette_image), "p.png")
    assert picture.pixels.shape == (4, 4, 3)
    assert tuple(picture.pixels[0, 0]) == (200, 0, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "x.png: empty file, not an image"),
        (b"hello, not an image", "x.png: not an image, or a format mprnet cannot read"),
    ],
)
def test_undecodable_bytes(data: bytes, message: str) -> None:
    with pytest.raises(InputError) as error:
        decode_image(data, "x.png")
    assert error.value.message == message


def test_truncated_image() -> None:
    data = pil_bytes(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match=r"^cut.png: truncated or corrupt image"):
        decode_image(data[: len(data) // 2], "cut.png")


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(InputError) as error:
        decode_image(pil_bytes(Image.new("RGB", (100, 50))), "big.png", max_pixels=4999)
    assert error.value.message == "big.png: 100x50 is over the 4,999-pixel limit (raise it with --max-pixels)"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.png: no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="is a directory"):
        read_image(tmp_path)


def test_output_format_comes_from_the_extension() -> None:
    assert [format_for(Path(f"a{ext}")) for ext in (".PNG", ".jpeg", ".webp", ".tif", ".bmp")] == [
        "PNG", "JPEG", "WEBP", "TIFF", "BMP",
    ]
    with pytest.raises(OutputError, match=r"a.gif: unknown output format '.gif'"):
        format_for(Path("a.gif"))
    with pytest.raises(OutputError, match=r"^out: no extension to choose the output format by .*; "
                                          r"for a directory, write out/$"):
        format_for(Path("out"))


@pytest.mark.parametrize(("mode", "key", "restored"), [("RGB", (0, 255, 0), "RGBA"), ("L", 255, "LA")])
def test_a_colour_key_becomes_alpha(mode: str, key: object, restored: str) -> None:
    image = Image.new(mode, (4, 3), key)
    image.putpixel((0, 0), 0 if mode == "L" else (1, 2, 3))
    picture = decode_image(pil_bytes(image, "PNG", transparency=key), "keyed.png")
    assert Image.open(io.BytesIO(encode_image(picture, "PNG"))).mode == restored
    alpha = picture.pixels[..., -1]
    assert alpha[0, 0] == 255 and (alpha.ravel()[1:] == 0).all()


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_only_the_first_frame_is_restored_and_the_user_is_told(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
    source = pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:])
    picture = decode_image(source, f"pages.{fmt.lower()}")
    assert picture.pixels.shape[:2] == (6, 8)
    assert f"pages.{fmt.lower()}: has 3 frames or pages; only the first is restored" in caplog.text


def _tiff_pages(count: int) -> bytes:
    page = Image.new("RGB", (8, 6), (1, 2, 3))
    return pil_bytes(page, "TIFF", save_all=True, append_images=[page] * (count - 1))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_damaged_later_page_costs_only_the_later_pages(caplog: pytest.LogCaptureFixture) -> None:
    truncated = _tiff_pages(3)[:576]  # the first page whole, the rest cut off
    assert decode_image(truncated, "scan.tif").pixels.shape == (6, 8, 3)
    assert "scan.tif: only the first frame or page is restored; the others are unreadable" in caplog.text


def test_a_jpegs_extra_pictures_are_not_pages(caplog: pytest.LogCaptureFixture) -> None:
    photo = Image.new("RGB", (40, 30), (9, 8, 7))
    source = pil_bytes(photo, "MPO", save_all=True, append_images=[photo.resize((10, 8))])  # a preview
    assert decode_image(source, "photo.jpg").pixels.shape == (30, 40, 3)
    assert caplog.records == []


def test_cmyk_becomes_rgb_without_its_cmyk_profile(caplog: pytest.LogCaptureFixture) -> None:
    """A CMYK profile cannot describe the RGB pixels written out; viewers would reject it."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    picture = decode_image(pil_bytes(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG", icc_profile=profile), "ink.jpg")
    assert picture.pixels.shape == (6, 8, 3) and picture.icc_profile is None
    assert "ink.jpg: CMYK is converted to RGB without colour management; its CMYK colour profile is dropped" in caplog.text


def test_write_atomic_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    write_atomic(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_write_atomic_keeps_the_permissions_of_the_file_it_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    write_atomic(target, b"new")
    assert target.stat().st_mode & 0o777 == 0o640


def test_write_atomic_takes_a_name_at_the_file_systems_limit(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the most ext4 and most others take
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_write_atomic_over_the_limit_is_one_plain_error(tmp_path: Path) -> None:
    target = tmp_path / ("x" * 252 + ".png")
    with pytest.raises(OutputError, match=r"cannot write \(File name too long\)$"):
        write_atomic(target, b"new")


def test_write_atomic_into_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as error:
        write_atomic(tmp_path / "missing" / "out.png", b"x")
    assert error.value.message == f"{tmp_path / 'missing' / 'out.png'}: cannot write (No such file or directory)"


def test_interrupted_write_leaves_the_old_file_and_no_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def fail_fsync(descriptor: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio.os, "fsync", fail_fsync)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_disk_full_is_an_output_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio.os, "fsync", disk_full)
    with pytest.raises(OutputError, match=r"out.png: cannot write \(No space left on device\)"):
        write_atomic(tmp_path / "out.png", b"new")
    assert list(tmp_path.iterdir()) == []


# --- files from the wild: bombs, colour keys, alpha, damaged profiles ---------------------

#: Enough for Python, numpy, Pillow and OpenCV; far less than any bomb here would allocate.
ADDRESS_SPACE = 2 * 1024**3

_DECODE_BOMBS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from pathlib import Path
from mprnet_cli.errors import InputError
from mprnet_cli.imageio import read_image
for path in sys.argv[1:]:
    try:
        read_image(Path(path), max_pixels=250_000_000)
        print(path, "decoded")
    except InputError as error:
        print(error.message)
"""


def test_a_bomb_is_refused_by_its_declared_size_before_anything_is_allocated(tmp_path: Path) -> None:
    """In a process with little address space: a decoder that trusted a header would fail
    with MemoryError there, not take the machine."""
    paths = []
    for name, make in hostile_corpus.BOMBS.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(make())
    finished = subprocess.run([sys.executable, "-c", _DECODE_BOMBS.format(limit=ADDRESS_SPACE), *map(str, paths)],
                              capture_output=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    lines = dict(zip(map(str, paths), finished.stdout.decode().splitlines()))
    over = "pixels, over the 250,000,000-pixel limit (raise it with --max-pixels)"
    for name, declared in [("bomb.png", 200_000**2), ("bomb.tif", 200_000**2), ("bomb.bmp", 200_000**2),
                           ("bomb.icns", 200_000**2), ("frame_bomb.gif", 60_000**2), ("bomb.jpg", 65_000**2)]:
        assert lines[str(tmp_path / name)] == f"{tmp_path / name}: declares an image of {declared:,} {over}"
    # A tile larger than its image is never allocated: libtiff finds too little data.
    assert lines[str(tmp_path / "tile_bomb.tif")].startswith(f"{tmp_path / 'tile_bomb.tif'}: truncated or corrupt image")
    assert finished.stderr == b""


def test_opencv_gets_the_pixel_limit_before_it_loads(tmp_path: Path) -> None:
    script = (
        "import numpy as np\n"
        "from mprnet_cli.imageio import limit_decoders\n"
        "limit_decoders(1000)\n"
        "import cv2\n"
        "ok, png = cv2.imencode('.png', np.zeros((40, 40, 3), np.uint16))\n"
        "try:\n"
        "    cv2.imdecode(png, cv2.IMREAD_UNCHANGED)\n"
        "except cv2.error as error:\n"
        "    print('refused' if 'CV_IO_MAX_IMAGE_PIXELS' in str(error) else error)\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert finished.stdout.decode().strip() == "refused", finished.stderr


def test_pillow_checks_each_part_of_a_file_against_the_limit() -> None:
    """The icon reports 512x512 when opened; its entry declares 200000x200000."""
    with pytest.raises(InputError) as error:
        decode_image(hostile_corpus.icns_bomb(), "icon.icns", max_pixels=1_000_000)
    assert error.value.message == ("icon.icns: declares an image of 40,000,000,000 pixels, over the 1,000,000-pixel limit "
                                   "(raise it with --max-pixels)")


@pytest.mark.parametrize(
    ("name", "dtype", "opaque"),
    [("mode_1_key.png", np.uint8, 255), ("mode_L_key.png", np.uint8, 255), ("mode_I16_key.png", np.uint16, 65535),
     ("mode_RGB_key.png", np.uint8, 255), ("mode_RGB16_key.png", np.uint16, 65535)],
)
def test_every_colour_key_becomes_alpha(name: str, dtype: type, opaque: int) -> None:
    data, has_alpha = hostile_corpus.modes()[name]
    picture = decode_image(data, name)
    assert has_alpha and picture.pixels.dtype == dtype
    assert picture.pixels.shape[-1] in (2, 4)
    colour, alpha = picture.pixels[..., :-1], picture.pixels[..., -1]
    # Each file's key is the colour of its top-left pixel: transparent exactly where it is.
    keyed = np.all(colour == colour[0, 0], axis=-1)
    assert 0 < keyed.sum() < keyed.size
    np.testing.assert_array_equal(alpha, np.where(keyed, 0, opaque))


def test_a_32_bit_bmp_keeps_its_alpha_both_ways() -> None:
    data, _ = hostile_corpus.modes()["mode_RGBA32.bmp"]
    picture = decode_image(data, "x.bmp")
    assert picture.pixels.shape == (20, 24, 4)
    np.testing.assert_array_equal(picture.pixels[..., 3], np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (20, 1)))
    written = Image.open(io.BytesIO(encode_image(replace(picture, dpi=(300.0, 300.0)), "BMP")))
    assert written.mode == "RGBA" and round(written.info["dpi"][0]) == 300
    np.testing.assert_array_equal(np.asarray(written), picture.pixels)
    gray = Image.open(io.BytesIO(encode_image(Picture(picture.pixels[..., [0, 3]]), "BMP")))
    assert gray.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(gray)[..., 3], picture.pixels[..., 3])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_with_alpha_is_written_as_sixteen_bit_rgba(fmt: str) -> None:
    pixels = RNG.integers(0, 65536, (5, 7, 2), dtype=np.uint16)
    again = decode_image(encode_image(Picture(pixels), fmt), "again").pixels
    assert again.dtype == np.uint16 and again.shape == (5, 7, 4)
    for channel in range(3):
        np.testing.assert_array_equal(again[..., channel], pixels[..., 0])
    np.testing.assert_array_equal(again[..., 3], pixels[..., 1])


def test_a_damaged_colour_profile_is_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    picture = decode_image(pil_bytes(Image.new("RGB", (8, 6)), "PNG", icc_profile=b"not a profile" * 20), "x.png")
    assert picture.icc_profile is None
    assert "x.png: its ICC colour profile is damaged; it is left out" in caplog.text


def test_what_an_encoder_warns_is_one_line_naming_the_output(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import warnings

    from mprnet_cli import library_messages

    monkeypatch.setattr(library_messages, "_fallback_showwarning", warnings.showwarning)
    monkeypatch.setattr(warnings, "showwarning", library_messages._show_warning)
    original = imageio._pil_bytes

    def chatty(*args: object, **options: object) -> bytes:
        warnings.warn("encoder says hello", UserWarning, stacklevel=1)
        warnings.warn("and again", UserWarning, stacklevel=1)
        return original(*args, **options)

    monkeypatch.setattr(imageio, "_pil_bytes", chatty)
    encode_image(Picture(np.zeros((4, 4, 3), dtype=np.uint8)), "JPEG", label="out.jpg")
    assert [r.getMessage() for r in caplog.records] == [
        "out.jpg: encoder says hello (and 1 more message; MPRNET_DEBUG=1 shows them)"]
