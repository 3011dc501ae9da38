"""Decode and encode images, keeping what a photographer expects to survive.

Pillow does the formats and the metadata (EXIF orientation applied; ICC, EXIF, XMP and
DPI carried). Pillow reads 16-bit RGB as 8 bits, so 16-bit colour PNG and TIFF pixels go
through OpenCV instead, which writes no metadata: 16-bit PNGs get their chunks inserted
by hand. Every TIFF gets its metadata in a directory of its own in front of its strips.
Files are written atomically: a temporary file beside the target, then a rename, so an
interrupted run never leaves a truncated image under the final name.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
import os
import secrets
import stat
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, TiffTags, UnidentifiedImageError

from mprnet_cli.errors import InputError, OutputError
from mprnet_cli.pixels import UnsupportedMode, pil_pixels

logger = logging.getLogger("mprnet")

# We enforce our own pixel limit (read_image's max_pixels) with a clear message.
Image.MAX_IMAGE_PIXELS = None

#: Output extensions and the Pillow format each one writes.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
_SIXTEEN_BIT_FORMATS = {"PNG", "TIFF"}
#: Formats that Pillow writes metadata into (PNG and TIFF get theirs from us).
_METADATA_FORMATS = {"JPEG", "WEBP"}
#: Per format: its resolution unit in dots per inch, and the whole numbers it can store.
_RESOLUTION_RANGES = {"JPEG": (1.0, (1, 65535)), "PNG": (1 / 0.0254, (1, 2**31 - 1)),
                      "BMP": (1 / 0.0254, (1, 2**31 - 1)), "TIFF": (1.0, (0, 2**32 - 1))}
_EXIF_ORIENTATION = 0x0112
#: Orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
#: EXIF pointers to sub-IFDs (Exif, GPS), which every camera writes; the Exif one holds
#: a pointer of its own, to the interoperability section.
_EXIF_SUB_IFDS = (0x8769, 0x8825)
_EXIF_INTEROPERABILITY = 0xA005
_PIXEL_X_DIMENSION, _PIXEL_Y_DIMENSION = 0xA002, 0xA003  # in the Exif sub-IFD
_TIFF_XMP_TAG = 700
_TIFF_STRIP_OFFSETS, _TIFF_STRIP_BYTE_COUNTS, _TIFF_EXTRA_SAMPLES, _TIFF_ICC_TAG = 273, 279, 338, 34675
_TIFF_RESOLUTION_TAGS = (282, 283, 296)  # XResolution, YResolution, ResolutionUnit
#: Tags that describe a TIFF's layout, never taken from EXIF (where a JPEG's may hold some).
_TIFF_LAYOUT_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 322, 323, 324,
                               325, 338, 339, 513, 514})
#: The largest EXIF and XMP blocks a JPEG marker segment holds (Pillow's limits).
_JPEG_MAX_EXIF = 65533
_JPEG_MAX_XMP = 65504
# TIFF keeps EXIF-like tags among its structural ones (sizes, strip offsets...); only these
# descriptive ones are carried from a TIFF into the output's EXIF.
_TIFF_DESCRIPTIVE_TAGS = (0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x013B, 0x8298)
# Magic numbers of the formats we read: a file that starts with one but will not open is
# a damaged image, which deserves a different message from "not an image at all".
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF", b"BM")


@dataclass(frozen=True)
class Picture:
    """Decoded pixels (HxW, HxWx2, HxWx3 or HxWx4; uint8 or uint16) and the metadata to keep."""

    pixels: np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    #: Pixels per inch, horizontal and vertical, as the source declared them.
    dpi: tuple[float, float] | None = None
    #: A PNG's colour chunks other than its ICC profile (sRGB, gAMA, cHRM), for PNG output.
    png_colour: tuple[tuple[bytes, bytes], ...] = ()

    def with_pixels(self, pixels: np.ndarray) -> Picture:
        return replace(self, pixels=pixels)


def read_image(path: Path, max_pixels: int | None = None) -> Picture:
    """Read an image file; raises InputError with the path and the reason."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None
    return decode_image(data, str(path), max_pixels)


