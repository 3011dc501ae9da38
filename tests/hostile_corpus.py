"""Files from the wild, made on the spot: decompression bombs, truncated and random files,
bogus metadata, and every pixel mode with and without transparency.

Each maker returns the file's bytes; `build_corpus` writes them all into a folder and says
which ones carry transparency, so a test can check that none loses it silently.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Declared by every bomb: far beyond any sane limit, so a decoder that trusts it would
#: try to allocate tens of gigabytes or more.
HUGE = 200_000


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bytes(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2, extra: bytes = b"",
              rows: bytes | None = None) -> bytes:
    """A PNG with the header we say and `rows` (default: a few bytes of zeros) as its data."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))


def png_bomb() -> bytes:
    return png_bytes(HUGE, HUGE)


def tiff_bytes(entries: list[tuple[int, int, int, int]], data: bytes = b"\x00" * 64) -> bytes:
    """A little-endian TIFF with one directory of (tag, type, count, value) entries;
    offsets (strip or tile) point at `data`, placed after the directory."""
    directory_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + directory_size
    body = struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        if tag in (273, 324):  # StripOffsets, TileOffsets
            value = data_offset
        body += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + body + struct.pack("<I", 0) + data


def _tiff_gray(width: int, height: int) -> list[tuple[int, int, int, int]]:
    return [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
            (277, 3, 1, 1)]


def tiff_bomb() -> bytes:
    return tiff_bytes(_tiff_gray(HUGE, HUGE) + [(273, 4, 1, 0), (278, 4, 1, HUGE), (279, 4, 1, 64)])


def tiff_tile_bomb() -> bytes:
    """A 16x16 image whose one tile is declared HUGE x HUGE."""
    return tiff_bytes(_tiff_gray(16, 16) + [(322, 4, 1, HUGE), (323, 4, 1, HUGE), (324, 4, 1, 0), (325, 4, 1, 64)])


def gif_frame_bomb() -> bytes:
    """A 16x16 screen holding one frame declared 60000 x 60000."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 60000, 60000, 0) + b"\x02\x02\x4c\x01\x00"
    return screen + frame + b";"


def icns_bomb() -> bytes:
    """An icon file whose 512x512 entry is a PNG that declares HUGE x HUGE pixels."""
    entry = png_bomb()
    body = b"ic09" + struct.pack(">I", 8 + len(entry)) + entry
    return b"icns" + struct.pack(">I", 8 + len(body)) + body


def bmp_bomb() -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, HUGE, HUGE, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 64
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + len(pixels), 0, 0, 14 + len(header)) + header + pixels


def jpeg_bomb() -> bytes:
    """A real JPEG whose frame header is rewritten to say 65000 x 65000."""
    data = bytearray(_pil_bytes(Image.new("RGB", (16, 16), (120, 30, 200)), "JPEG"))
    start = data.index(b"\xff\xc0")
    data[start + 5:start + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


BOMBS = {
    "bomb.png": png_bomb, "bomb.tif": tiff_bomb, "tile_bomb.tif": tiff_tile_bomb, "frame_bomb.gif": gif_frame_bomb,
    "bomb.icns": icns_bomb, "bomb.bmp": bmp_bomb, "bomb.jpg": jpeg_bomb,
}


def _pil_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 24, height: int = 20) -> np.ndarray:
    """Smooth RGB content (flat images hide mistakes in channel order)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)


def _alpha(width: int = 24, height: int = 20) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))


def _keyed(mode: str, bit_depth: int) -> bytes:
    """A PNG with a tRNS colour key on gray (bit depth 1, 8 or 16) or RGB (8 or 16)."""
    width, height = 24, 20
    if mode == "gray":
        maximum = (1 << bit_depth) - 1
        values = (np.arange(width) * maximum // (width - 1)).astype(np.uint16)
        if bit_depth == 1:
            row = np.packbits(values.astype(np.uint8)).tobytes()
        elif bit_depth == 8:
            row = values.astype(np.uint8).tobytes()
        else:
            row = values.astype(">u2").tobytes()
        key = struct.pack(">H", 0)
        return png_bytes(width, height, bit_depth=bit_depth, colour_type=0, extra=png_chunk(b"tRNS", key),
                         rows=(b"\x00" + row) * height)
    rgb = gradient(width, height).astype(">u2" if bit_depth == 16 else np.uint8) * (257 if bit_depth == 16 else 1)
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))
    key = struct.pack(">HHH", *(int(v) for v in rgb[0, 0]))
    return png_bytes(width, height, bit_depth=bit_depth, colour_type=2, extra=png_chunk(b"tRNS", key), rows=rows)


def bmp_with_alpha() -> bytes:
    """A 32-bit top-down BMP with a BITMAPV4 header and an alpha mask, as editors write them."""
    width, height = 24, 20
    bgra = np.dstack([gradient(width, height), _alpha(width, height)])[:, :, [2, 1, 0, 3]].tobytes()
    masks = struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    header = struct.pack("<IiiHHIIiiII", 108, width, -height, 1, 32, 3, len(bgra), 2835, 2835, 0, 0) + masks
    header += b"\x00" * (108 - len(header))
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(bgra), 0, 0, offset) + header + bgra


def sixteen_bit_rgba_png() -> bytes:
    import cv2

    rgba = np.dstack([gradient(), _alpha()]).astype(np.uint16) * 257
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert ok
    return encoded.tobytes()


