"""Metadata in each format's own containers: read out of a decoded image, written into
encoded bytes.

Pillow reads it all and writes it for JPEG and WebP. PNG and TIFF get theirs from here:
16-bit PNGs come from OpenCV, which writes none, so PNG chunks are inserted by hand for
every depth; and TIFFs get a directory of their own in front of their strips, since
libtiff, which Pillow compresses with, refuses the EXIF sections cameras write.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import struct
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image, ImageOps, TiffImagePlugin, TiffTags

if TYPE_CHECKING:
    from mprnet_cli.imageio import Picture

logger = logging.getLogger("mprnet")
T = TypeVar("T")

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


def _guarded(where: str, action: Callable[[], T],
             what: str = "EXIF that cannot be read or rewritten is left out") -> T | None:
    """Cameras and editors write odd EXIF, and Pillow's parser and writer raise many kinds of
    error on it (a tag of an unusual type, a section pointing nowhere): whatever fails costs
    the EXIF, with a warning, never the image. `where` names the image ("photo.jpg: ")."""
    try:
        return action()
    except Exception:  # noqa: BLE001 - see above
        logger.warning("%s%s", where, what)
        return None


def xmp_as_bytes(image: Image.Image) -> None:
    """Some TIFF writers type the XMP packet as text, and Pillow's own EXIF reading (in
    `load`) then trips over it: it is made the bytes Pillow expects, the file's own bytes
    again (Pillow decodes text tags as Latin-1)."""
    if isinstance(image.info.get("xmp"), str):
        image.info["xmp"] = image.info["xmp"].encode("latin-1", "replace")


def orientation(image: Image.Image, label: str) -> int | None:
    """The EXIF orientation, or None when the EXIF cannot be read."""
    return _guarded(f"{label}: ", lambda: image.getexif().get(_EXIF_ORIENTATION, 1))


def upright(image: Image.Image, label: str) -> Image.Image | None:
    """The image turned as its EXIF says, orientation cleared (in XMP too), by Pillow; None
    when Pillow cannot rewrite the EXIF, and the caller turns the pixels itself."""
    return _guarded(f"{label}: ", lambda: ImageOps.exif_transpose(image),
                    "its EXIF cannot be rewritten for the turned photo; EXIF and XMP are left out")


def tiff_exif(image: Image.Image, label: str) -> bytes | None:
    """A TIFF source's EXIF: its descriptive tags and camera sections, not its layout."""
    def kept_tags() -> bytes | None:
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

    return _guarded(f"{label}: ", kept_tags)


def _loaded(exif: bytes, where: str) -> Image.Exif | None:
    """Parsed, sections and all (Pillow reads those only when first asked for them)."""
    def load() -> Image.Exif:
        tags = Image.Exif()
        tags.load(exif)
        for pointer in _EXIF_SUB_IFDS:
            _section(tags, pointer)
        return tags

    return _guarded(where, load)


def _section(exif: Image.Exif, pointer: int) -> dict[int, Any]:
    """An EXIF section with the sections it points to as dicts, not as offsets into the
    source file, which mean nothing once written elsewhere."""
    section = dict(exif.get_ifd(pointer))
    if _EXIF_INTEROPERABILITY in section:
        section[_EXIF_INTEROPERABILITY] = dict(exif.get_ifd(_EXIF_INTEROPERABILITY))
    return section


def declared_dpi(declared: Any, orientation: int) -> tuple[float, float] | None:
    """A resolution that makes no sense (zero, a zero denominator, text) is left behind, and
    so is 1x1, which Pillow reports for a TIFF that declares none (and writes by default)."""
    try:
        x, y = (float(v) for v in declared)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in (x, y)) or (x, y) == (1.0, 1.0):
        return None
    return (y, x) if orientation in _TRANSPOSING_ORIENTATIONS else (x, y)


def turned_exif(exif: bytes | None, orientation: int, label: str) -> bytes | None:
    """After a quarter turn, the pixel dimensions that cameras record must swap too."""
    if not exif or orientation not in _TRANSPOSING_ORIENTATIONS:
        return exif

    def swapped() -> bytes:
        tags = Image.Exif()
        tags.load(exif)
        section = tags.get_ifd(_EXIF_SUB_IFDS[0])
        if _PIXEL_X_DIMENSION not in section or _PIXEL_Y_DIMENSION not in section:
            return exif
        section[_PIXEL_X_DIMENSION], section[_PIXEL_Y_DIMENSION] = section[_PIXEL_Y_DIMENSION], section[_PIXEL_X_DIMENSION]
        return tags.tobytes()

    return _guarded(f"{label}: ", swapped)


def png_colour_chunks(info: dict[str, Any]) -> tuple[tuple[bytes, bytes], ...]:
    """The chunks again from the values Pillow parsed them into (in units of 1/100000)."""
    chunks = []
    if "srgb" in info:
        chunks.append((b"sRGB", struct.pack(">B", info["srgb"])))
    if "gamma" in info:
        chunks.append((b"gAMA", struct.pack(">I", round(info["gamma"] * 100000))))
    if "chromaticity" in info:
        chunks.append((b"cHRM", struct.pack(">8I", *(round(v * 100000) for v in info["chromaticity"]))))
    return tuple(chunks)


