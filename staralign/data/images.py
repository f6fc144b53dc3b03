"""Reading face images as 8-bit BGR, with errors that say which image and which row."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = ["ImageReadError", "decode_image", "read_image", "read_image_bytes", "to_bgr8"]


class ImageReadError(OSError):
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
