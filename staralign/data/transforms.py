"""Geometry and augmentation of one face sample, every random draw from an explicit generator.

Conventions (those of the authors' code; the crop and normalisation rules live in
:mod:`staralign.crop` and are re-exported here):

* Points are (x, y) pixel coordinates whose integer values are pixel centres, so a
  crop of side S spans [-0.5, S - 0.5]; matrices are 3x3 and act on column vectors
  ``(x, y, 1)``.
* The crop maps the face centre to ``((S - 1) / 2, (S - 1) / 2)`` (align-corners
  centre) and scales by ``S / (scale * 200)``.
* Random geometry: shift ~ N(0, 0.05) * (S - 1) per axis, rotation ~ N(0, 18 deg),
  scale ~ N(1, 0.1), about the crop centre; composed after the crop
  (``geometry @ crop``).
* Flip (probability 0.5, before the crop): the image is mirrored (pixel x -> w - 1 - x),
  landmarks and crop centre map x -> w + offset - x with the definition's
  ``flip_x_offset`` (-1 for WFLW/300W, 0 for COFW: the original's convention) and
  the flip pairs swap.  We fold the mirror into the warp instead of copying the image.
* Texture, in this order, on the warped 8-bit crop: occlusion (p 0.4), box blur
  (p 0.3), gamma (p 0.2), noise blend (p 0.2), grey (p 0.2), with the original's
  ranges.  One deliberate difference: the original converts its BGR crop with
  OpenCV's *RGB*-to-grey weights (blue weighted as red); we use the BGR weights.
* Normalised landmarks: ``(2 p + 1) / S - 1`` (align_corners=False), clamped to
  [-1, 1]; the image ``(pixel - 127.5) / 127.5``.

No function here touches global random state: pass a ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import cv2
import numpy as np
import torch
from torch import Tensor

from .. import crop as _crop
from ..crop import (  # the crop convention's home; re-exported here for training code
    FACE_SIZE,
    compose_rotate_scale,
    denormalize_points,
    normalize_points,
)

__all__ = [
    "FACE_SIZE",
    "GeometryAugment",
    "TextureAugment",
    "apply_texture",
    "compose_rotate_scale",
    "crop_matrix",
    "crop_to_image",
    "denormalize_points",
    "flip_matrix",
    "image_to_tensor",
    "network_input",
    "normalize_image",
    "invert_affine",
    "mirror_matrix",
    "normalize_points",
    "random_geometry_matrix",
    "transform_points",
    "warp_image",
]

ArrayLike = TypeVar("ArrayLike", np.ndarray, Tensor)



# --------------------------------------------------------------------------- matrices


def crop_matrix(scale: float, center_w: float, center_h: float, size: int = 256,
                angle: float = 0.0) -> np.ndarray:
    """(3, 3) float32 map from image pixels to the crop (:func:`staralign.crop.crop_matrix`)."""
    return _crop.crop_matrix(scale, center_w, center_h, size, angle).astype(np.float32)


@dataclass(frozen=True)
class GeometryAugment:
    """Sigmas of the random similarity applied after the crop (the original's defaults)."""

    shift_sigma: float = 0.05  # fraction of the crop side
    rotation_sigma: float = math.radians(18.0)
    scale_sigma: float = 0.1


def random_geometry_matrix(
    rng: np.random.Generator, size: int = 256, config: GeometryAugment = GeometryAugment()
) -> np.ndarray:
    """(3, 3) float32 random shift/rotation/scale about the crop centre, all normal."""
    half = (size - 1) / 2.0
    shift = rng.normal(0.0, config.shift_sigma, size=2) * (size - 1)
    angle = rng.normal(0.0, config.rotation_sigma)
    zoom = rng.normal(1.0, config.scale_sigma)
    return compose_rotate_scale(angle, zoom, (shift[0], shift[1]), (half, half), (half, half)).astype(
        np.float32)


def flip_matrix(width: int, x_offset: int) -> np.ndarray:
    """(3, 3) map of the landmark flip ``x -> width + x_offset - x``."""
    return np.array([[-1.0, 0.0, width + x_offset], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)


def mirror_matrix(width: int) -> np.ndarray:
    """(3, 3) map of the image mirror (pixel ``x -> width - 1 - x``)."""
    return flip_matrix(width, -1)


def transform_points(points: ArrayLike, matrix: ArrayLike) -> ArrayLike:
    """Apply (..., 3, 3) affine matrices to (..., N, 2) points (numpy or torch)."""
    if isinstance(points, Tensor):
        m = torch.as_tensor(matrix, dtype=points.dtype, device=points.device)
        return points @ m[..., :2, :2].transpose(-1, -2) + m[..., None, :2, 2]
    m = np.asarray(matrix)
    pts = np.asarray(points)
    out = pts @ np.swapaxes(m[..., :2, :2], -1, -2) + m[..., None, :2, 2]
    return out.astype(np.result_type(pts.dtype, np.float32), copy=False)


def invert_affine(matrix: ArrayLike) -> ArrayLike:
    """Inverse of (..., 3, 3) affine matrices (numpy or torch)."""
    if isinstance(matrix, Tensor):
        a = matrix[..., :2, :2]
        inv = torch.linalg.inv(a.to(torch.float64)).to(matrix.dtype)
        t = -(inv @ matrix[..., :2, 2:3])
        top = torch.cat([inv, t], -1)
        bottom = torch.zeros_like(matrix[..., 2:3, :])
        bottom[..., 0, 2] = 1
        return torch.cat([top, bottom], -2)
    m = np.asarray(matrix)
    inv = np.linalg.inv(m[..., :2, :2].astype(np.float64))
    t = -(inv @ m[..., :2, 2:3].astype(np.float64))
    out = np.zeros(m.shape, np.float64)
    out[..., :2, :2] = inv
    out[..., :2, 2:3] = t
    out[..., 2, 2] = 1.0
    return out.astype(m.dtype if m.dtype.kind == "f" else np.float64)


def crop_to_image(points: ArrayLike, matrix: ArrayLike) -> ArrayLike:
    """Crop pixels -> original image pixels, given the sample's crop ``matrix`` (numpy or torch,
    batched as (B, N, 2) with (B, 3, 3)).  Evaluation and inference use it."""
    if isinstance(points, Tensor):
        m = torch.as_tensor(matrix, device=points.device)
        inv = invert_affine(m.to(torch.float64))
        return transform_points(points.to(torch.float64), inv).to(points.dtype)
    return transform_points(np.asarray(points, np.float64), invert_affine(np.asarray(matrix, np.float64)))


# --------------------------------------------------------------------------- images


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int = 256) -> np.ndarray:
    """Bilinear warp of an 8-bit image into a size x size crop, black outside the image."""
    return _crop.warp_to_crop(image, matrix, size)


def image_to_tensor(image: np.ndarray, normalize: bool = True) -> Tensor:
    """HxWx3 uint8 BGR -> 3xHxW float32 in [-1, 1] (:func:`normalize_image`), or with
    ``normalize=False`` the 8-bit 3xHxW tensor, to be normalised later (on the device)."""
    t = torch.from_numpy(image).permute(2, 0, 1)
    return normalize_image(t) if normalize else t.contiguous()


def normalize_image(images: Tensor) -> Tensor:
    """8-bit images (any shape, any device) -> contiguous float32 ``(pixel - 127.5) / 127.5``,
    the network's input; float input is taken as already normalised and returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    return images.to(torch.float32, memory_format=torch.contiguous_format).sub_(_crop.PIXEL_MEAN).div_(
        _crop.PIXEL_SCALE)


def network_input(images: Tensor, channels_last: bool = False) -> Tensor:
    """A batch as the network takes it: 8-bit crops normalised (float passes through), in the
    model's memory format (``channels_last`` for a channels-last model)."""
    images = normalize_image(images)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@dataclass(frozen=True)
class TextureAugment:
    """Probabilities of the texture augmentations (the original's values)."""

    occlusion: float = 0.4
    blur: float = 0.3
    gamma: float = 0.2
    noise: float = 0.2
    grey: float = 0.2


def _occlude(image: np.ndarray, rng: np.random.Generator) -> None:
    h, w = image.shape[:2]
    rh = 0.2 + 0.6 * rng.random()  # box height, a fraction of half the crop: [0.2, 0.8]
    rw = rh - 0.2 + 0.4 * rng.random()
    cx = int((w - 1) * rng.random())
    cy = int((h - 1) * rng.random())
    dh, dw = int(h / 2 * rh), int(w / 2 * rw)
    x0, y0 = max(0, cx - dw // 2), max(0, cy - dh // 2)
    x1, y1 = min(w - 1, cx + dw // 2), min(h - 1, cy + dh // 2)
    image[y0:y1 + 1, x0:x1 + 1] = 0


def _gamma_table(gamma: float) -> np.ndarray:
    return ((np.arange(256) / 255.0) ** gamma * 255).astype(np.uint8)


def apply_texture(
    image: np.ndarray, rng: np.random.Generator, config: TextureAugment = TextureAugment()
) -> np.ndarray:
    """The original's texture augmentation of an 8-bit crop.  ``image`` is never modified;
    the result is a new array, or ``image`` itself when no step applied."""
    if rng.random() < config.occlusion:
        image = image.copy()  # the only step working in place
        _occlude(image, rng)
    if rng.random() < config.blur:
        k = int((image.shape[0] + image.shape[1]) / 2 * 0.05 * rng.random())
        if k > 1:
            image = cv2.blur(image, (k, k))
    if rng.random() < config.gamma:
        gamma = 0.25 + 0.75 * rng.random() if rng.random() < 0.5 else 1.0 + 3.0 * rng.random()
        image = cv2.LUT(image, _gamma_table(gamma))
    if rng.random() < config.noise:
        noise = np.frombuffer(rng.bytes(image.size), np.uint8).reshape(image.shape)
        alpha = np.float32(0.5 * rng.random())
        blended = (np.float32(1.0) - alpha) * image + alpha * noise
        image = blended.astype(np.uint8)  # truncation, as the original
    if rng.random() < config.grey:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        image = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    return image
