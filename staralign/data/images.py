"""Reading face images as 8-bit BGR, with errors that say which image and which row.

Also the size of a JPEG, PNG, BMP or WebP file from its header (pure Python, no
decoder: :func:`header_size`) and one size check (:func:`check_size`), so a
decompression bomb (a few kilobytes claiming gigapixels) is refused before a
decoder allocates anything.  :func:`decode_checked` is that guard for files (``predict``,
the training pre-flight, ``staralign data check``); ``staralign serve`` uses the same pieces
with its own limits and HTTP answers.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import cv2
import numpy as np

from .._io import FileProblem

__all__ = [
    "MAX_PIXELS",
    "MAX_SIDE",
    "HeaderError",
    "ImageReadError",
    "check_size",
    "decode_image",
    "decode_checked",
    "header_size",
    "image_size",
    "read_image",
    "read_image_bytes",
    "sniff_type",
    "to_bgr8",
]

MAX_PIXELS = 100_000_000  # default limits of check_size: a typo or a bomb, not a face photo
MAX_SIDE = 20_000

# bytes, bytearray, memoryview or a 1-D uint8 numpy array (what read_image_bytes returns).
Buffer = bytes | bytearray | memoryview | np.ndarray


class ImageReadError(FileProblem):
    """An image is missing or cannot be decoded; names the file and the annotation row."""

    def __init__(self, path: str | os.PathLike, reason: str, source: str = "", line: int = 0) -> None:
        self.path, self.reason, self.source, self.line = str(path), reason, source, line
        where = f" (listed in {source}:{line})" if source and line else (f" (listed in {source})" if source else "")
        super().__init__(f"image {path}{where}: {reason}")


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Any decoded image (grey, BGRA, 16-bit, float) -> HxWx3 uint8 BGR."""
    img = np.asarray(image)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img, initial=0.0)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    raise ValueError(f"unsupported image shape {img.shape}")


def read_image(path: str | os.PathLike, source: str = "", line: int = 0) -> np.ndarray:
    """HxWx3 uint8 BGR, as the original reads it (``cv2.IMREAD_COLOR``: EXIF orientation
    applied; grey, alpha and 16-bit images converted to 8-bit BGR).

    Raises :class:`ImageReadError` naming the file and, when given, the annotation
    file and line that listed it.
    """
    return decode_image(read_image_bytes(path, source, line), path, source, line)


def read_image_bytes(path: str | os.PathLike, source: str = "", line: int = 0) -> np.ndarray:
    """The raw bytes of an image file (uint8 array), or :class:`ImageReadError`."""
    p = Path(path)
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(p, "no such file", source, line) from None
    except IsADirectoryError:
        raise ImageReadError(p, "is a directory, not an image", source, line) from None
    except OSError as exc:
        raise ImageReadError(p, f"cannot read: {exc.strerror or exc}", source, line) from None
    if data.size == 0:
        raise ImageReadError(p, "empty file", source, line)
    return data


def decode_image(data: np.ndarray, path: str | os.PathLike = "<bytes>", source: str = "",
                 line: int = 0) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 BGR (see :func:`read_image`)."""
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(path, "not a readable image (OpenCV cannot decode it)", source, line)
    return to_bgr8(image)


def check_size(width: int, height: int, name: str | os.PathLike = "<array>", *, max_pixels: int = MAX_PIXELS,
               max_side: int = MAX_SIDE) -> None:
    """Raise :class:`ImageReadError` naming ``name`` and the limits if the image is too large."""
    if width > max_side or height > max_side or width * height > max_pixels:
        raise ImageReadError(
            name, f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels) is too large to process "
                  f"(limits: {max_pixels / 1e6:g} megapixels, {max_side} pixels a side); resize it first")


def decode_checked(data: np.ndarray, path: str | os.PathLike = "<bytes>", source: str = "",
                   line: int = 0) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8 BGR, the size checked BEFORE decoding and again after.

    The one guard against decompression bombs, shared by ``predict``, the training pre-flight
    and ``staralign data check``: the size comes from the header (JPEG, PNG, BMP and WebP in
    pure Python; other types through Pillow's header parser where Pillow is installed), so an
    image claiming billions of pixels is refused without being decoded.  A corrupt header, an
    undecodable file or one over the limits raises :class:`ImageReadError` naming ``path``.
    """
    try:
        size = header_size(data)
    except HeaderError as exc:
        raise ImageReadError(path, f"not a readable image: {exc}", source, line) from None
    if size is None:
        size = _pillow_size(data, path)
    if size is not None:
        check_size(*size, name=path)
    image = decode_image(data, path, source, line)
    check_size(image.shape[1], image.shape[0], name=path)
    return image


def _pillow_size(data: np.ndarray, path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) via Pillow's header parsing, for types :func:`header_size` does not read;
    None without Pillow or for a file Pillow does not know (OpenCV may still read it).

    Pillow's global bomb limit is left alone: past it, Pillow refuses to say the size, so the
    file is refused here, as over that limit.
    """
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageReadError(
            path, f"more than {limit / 1e6:g} megapixels (Pillow's decompression-bomb limit) is too large to "
                  f"process (limits: {MAX_PIXELS / 1e6:g} megapixels, {MAX_SIDE} pixels a side); "
                  "resize it first") from None
    except Exception:  # not an image Pillow knows
        return None


# --------------------------------------------------------------------------- sizes from headers


class HeaderError(ValueError):
    """The header of an image of a known type is truncated or inconsistent (a corrupt file)."""


def _view(data: Buffer) -> memoryview:
    """A flat byte view of ``data``, without copying it."""
    view = memoryview(data)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def sniff_type(data: Buffer) -> str | None:
    """The type (``"jpeg"``, ``"png"``, ``"bmp"``, ``"webp"``) whose header :func:`image_size` reads, or None."""
    view = _view(data)
    if view[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if view[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if view[:2] == b"BM" and len(view) >= 18:
        return "bmp"
    if view[:4] == b"RIFF" and view[8:12] == b"WEBP":
        return "webp"
    return None


def image_size(data: Buffer, kind: str) -> tuple[int, int]:
    """``(width, height)`` from the header of an image of type ``kind`` (see :func:`sniff_type`).

    Raises :class:`HeaderError` if the header is truncated or holds no size.
    """
    try:
        width, height = _SIZE_READERS[kind](_view(data))
    except (struct.error, IndexError) as exc:
        raise HeaderError(f"truncated {kind.upper()} header") from exc
    if width <= 0 or height <= 0:
        raise HeaderError(f"{kind.upper()} header gives an empty size {width}x{height}")
    return width, height


def header_size(data: Buffer) -> tuple[int, int] | None:
    """``(width, height)`` of an encoded image from its header; None for a type not read here.

    Raises :class:`HeaderError` for a corrupt header of a known type.
    """
    kind = sniff_type(data)
    return None if kind is None else image_size(data, kind)


def _png(data: memoryview) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise HeaderError("PNG without an IHDR chunk first")
    return struct.unpack(">II", data[16:24])


def _bmp(data: memoryview) -> tuple[int, int]:
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    if header < 40:
        raise HeaderError(f"BMP with an unknown header size {header}")
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # negative height: rows stored top-down


def _webp(data: memoryview) -> tuple[int, int]:
    chunk = bytes(data[12:16])
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


def _jpeg(data: memoryview) -> tuple[int, int]:
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
