"""What an uploaded file is and how large it will be, from its first bytes, before decoding.

The server never trusts a file name or a declared content type: the format comes
from the magic bytes and the pixel count from the header, so a decompression bomb
(a few kilobytes claiming gigapixels) is refused before a decoder allocates
anything.  Only formats a browser can also draw on a canvas are accepted (the page
draws the photo itself); TIFF, GIF and the rest get a clear 415.

Pure Python on purpose: no Pillow needed to run the server.
"""

from __future__ import annotations

import struct

__all__ = ["ACCEPTED_TYPES", "HeaderError", "describe_unsupported", "image_size", "sniff_type"]

# format name -> MIME type, for the formats the server decodes and the page can draw.
ACCEPTED_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "bmp": "image/bmp",
    "webp": "image/webp",
}

# Recognised but refused, so the error can name what was sent.
_KNOWN_OTHERS: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"%PDF", 0, "PDF"),
    (b"<svg", 0, "SVG"),
    (b"<?xml", 0, "XML/SVG"),
)


class HeaderError(ValueError):
    """The header of an image of a known type is truncated or inconsistent (a corrupt file)."""


def sniff_type(data: bytes) -> str | None:
    """The accepted format (``"jpeg"``, ``"png"``, ``"bmp"``, ``"webp"``) of ``data``, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"BM") and len(data) >= 18:
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def describe_unsupported(data: bytes) -> str:
    """A short name for a file we refuse ("GIF", "TIFF", ..., "text", "unknown")."""
    for magic, offset, name in _KNOWN_OTHERS:
        if data[offset:offset + len(magic)] == magic:
            return name
    head = data[:512]
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head):
        return "text"
    return "unknown"


def image_size(data: bytes, kind: str) -> tuple[int, int]:
    """``(width, height)`` from the header of an image of type ``kind`` (see :func:`sniff_type`).

    Raises :class:`HeaderError` if the header is truncated or holds no size.
    """
    try:
        width, height = _SIZE_READERS[kind](data)
    except (struct.error, IndexError) as exc:
        raise HeaderError(f"truncated {kind.upper()} header") from exc
    if width <= 0 or height <= 0:
        raise HeaderError(f"{kind.upper()} header gives an empty size {width}x{height}")
    return width, height


def _png(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise HeaderError("PNG without an IHDR chunk first")
    return struct.unpack(">II", data[16:24])


def _bmp(data: bytes) -> tuple[int, int]:
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    if header < 40:
        raise HeaderError(f"BMP with an unknown header size {header}")
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # negative height: rows stored top-down


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: frame tag (3 bytes), start code 9d 01 2a, 14-bit sizes
        if data[23:26] != b"\x9d\x01\x2a":
            raise HeaderError("WebP VP8 frame without its start code")
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature 0x2f, then 14-bit (size - 1) fields
        if data[20] != 0x2F:
            raise HeaderError("WebP VP8L stream without its signature")
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit (canvas size - 1) fields after 4 flag bytes
        if len(data) < 30:
            raise HeaderError("truncated WebP VP8X header")
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise HeaderError(f"WebP with an unknown first chunk {chunk!r}")


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): they carry the size.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})


def _jpeg(data: bytes) -> tuple[int, int]:
    """Walk the marker segments (skipping APPn, so an EXIF thumbnail is never mistaken) to the SOF."""
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise HeaderError(f"JPEG marker expected at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            break
        length = struct.unpack(">H", data[i:i + 2])[0]
        if length < 2:
            raise HeaderError("JPEG segment with an impossible length")
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 3:i + 7])
            return width, height
        i += length
    raise HeaderError("JPEG without a frame header (no size before the image data)")


_SIZE_READERS = {"png": _png, "bmp": _bmp, "webp": _webp, "jpeg": _jpeg}
