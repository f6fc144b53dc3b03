"""Contour tangents and the semantic-ambiguity label model.

Real annotators agree on *where a contour is* much better than on *where along it*
a point sits (the jaw, the brows, the lip lines).  ``ambiguous_landmarks`` imitates
that: it slides each contour landmark along its drawn curve by a normal random arc
length (std ``sigma`` x inter-ocular distance), corners and ends (and pupils, which
have no contour) by a tenth of that.  Because the point moves *along the curve*
(by arc length on the same dense polyline that was drawn), it stays on the contour:
the error is tangential to first order and only second order (curvature) normal.

Tangents are unit vectors in image-pixel coordinates, in the order of the curve's
landmark numbering.  A crop (similarity transform) maps them by its rotation only,
so for the usual axis-aligned crops they are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .geometry import KIND_CONTOUR, KIND_PUPIL, point_kinds

__all__ = ["ambiguous_landmarks", "curve_tangents", "tangents_from_landmarks"]

CORNER_FACTOR = 0.1  # corners/ends/pupils move this fraction of the contour sigma


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 1e-12)


def _tangent(prev_dir: np.ndarray, next_dir: np.ndarray) -> np.ndarray:
    """Direction through a vertex from the unit directions of its two segments.

    The bisector ``u1 + u2``; at a cusp (the curve doubles back, as at the corner of
    a closed eye or mouth) that sum vanishes and the outgoing direction is used.
    """
    s = prev_dir + next_dir
    ok = np.linalg.norm(s, axis=-1, keepdims=True) >= 0.2
    return np.where(ok, _unit(s), next_dir)


def _vertex_tangents(prev: np.ndarray, here: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Unit tangents (K, 2) at the vertices ``here`` from their neighbours ``prev`` and ``nxt``.

    A neighbour that is the vertex itself (an open end) gives a zero segment, which takes
    the direction of the other one.
    """
    u1, u2 = _unit(here - prev), _unit(nxt - here)
    u1 = np.where(u1.any(axis=-1, keepdims=True), u1, u2)
    u2 = np.where(u2.any(axis=-1, keepdims=True), u2, u1)
    return _tangent(u1, u2)


def curve_tangents(curves: Sequence[dict[str, Any]], num_points: int = 98) -> np.ndarray:
    """(num_points, 2) float32 exact unit tangents of the drawn curves at the landmarks
    (zero for points on no curve: the pupils).  ``curves`` as in ``render_face``'s info."""
    # All curves at once: global indices of each landmark vertex and its two neighbours.
    pts, here, prev, nxt, ids = [], [], [], [], []
    base = 0
    for c in curves:
        p = np.asarray(c["points"], np.float64)
        j = np.asarray(c["marks"])
        m = len(p)
        if c["closed"]:
            jp, jn = (j - 1) % m, (j + 1) % m
        else:  # at an open end one neighbour is the point itself (a zero segment)
            jp, jn = np.maximum(j - 1, 0), np.minimum(j + 1, m - 1)
        pts.append(p)
        here.append(j + base)
        prev.append(jp + base)
        nxt.append(jn + base)
        ids.append(np.asarray(c["ids"]))
        base += m
    p = np.concatenate(pts)
    h, a, b = np.concatenate(here), np.concatenate(prev), np.concatenate(nxt)
    out = np.zeros((num_points, 2), np.float64)
    out[np.concatenate(ids)] = _vertex_tangents(p[a], p[h], p[b])
    return out.astype(np.float32)


def ambiguous_landmarks(landmarks: np.ndarray, curves: Sequence[dict[str, Any]], sigma: float,
                        rng: np.random.Generator, iod: float | None = None,
                        kinds: np.ndarray | None = None,
                        corner_factor: float = CORNER_FACTOR) -> np.ndarray:
    """Training labels with semantic ambiguity: each landmark slid along its curve.

    ``sigma`` is in units of the inter-ocular distance ``iod`` (outer eye corners 60
    and 72 by default).  Contour points move by N(0, sigma * iod) arc length; corner and
    end points by ``corner_factor`` times that; pupils get isotropic noise of that size.
    ``sigma == 0`` returns the landmarks unchanged.  Draws exactly 102 normals from
    ``rng`` whatever the face, so labels are reproducible.
    """
    lm = np.asarray(landmarks, np.float64)
    n = lm.shape[0]
    z = rng.standard_normal(n)
    z_pupil = rng.standard_normal((2, 2))
    if sigma == 0:
        return lm.astype(np.float32)
    if iod is None:
        iod = float(np.linalg.norm(lm[60] - lm[72]))
    kinds = point_kinds(n) if kinds is None else np.asarray(kinds)
    std = sigma * iod * np.where(kinds == KIND_CONTOUR, 1.0, corner_factor)
    # All curves in one interpolation: each curve's arc length is shifted into its own
    # interval of one long axis (closed curves wrap around, open ones stop at their ends).
    out = lm.copy()
    axes, xs, ys, s_all, ids_all = [], [], [], [], []
    offset = 0.0
    for c in curves:
        p = np.asarray(c["points"], np.float64)
        if c["closed"]:
            p = np.concatenate([p, p[:1]])
        cum = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(p, axis=0).T))])
        ids = np.asarray(c["ids"])
        s = cum[np.asarray(c["marks"])] + z[ids] * std[ids]
        s = np.mod(s, cum[-1]) if c["closed"] else np.clip(s, 0.0, cum[-1])
        axes.append(cum + offset)
        xs.append(p[:, 0])
        ys.append(p[:, 1])
        s_all.append(s + offset)
        ids_all.append(ids)
        offset += cum[-1] + 1.0
    axis, s = np.concatenate(axes), np.concatenate(s_all)
    ids = np.concatenate(ids_all)
    out[ids, 0] = np.interp(s, axis, np.concatenate(xs))
    out[ids, 1] = np.interp(s, axis, np.concatenate(ys))
    pupils = np.flatnonzero(kinds == KIND_PUPIL)[:2]
    out[pupils] += z_pupil[: len(pupils)] * std[pupils, None]
    return out.astype(np.float32)


def tangents_from_landmarks(landmarks: np.ndarray, definition: Any) -> np.ndarray:
    """(N, 2) float32 unit tangents recomputed from landmarks and a definition's edges.

    For data without the generator's side file (e.g. real WFLW predictions): each point's
    direction is the bisector of the chords to its neighbours along its edge (one chord
    at the ends of open edges); points on no edge get zeros.  On synthetic faces this
    agrees with the exact tangents on smooth contours (median 0.5 degrees, 99th
    percentile 9 degrees).
    """
    lm = np.asarray(landmarks, np.float64)
    out = np.zeros_like(lm)
    done = np.zeros(len(lm), bool)
    for edge in definition.edges:
        idx = np.asarray(edge.indices)
        if edge.closed:
            prev, nxt = np.roll(idx, 1), np.roll(idx, -1)
        else:
            prev = np.concatenate([idx[:1], idx[:-1]])
            nxt = np.concatenate([idx[1:], idx[-1:]])
        t = _vertex_tangents(lm[prev], lm[idx], lm[nxt])
        new = ~done[idx]
        out[idx[new]] = t[new]
        done[idx] = True
    return out.astype(np.float32)
