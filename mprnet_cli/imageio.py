"""Decode and encode images, keeping what a photographer expects to survive.

Pillow does the formats (EXIF orientation applied; `mprnet_cli.metadata` carries ICC,
EXIF, XMP and DPI). Pillow reads 16-bit RGB as 8 bits, so 16-bit colour PNG and TIFF
pixels go through OpenCV instead.
Files are written atomically: a temporary file beside the target, then a rename, so an
interrupted run never leaves a truncated image under the final name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import stat
import struct
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from mprnet_cli import library_messages, metadata
from mprnet_cli.errors import InputError, OutputError
from mprnet_cli.pixels import UnsupportedMode, pil_pixels, with_colour_key

logger = logging.getLogger("mprnet")

# Pillow's decompression-bomb guard is set to the caller's limit on each decode
# (`limit_decoders`); without a limit there is none. Its warning, for sizes up to half the
# guard's, says nothing: our own check refuses what is over the limit, with the file's name.
Image.MAX_IMAGE_PIXELS = None
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow's guard on decompressed PNG text chunks (1 MB) also refuses the larger ICC profiles
# that some printers' and scanners' are; 64 MB still stops a decompression bomb.
PngImagePlugin.MAX_TEXT_CHUNK = 64 * 1024 * 1024

#: Output extensions and the Pillow format each one writes.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
_SIXTEEN_BIT_FORMATS = {"PNG", "TIFF"}
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


def readable_extensions() -> set[str]:
    """The file extensions of every format Pillow reads here."""
    Image.init()
    return {extension.lower() for extension in Image.registered_extensions()}


def opens_as_an_image(path: Path) -> bool:
    """Whether a file's header is one Pillow reads (only the header is read)."""
    with library_messages.collect(str(path)):
        try:
            with Image.open(path):
                return True
        except Image.DecompressionBombError:  # an image, refused when it is read
            return True
        except (OSError, ValueError, SyntaxError, struct.error):
            return False


def limit_decoders(max_pixels: int | None) -> None:
    """Set every decoder's own guard to `max_pixels`, so that a file declaring more is
    refused by its declared size, before anything is allocated.

    Our check reads the size Pillow reports once a file is open, but that is not what
    every decoder allocates: an icon's entries, a GIF's frames and a TIFF's tiles declare
    sizes of their own. Pillow checks each of those against MAX_IMAGE_PIXELS and refuses
    above twice that value. OpenCV reads its limit from the environment once, as it loads,
    so it is set before its first import (16-bit colour goes through it).
    """
    Image.MAX_IMAGE_PIXELS = None if max_pixels is None else -(-max_pixels // 2)
    if max_pixels is not None and "cv2" not in sys.modules:
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)


def decode_image(data: bytes, label: str, max_pixels: int | None = None) -> Picture:
    """Decode image bytes (`label` names the source in messages: a path, or `-` for stdin).

    What the libraries print or warn while decoding becomes one warning naming `label`
    (see `mprnet_cli.library_messages`)."""
    if not data:
        raise InputError(f"{label}: empty file, not an image")
    limit_decoders(max_pixels)
    with library_messages.collect(label):
        return _decode(data, label, max_pixels)


