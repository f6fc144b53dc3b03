"""The crop convention: how a face in a photo becomes the network's input, in one place.

Training (:mod:`staralign.data.transforms`, the converters), evaluation and
inference (:mod:`staralign.inference.geometry`, the ONNX path) all import these
rules from here.  The module needs numpy and OpenCV only, never torch, so the
ONNX inference path can use it; it sits at the package's top level because it
belongs to neither ``data`` nor ``inference`` alone.

The convention is the authors' (STAR's code):

* Points are (x, y) pixel coordinates whose integer values are pixel centres, so
  a whole W x H image spans ``(-0.5, -0.5, W - 0.5, H - 0.5)`` and a crop of side
  S spans ``[-0.5, S - 0.5]``.  Matrices are 3x3, acting on column vectors
  ``(x, y, 1)``.
* A face box ``(x1, y1, x2, y2)`` gives ``scale = min(x2 - x1, y2 - y1) / 200 * 1.05``
  (:data:`FACE_SIZE`, :data:`BOX_MARGIN`) and ``centre`` = the box centre
  (:func:`box_to_crop`).  The converters apply it to each dataset's boxes (300W's
  are the landmarks' bounding box: :func:`landmark_box`).
* The crop (:func:`crop_matrix`) scales by ``S / (scale * 200)`` about the centre
  and puts the centre at ``((S - 1) / 2, (S - 1) / 2)``.  An optional ``angle``
  (degrees) is the face's in-plane roll in the photo -- the direction of its eye
  line, measured from the image's +x axis towards +y (clockwise on screen) -- and
  the crop turns by ``-angle`` so the face reaches the network upright.  The
  datasets' crops have angle 0.
* The image is warped with OpenCV's bilinear ``warpAffine``, black outside
  (:func:`warp_to_crop`).
* Normalised landmarks: ``(2 p + 1) / S - 1`` (align_corners=False, clamped to
  [-1, 1]), so one normalised unit is ``S / 2`` crop pixels; the image is
  ``(pixel - 127.5) / 127.5`` (:data:`PIXEL_MEAN`, :data:`PIXEL_SCALE`).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

__all__ = [
    "BOX_MARGIN",
    "FACE_SIZE",
    "PIXEL_MEAN",
    "PIXEL_SCALE",
    "box_to_crop",
    "compose_rotate_scale",
    "crop_to_box",
    "crop_matrix",
    "denormalize_points",
    "landmark_box",
    "normalize_points",
    "upright_landmark_crop",
    "warp_to_crop",
]

BOX_MARGIN = 1.05  # the authors' margin on the face box
FACE_SIZE = 200.0  # ``scale`` is the face size in units of 200 pixels
PIXEL_MEAN = 127.5  # network input = (pixel - PIXEL_MEAN) / PIXEL_SCALE, in [-1, 1]
PIXEL_SCALE = 127.5


def box_to_crop(x1: float, y1: float, x2: float, y2: float) -> tuple[float, tuple[float, float]]:
    """Face box corners -> (scale, (center_w, center_h)) as the authors define them."""
    scale = min(x2 - x1, y2 - y1) / FACE_SIZE * BOX_MARGIN
    return float(scale), (float((x1 + x2) / 2.0), float((y1 + y2) / 2.0))


def crop_to_box(scale: float, center: tuple[float, float] | np.ndarray) -> tuple[float, float, float, float]:
    """The square face box that :func:`box_to_crop` turns into (``scale``, ``center``)."""
    half = float(scale) * FACE_SIZE / BOX_MARGIN / 2.0
    cx, cy = float(center[0]), float(center[1])
    return cx - half, cy - half, cx + half, cy + half


def landmark_box(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """The bounding box of (N, 2) landmarks: 300W's face box (its converter's rule)."""
    lm = np.asarray(landmarks, np.float64)
    (x1, y1), (x2, y2) = lm.min(0), lm.max(0)
    return float(x1), float(y1), float(x2), float(y2)


def upright_landmark_crop(landmarks: np.ndarray, angle: float = 0.0) -> tuple[float, tuple[float, float]]:
    """(scale, centre) of the landmarks' box taken in the face's upright frame.

    With ``angle`` 0 this is exactly the 300W converter's crop; otherwise the
    landmarks are turned by ``-angle`` (degrees) about their mean, boxed, and the
    box centre is turned back into the photo.
    """
    lm = np.asarray(landmarks, np.float64)
    if angle == 0.0:
        return box_to_crop(*landmark_box(lm))
    mean = lm.mean(0)
    t = math.radians(angle)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])  # upright -> photo
    upright = (lm - mean) @ rot  # photo -> upright (rot.T applied to each row)
    scale, (cx, cy) = box_to_crop(*landmark_box(upright))
    centre = rot @ np.array([cx, cy]) + mean
    return scale, (float(centre[0]), float(centre[1]))


def compose_rotate_scale(
    angle: float,
    scale: float,
    shift: tuple[float, float],
    from_center: tuple[float, float],
    to_center: tuple[float, float],
) -> np.ndarray:
    """(3, 3) float64: rotate by ``angle`` (radians) and scale about ``from_center``,
    landing on ``to_center + shift``."""
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    fx, fy = from_center
    tx, ty = to_center
    return np.array([
        [c, -s, tx - c * fx + s * fy + shift[0]],
        [s, c, ty - s * fx - c * fy + shift[1]],
        [0.0, 0.0, 1.0],
    ])


def crop_matrix(scale: float, center_w: float, center_h: float, size: int = 256,
                angle: float = 0.0) -> np.ndarray:
    """(3, 3) float64 map from image pixels to the ``size`` x ``size`` crop.

    The face centre goes to the crop's middle, ``scale * 200`` image pixels span the
    crop, and a face rolled by ``angle`` degrees in the photo comes out upright.
    """
    half = (size - 1) / 2.0
    zoom = size / (scale * FACE_SIZE)
    return compose_rotate_scale(-math.radians(angle), zoom, (0.0, 0.0), (center_w, center_h), (half, half))


def warp_to_crop(image: np.ndarray, matrix: np.ndarray, size: int = 256) -> np.ndarray:
    """Bilinear warp of an 8-bit image into a size x size crop, black outside the image."""
    return cv2.warpAffine(image, np.asarray(matrix, np.float32)[:2], (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def normalize_points(points: Any, size: int = 256) -> Any:
    """Crop pixels -> [-1, 1] (align_corners=False), clamped as the original does.

    numpy arrays or torch tensors (duck-typed: this module never imports torch).
    """
    if hasattr(points, "clamp"):
        return ((points * 2 + 1) / size - 1).clamp(-1, 1)
    return np.clip((np.asarray(points) * 2 + 1) / size - 1, -1, 1)


def denormalize_points(points: Any, size: int = 256) -> Any:
    """[-1, 1] -> crop pixels: the inverse of :func:`normalize_points` (before its clamp)."""
    return ((points + 1) * size - 1) / 2

