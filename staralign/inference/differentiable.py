"""Landmarks as a differentiable function of the image, for supervising image generators.

Convention: ``images`` are (B, 3, H, W) float tensors, **RGB in [0, 1]** (the
usual generator output; ``channels="bgr"`` if yours are BGR), and ``boxes`` (B, 4)
are dataset-style face boxes ``(x1, y1, x2, y2)`` in pixels of those images
(pixel centres at integers, as everywhere in staralign), or None for "the whole
image is the face".  The returned landmarks are (B, N, 2) pixels of the input
images.  Gradients flow to the image pixels (and to the boxes, if they require
grad).

The crop is ``affine_grid`` + ``grid_sample`` (bilinear, zero padding,
align_corners=False) with the same matrix as the dataset's OpenCV warp, so the
network sees what it sees in :class:`~staralign.inference.detector.LandmarkDetector`
up to 8-bit rounding.  Like the dataset's warp it does not low-pass before
shrinking: give faces near the network's input size (about 250 px across) for the
smoothest gradients.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..crop import BOX_MARGIN
from ..data.transforms import crop_to_image, denormalize_points, invert_affine
from ..heatmaps import heatmap_moments

__all__ = ["DifferentiableLandmarks", "LandmarkResult", "boxes_to_matrices", "crop_theta", "differentiable_crop"]


class LandmarkResult(NamedTuple):
    """Landmarks (B, N, 2) in image pixels; covariance (B, N, 2, 2) in pixels squared (or None);
    the crop matrices (B, 3, 3) image -> crop; the crops (B, 3, S, S) the network saw, in [-1, 1]."""

    landmarks: Tensor
    covariance: Tensor | None
    matrices: Tensor
    crops: Tensor


def boxes_to_matrices(boxes: Tensor, size: int) -> Tensor:
    """(B, 4) face boxes -> (B, 3, 3) image -> crop matrices (the dataset's crop, differentiable)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    side = torch.minimum(x2 - x1, y2 - y1)
    zoom = size / (side * BOX_MARGIN)  # size / (scale * 200) with scale = side / 200 * 1.05
    half = (size - 1) / 2.0
    zero, one = torch.zeros_like(zoom), torch.ones_like(zoom)
    rows = [torch.stack([zoom, zero, half - zoom * (x1 + x2) / 2], -1),
            torch.stack([zero, zoom, half - zoom * (y1 + y2) / 2], -1),
            torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def crop_theta(matrices: Tensor, height: int, width: int, size: int) -> Tensor:
    """(B, 2, 3) ``affine_grid`` thetas (align_corners=False) for image -> crop ``matrices``.

    theta maps the crop's normalised coordinates to the image's:
    ``normalise_image @ inv(matrix) @ denormalise_crop``.
    """
    dtype, device = matrices.dtype, matrices.device
    denorm = torch.tensor([[size / 2, 0, (size - 1) / 2], [0, size / 2, (size - 1) / 2], [0, 0, 1]],
                          dtype=dtype, device=device)
    norm = torch.tensor([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]],
                        dtype=dtype, device=device)
    return (norm @ torch.linalg.inv(matrices) @ denorm)[:, :2]


def differentiable_crop(images: Tensor, matrices: Tensor, size: int) -> Tensor:
    """Bilinear crops (B, C, S, S) of ``images`` under image -> crop ``matrices``, zero outside."""
    theta = crop_theta(matrices.to(images.dtype), images.shape[-2], images.shape[-1], size)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DifferentiableLandmarks(nn.Module):
    """``images (B, 3, H, W) RGB [0, 1], boxes (B, 4) | None -> landmarks (B, N, 2)`` in image pixels.

    ``freeze`` (default) stops gradients into the network's weights, so only the
    image (and boxes) receive them; the network stays in eval mode.
    """

    def __init__(self, model: nn.Module, freeze: bool = True) -> None:
        super().__init__()
        self.model = model.eval()
        self.size = int(model.config.input_size)
        self.definition = model.definition
        if freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", allow_pickle: bool = False,
                        ema: bool = False, freeze: bool = True) -> DifferentiableLandmarks:
        from ..models import load_model

        return cls(load_model(path, map_location=device, ema=ema, allow_pickle=allow_pickle), freeze=freeze)

    def train(self, mode: bool = True) -> DifferentiableLandmarks:
        # Batch statistics would make a face's landmarks depend on the rest of the batch.
        super().train(mode)
        self.model.eval()
        return self

    def run(self, images: Tensor, boxes: Tensor | None = None, channels: str = "rgb",
            ambiguity: bool = False) -> LandmarkResult:
        """Everything: landmarks, optional covariances, the crop matrices and the crops."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if channels not in ("rgb", "bgr"):
            raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
        b, _, h, w = images.shape
        if boxes is None:
            whole = torch.tensor([-0.5, -0.5, w - 0.5, h - 0.5], dtype=images.dtype, device=images.device)
            boxes = whole.expand(b, 4)
        boxes = torch.as_tensor(boxes, dtype=images.dtype, device=images.device).reshape(-1, 4)
        if boxes.shape[0] != b:
            raise ValueError(f"expected one box per image ({b}), got {boxes.shape[0]}")
        matrices = boxes_to_matrices(boxes, self.size)
        bgr = images.flip(1) if channels == "rgb" else images
        crops = differentiable_crop(bgr, matrices, self.size) * 2 - 1  # (255 p - 127.5) / 127.5
        out = self.model(crops, all_stacks=False)
        crop_px = denormalize_points(out.landmarks.to(images.dtype), self.size)
        landmarks = crop_to_image(crop_px, matrices)
        cov = None
        if ambiguity:
            a = invert_affine(matrices)[:, :2, :2] * (self.size / 2)
            cov_n = heatmap_moments(out.heatmaps[-1].float()).covariance.to(images.dtype)
            cov = a[:, None] @ cov_n @ a[:, None].transpose(-1, -2)
        return LandmarkResult(landmarks, cov, matrices, crops)

    def forward(self, images: Tensor, boxes: Tensor | None = None, channels: str = "rgb") -> Tensor:
        """Landmarks (B, N, 2) in pixels of ``images``."""
        return self.run(images, boxes, channels).landmarks
