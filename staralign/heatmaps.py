"""Heatmaps as 2-D distributions: soft-argmax and the moments STAR is built on.

Everything here is batched over (B, N, H, W), runs on the tensor's own device,
is differentiable, and never synchronises with the host.  Coordinates follow the
original code: column ``j`` of a W-wide map sits at ``x = -1 + 2 j / (W - 1)``
(likewise rows), and points are (x, y).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "HeatmapMoments",
    "coordinate_axes",
    "eigh2x2",
    "heatmap_moments",
    "soft_argmax",
]

# Smallest heatmap mass the original divides by; keeps an all-zero map finite.
SUM_FLOOR = 1e-6
# The original's epsilon in the unbiased-covariance weights (V1, V2).
COV_EPSILON = 1e-5


class HeatmapMoments(NamedTuple):
    """Mean, covariance and its eigen-decomposition for every (batch, landmark).

    ``eigenvalues[..., 0] <= eigenvalues[..., 1]``; ``eigenvectors[..., :, k]`` (a
    column) is the unit eigenvector of ``eigenvalues[..., k]``.  Column 0 is the
    *normal* direction (least spread), column 1 the *tangent* (most ambiguous).
    """

    mean: Tensor  # (B, N, 2)
    covariance: Tensor  # (B, N, 2, 2)
    eigenvalues: Tensor  # (B, N, 2)
    eigenvectors: Tensor  # (B, N, 2, 2)


def coordinate_axes(height: int, width: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """The x coordinates of the columns (W,) and y coordinates of the rows (H,) in [-1, 1]."""
    xs = torch.arange(width, device=device, dtype=torch.float32) / (width - 1) * 2 - 1
    ys = torch.arange(height, device=device, dtype=torch.float32) / (height - 1) * 2 - 1
    if dtype is not None:
        xs, ys = xs.to(dtype), ys.to(dtype)
    return xs, ys


class _SaturatingUpcast(torch.autograd.Function):
    """fp16/bf16 -> fp32 whose backward clamps the gradient into the input dtype's range.

    STAR's gradient on a degenerate map (all zeros, a one-pixel spike) is large by
    design (it divides by the map's mass and by sqrt(eigenvalue + 1e-5)); cast back
    to fp16 it would overflow to inf.  Saturating keeps it finite and signed.
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.in_dtype = t.dtype
        return t.float()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        limit = torch.finfo(ctx.in_dtype).max
        return grad.clamp(-limit, limit).to(ctx.in_dtype)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`upcast_half` gives a tensor of ``dtype``: fp32 for half precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast_half(t: Tensor) -> Tensor:
    """Half-precision tensors to fp32 for reductions over thousands of pixels; others unchanged."""
    return _SaturatingUpcast.apply(t) if working_dtype(t.dtype) != t.dtype else t


def soft_argmax(heatmaps: Tensor) -> Tensor:
    """Expected (x, y) of each heatmap taken as an unnormalised distribution: (B,N,H,W) -> (B,N,2).

    Matches the original decoder: the mass is clamped at 1e-6 before dividing.  Computed and
    returned in float32 for half-precision maps (coordinates rounded to bf16 would be off by
    ~0.1 px at 256 px), else in the maps' dtype.
    """
    h = upcast_half(heatmaps)
    height, width = h.shape[-2:]
    xs, ys = coordinate_axes(height, width, h.device, h.dtype)
    mass = h.sum(dim=(-2, -1)).clamp(min=SUM_FLOOR)
    x = (h.sum(dim=-2) * xs).sum(-1) / mass
    y = (h.sum(dim=-1) * ys).sum(-1) / mass
    return torch.stack([x, y], dim=-1)


def eigh2x2(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form eigen-decomposition of symmetric 2x2 matrices (..., 2, 2).

    Returns ascending eigenvalues (..., 2) and eigenvectors as *columns* (..., 2, 2),
    like ``torch.linalg.eigh`` but on any device without a solver call or host sync.
    Where the two eigenvalues coincide (to float precision) the direction is
    undefined; we return the axes and let no gradient flow through the direction
    there, so the result stays finite.
    """
    a = cov[..., 0, 0]
    b = 0.5 * (cov[..., 0, 1] + cov[..., 1, 0])
    c = cov[..., 1, 1]
    half_diff = 0.5 * (a - c)
    mid = 0.5 * (a + c)
    r2 = half_diff * half_diff + b * b
    # Separated eigenvalues: gap above float rounding of their size.
    tiny = torch.finfo(cov.dtype).eps ** 2
    separated = r2 > tiny * (mid * mid) + 1e-20
    r2_safe = torch.where(separated, r2, torch.ones_like(r2))
    radius = torch.where(separated, torch.sqrt(r2_safe), torch.zeros_like(r2))
    evals = torch.stack([mid - radius, mid + radius], dim=-1)
    # Angle of the major axis (the larger eigenvalue's eigenvector).
    theta = 0.5 * torch.atan2(
        torch.where(separated, b, torch.zeros_like(b)),
        torch.where(separated, half_diff, torch.ones_like(half_diff)),
    )
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Columns: minor axis (-sin, cos) for the smaller eigenvalue, major (cos, sin).
    evecs = torch.stack([torch.stack([-sin, cos], dim=-1), torch.stack([cos, sin], dim=-1)], dim=-1)
    return evals, evecs


def heatmap_moments(heatmaps: Tensor, eps: float = COV_EPSILON) -> HeatmapMoments:
    """Mean, unbiased weighted covariance and PCA of each heatmap, as in STAR.

    Per map ``h``: ``p = h / max(sum h, 1e-6)``; ``m = sum p v``;
    ``C = sum p (v - m)(v - m)^T / (V1 - V2 / V1)`` with ``V1 = sum p + eps``,
    ``V2 = sum p^2 + eps``.  Computed from the row and column marginals plus one
    matrix-vector product per map, instead of materialising (v - m) for every pixel.
    """
    h = upcast_half(heatmaps)
    height, width = h.shape[-2:]
    xs, ys = coordinate_axes(height, width, h.device, h.dtype)
    # The division by the mass is applied to the small reductions rather than to the
    # whole map wherever the statistic is linear in h.
    inv_mass = 1.0 / h.sum(dim=(-2, -1)).clamp(min=SUM_FLOOR)  # (B, N)
    px = h.sum(dim=-2) * inv_mass.unsqueeze(-1)  # (B, N, W) column marginal of p
    py = h.sum(dim=-1) * inv_mass.unsqueeze(-1)  # (B, N, H) row marginal of p
    mx = (px * xs).sum(-1)
    my = (py * ys).sum(-1)
    dx = xs - mx.unsqueeze(-1)  # (B, N, W)
    dy = ys - my.unsqueeze(-1)  # (B, N, H)
    cxx = (px * dx * dx).sum(-1)
    cyy = (py * dy * dy).sum(-1)
    cxy = (torch.matmul(h, dx.unsqueeze(-1)).squeeze(-1) * dy).sum(-1) * inv_mass
    v1 = px.sum(-1) + eps
    # Normalise before squaring so huge maps do not overflow.
    v2 = (h * inv_mass[..., None, None]).square().sum(dim=(-2, -1)) + eps
    denom = v1 - v2 / v1
    cov = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    cov = cov / denom[..., None, None]
    evals, evecs = eigh2x2(cov)
    mean = torch.stack([mx, my], dim=-1)
    return HeatmapMoments(mean, cov, evals, evecs)
