"""Converting landmarks between layouts, e.g. WFLW's 98 points to 300W's 68.

A conversion is data: for every destination point, a list of (source index,
weight) pairs whose weighted sum gives it.  ``CONVERSIONS`` holds them by
``(src, dst)``; :func:`register_conversion` adds more.  Applying one is a
(dst, src) matrix product, so it works on numpy arrays and torch tensors of shape
``(..., src_points, 2)``, on any device, and is differentiable.

WFLW 98 -> 300W 68, group by group (indices are WFLW -> 300W):

==============  =====================  ==============================================
group           mapping                kind
==============  =====================  ==============================================
jaw             2j -> j, j = 0..16     approximate: WFLW's 33 contour points resampled
                                       to 17 by keeping every other one (endpoints
                                       0 -> 0 and 32 -> 16 and the chin 16 -> 8 are
                                       the same points; between them the spacing of
                                       the two annotation protocols differs)
eyebrows        33..37 -> 17..21,      approximate: 300W marks 5 points along the
                42..46 -> 22..26       upper contour of each brow; WFLW's upper contour
                                       points are taken, its lower contour (38..41,
                                       47..50) dropped
nose bridge     51..54 -> 27..30       one to one
nose base       55..59 -> 31..35       one to one
eyes            60 -> 36, 64 -> 39,    corners one to one; lids approximate: 300W has
                68 -> 42, 72 -> 45     2 points per lid at about 1/3 and 2/3 of the lid,
                lids: see table        WFLW 3 at 1/4, 1/2, 3/4, so each 300W lid point
                                       is interpolated between two WFLW ones
                                       (e.g. 37 = 2/3 * 61 + 1/3 * 62)
outer lip       76..87 -> 48..59       one to one
inner lip       88..95 -> 60..67       one to one
pupils 96, 97   (dropped)              300W has no pupil points
==============  =====================  ==============================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch is loaded only to convert tensors: the ONNX runtime path runs without it
    from torch import Tensor

__all__ = [
    "CONVERSIONS",
    "WFLW_TO_300W",
    "conversion_matrix",
    "convert_landmarks",
    "register_conversion",
]

ArrayLike = TypeVar("ArrayLike", np.ndarray, "Tensor")
Table = Sequence[Sequence[tuple[int, float]]]


def _lid(a: int, b: int, t: float) -> list[tuple[int, float]]:
    """The point a fraction ``t`` of the way from WFLW point ``a`` to ``b``."""
    return [(a, 1.0 - t), (b, t)]


def _wflw_to_300w() -> list[list[tuple[int, float]]]:
    t: list[list[tuple[int, float]]] = []
    t += [[(2 * j, 1.0)] for j in range(17)]  # jaw 0..16
    t += [[(i, 1.0)] for i in range(33, 38)]  # right brow 17..21 (upper contour)
    t += [[(i, 1.0)] for i in range(42, 47)]  # left brow 22..26 (upper contour)
    t += [[(i, 1.0)] for i in range(51, 55)]  # nose bridge 27..30
    t += [[(i, 1.0)] for i in range(55, 60)]  # nose base 31..35
    # Eyes: WFLW lid points sit at 1/4, 1/2, 3/4 of the lid, 300W's at 1/3, 2/3.
    for c0, c1 in ((60, 64), (68, 72)):
        upper = [c0 + 1, c0 + 2, c0 + 3]
        lower = [c1 + 1, c1 + 2, c1 + 3]  # from the far corner back to the near one
        t += [
            [(c0, 1.0)],
            _lid(upper[0], upper[1], 1.0 / 3.0),
            _lid(upper[1], upper[2], 2.0 / 3.0),
            [(c1, 1.0)],
            _lid(lower[0], lower[1], 1.0 / 3.0),
            _lid(lower[1], lower[2], 2.0 / 3.0),
        ]
    t += [[(i, 1.0)] for i in range(76, 88)]  # outer lip 48..59
    t += [[(i, 1.0)] for i in range(88, 96)]  # inner lip 60..67
    return t


WFLW_TO_300W: list[list[tuple[int, float]]] = _wflw_to_300w()

# (src, dst) -> (number of source points, table)
CONVERSIONS: dict[tuple[str, str], tuple[int, Table]] = {
    ("WFLW", "300W"): (98, WFLW_TO_300W),
}
_MATRICES: dict[tuple[str, str], np.ndarray] = {}


def register_conversion(src: str, dst: str, num_src_points: int, table: Table) -> None:
    """Add a conversion: ``table[i]`` lists (source index, weight) pairs for destination point i."""
    for i, row in enumerate(table):
        if not row:
            raise ValueError(f"{src}->{dst}: destination point {i} has no source points")
        for j, _ in row:
            if not 0 <= j < num_src_points:
                raise ValueError(f"{src}->{dst}: point {i} uses source index {j}, "
                                 f"outside 0..{num_src_points - 1}")
        total = sum(w for _, w in row)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"{src}->{dst}: weights of point {i} sum to {total}, not 1")
    CONVERSIONS[(src.upper(), dst.upper())] = (num_src_points, table)
    _MATRICES.pop((src.upper(), dst.upper()), None)


def conversion_matrix(src: str = "WFLW", dst: str = "300W") -> np.ndarray:
    """(dst points, src points) float64 weights of a registered conversion."""
    key = (src.upper(), dst.upper())
    if key not in CONVERSIONS:
        known = ", ".join(f"{a}->{b}" for a, b in CONVERSIONS)
        raise KeyError(f"no landmark conversion {src}->{dst}; known: {known}")
    if key not in _MATRICES:
        n_src, table = CONVERSIONS[key]
        m = np.zeros((len(table), n_src))
        for i, row in enumerate(table):
            for j, w in row:
                m[i, j] += w
        m.setflags(write=False)
        _MATRICES[key] = m
    return _MATRICES[key]


def convert_landmarks(points: ArrayLike, src: str = "WFLW", dst: str = "300W") -> ArrayLike:
    """(..., src points, 2) -> (..., dst points, 2), numpy or torch (any device, differentiable)."""
    m = conversion_matrix(src, dst)
    n_src = m.shape[1]
    if points.shape[-2] != n_src or points.shape[-1] != 2:
        raise ValueError(f"{src}->{dst} expects (..., {n_src}, 2) points, got {tuple(points.shape)}")
    if type(points).__module__.startswith("torch"):
        import torch

        dtype = points.dtype if points.is_floating_point() else torch.float32
        w = torch.tensor(m, dtype=dtype, device=points.device)
        return torch.matmul(w, points.to(dtype))
    pts = np.asarray(points)
    dtype = pts.dtype if pts.dtype.kind == "f" else np.float64
    # einsum, not a BLAS product: the sizes are tiny and BLAS threading costs more.
    return np.einsum("ij,...jk->...ik", m.astype(dtype), pts.astype(dtype, copy=False))
