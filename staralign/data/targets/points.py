"""Point maps: one Gaussian per landmark, in numpy (loader workers) and torch (device).

The authors draw a Gaussian (sigma 1.5, peak 1) on a 256x256 canvas per landmark,
centred on the integer grid (window columns ``int(x - 3 sigma)`` ..
``int(x + 3 sigma + 1) - 1``, peak at ``int(x - 3 sigma) + floor((6 sigma + 1) / 2)``,
so the sub-pixel part of the point is dropped), then resize it bilinearly
(align_corners=False) to 64x64.

We compute the same numbers without the big canvases: a 2-D Gaussian and a bilinear
resize are both separable, so a point map is the outer product of two resized 1-D
profiles.  A profile depends on the coordinate only through the integer window start,
so all of them are tabulated once and a map costs two table look-ups and an outer
product.  Exact.  Any ``image_size`` (crop side) and ``heatmap_size`` (map side) work.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["point_maps", "point_maps_torch"]


@lru_cache(maxsize=32)
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a 1-D bilinear resize with align_corners=False (torch's rule)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1.0 - frac
        w[i, i1] += frac
    w.setflags(write=False)
    return w


def _gaussian_geometry(sigma: float) -> tuple[float, int, int]:
    """(half window, kernel length, peak offset) of the original's integer-grid Gaussian."""
    tmp = 3.0 * sigma
    size = 2.0 * tmp + 1.0
    return tmp, int(np.ceil(size)), int(size // 2)


@lru_cache(maxsize=16)
def _profile_table(image_size: int, heatmap_size: int, sigma: float) -> tuple[np.ndarray, int]:
    """Every resized 1-D Gaussian profile a point can produce, and the smallest window start.

    A profile depends on the coordinate only through the integer window start
    ``ul = int(c - 3 sigma)`` and the window's (clipped) width, so there are a few
    thousand of them; a point map is then two table rows and an outer product.
    """
    tmp, klen, peak = _gaussian_geometry(sigma)
    ul_min = int(np.trunc(0 - tmp))
    ul_max = int(np.trunc(image_size - 1 - tmp))
    uls = np.arange(ul_min, ul_max + 1)[:, None, None]
    widths = np.arange(klen + 1)[None, :, None]
    cols = np.arange(image_size)[None, None, :]
    inside = (cols >= uls) & (cols < uls + widths)
    g = np.where(inside, np.exp(-((cols - uls - peak) ** 2) / (2.0 * sigma * sigma)), 0.0)
    table = g @ _bilinear_matrix(image_size, heatmap_size).T  # (U, klen + 1, H)
    return np.ascontiguousarray(table.astype(np.float32)), ul_min


def _window(coord: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    tmp, klen, _ = _gaussian_geometry(sigma)
    ul = np.trunc(coord - tmp)  # int() truncates toward zero
    hi = np.minimum(np.trunc(coord + tmp + 1), ul + klen)
    return ul.astype(np.int64), (hi - ul).astype(np.int64)


def point_maps(
    points: np.ndarray,
    image_size: int = 256,
    heatmap_size: int = 64,
    sigma: float = 1.5,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(N, 2) crop-pixel points -> (N, H, H) float32 Gaussian maps, equal to the original's
    (written into ``out`` when given)."""
    pts = np.clip(np.asarray(points, np.float64).reshape(-1, 2), 0, image_size - 1)
    table, ul_min = _profile_table(image_size, heatmap_size, float(sigma))
    ul, width = _window(pts, sigma)
    prof = table[ul - ul_min, width]  # (N, 2, H)
    return np.multiply(prof[:, 1, :, None], prof[:, 0, None, :], out=out)


_TABLES: dict[tuple[int, int, float, str], Tensor] = {}


def point_maps_torch(
    points: Tensor, image_size: int = 256, heatmap_size: int = 64, sigma: float = 1.5
) -> Tensor:
    """Batched point maps on the points' device: (B, N, 2) -> (B, N, H, H) float32."""
    device = points.device
    key = (image_size, heatmap_size, float(sigma), str(device))
    if key not in _TABLES:
        table, _ = _profile_table(image_size, heatmap_size, float(sigma))
        _TABLES[key] = torch.tensor(table, device=device)
    table = _TABLES[key]
    _, ul_min = _profile_table(image_size, heatmap_size, float(sigma))
    tmp, klen, _ = _gaussian_geometry(sigma)
    pts = points.detach().to(torch.float64).clamp(0, image_size - 1)
    ul = torch.trunc(pts - tmp)
    width = torch.minimum(torch.trunc(pts + tmp + 1), ul + klen) - ul
    prof = table[(ul - ul_min).long(), width.long()]  # (B, N, 2, H)
    return prof[..., 1, :, None] * prof[..., 0, None, :]
