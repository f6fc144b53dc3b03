"""What an uploaded file is and how large it will be, from its first bytes, before decoding.

The server never trusts a file name or a declared content type: the format comes
from the magic bytes and the pixel count from the header, so a decompression bomb
(a few kilobytes claiming gigapixels) is refused before a decoder allocates
anything.  Only formats a browser can also draw on a canvas are accepted (the page
draws the photo itself); TIFF, GIF and the rest get a clear 415.

The header reading itself (pure Python, no Pillow needed) is
:mod:`staralign.data.images`'s, shared with ``staralign predict``; it is
re-exported here.
"""

from __future__ import annotations

from ..data.images import HeaderError, image_size, sniff_type

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


def describe_unsupported(data: bytes) -> str:
    """A short name for a file we refuse ("GIF", "TIFF", ..., "text", "unknown")."""
    for magic, offset, name in _KNOWN_OTHERS:
        if data[offset:offset + len(magic)] == magic:
            return name
    head = data[:512]
    if head and all(b in b"\t\n\r" or 32 <= b < 127 for b in head):
        return "text"
    return "unknown"