def _decode(data: bytes, label: str, max_pixels: int | None) -> Picture:
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise InputError(
                f"{label}: {image.width}x{image.height} is over the {max_pixels:,}-pixel limit (raise it with --max-pixels)"
            )
        metadata.xmp_as_bytes(image)
        image.load()
        _warn_of_other_frames(data, label)
        orientation = metadata.orientation(image, label)  # None: the EXIF cannot be read
        icc_profile = _valid_icc_profile(image.info.get("icc_profile"), label)
        dpi = metadata.declared_dpi(image.info.get("dpi"), orientation or 1)
        png_colour = metadata.png_colour_chunks(image.info) if image.format == "PNG" else ()
        sixteen_bit_color = _is_sixteen_bit_color(image, data)
        exif, xmp, turn_pixels = None, image.info.get("xmp") or None, 1
        if orientation is not None:
            tiff_exif = metadata.tiff_exif(image, label) if image.format == "TIFF" else None
            upright = metadata.upright(image, label)
            if upright is None:
                xmp, turn_pixels = None, orientation  # it may hold the orientation too
            else:
                image, xmp = upright, upright.info.get("xmp") or None  # its orientation cleared
                exif = metadata.turned_exif(tiff_exif or image.info.get("exif") or None, orientation, label)
        if image.mode == "CMYK":
            # The pixels become RGB, which a CMYK profile cannot describe: keeping it would
            # make colour-managed viewers reject the output or misread its colours.
            logger.warning("%s: CMYK is converted to RGB without colour management%s", label,
                           "; its CMYK colour profile is dropped" if icc_profile else "")
            image, icc_profile = image.convert("RGB"), None
        if sixteen_bit_color:
            pixels = _decode_sixteen_bit(data, orientation or 1)
            key = image.info.get("transparency")  # OpenCV leaves a colour key unresolved
            if pixels.shape[2] == 3 and isinstance(key, tuple):
                pixels = with_colour_key(pixels, key)
        else:
            pixels = np.ascontiguousarray(_orient(pil_pixels(image), turn_pixels))
    except UnsupportedMode as error:
        raise InputError(f"{label}: {error}") from None
    except Image.DecompressionBombError as error:
        raise InputError(f"{label}: {_declared_pixels(error)}, over the {max_pixels or 0:,}-pixel limit "
                         "(raise it with --max-pixels)") from None
    except MemoryError:
        raise InputError(f"{label}: not enough memory to decode it") from None
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_SIGNATURES):
            raise InputError(f"{label}: truncated or corrupt image (its header is unreadable)") from None
        raise InputError(f"{label}: not an image, or a format mprnet cannot read") from None
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        raise InputError(f"{label}: truncated or corrupt image ({error})") from None
    return Picture(pixels=pixels, icc_profile=icc_profile, exif=exif, xmp=xmp, dpi=dpi, png_colour=png_colour)


def _valid_icc_profile(profile: bytes | None, label: str) -> bytes | None:
    """A profile that is not one (its header's `acsp` signature missing) would be copied
    into the output, where colour-managed viewers reject it or the whole image."""
    if not profile:
        return None
    if len(profile) < 128 or profile[36:40] != b"acsp":
        logger.warning("%s: its ICC colour profile is damaged; it is left out", label)
        return None
    return profile


