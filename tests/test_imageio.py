"""Decoding and encoding: pixel formats, metadata, errors, and atomic writes."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps, PngImagePlugin, TiffImagePlugin, TiffTags

from mprnet_cli import imageio
from mprnet_cli.errors import InputError, OutputError
from mprnet_cli.imageio import Picture, decode_image, encode_image, format_for, read_image, write_atomic

RNG = np.random.default_rng(7)
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _pil_bytes(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _cv2_bytes(pixels_rgb: np.ndarray, ext: str) -> bytes:
    order = cv2.COLOR_RGBA2BGRA if pixels_rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(pixels_rgb, order))
    assert ok
    return encoded.tobytes()


@pytest.mark.parametrize(("shape", "mode"), [((5, 7, 3), "RGB"), ((5, 7), "L"), ((5, 7, 4), "RGBA"), ((5, 7, 2), "LA")])
def test_eight_bit_modes_round_trip_exactly(shape: tuple[int, ...], mode: str) -> None:
    pixels = RNG.integers(0, 256, shape, dtype=np.uint8)
    picture = decode_image(_pil_bytes(Image.fromarray(pixels)), "x")
    assert Image.open(io.BytesIO(encode_image(picture, "PNG"))).mode == mode
    assert picture.pixels.dtype == np.uint8
    np.testing.assert_array_equal(picture.pixels, pixels)
    again = decode_image(encode_image(picture, "PNG"), "y")
    np.testing.assert_array_equal(again.pixels, pixels)


def test_black_and_white_becomes_grayscale() -> None:
    bits = RNG.integers(0, 2, (5, 7)).astype(bool)
    picture = decode_image(_pil_bytes(Image.fromarray(bits)), "bits.png")
    np.testing.assert_array_equal(picture.pixels, np.where(bits, 255, 0).astype(np.uint8))


def test_sixteen_bit_gray_png_stays_sixteen_bit() -> None:
    pixels = RNG.integers(0, 65536, (6, 4), dtype=np.uint16)
    picture = decode_image(_pil_bytes(Image.fromarray(pixels)), "gray16.png")
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


def test_sixteen_bit_png_keeps_icc_and_exif() -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    picture = Picture(RNG.integers(0, 65536, (4, 4, 3), dtype=np.uint16), icc_profile=SRGB_ICC, exif=exif.tobytes())
    reread = Image.open(io.BytesIO(encode_image(picture, "PNG")))
    assert reread.info["icc_profile"] == SRGB_ICC
    assert reread.getexif()[0x010F] == "Camera Maker"
    assert decode_image(encode_image(picture, "PNG"), "x").pixels.dtype == np.uint16


def test_sixteen_bit_to_jpeg_is_written_as_eight_bit(caplog: pytest.LogCaptureFixture) -> None:
    picture = Picture(np.full((4, 4, 3), 65535, dtype=np.uint16))
    decoded = decode_image(encode_image(picture, "JPEG"), "x")
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.min() >= 250
    assert "JPEG cannot store 16 bits per channel; writing 8 bits" in caplog.text


def test_alpha_is_dropped_with_a_warning_where_the_format_has_none(caplog: pytest.LogCaptureFixture) -> None:
    picture = Picture(np.zeros((4, 4, 4), dtype=np.uint8))
    assert decode_image(encode_image(picture, "JPEG"), "x").pixels.shape == (4, 4, 3)
    assert "JPEG cannot store transparency; the alpha channel is dropped" in caplog.text


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_icc_and_exif_are_carried(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    source = _pil_bytes(Image.new("RGB", (8, 6), (10, 20, 30)), fmt, icc_profile=SRGB_ICC, exif=exif.tobytes())
    picture = decode_image(source, "x")
    assert picture.icc_profile == SRGB_ICC
    written = Image.open(io.BytesIO(encode_image(picture, fmt)))
    assert written.info.get("icc_profile") == SRGB_ICC
    assert written.getexif()[0x010F] == "Camera Maker"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_cleared(orientation: int) -> None:
    pixels = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    source = _pil_bytes(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
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
    picture = decode_image(_pil_bytes(palette_image), "p.png")
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
    data = _pil_bytes(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match=r"^cut.png: truncated or corrupt image"):
        decode_image(data[: len(data) // 2], "cut.png")


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(InputError) as error:
        decode_image(_pil_bytes(Image.new("RGB", (100, 50))), "big.png", max_pixels=4999)
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


def _camera_exif() -> Image.Exif:
    """EXIF as cameras write it: the shooting data in the Exif sub-IFD, the position in GPS."""
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    exif.get_ifd(0x8769)[0x9003] = "2026:11:26 10:00:00"  # DateTimeOriginal
    exif.get_ifd(0x8825)[0x0001] = "N"  # GPSLatitudeRef
    return exif


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_camera_exif_keeps_its_sub_ifds(fmt: str) -> None:
    source = _pil_bytes(Image.new("RGB", (8, 6), (10, 20, 30)), "JPEG", exif=_camera_exif().tobytes())
    written = Image.open(io.BytesIO(encode_image(decode_image(source, "camera.jpg"), fmt))).getexif()
    assert written[0x010F] == "Camera Maker"
    assert written.get_ifd(0x8769)[0x9003] == "2026:11:26 10:00:00"
    assert written.get_ifd(0x8825)[0x0001] == "N"


@pytest.mark.parametrize("pixels", [np.zeros((6, 8, 3), dtype=np.uint8), np.zeros((6, 8, 2), dtype=np.uint8),
                                    np.zeros((6, 8), dtype=np.uint16)])
def test_tiff_with_camera_exif_is_still_compressed(pixels: np.ndarray, capfd: pytest.CaptureFixture[str]) -> None:
    """libtiff, Pillow's compressor, refuses EXIF's sub-IFD pointers (and says so on stderr)."""
    data = encode_image(Picture(pixels, exif=_camera_exif().tobytes(), icc_profile=SRGB_ICC), "TIFF")
    written = Image.open(io.BytesIO(data))
    assert written.info["compression"] == "tiff_lzw" and written.info["icc_profile"] == SRGB_ICC
    assert written.getexif().get_ifd(0x8769)[0x9003] == "2026:11:26 10:00:00"
    np.testing.assert_array_equal(decode_image(data, "again").pixels, pixels)
    assert capfd.readouterr().err == ""


XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description dc:rights="(c) someone"/></rdf:RDF></x:xmpmeta>'


@pytest.mark.parametrize(("fmt", "dtype"), [("PNG", np.uint8), ("JPEG", np.uint8), ("WEBP", np.uint8), ("TIFF", np.uint8),
                                            ("PNG", np.uint16), ("TIFF", np.uint16)])
def test_xmp_is_carried(fmt: str, dtype: type) -> None:
    picture = Picture(np.zeros((6, 8, 3), dtype=dtype), exif=_camera_exif().tobytes(), xmp=XMP)
    written = Image.open(io.BytesIO(encode_image(picture, fmt)))
    assert written.info["xmp"] == XMP
    assert written.getexif().get_ifd(0x8769)[0x9003] == "2026:11:26 10:00:00"
    assert decode_image(encode_image(picture, fmt), "again").xmp == XMP


@pytest.mark.parametrize(("fmt", "dtype"), [("PNG", np.uint8), ("JPEG", np.uint8), ("TIFF", np.uint8), ("BMP", np.uint8),
                                            ("PNG", np.uint16), ("TIFF", np.uint16)])
def test_dpi_is_carried(fmt: str, dtype: type) -> None:
    picture = Picture(np.zeros((6, 8, 3), dtype=dtype), dpi=(300.0, 150.0))
    assert decode_image(encode_image(picture, fmt), "again").dpi == pytest.approx((300.0, 150.0), abs=0.05)  # PNG, BMP: whole dots per metre


def test_a_quarter_turn_swaps_the_recorded_pixel_dimensions() -> None:
    exif = _camera_exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8769).update({0xA002: 8, 0xA003: 6})  # PixelXDimension, PixelYDimension
    picture = decode_image(_pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=exif.tobytes()), "x")
    written = Image.open(io.BytesIO(encode_image(picture, "JPEG")))
    section = written.getexif().get_ifd(0x8769)
    assert written.size == (6, 8) and (section[0xA002], section[0xA003]) == (6, 8)
    assert section[0x9003] == "2026:11:26 10:00:00"


@pytest.mark.parametrize("declared", [None, (0, 72), (72,), ("a", "b"), (float("inf"), 72), (float("nan"), 72), (1, 1)])
def test_a_senseless_resolution_is_left_behind(declared: object) -> None:
    assert imageio._dpi(declared, 1) is None


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG"])
def test_no_resolution_stays_none(fmt: str) -> None:
    """Pillow reports 1x1 dpi for a TIFF without one; passed on, printers would get 1 dot per inch."""
    for pixels in (np.zeros((6, 8, 3), dtype=np.uint8), np.zeros((6, 8, 3), dtype=np.uint16)):
        assert decode_image(encode_image(Picture(pixels), fmt), "x").dpi is None


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_pngs_colour_chunks_are_carried(dtype: type) -> None:
    info = PngImagePlugin.PngInfo()
    info.add(b"gAMA", (55000).to_bytes(4, "big"))
    info.add(b"cHRM", b"".join(round(v * 100000).to_bytes(4, "big") for v in (0.3127, 0.329, 0.64, 0.33, 0.3, 0.6, 0.15, 0.06)))
    source = _pil_bytes(Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)), "PNG", pnginfo=info)
    picture = decode_image(source, "gamma.png")
    written = Image.open(io.BytesIO(encode_image(picture.with_pixels(picture.pixels.astype(dtype)), "PNG")))
    assert written.info["gamma"] == 0.55
    assert written.info["chromaticity"] == (0.3127, 0.329, 0.64, 0.33, 0.3, 0.6, 0.15, 0.06)
    srgb = decode_image(_pil_bytes(Image.new("RGB", (4, 4)), "PNG", pnginfo=_srgb_chunk()), "s.png")
    assert Image.open(io.BytesIO(encode_image(srgb, "PNG"))).info["srgb"] == 0


def _srgb_chunk() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add(b"sRGB", b"\0")  # perceptual
    return info


def test_dpi_turns_with_the_image() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter turn
    picture = decode_image(_pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=exif.tobytes(), dpi=(300, 150)), "x")
    assert picture.pixels.shape[:2] == (8, 6) and picture.dpi == (150.0, 300.0)


@pytest.mark.parametrize(("mode", "key", "restored"), [("RGB", (0, 255, 0), "RGBA"), ("L", 255, "LA")])
def test_a_colour_key_becomes_alpha(mode: str, key: object, restored: str) -> None:
    image = Image.new(mode, (4, 3), key)
    image.putpixel((0, 0), 0 if mode == "L" else (1, 2, 3))
    picture = decode_image(_pil_bytes(image, "PNG", transparency=key), "keyed.png")
    assert Image.open(io.BytesIO(encode_image(picture, "PNG"))).mode == restored
    alpha = picture.pixels[..., -1]
    assert alpha[0, 0] == 255 and (alpha.ravel()[1:] == 0).all()


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_only_the_first_frame_is_restored_and_the_user_is_told(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    frames = [Image.new("RGB", (8, 6), (40 * i, 0, 0)) for i in range(3)]
    source = _pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:])
    picture = decode_image(source, f"pages.{fmt.lower()}")
    assert picture.pixels.shape[:2] == (6, 8)
    assert f"pages.{fmt.lower()}: has 3 frames or pages; only the first is restored" in caplog.text


def test_metadata_too_large_for_a_jpeg_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    exif = Image.Exif()
    exif[0x010E] = "x" * 70000  # ImageDescription
    picture = Picture(np.zeros((6, 8, 3), dtype=np.uint8), exif=exif.tobytes(), xmp=b"y" * 70000)
    written = Image.open(io.BytesIO(encode_image(picture, "JPEG")))
    assert "exif" not in written.info and "xmp" not in written.info
    assert f"EXIF of {len(exif.tobytes())} bytes is more than a JPEG can hold (65533); it is dropped" in caplog.text
    assert "XMP of 70000 bytes is more than a JPEG can hold (65504); it is dropped" in caplog.text


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_tiff_keeps_every_kind_of_metadata(channels: int, capfd: pytest.CaptureFixture[str]) -> None:
    """OpenCV writes the pixels; the directory in front of them is ours."""
    pixels = RNG.integers(0, 65536, (70, 9, channels), dtype=np.uint16)  # OpenCV: several strips
    picture = Picture(pixels, icc_profile=SRGB_ICC, exif=_camera_exif().tobytes(), xmp=XMP, dpi=(300.0, 150.0))
    data = encode_image(picture, "TIFF")
    again = decode_image(data, "again.tif")
    np.testing.assert_array_equal(again.pixels, pixels)
    assert (again.icc_profile, again.xmp, again.dpi) == (SRGB_ICC, XMP, (300.0, 150.0))
    written = Image.open(io.BytesIO(data))
    assert written.getexif()[0x010F] == "Camera Maker"
    assert written.getexif().get_ifd(0x8769)[0x9003] == "2026:11:26 10:00:00"
    assert written.tag_v2.get(338) == ((2,) if channels == 4 else None)  # ExtraSamples: alpha
    cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # libtiff, unsilenced: no complaint
    assert capfd.readouterr().err == ""


def test_a_tiff_sources_camera_exif_is_carried() -> None:
    source = _pil_bytes(Image.new("RGB", (8, 6)), "TIFF", exif=_camera_exif().tobytes())
    written = Image.open(io.BytesIO(encode_image(decode_image(source, "scan.tif"), "PNG"))).getexif()
    assert written[0x010F] == "Camera Maker"
    assert written.get_ifd(0x8769)[0x9003] == "2026:11:26 10:00:00"
    assert written.get_ifd(0x8825)[0x0001] == "N"


def test_an_xmp_orientation_is_cleared_with_the_exif_one() -> None:
    """Adobe's exports carry both; a stale XMP copy would make viewers turn the photo again."""
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    source = _pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=exif.tobytes(), xmp=xmp)
    picture = decode_image(source, "adobe.jpg")
    assert picture.pixels.shape[:2] == (8, 6) and b'tiff:Orientation="6"' not in picture.xmp
    for fmt in ("JPEG", "PNG", "TIFF"):
        again = decode_image(encode_image(picture, fmt), "again")
        assert again.pixels.shape[:2] == (8, 6), fmt