def decode_image(data: bytes, label: str, max_pixels: int | None = None) -> Picture:
    """Decode image bytes (`label` names the source in messages: a path, or `-` for stdin)."""
    if not data:
        raise InputError(f"{label}: empty file, not an image")
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise InputError(
                f"{label}: {image.width}x{image.height} is over the {max_pixels:,}-pixel limit (raise it with --max-pixels)"
            )
        image.load()
        _warn_of_other_frames(data, label)
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        icc_profile = image.info.get("icc_profile") or None
        dpi = _dpi(image.info.get("dpi"), orientation)
        png_colour = _png_colour_chunks(image.info) if image.format == "PNG" else ()
        sixteen_bit_color = _is_sixteen_bit_color(image, data)
        tiff_exif = _tiff_descriptive_exif(image) if image.format == "TIFF" else None
        image = ImageOps.exif_transpose(image)
        xmp = image.info.get("xmp") or None  # after the turn, which clears its orientation too
        exif = tiff_exif or image.info.get("exif") or None
        if orientation in _TRANSPOSING_ORIENTATIONS:
            exif = _turned_exif(exif)
        if image.mode == "CMYK":
            # The pixels become RGB, which a CMYK profile cannot describe: keeping it would
            # make colour-managed viewers reject the output or misread its colours.
            logger.warning("%s: CMYK is converted to RGB without colour management%s", label,
                           "; its CMYK colour profile is dropped" if icc_profile else "")
            image, icc_profile = image.convert("RGB"), None
        pixels = _decode_sixteen_bit(data, orientation) if sixteen_bit_color else pil_pixels(image)
    except UnsupportedMode as error:
        raise InputError(f"{label}: {error}") from None
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_SIGNATURES):
            raise InputError(f"{label}: truncated or corrupt image (its header is unreadable)") from None
        raise InputError(f"{label}: not an image, or a format mprnet cannot read") from None
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        raise InputError(f"{label}: truncated or corrupt image ({error})") from None
    return Picture(pixels=pixels, icc_profile=icc_profile, exif=exif, xmp=xmp, dpi=dpi, png_colour=png_colour)


def _warn_of_other_frames(data: bytes, label: str) -> None:
    """Counted on an image of its own: counting walks every page, and a later page that is
    damaged must not cost the first. A JPEG's MPO pictures (previews, gain maps) are no
    pages of the photo."""
    image = Image.open(io.BytesIO(data))
    if image.format == "MPO":
        return
    try:
        frames = getattr(image, "n_frames", 1)
    except Exception:  # noqa: BLE001 - whatever a damaged later page raises, the first one is fine
        logger.warning("%s: only the first frame or page is restored; the others are unreadable", label)
        return
    if frames > 1:
        logger.warning("%s: has %d frames or pages; only the first is restored", label, frames)


def _png_colour_chunks(info: dict[str, Any]) -> tuple[tuple[bytes, bytes], ...]:
    """The chunks again from the values Pillow parsed them into (in units of 1/100000)."""
    chunks = []
    if "srgb" in info:
        chunks.append((b"sRGB", struct.pack(">B", info["srgb"])))
    if "gamma" in info:
        chunks.append((b"gAMA", struct.pack(">I", round(info["gamma"] * 100000))))
    if "chromaticity" in info:
        chunks.append((b"cHRM", struct.pack(">8I", *(round(v * 100000) for v in info["chromaticity"]))))
    return tuple(chunks)


def _dpi(declared: Any, orientation: int) -> tuple[float, float] | None:
    """A resolution that makes no sense (zero, a zero denominator, text) is left behind, and
    so is 1x1, which Pillow reports for a TIFF that declares none (and writes by default)."""
    try:
        x, y = (float(v) for v in declared)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in (x, y)) or (x, y) == (1.0, 1.0):
        return None
    return (y, x) if orientation in _TRANSPOSING_ORIENTATIONS else (x, y)