def pillow_options(picture: Picture, fmt: str, where: str) -> dict[str, object]:
    """Pillow's save options for the metadata that `fmt` (JPEG, WebP, BMP) can hold."""
    options: dict[str, object] = {}
    dpi = _resolution_for(fmt, picture.dpi, where)
    if dpi:
        options["dpi"] = dpi
    if fmt not in _METADATA_FORMATS:
        return options
    exif, xmp = picture.exif, picture.xmp
    if fmt == "JPEG":
        exif = _fits_jpeg(exif, _JPEG_MAX_EXIF, "EXIF", where)
        xmp = _fits_jpeg(xmp, _JPEG_MAX_XMP, "XMP", where)
    options.update({k: v for k, v in (("icc_profile", picture.icc_profile), ("exif", exif), ("xmp", xmp)) if v})
    return options


def _resolution_for(fmt: str, dpi: tuple[float, float] | None, where: str) -> tuple[float, float] | None:
    """The resolution if `fmt` can record it: JPEG in whole dots per inch up to 65535, PNG
    and BMP in whole dots per metre up to 2**31 - 1 (a microscope's can be more)."""
    if dpi is None or fmt not in _RESOLUTION_RANGES:
        return None
    per_unit, (low, high) = _RESOLUTION_RANGES[fmt]
    if all(low <= round(value * per_unit) <= high for value in dpi):
        return dpi
    logger.warning("%s%s cannot record a resolution of %g x %g dpi; it is left out", where, fmt, *dpi)
    return None


def _fits_jpeg(block: bytes | None, limit: int, name: str, where: str) -> bytes | None:
    if block and len(block) > limit:
        logger.warning("%s%s of %d bytes is more than a JPEG can hold (%d); it is dropped", where, name, len(block), limit)
        return None
    return block


def add_png_metadata(png: bytes, picture: Picture, where: str) -> bytes:
    """Insert the metadata chunks right after IHDR (all but iTXt must come before the image
    data, and the colour ones before any palette)."""
    chunks = b""
    if picture.icc_profile:
        chunks += _png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(picture.icc_profile))
    for kind, body in picture.png_colour:
        if not (kind == b"sRGB" and picture.icc_profile):  # the PNG standard: one or the other
            chunks += _png_chunk(kind, body)
    dpi = _resolution_for("PNG", picture.dpi, where)
    if dpi:
        per_metre = (round(dots * _RESOLUTION_RANGES["PNG"][0]) for dots in dpi)
        chunks += _png_chunk(b"pHYs", struct.pack(">IIB", *per_metre, 1))
    if picture.exif:
        chunks += _png_chunk(b"eXIf", picture.exif.removeprefix(b"Exif\0\0"))
    if picture.xmp:  # keyword, no compression, no language, no translated keyword
        chunks += _png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + picture.xmp)
    end_of_header = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR body, CRC
    return png[:end_of_header] + chunks + png[end_of_header:]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def retag_tiff(tiff: bytes, picture: Picture, where: str) -> bytes:
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
        _add_exif(directory, picture.exif, where)
    for tag in _TIFF_RESOLUTION_TAGS:  # Pillow's default of 1, unless the picture has one
        directory.pop(tag, None)
    dpi = _resolution_for("TIFF", picture.dpi, where)
    if dpi:
        directory[_TIFF_RESOLUTION_TAGS[0]], directory[_TIFF_RESOLUTION_TAGS[1]] = dpi
        directory[_TIFF_RESOLUTION_TAGS[2]] = 2  # inches
    if picture.icc_profile:
        directory[_TIFF_ICC_TAG] = picture.icc_profile
    if picture.xmp:
        directory[_TIFF_XMP_TAG] = picture.xmp
    header = b"II*\0" + struct.pack("<I", 8)
    return header + directory.tobytes(len(header)) + strips


def _add_exif(directory: TiffImagePlugin.ImageFileDirectory_v2, exif_bytes: bytes, where: str) -> None:
    """EXIF keeps no tag types, and Pillow guesses them again from its table: a value that
    does not fit the guess (a LONG where it expects a SHORT) is left out, not the image."""
    exif = _loaded(exif_bytes, where)
    if exif is None:
        return
    left_out = []
    for tag, value in exif.items():
        if tag in _TIFF_LAYOUT_TAGS or tag == _EXIF_ORIENTATION:  # the pixels are upright
            continue
        if tag in _EXIF_SUB_IFDS:
            value = _section(exif, tag)
        single = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
        single[tag] = value
        if tag in _EXIF_SUB_IFDS:
            single.tagtype[tag] = TiffTags.LONG
        try:
            single.tobytes()
        except Exception:  # noqa: BLE001 - as in `_guarded`, for this tag alone
            left_out.append(f"0x{tag:04X}")
            continue
        directory[tag] = value
        directory.tagtype[tag] = single.tagtype[tag]
    if left_out:
        logger.warning("%sEXIF tags %s do not fit a TIFF as Pillow types them; they are left out", where,
                       ", ".join(left_out))
