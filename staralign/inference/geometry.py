"""Face box -> model crop -> image pixels, in numpy only (the ONNX path must not import torch).

The conventions are the dataset's and live in :mod:`staralign.crop` (torch-free);
this module adapts them to inference's needs (boxes as tuples, validation, the
network's batch layout, covariances).  In short:

* points are (x, y) with integer values at pixel centres; a box ``(x1, y1, x2, y2)``
  is in the same frame, so the box of a whole W x H image is
  ``(-0.5, -0.5, W - 0.5, H - 0.5)``;
* ``scale = min(x2 - x1, y2 - y1) / 200 * 1.05``, centre = box centre;
* the crop scales by ``S / (scale * 200)`` about the centre, turns by ``-angle``
  (the face's roll in degrees, 0 for box crops) and puts the centre at
  ``((S - 1) / 2, (S - 1) / 2)``; the image is warped with OpenCV's bilinear
  ``warpAffine``, black outside;
* the network's normalised landmarks ``n`` are crop pixels ``((n + 1) S - 1) / 2``
  (align_corners=False), so one normalised unit is ``S / 2`` crop pixels.

Landmarks and covariances go back through the inverse of the full crop matrix,
so a rotated crop's results are rotated back into the photo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import crop as _crop
from ..crop import BOX_MARGIN, FACE_SIZE

__all__ = [
    "BOX_MARGIN",
    "FACE_SIZE",
    "box_to_crop",
    "covariance_to_image",
    "crop_image",
    "crop_matrix",
    "crops_to_input",
    "denormalize_points",
    "eigh2x2",
    "points_to_image",
    "whole_image_box",
]

Box = tuple[float, float, float, float]


def whole_image_box(width: int, height: int) -> Box:
    """The box covering every pixel of a ``width`` x ``height`` image (pixel-centre frame)."""
    return (-0.5, -0.5, width - 0.5, height - 0.5)


def box_to_crop(box: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """Face box -> (scale, centre): the dataset converters' rule, refusing empty boxes."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not min(x2 - x1, y2 - y1) > 0:
        raise ValueError(f"face box {tuple(box)} is empty (x2 <= x1 or y2 <= y1)")
    return _crop.box_to_crop(x1, y1, x2, y2)


def crop_matrix(scale: float, center: Sequence[float], size: int, angle: float = 0.0) -> np.ndarray:
    """(3, 3) float64 map from image pixels to the ``size`` x ``size`` crop (``angle``: the
    face's roll in degrees, undone by the crop)."""
    return _crop.crop_matrix(scale, float(center[0]), float(center[1]), size, angle)


def crop_image(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear warp of an 8-bit BGR image into the crop (the dataset's warp, black outside)."""
    return _crop.warp_to_crop(image, matrix, size)


def crops_to_input(crops: Sequence[np.ndarray]) -> np.ndarray:
    """HxWx3 uint8 BGR crops -> (B, 3, S, S) float32 network input, ``(pixel - 127.5) / 127.5``."""
    batch = np.stack([np.asarray(c) for c in crops]).astype(np.float32)
    batch = (batch - np.float32(_crop.PIXEL_MEAN)) / np.float32(_crop.PIXEL_SCALE)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def denormalize_points(points: np.ndarray, size: int) -> np.ndarray:
    """Normalised [-1, 1] (align_corners=False) -> crop pixels."""
    return _crop.denormalize_points(np.asarray(points, np.float64), size)


def points_to_image(normalized: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """(..., N, 2) normalised network landmarks -> original image pixels (float64)."""
    crop = denormalize_points(normalized, size)
    inv = np.linalg.inv(np.asarray(matrix, np.float64))
    return crop @ inv[:2, :2].T + inv[:2, 2]


def covariance_to_image(covariance: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """(..., N, 2, 2) covariance in normalised units -> image pixels squared.

    A point's covariance follows the linear part ``A`` of normalised -> image:
    ``A C A^T`` with ``A = inv(crop)[:2, :2] * S / 2``.
    """
    inv = np.linalg.inv(np.asarray(matrix, np.float64))
    a = inv[:2, :2] * (size / 2.0)
    return a @ np.asarray(covariance, np.float64) @ a.T


def eigh2x2(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending eigenvalues (..., 2) and unit eigenvectors as columns (..., 2, 2) of symmetric 2x2s.

    Closed form (the same as ``staralign.heatmaps.eigh2x2``); where the two
    eigenvalues coincide the axes are returned.
    """
    cov = np.asarray(cov, np.float64)
    a, c = cov[..., 0, 0], cov[..., 1, 1]
    b = 0.5 * (cov[..., 0, 1] + cov[..., 1, 0])
    half_diff, mid = 0.5 * (a - c), 0.5 * (a + c)
    radius = np.hypot(half_diff, b)
    evals = np.stack([mid - radius, mid + radius], -1)
    theta = 0.5 * np.arctan2(b, np.where(radius > 0, half_diff, 1.0))
    cos, sin = np.cos(theta), np.sin(theta)
    evecs = np.stack([np.stack([-sin, cos], -1), np.stack([cos, sin], -1)], -1)
    return evals, evecs