def _declared_pixels(error: Image.DecompressionBombError) -> str:
    """Pillow's message holds the pixel count a part of the file declared."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"declares an image of {int(found.group(1)):,} pixels" if found else "declares an image of too many pixels"


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
    except cv2.error as error:  # its own size guard, or a damaged file
        raise ValueError(f"OpenCV could not decode the 16-bit pixels: {error.err or error}") from None
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


def format_for(path: str | os.PathLike[str]) -> str:
    """The Pillow format name for an output path's extension (a local path or a store's URI,
    which `Path` would spell `s3:/` in messages)."""
    suffix = os.path.splitext(os.fspath(path))[1]
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        if not suffix:
            raise OutputError(f"{path}: no extension to choose the output format by ({known}); "
                              f"for a directory, write {path}/")
        raise OutputError(f"{path}: unknown output format {suffix!r}; use one of {known}")
    return fmt


def encode_image(picture: Picture, fmt: str, quality: int = 95, label: str = "") -> bytes:
    """Encode to `fmt` ('PNG', 'JPEG', ...). 16-bit pixels stay 16-bit where the format
    allows; alpha is dropped (with a warning) where it does not. `label` names the output in
    warnings (in a batch, they come from the writer while other images are being read), and
    what the encoders print (see `mprnet_cli.library_messages`)."""
    with library_messages.collect(label or f"{fmt} output"):
        return _encode(picture, fmt, quality, label)


def _encode(picture: Picture, fmt: str, quality: int, label: str) -> bytes:
    where = f"{label}: " if label else ""
    pixels = picture.pixels
    if fmt == "JPEG" and _has_alpha(pixels):
        logger.warning("%s%s cannot store transparency; the alpha channel is dropped", where, fmt)
        pixels = pixels[..., :-1] if pixels.shape[-1] == 4 else pixels[..., 0]
    if pixels.dtype == np.uint16 and fmt not in _SIXTEEN_BIT_FORMATS:
        logger.warning("%s%s cannot store 16 bits per channel; writing 8 bits", where, fmt)
        pixels = np.round(pixels / 257.0).astype(np.uint8)
    if fmt == "BMP" and _has_alpha(pixels):
        return _bmp_with_alpha(pixels, metadata.pillow_options(picture, fmt, where).get("dpi"))
    if fmt in ("PNG", "TIFF"):  # bare pixels, then the metadata in the format's own containers
        if pixels.dtype == np.uint16 and pixels.ndim == 3:
            bare = _sixteen_bit_color_bytes(pixels, fmt)
        else:
            bare = _pil_bytes(pixels, fmt, **({"compression": "tiff_lzw"} if fmt == "TIFF" else {}))
        return metadata.add_png_metadata(bare, picture, where) if fmt == "PNG" else metadata.retag_tiff(bare, picture, where)
    options = metadata.pillow_options(picture, fmt, where)
    if fmt == "JPEG":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        options.update(quality=quality, lossless=quality >= 100)
    return _pil_bytes(pixels, fmt, **options)


def _pil_bytes(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _bmp_with_alpha(pixels: np.ndarray, dpi: tuple[float, float] | None) -> bytes:
    """A 32-bit BMP whose BITMAPV5 header declares the fourth byte alpha. Pillow writes RGBA
    as a plain 32-bit BMP, whose fourth byte readers (Pillow among them) ignore."""
    pixels = _as_rgba(pixels)
    height, width = pixels.shape[:2]
    bgra = np.ascontiguousarray(pixels[::-1, :, [2, 1, 0, 3]]).tobytes()  # rows bottom-up
    per_metre = [round(dots / 0.0254) for dots in dpi] if dpi else [0, 0]
    header = struct.pack(
        "<IiiHHIIiiII4I4s36s3I4I",
        124, width, height, 1, 32, 3, len(bgra), *per_metre, 0, 0,  # 3: BI_BITFIELDS
        0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000,  # red, green, blue and alpha masks
        b"BGRs", b"", 0, 0, 0, 4, 0, 0, 0,  # sRGB, no end points or gamma; intent: images
    )
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(bgra), 0, 0, offset) + header + bgra


def _as_rgba(pixels: np.ndarray) -> np.ndarray:
    """Gray with alpha (HxWx2) as RGBA, for writers that take no two-channel image."""
    if pixels.shape[2] != 2:
        return pixels
    gray, alpha = pixels[..., 0], pixels[..., 1]
    return np.dstack([gray, gray, gray, alpha])


def _has_alpha(pixels: np.ndarray) -> bool:
    return pixels.ndim == 3 and pixels.shape[2] in (2, 4)


def _sixteen_bit_color_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    """16-bit RGB, RGBA, or gray with alpha (as RGBA: Pillow writes no 16-bit gray with
    alpha, and OpenCV no two-channel image)."""
    import cv2

    pixels = _as_rgba(pixels)
    order = cv2.COLOR_RGBA2BGRA if pixels.shape[2] == 4 else cv2.COLOR_RGB2BGR
    try:
        ok, encoded = cv2.imencode(".png" if fmt == "PNG" else ".tiff", cv2.cvtColor(pixels, order))
    except cv2.error as error:
        raise ValueError(f"OpenCV could not encode a 16-bit {fmt}: {error.err or error}") from None
    if not ok:
        raise ValueError(f"OpenCV could not encode a 16-bit {fmt}")
    return encoded.tobytes()


def _keep_mode(path: Path, descriptor: int) -> None:
    """A file written over keeps its permissions, as it would if written in place."""
    with contextlib.suppress(OSError):  # a new file, or a file system that refuses chmod
        os.fchmod(descriptor, stat.S_IMODE(os.stat(path).st_mode))


#: The temporary names of `atomic_file`: short, so that a target name near the file
#: system's limit still fits, and hidden.
PARTIAL_PATTERN = ".mprnet-*.partial"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old file or the whole new one."""
    with atomic_file(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A new file that appears at `path` whole, and only if the block ends without an error:
    a temporary file beside it, synced, then renamed over it (a video writer streams into
    it for hours; an interrupt leaves nothing behind)."""
    temporary = path.with_name(PARTIAL_PATTERN.replace("*", secrets.token_hex(4)))
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            _keep_mode(path, handle.fileno())
            yield handle
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
