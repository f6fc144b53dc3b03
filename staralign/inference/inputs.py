"""What users feed in: image files, arrays, PIL images, folders and videos, as 8-bit BGR.

Files are read once and decoded by ``staralign.data.images`` (OpenCV
``IMREAD_COLOR``: EXIF orientation applied; grey, alpha and 16-bit converted),
after a size check from the header (JPEG, PNG, BMP and WebP in pure Python; other
types through Pillow where it is installed), so a decompression bomb is refused
before it is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.images import (
    MAX_PIXELS,
    MAX_SIDE,
    ImageReadError,
    check_size,
    decode_checked,
    read_image_bytes,
    to_bgr8,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MAX_SIDE",
    "VIDEO_EXTENSIONS",
    "ImageReadError",
    "InputItem",
    "as_bgr",
    "check_size",
    "collect_inputs",
    "load_image",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2",
                              ".pgm", ".ppm", ".pbm", ".pnm", ".sr", ".ras", ".exr", ".hdr", ".pic"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg",
                              ".wmv", ".flv", ".3gp", ".ogv"})


def load_image(path: str | os.PathLike) -> np.ndarray:
    """HxWx3 uint8 BGR of an image file; :class:`ImageReadError` (naming the file) if unusable.

    The file is read once; its size comes from the header and is checked before decoding.
    """
    p = Path(path)
    return decode_checked(read_image_bytes(p), p)


def _from_pil(image: Any) -> np.ndarray:
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # what viewers show, like cv2.imread
    check_size(*image.size, name=getattr(image, "filename", "") or "<PIL image>")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return to_bgr8(np.asarray(image).astype(np.uint16))
    if image.mode == "I":  # 32-bit integer grey: PNG 16-bit opened by some Pillow versions
        return to_bgr8(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    return as_bgr(np.asarray(image), "rgb")


def as_bgr(image: Any, color: str = "bgr") -> np.ndarray:
    """A path, numpy array (``color`` ``"bgr"`` or ``"rgb"``; grey, 4-channel, 16-bit or float
    in [0, 1] accepted) or PIL image -> HxWx3 uint8 BGR (C-contiguous)."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if type(image).__module__.startswith("PIL."):
        return _from_pil(image)
    if color not in ("bgr", "rgb"):
        raise ValueError(f"color must be 'bgr' or 'rgb', got {color!r}")
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"expected an HxW or HxWxC image, got an array of shape {arr.shape}")
    check_size(arr.shape[1], arr.shape[0])
    if color == "rgb" and arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]
    return np.ascontiguousarray(to_bgr8(arr))


@dataclass(frozen=True)
class InputItem:
    """One input of ``staralign predict``: a file, its kind, and its path relative to the
    folder it was found in (to mirror the folder under ``--out-dir``)."""

    path: Path
    kind: str  # "image" or "video"
    relative: Path


def _kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"


def collect_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Expand files and folders (searched recursively for images and videos, sorted).

    Returns the items and ``(path, reason)`` for each argument that is neither.
    """
    items: list[InputItem] = []
    missing: list[tuple[str, str]] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS)
            if not found:
                missing.append((str(p), "folder holds no images or videos"))
            items.extend(InputItem(f, _kind(f), Path(p.name) / f.relative_to(p)) for f in found)
        elif p.is_file():
            items.append(InputItem(p, _kind(p), Path(p.name)))
        else:
            missing.append((str(p), "no such file or folder"))
    return items, missing