def modes() -> dict[str, tuple[bytes, bool]]:
    """(bytes, has transparency) for every pixel mode we read, with and without alpha."""
    rgb = Image.fromarray(gradient())
    gray = rgb.convert("L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_keyed = palette.copy()
    palette_keyed.info["transparency"] = 0
    rgba = Image.fromarray(np.dstack([gradient(), _alpha()]))
    gray16 = Image.fromarray((np.asarray(gray).astype(np.uint16) * 257))
    return {
        "mode_1.png": (_pil_bytes(gray.convert("1"), "PNG"), False),
        "mode_1_key.png": (_keyed("gray", 1), True),
        "mode_L.png": (_pil_bytes(gray, "PNG"), False),
        "mode_L_key.png": (_keyed("gray", 8), True),
        "mode_LA.png": (_pil_bytes(rgba.convert("LA"), "PNG"), True),
        "mode_I16.png": (_pil_bytes(gray16, "PNG"), False),
        "mode_I16_key.png": (_keyed("gray", 16), True),
        "mode_P.png": (_pil_bytes(palette, "PNG"), False),
        "mode_P_key.png": (_pil_bytes(palette_keyed, "PNG", transparency=0), True),
        "mode_P_key.gif": (_pil_bytes(palette_keyed, "GIF", transparency=0), True),
        "mode_RGB.png": (_pil_bytes(rgb, "PNG"), False),
        "mode_RGB_key.png": (_keyed("rgb", 8), True),
        "mode_RGB16_key.png": (_keyed("rgb", 16), True),
        "mode_RGBA.png": (_pil_bytes(rgba, "PNG"), True),
        "mode_RGBA.webp": (_pil_bytes(rgba, "WEBP", lossless=True), True),
        "mode_RGBA.tif": (_pil_bytes(rgba, "TIFF"), True),
        "mode_RGBA16.png": (sixteen_bit_rgba_png(), True),
        "mode_CMYK.jpg": (_pil_bytes(rgb.convert("CMYK"), "JPEG"), False),
        "mode_CMYK.tif": (_pil_bytes(rgb.convert("CMYK"), "TIFF"), False),
        "mode_YCbCr.jpg": (_pil_bytes(rgb, "JPEG"), False),
        "mode_RGBA32.bmp": (bmp_with_alpha(), True),
        "mode_I.tif": (_pil_bytes(gray.convert("I"), "TIFF"), False),
        "mode_F.tif": (_pil_bytes(gray.convert("F"), "TIFF"), False),
    }


#: Formats Pillow writes that we also read, each saved from a small image and then cut short.
TRUNCATED_FORMATS = {
    "png": "PNG", "jpg": "JPEG", "webp": "WEBP", "tif": "TIFF", "bmp": "BMP", "gif": "GIF", "ico": "ICO",
    "icns": "ICNS", "jp2": "JPEG2000", "tga": "TGA", "ppm": "PPM", "pcx": "PCX", "sgi": "SGI", "qoi": "QOI",
    "dds": "DDS", "blp": "BLP", "avif": "AVIF",
}


def truncated() -> dict[str, bytes]:
    image = Image.fromarray(gradient(64, 48))
    files = {}
    for extension, fmt in TRUNCATED_FORMATS.items():
        try:
            data = _pil_bytes(image, fmt)
        except (OSError, KeyError, ValueError):  # a codec this Pillow build lacks
            continue
        files[f"truncated.{extension}"] = data[: max(len(data) // 2, 8)]
    return files


def bogus_metadata() -> dict[str, bytes]:
    rgb = Image.fromarray(gradient())
    garbage = b"Exif\x00\x00" + bytes(range(256)) * 2
    exif = Image.Exif()
    exif[0x0112] = 9  # an orientation code that does not exist
    bad_icc = png_chunk(b"iCCP", b"junk\x00\x00" + zlib.compress(b"not an ICC profile at all" * 4))
    # 16-bit, so that libpng (inside OpenCV) decodes it, and complains of the profile.
    rgb_rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in gradient().astype(np.uint16) * 257)
    return {
        "exif_garbage.jpg": _pil_bytes(rgb, "JPEG", exif=garbage),
        "exif_bad_orientation.jpg": _pil_bytes(rgb, "JPEG", exif=exif.tobytes()),
        "exif_garbage.png": _pil_bytes(rgb, "PNG", exif=garbage[6:]),
        "bad_icc.png": png_bytes(24, 20, bit_depth=16, extra=bad_icc, rows=rgb_rows),
        "corrupt_strip.tif": corrupt_tiff(),
    }


def corrupt_tiff() -> bytes:
    """A CCITT Group 4 TIFF whose compressed strip is noise: libtiff complains as it decodes."""
    entries = [(256, 4, 1, 64), (257, 4, 1, 48), (258, 3, 1, 1), (259, 3, 1, 4), (262, 3, 1, 0), (277, 3, 1, 1),
               (273, 4, 1, 0), (278, 4, 1, 48), (279, 4, 1, 256)]
    return tiff_bytes(entries, np.random.default_rng(7).integers(0, 256, 256, dtype=np.uint8).tobytes())


def garbage() -> dict[str, bytes]:
    noise = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return {"empty.png": b"", "random.jpg": noise, "random.png": noise[:100], "random.tif": b"II*\x00" + noise,
            "text.webp": b"this is not an image\n" * 10}


@dataclass(frozen=True)
class Corpus:
    folder: Path
    #: File names whose pixels carry transparency.
    transparent: frozenset[str]
    #: File names that must be refused (bombs and unreadable files).
    bombs: frozenset[str]


def build_corpus(folder: Path) -> Corpus:
    folder.mkdir(parents=True, exist_ok=True)
    transparent = set()
    files: dict[str, bytes] = {name: make() for name, make in BOMBS.items()}
    for name, (data, has_alpha) in modes().items():
        files[name] = data
        if has_alpha:
            transparent.add(name)
    files.update(truncated())
    files.update(bogus_metadata())
    files.update(garbage())
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Corpus(folder, frozenset(transparent), frozenset(BOMBS))