def _turned_exif(exif: bytes | None) -> bytes | None:
    """After a quarter turn, the pixel dimensions that cameras record must swap too."""
    if not exif:
        return exif
    tags = Image.Exif()
    tags.load(exif)
    section = tags.get_ifd(_EXIF_SUB_IFDS[0])
    if _PIXEL_X_DIMENSION not in section or _PIXEL_Y_DIMENSION not in section:
        return exif
    section[_PIXEL_X_DIMENSION], section[_PIXEL_Y_DIMENSION] = section[_PIXEL_Y_DIMENSION], section[_PIXEL_X_DIMENSION]
    return tags.tobytes()


def _tiff_descriptive_exif(image: Image.Image) -> bytes | None:
    tags = image.getexif()
    kept = Image.Exif()
    for tag in _TIFF_DESCRIPTIVE_TAGS:
        if tag in tags:
            kept[tag] = tags[tag]
    for pointer in _EXIF_SUB_IFDS:
        section = _section(tags, pointer)
        if section:
            kept.get_ifd(pointer).update(section)
    return kept.tobytes() if len(kept) else None


def _section(exif: Image.Exif, pointer: int) -> dict[int, Any]:
    """An EXIF section with the sections it points to as dicts, not as offsets into the
    source file, which mean nothing once written elsewhere."""
    section = dict(exif.get_ifd(pointer))
    if _EXIF_INTEROPERABILITY in section:
        section[_EXIF_INTEROPERABILITY] = dict(exif.get_ifd(_EXIF_INTEROPERABILITY))
    return section


def _is_sixteen_bit_color(image: Image.Image, data: bytes) -> bool:
    if image.mode not in ("RGB", "RGBA"):
        return False
    if image.format == "PNG":
        return data[24] == 16  # bit depth byte of the IHDR chunk
    if image.format == "TIFF":
        return 16 in (image.tag_v2.get(258) or ())  # BitsPerSample
    return False


def _decode_sixteen_bit(data: bytes, orientation: int) -> np.ndarray:
    import cv2

    quiet = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # libtiff's warnings, e.g. on
    try:  # an undeclared fourth channel, are not the user's business
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    finally:
        cv2.utils.logging.setLogLevel(quiet)
    if pixels is None or pixels.dtype != np.uint16:
        raise ValueError("OpenCV could not decode the 16-bit pixels")
    pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(_orient(pixels, orientation))


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation code, as `ImageOps.exif_transpose` does for Pillow images."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return transforms[orientation](pixels) if orientation in transforms else pixels


def format_for(path: Path) -> str:
    """The Pillow format name for an output path's extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        if not path.suffix:
            raise OutputError(f"{path}: no extension to choose the output format by ({known}); "
                              f"for a directory, write {path}/")
        raise OutputError(f"{path}: unknown output format {path.suffix!r}; use one of {known}")
    return fmt


def encode_image(picture: Picture, fmt: str, quality: int = 95) -> bytes:
    """Encode to `fmt` ('PNG', 'JPEG', ...). 16-bit pixels stay 16-bit where the format
    allows; alpha is dropped (with a warning) where it does not."""
    pixels = picture.pixels
    if fmt in ("JPEG", "BMP") and _has_alpha(pixels):
        logger.warning("%s cannot store transparency; the alpha channel is dropped", fmt)
        pixels = pixels[..., :-1] if pixels.shape[-1] == 4 else pixels[..., 0]
    if pixels.dtype == np.uint16 and fmt not in _SIXTEEN_BIT_FORMATS:
        logger.warning("%s cannot store 16 bits per channel; writing 8 bits", fmt)
        pixels = np.round(pixels / 257.0).astype(np.uint8)
    if pixels.dtype == np.uint16 and pixels.ndim == 3:
        return _encode_sixteen_bit_color(pixels, fmt, picture)
    if fmt == "TIFF":
        return _retag_tiff(_pil_bytes(pixels, fmt, compression="tiff_lzw"), picture)
    if fmt == "PNG":
        return _add_png_metadata(_pil_bytes(pixels, fmt), picture)
    options = _metadata_options(picture, fmt)
    if fmt == "JPEG":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        options.update(quality=quality, lossless=quality >= 100)
    return _pil_bytes(pixels, fmt, **options)


def _pil_bytes(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _metadata_options(picture: Picture, fmt: str) -> dict[str, object]:
    """Pillow's save options for the metadata that `fmt` (JPEG, WebP, BMP) can hold."""
    options: dict[str, object] = {}
    dpi = _resolution_for(fmt, picture.dpi)
    if dpi:
        options["dpi"] = dpi
    if fmt not in _METADATA_FORMATS:
        return options
    exif, xmp = picture.exif, picture.xmp
    if fmt == "JPEG":
        exif = _fits_jpeg(exif, _JPEG_MAX_EXIF, "EXIF")
        xmp = _fits_jpeg(xmp, _JPEG_MAX_XMP, "XMP")
    options.update({k: v for k, v in (("icc_profile", picture.icc_profile), ("exif", exif), ("xmp", xmp)) if v})
    return options