def _tiff_pages(count: int) -> bytes:
    page = Image.new("RGB", (8, 6), (1, 2, 3))
    return _pil_bytes(page, "TIFF", save_all=True, append_images=[page] * (count - 1))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_damaged_later_page_costs_only_the_later_pages(caplog: pytest.LogCaptureFixture) -> None:
    truncated = _tiff_pages(3)[:576]  # the first page whole, the rest cut off
    assert decode_image(truncated, "scan.tif").pixels.shape == (6, 8, 3)
    assert "scan.tif: only the first frame or page is restored; the others are unreadable" in caplog.text


def test_a_jpegs_extra_pictures_are_not_pages(caplog: pytest.LogCaptureFixture) -> None:
    photo = Image.new("RGB", (40, 30), (9, 8, 7))
    source = _pil_bytes(photo, "MPO", save_all=True, append_images=[photo.resize((10, 8))])  # a preview
    assert decode_image(source, "photo.jpg").pixels.shape == (30, 40, 3)
    assert "frames" not in caplog.text


def _exif_with_interoperability() -> bytes:
    """As cameras write it, and Pillow does not: a section inside the Exif section."""
    directory = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    directory[0x010F] = "Camera Maker"
    directory[0x8769] = {0x8827: 100, 0xA005: {1: "R98", 2: b"0100"}}  # ISO, interoperability
    directory.tagtype[0x8769] = TiffTags.LONG
    return b"Exif\0\0II*\0\x08\0\0\0" + directory.tobytes(8)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG"])
