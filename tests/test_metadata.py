"""Metadata through decoding and encoding: ICC, EXIF with its camera sections, XMP, DPI and
PNG colour chunks, in every format that holds them, and what is left out with a warning."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin, TiffImagePlugin, TiffTags

from mprnet_cli import metadata
from mprnet_cli.imageio import Picture, decode_image, encode_image

from .conftest import pil_bytes

RNG = np.random.default_rng(7)
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_sixteen_bit_png_keeps_icc_and_exif() -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    picture = Picture(RNG.integers(0, 65536, (4, 4, 3), dtype=np.uint16), icc_profile=SRGB_ICC, exif=exif.tobytes())
    reread = Image.open(io.BytesIO(encode_image(picture, "PNG")))
    assert reread.info["icc_profile"] == SRGB_ICC
    assert reread.getexif()[0x010F] == "Camera Maker"
    assert decode_image(encode_image(picture, "PNG"), "x").pixels.dtype == np.uint16


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_icc_and_exif_are_carried(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    source = pil_bytes(Image.new("RGB", (8, 6), (10, 20, 30)), fmt, icc_profile=SRGB_ICC, exif=exif.tobytes())
    picture = decode_image(source, "x")
    assert picture.icc_profile == SRGB_ICC
    written = Image.open(io.BytesIO(encode_image(picture, fmt)))
    assert written.info.get("icc_profile") == SRGB_ICC
    assert written.getexif()[0x010F] == "Camera Maker"


def _camera_exif() -> Image.Exif:
    """EXIF as cameras write it: the shooting data in the Exif sub-IFD, the position in GPS."""
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    exif.get_ifd(0x8769)[0x9003] = "2026:11:26 10:00:00"  # DateTimeOriginal
    exif.get_ifd(0x8825)[0x0001] = "N"  # GPSLatitudeRef
    return exif


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_camera_exif_keeps_its_sub_ifds(fmt: str) -> None:
    source = pil_bytes(Image.new("RGB", (8, 6), (10, 20, 30)), "JPEG", exif=_camera_exif().tobytes())
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
    source = pil_bytes(Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)), "PNG", pnginfo=info)
    picture = decode_image(source, "gamma.png")
    written = Image.open(io.BytesIO(encode_image(picture.with_pixels(picture.pixels.astype(dtype)), "PNG")))
    assert written.info["gamma"] == 0.55
    assert written.info["chromaticity"] == (0.3127, 0.329, 0.64, 0.33, 0.3, 0.6, 0.15, 0.06)
    srgb = decode_image(pil_bytes(Image.new("RGB", (4, 4)), "PNG", pnginfo=_srgb_chunk()), "s.png")
    assert Image.open(io.BytesIO(encode_image(srgb, "PNG"))).info["srgb"] == 0


def _srgb_chunk() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add(b"sRGB", b"\0")  # perceptual
    return info


def test_a_quarter_turn_swaps_the_recorded_pixel_dimensions() -> None:
    exif = _camera_exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8769).update({0xA002: 8, 0xA003: 6})  # PixelXDimension, PixelYDimension
    picture = decode_image(pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=exif.tobytes()), "x")
    written = Image.open(io.BytesIO(encode_image(picture, "JPEG")))
    section = written.getexif().get_ifd(0x8769)
    assert written.size == (6, 8) and (section[0xA002], section[0xA003]) == (6, 8)
    assert section[0x9003] == "2026:11:26 10:00:00"


@pytest.mark.parametrize("declared", [None, (0, 72), (72,), ("a", "b"), (float("inf"), 72), (float("nan"), 72), (1, 1)])
def test_a_senseless_resolution_is_left_behind(declared: object) -> None:
    assert metadata.declared_dpi(declared, 1) is None


def test_dpi_turns_with_the_image() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter turn
    picture = decode_image(pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=exif.tobytes(), dpi=(300, 150)), "x")
    assert picture.pixels.shape[:2] == (8, 6) and picture.dpi == (150.0, 300.0)


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
    source = pil_bytes(Image.new("RGB", (8, 6)), "TIFF", exif=_camera_exif().tobytes())
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
    source = pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=exif.tobytes(), xmp=xmp)
    picture = decode_image(source, "adobe.jpg")
    assert picture.pixels.shape[:2] == (8, 6) and b'tiff:Orientation="6"' not in picture.xmp
    for fmt in ("JPEG", "PNG", "TIFF"):
        again = decode_image(encode_image(picture, fmt), "again")
        assert again.pixels.shape[:2] == (8, 6), fmt


def _exif_with_interoperability() -> bytes:
    """As cameras write it, and Pillow does not: a section inside the Exif section."""
    directory = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    directory[0x010F] = "Camera Maker"
    directory[0x8769] = {0x8827: 100, 0xA005: {1: "R98", 2: b"0100"}}  # ISO, interoperability
    directory.tagtype[0x8769] = TiffTags.LONG
    return b"Exif\0\0II*\0\x08\0\0\0" + directory.tobytes(8)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "JPEG"])
def test_the_interoperability_section_is_carried_as_a_section(fmt: str) -> None:
    jpeg = pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=_exif_with_interoperability())
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


@pytest.mark.filterwarnings("ignore:not a TIFF file")
def test_exif_that_cannot_be_read_is_left_out_not_the_image(caplog: pytest.LogCaptureFixture) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    for damaged in (b"Exif\0\0garbage!!", b"Exif\0\0" + exif.tobytes()[6:12]):  # not TIFF; cut short
        for fmt in ("TIFF", "PNG", "JPEG"):
            picture = Picture(np.zeros((6, 8, 3), dtype=np.uint8), exif=damaged)
            assert decode_image(encode_image(picture, fmt), "again").pixels.shape == (6, 8, 3)
    picture = decode_image(pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=b"Exif\0\0garbage!!"), "odd.jpg")
    assert decode_image(encode_image(picture, "TIFF"), "again").exif is None
    assert "EXIF that cannot be read or rewritten is left out" in caplog.text  # on writing: no file name


def _odd_make(orientation: int) -> bytes:
    """EXIF that Pillow reads but cannot write back: Make (ASCII) stored as a RATIONAL."""
    directory = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    directory[0x0112] = orientation
    directory[0x010F] = TiffImagePlugin.IFDRational(3, 2)
    directory.tagtype[0x010F] = TiffTags.RATIONAL
    return b"Exif\0\0II*\0\x08\0\0\0" + directory.tobytes(8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_photo_whose_exif_cannot_be_rewritten_is_still_turned(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    pixels = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    source = pil_bytes(Image.fromarray(pixels), fmt, exif=_odd_make(6), xmp=XMP, **({"lossless": True} if fmt == "WEBP" else {}))
    picture = decode_image(source, f"odd.{fmt.lower()}")
    if fmt != "JPEG":  # lossy
        np.testing.assert_array_equal(picture.pixels, np.rot90(pixels, -1))
    assert picture.pixels.shape == (8, 6, 3) and (picture.exif, picture.xmp) == (None, None)
    assert f"odd.{fmt.lower()}: its EXIF cannot be rewritten for the turned photo; EXIF and XMP are left out" in caplog.text


def test_a_tiff_with_exif_it_cannot_rewrite_is_read_and_written(caplog: pytest.LogCaptureFixture) -> None:
    picture = decode_image(pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=_odd_make(1)), "odd.jpg")
    assert picture.exif is not None  # read fine, and written fine into JPEG or PNG
    tiff = encode_image(picture, "TIFF")  # the one tag left out
    assert "EXIF tags 0x010F do not fit a TIFF as Pillow types them; they are left out" in caplog.text
    assert decode_image(tiff, "again.tif").pixels.shape == (6, 8, 3)


def _bare_tiff(**extra: tuple[int, object, int]) -> bytes:
    """An uncompressed 8x6 TIFF with `extra` tags (name=(tag, value, type)) as other
    writers type them, which Pillow's writer would not."""
    pixels = bytes(8 * 6 * 3)
    directory = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    layout = {256: 8, 257: 6, 258: (8, 8, 8), 259: 1, 262: 2, 273: (0,), 277: 3, 278: 6, 279: (len(pixels),)}
    for tag, value in layout.items():
        directory[tag] = value
        directory.tagtype[tag] = TiffTags.LONG if tag in (273, 279) else TiffTags.SHORT
    for tag, value, kind in extra.values():
        directory[tag] = value
        directory.tagtype[tag] = kind
    return b"II*\0\x08\0\0\0" + directory.tobytes(8) + pixels  # strip offsets count from the directory's end