def _resolution_for(fmt: str, dpi: tuple[float, float] | None) -> tuple[float, float] | None:
    """The resolution if `fmt` can record it: JPEG in whole dots per inch up to 65535, PNG
    and BMP in whole dots per metre up to 2**31 - 1 (a microscope's can be more)."""
    if dpi is None or fmt not in _RESOLUTION_RANGES:
        return None
    per_unit, (low, high) = _RESOLUTION_RANGES[fmt]
    if all(low <= round(value * per_unit) <= high for value in dpi):
        return dpi
    logger.warning("%s cannot record a resolution of %g x %g dpi; it is left out", fmt, *dpi)
    return None


def _fits_jpeg(block: bytes | None, limit: int, name: str) -> bytes | None:
    if block and len(block) > limit:
        logger.warning("%s of %d bytes is more than a JPEG can hold (%d); it is dropped", name, len(block), limit)
        return None
    return block


def _has_alpha(pixels: np.ndarray) -> bool:
    return pixels.ndim == 3 and pixels.shape[2] in (2, 4)


def _encode_sixteen_bit_color(pixels: np.ndarray, fmt: str, picture: Picture) -> bytes:
    import cv2

    order = cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, encoded = cv2.imencode(".png" if fmt == "PNG" else ".tiff", cv2.cvtColor(pixels, order))
    if not ok:
        raise OutputError(f"OpenCV could not encode a 16-bit {fmt}")
    data = encoded.tobytes()
    return _add_png_metadata(data, picture) if fmt == "PNG" else _retag_tiff(data, picture)


def _add_exif(directory: TiffImagePlugin.ImageFileDirectory_v2, exif_bytes: bytes) -> None:
    """EXIF keeps no tag types, and Pillow guesses them again from its table: a value that
    does not fit the guess (a LONG where it expects a SHORT) is left out, not the image."""
    exif = Image.Exif()
    exif.load(exif_bytes)
    left_out = []
    for tag, value in exif.items():
        if tag in _TIFF_LAYOUT_TAGS:
            continue
        if tag in _EXIF_SUB_IFDS:
            value = _section(exif, tag)
        single = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
        single[tag] = value
        if tag in _EXIF_SUB_IFDS:
            single.tagtype[tag] = TiffTags.LONG
        try:
            single.tobytes()
        except (struct.error, TypeError, ValueError, OverflowError):
            left_out.append(f"0x{tag:04X}")
            continue
        directory[tag] = value
        directory.tagtype[tag] = single.tagtype[tag]
    if left_out:
        logger.warning("EXIF tags %s do not fit a TIFF as Pillow types them; they are left out", ", ".join(left_out))