def test_the_interoperability_section_is_carried_as_a_section(fmt: str) -> None:
    jpeg = _pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=_exif_with_interoperability())
    tiff = encode_image(decode_image(jpeg, "camera.jpg"), "TIFF")  # Pillow's own TIFF writer flattens the section
    for source in (jpeg, tiff):
        picture = decode_image(source, "x")
        written = Image.open(io.BytesIO(encode_image(picture, fmt))).getexif()
        assert written.get_ifd(0x8769)[0x8827] == 100
        assert dict(written.get_ifd(0xA005)) == {1: "R98", 2: b"0100"}


def test_an_exif_tag_that_tiff_cannot_type_is_left_out_not_the_image(caplog: pytest.LogCaptureFixture) -> None:
    directory = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    directory[0x010F] = "Camera Maker"
    directory[0x0213] = 70000  # YCbCrPositioning, which Pillow types as a SHORT
    directory.tagtype[0x0213] = TiffTags.LONG
    picture = Picture(np.zeros((6, 8, 3), dtype=np.uint8), exif=b"Exif\0\0II*\0\x08\0\0\0" + directory.tobytes(8))
    written = Image.open(io.BytesIO(encode_image(picture, "TIFF")))
    assert written.getexif()[0x010F] == "Camera Maker" and 0x0213 not in written.getexif()
    assert "EXIF tags 0x0213 do not fit a TIFF as Pillow types them; they are left out" in caplog.text


@pytest.mark.parametrize(("fmt", "dpi"), [("JPEG", (70000.0, 300.0)), ("PNG", (3e8, 300.0)), ("BMP", (3e8, 300.0))])
def test_a_resolution_the_format_cannot_hold_is_left_out(fmt: str, dpi: tuple[float, float],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A microscope's, say: JPEG would wrap 70000 dpi round to 4464, PNG and BMP overflow."""
    again = decode_image(encode_image(Picture(np.zeros((6, 8, 3), dtype=np.uint8), dpi=dpi), fmt), "again")
    assert again.dpi is None or max(again.dpi) < 100  # Pillow's BMP says 96 when told nothing
    assert f"{fmt} cannot record a resolution of {dpi[0]:g} x 300 dpi; it is left out" in caplog.text


def test_cmyk_becomes_rgb_without_its_cmyk_profile(caplog: pytest.LogCaptureFixture) -> None:
    """A CMYK profile cannot describe the RGB pixels written out; viewers would reject it."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(buffer, "JPEG", icc_profile=profile)
    picture = decode_image(buffer.getvalue(), "ink.jpg")
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