def test_a_tiff_source_whose_exif_cannot_be_rewritten_is_read(caplog: pytest.LogCaptureFixture) -> None:
    picture = decode_image(_bare_tiff(make=(0x010F, TiffImagePlugin.IFDRational(3, 2), TiffTags.RATIONAL)), "odd.tif")
    assert picture.pixels.shape == (6, 8, 3) and picture.exif is None
    assert "odd.tif: EXIF that cannot be read or rewritten is left out" in caplog.text


def test_an_invalid_orientation_is_not_written_into_a_tiff(capfd: pytest.CaptureFixture[str]) -> None:
    """libtiff would complain of it on stderr whenever the file is read."""
    exif = Image.Exif()
    exif[0x0112] = 0
    tiff = encode_image(decode_image(pil_bytes(Image.new("RGB", (8, 6)), "JPEG", exif=exif.tobytes()), "x"), "TIFF")
    assert 0x0112 not in Image.open(io.BytesIO(tiff)).getexif()
    cv2.imdecode(np.frombuffer(tiff, np.uint8), cv2.IMREAD_UNCHANGED)
    assert capfd.readouterr().err == ""


def test_an_icc_profile_over_a_megabyte_is_kept() -> None:
    """Pillow's text-chunk guard would refuse it in a PNG; some printers' profiles are that large."""
    profile = SRGB_ICC + bytes(RNG.integers(0, 256, 2 * 1024 * 1024, dtype=np.uint8))
    for dtype in (np.uint8, np.uint16):
        png = encode_image(Picture(np.zeros((6, 8, 3), dtype=dtype), icc_profile=profile), "PNG")
        assert decode_image(png, "large.png").icc_profile == profile


def test_an_xmp_packet_typed_as_text_is_read_byte_for_byte() -> None:
    """Pillow's own EXIF reading trips over it; the image used to be lost."""
    xmp = '<x:xmpmeta xmlns:x="adobe:ns:meta/"><dc:creator>Zoë 東京</dc:creator></x:xmpmeta>'.encode()
    picture = decode_image(_bare_tiff(xmp=(700, xmp, TiffTags.ASCII)), "text_xmp.tif")
    assert picture.pixels.shape == (6, 8, 3) and picture.xmp == xmp