def _retag_tiff(tiff: bytes, picture: Picture) -> bytes:
    """A TIFF of bare pixels with the picture's metadata, and a fourth channel declared as
    alpha (OpenCV leaves it undeclared): Pillow writes a directory of the pixels' tags and
    ours, and their strips follow it. Pillow's directory counts strip offsets from its own
    end. Pillow's TIFF writer cannot do this itself: libtiff, which compresses, refuses
    the EXIF sections (Exif, GPS) that cameras write."""
    source = Image.open(io.BytesIO(tiff)).tag_v2
    directory = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    for tag, value in source.items():
        directory[tag] = value
        directory.tagtype[tag] = source.tagtype[tag]
    counts = source[_TIFF_STRIP_BYTE_COUNTS]
    strips = b"".join(tiff[start:start + count] for start, count in zip(source[_TIFF_STRIP_OFFSETS], counts))
    directory[_TIFF_STRIP_OFFSETS] = (0, *itertools.accumulate(counts[:-1]))
    directory.tagtype[_TIFF_STRIP_OFFSETS] = TiffTags.LONG
    if len(source[258]) == 4:  # BitsPerSample: RGBA
        directory[_TIFF_EXTRA_SAMPLES] = (2,)  # unassociated alpha
    if picture.exif:
        _add_exif(directory, picture.exif)
    for tag in _TIFF_RESOLUTION_TAGS:  # Pillow's default of 1, unless the picture has one
        directory.pop(tag, None)
    dpi = _resolution_for("TIFF", picture.dpi)
    if dpi:
        directory[_TIFF_RESOLUTION_TAGS[0]], directory[_TIFF_RESOLUTION_TAGS[1]] = dpi
        directory[_TIFF_RESOLUTION_TAGS[2]] = 2  # inches
    if picture.icc_profile:
        directory[_TIFF_ICC_TAG] = picture.icc_profile
    if picture.xmp:
        directory[_TIFF_XMP_TAG] = picture.xmp
    header = b"II*\0" + struct.pack("<I", 8)
    return header + directory.tobytes(len(header)) + strips


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _add_png_metadata(png: bytes, picture: Picture) -> bytes:
    """Insert the metadata chunks right after IHDR (all but iTXt must come before the image
    data, and the colour ones before any palette)."""
    chunks = b""
    if picture.icc_profile:
        chunks += _png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(picture.icc_profile))
    for kind, body in picture.png_colour:
        if not (kind == b"sRGB" and picture.icc_profile):  # the PNG standard: one or the other
            chunks += _png_chunk(kind, body)
    dpi = _resolution_for("PNG", picture.dpi)
    if dpi:
        per_metre = (round(dots / 0.0254) for dots in dpi)
        chunks += _png_chunk(b"pHYs", struct.pack(">IIB", *per_metre, 1))
    if picture.exif:
        chunks += _png_chunk(b"eXIf", picture.exif.removeprefix(b"Exif\0\0"))
    if picture.xmp:  # keyword, no compression, no language, no translated keyword
        chunks += _png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + picture.xmp)
    end_of_header = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR body, CRC
    return png[:end_of_header] + chunks + png[end_of_header:]


def _keep_mode(path: Path, descriptor: int) -> None:
    """A file written over keeps its permissions, as it would if written in place."""
    with contextlib.suppress(OSError):  # a new file, or a file system that refuses chmod
        os.fchmod(descriptor, stat.S_IMODE(os.stat(path).st_mode))


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old file or the whole new one."""
    # Short, so that a target name near the file system's limit still fits.
    temporary = path.with_name(f".mprnet-{secrets.token_hex(4)}.partial")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            _keep_mode(path, handle.fileno())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        reason = error.strerror or str(error)
        raise OutputError(f"{path}: cannot write ({reason})") from None
    except BaseException:
        _remove(temporary)
        raise


def _remove(temporary: Path) -> None:
    """Cleaning up must not replace the error that made it necessary."""
    with contextlib.suppress(OSError):
        temporary.unlink(missing_ok=True)
