"""The spline through an edge's landmarks, in numpy (loader workers) and torch (device).

The authors draw each edge as an interpolating cubic spline through its landmarks
(scipy ``splprep(s=0, k=3)``, periodic when closed, 5 samples per knot interval, the
raw points when the fit fails).  This is the same interpolant FITPACK builds for
``s=0`` (not-a-knot cubic for open curves, periodic cubic for closed ones,
chord-length parameters), solved directly for its second derivatives; a
:class:`CurvePlan` fits all edges of a definition with one batched solve.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ...definitions import LandmarkDefinition

__all__ = ["SPLINE_DENSITY", "CurvePlan", "curve_plan", "fit_edge_curve"]

# Samples of the fitted spline per interval between two landmarks.
SPLINE_DENSITY = 5


def _sample_fractions(density: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = np.arange(density, dtype=np.float64) / density
    g = 1.0 - f
    return f, g ** 3 - g, f ** 3 - f


def _spline_system_np(h: np.ndarray, y: np.ndarray, closed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Linear system for the knot second derivatives of the FITPACK s=0 interpolant."""
    slope = np.diff(y, axis=0) / h[:, None]
    if closed:
        n = h.shape[0]  # unknowns M_0..M_{n-1}; M_n = M_0
        a = np.zeros((n, n))
        idx = np.arange(n)
        prev = (idx - 1) % n
        a[idx, prev] += h[prev]
        a[idx, idx] += 2.0 * (h[prev] + h)
        a[idx, (idx + 1) % n] += h
        rhs = 6.0 * (slope - slope[prev])
        return a, rhs
    m = h.shape[0] + 1
    a = np.zeros((m, m))
    rhs = np.zeros((m, 2))
    i = np.arange(1, m - 1)
    a[i, i - 1] = h[i - 1]
    a[i, i] = 2.0 * (h[i - 1] + h[i])
    a[i, i + 1] = h[i]
    rhs[1:-1] = 6.0 * (slope[1:] - slope[:-1])
    # Not-a-knot: the third derivative is continuous at the second and penultimate knots.
    a[0, :3] = (h[1], -(h[0] + h[1]), h[0])
    a[-1, -3:] = (h[-1], -(h[-2] + h[-1]), h[-2])
    return a, rhs


def fit_edge_curve(points: np.ndarray, closed: bool, density: int = SPLINE_DENSITY) -> np.ndarray:
    """The polyline the original draws for one edge: (n, 2) -> (m, 2) float64.

    ``density`` samples per interval of the interpolating cubic spline (plus the last
    point for an open curve); the raw points where scipy's ``splprep`` would fail
    (too few points, or two consecutive points equal).
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    y = np.concatenate([pts, pts[:1]]) if closed else pts
    m = y.shape[0]
    if m <= 3:
        return pts.copy()
    chord = np.sqrt(((y[1:] - y[:-1]) ** 2).sum(axis=1))
    v = np.concatenate([[0.0], np.cumsum(chord)])
    if not v[-1] > 0:
        return pts.copy()
    u = v / v[-1]
    h = np.diff(u)
    if not np.all(h > 0):
        return pts.copy()
    a, rhs = _spline_system_np(h, y, closed)
    try:
        mom = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        return pts.copy()
    if closed:
        mom = np.concatenate([mom, mom[:1]])
    f, c0, c1 = _sample_fractions(density)
    h2 = (h * h / 6.0)[:, None, None]
    seg = (
        (1.0 - f)[None, :, None] * y[:-1, None, :]
        + f[None, :, None] * y[1:, None, :]
        + h2 * (c0[None, :, None] * mom[:-1, None, :] + c1[None, :, None] * mom[1:, None, :])
    ).reshape(-1, 2)
    if not closed:
        seg = np.concatenate([seg, y[-1:]])
    if not np.all(np.isfinite(seg)):
        return pts.copy()
    return seg


def _curve_length(n: int, closed: bool, density: int) -> int:
    if n + closed <= 3:  # splprep refuses these: the raw points are drawn
        return n
    return density * n if closed else density * (n - 1) + 1


class CurvePlan:
    """Index arrays that fit every edge of a definition at once.

    Fitting edge by edge costs a few dozen small array operations per edge; this
    plan concatenates all edges' knots, builds all their (zero-padded) systems with
    a handful of gathers, solves them in one batched call, and samples them
    together.  ``curves`` is the numpy executor (one sample), ``curves_torch`` the
    batched one.  Both return the curves concatenated, with ``offsets`` marking
    where each edge's polyline starts; an edge whose fit fails (equal consecutive
    points, non-finite result) gets its raw points, padded by repeating its last
    point (repeated vertices add nothing to a drawing).
    """

    def __init__(self, edges: tuple[tuple[tuple[int, ...], bool], ...], density: int = SPLINE_DENSITY):
        self.edges, self.density = edges, density
        gather, ia, iedge, lengths, raw_idx = [], [], [], [], []
        fit_edges = []  # (edge, point offset, interval offset, intervals, unknowns, closed)
        moff = koff = 0
        for e, (idx, closed) in enumerate(edges):
            n = len(idx)
            y = list(idx) + ([idx[0]] if closed else [])
            length = _curve_length(n, closed, density)
            lengths.append(length)
            raw_idx.extend(moff + min(j, n - 1) for j in range(length))
            gather.extend(y)
            if n + closed > 3:
                k = len(y) - 1
                fit_edges.append((e, moff, koff, k, k if closed else k + 1, closed))
                ia.extend(moff + j for j in range(k))
                iedge.extend([len(fit_edges) - 1] * k)
                koff += k
            moff += len(y)
        self.gather = np.array(gather, np.int64)
        self.ia = np.array(ia, np.int64)
        self.interval_fit = np.array(iedge, np.int64)  # which fitted edge an interval belongs to
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.raw_idx = np.array(raw_idx, np.int64)
        self.num_fit = len(fit_edges)
        self.size = max((f[4] for f in fit_edges), default=1)
        ent = []  # (fit edge, row, col, p, alpha, q, beta): A[f, row, col] = alpha h[p] + beta h[q]
        rhs = []  # (fit edge, row, s_plus, s_minus): rhs[f, row] = 6 (slope[s_plus] - slope[s_minus])
        pad = []
        mom_a, mom_b = [], []
        out_idx = np.zeros(int(self.offsets[-1]), np.int64)
        self.fit_edge_ids = np.array([f[0] for f in fit_edges], np.int64)
        nsamples = koff * density
        for f, (e, moff_e, k0, k, unk, closed) in enumerate(fit_edges):
            def h(j: int, k0: int = k0, k: int = k, closed: bool = closed) -> int:
                return k0 + (j % k if closed else j)
            if closed:
                for i in range(k):
                    ent += [(f, i, (i - 1) % k, h(i - 1), 1.0, h(i), 0.0),
                            (f, i, i, h(i - 1), 2.0, h(i), 2.0),
                            (f, i, (i + 1) % k, h(i), 1.0, h(i), 0.0)]
                    rhs.append((f, i, h(i), h(i - 1)))
            else:
                ent += [(f, 0, 0, h(1), 1.0, h(1), 0.0), (f, 0, 1, h(0), -1.0, h(1), -1.0),
                        (f, 0, 2, h(0), 1.0, h(0), 0.0)]
                for i in range(1, k):
                    ent += [(f, i, i - 1, h(i - 1), 1.0, h(i), 0.0),
                            (f, i, i, h(i - 1), 2.0, h(i), 2.0),
                            (f, i, i + 1, h(i), 1.0, h(i), 0.0)]
                    rhs.append((f, i, h(i), h(i - 1)))
                ent += [(f, k, k - 2, h(k - 1), 1.0, h(k - 1), 0.0),
                        (f, k, k - 1, h(k - 2), -1.0, h(k - 1), -1.0),
                        (f, k, k, h(k - 2), 1.0, h(k - 2), 0.0)]
            pad.extend((f, r) for r in range(unk, self.size))
            for i in range(k):
                mom_a.append(f * self.size + i)
                mom_b.append(f * self.size + ((i + 1) % k if closed else i + 1))
            start = int(self.offsets[e])
            out_idx[start:start + k * density] = np.arange(k0 * density, (k0 + k) * density)
            if not closed:  # the last knot ends an open curve
                out_idx[start + k * density] = nsamples + moff_e + k
        fitted = set(self.fit_edge_ids.tolist())
        for e in range(len(edges)):  # raw edges read the knots directly
            if e not in fitted:
                a, b = int(self.offsets[e]), int(self.offsets[e + 1])
                out_idx[a:b] = nsamples + self.raw_idx[a:b]
        self.out_idx = out_idx
        self.point_edge = np.repeat(np.arange(len(edges)), lengths)
        ent_a = np.array(ent, np.float64).reshape(-1, 7)
        self.a_f, self.a_row, self.a_col, self.a_p, self.a_q = (
            ent_a[:, i].astype(np.int64) for i in (0, 1, 2, 3, 5))
        self.a_alpha, self.a_beta = ent_a[:, 4], ent_a[:, 6]
        rhs_a = np.array(rhs, np.int64).reshape(-1, 4)
        self.r_f, self.r_row, self.r_plus, self.r_minus = (rhs_a[:, i] for i in range(4))
        pad_a = np.array(pad, np.int64).reshape(-1, 2)
        self.pad_f, self.pad_row = pad_a[:, 0], pad_a[:, 1]
        self.mom_a, self.mom_b = np.array(mom_a, np.int64), np.array(mom_b, np.int64)
        frac, c0, c1 = _sample_fractions(density)
        self.frac, self.c0, self.c1 = frac, c0, c1
        self._torch: dict[str, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ numpy

    def curves(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) points -> (C, 2) float64 concatenated polylines (see ``offsets``)."""
        y = np.asarray(points, np.float64)[self.gather]
        if self.num_fit == 0:
            return y[self.raw_idx]
        ya, yb = y[self.ia], y[self.ia + 1]
        chord = np.sqrt(((yb - ya) ** 2).sum(1))
        total = np.bincount(self.interval_fit, chord, minlength=self.num_fit)
        bad = np.bincount(self.interval_fit, chord <= 0, minlength=self.num_fit) > 0
        bad |= ~(total > 0)
        h = chord / np.where(bad, 1.0, total)[self.interval_fit]
        if bad.any():
            h = np.where(bad[self.interval_fit], 1.0, h)
        slope = (yb - ya) / h[:, None]
        a = np.zeros((self.num_fit, self.size, self.size))
        a[self.a_f, self.a_row, self.a_col] = self.a_alpha * h[self.a_p] + self.a_beta * h[self.a_q]
        a[self.pad_f, self.pad_row, self.pad_row] = 1.0
        rhs = np.zeros((self.num_fit, self.size, 2))
        rhs[self.r_f, self.r_row] = 6.0 * (slope[self.r_plus] - slope[self.r_minus])
        try:
            mom = np.linalg.solve(a, rhs).reshape(-1, 2)
        except np.linalg.LinAlgError:
            return np.concatenate([fit_edge_curve_padded(points, idx, closed, self.density)
                                   for idx, closed in self.edges])
        h2 = (h * h / 6.0)[:, None, None]
        f = self.frac[None, :, None]
        samples = ((1.0 - f) * ya[:, None] + f * yb[:, None]
                   + h2 * (self.c0[None, :, None] * mom[self.mom_a][:, None]
                           + self.c1[None, :, None] * mom[self.mom_b][:, None]))
        finite = np.isfinite(samples).all(axis=(1, 2))
        bad |= np.bincount(self.interval_fit, ~finite, minlength=self.num_fit) > 0
        out = np.concatenate([samples.reshape(-1, 2), y])[self.out_idx]
        if bad.any():
            edge_bad = np.zeros(len(self.edges), bool)
            edge_bad[self.fit_edge_ids[bad]] = True
            sel = edge_bad[self.point_edge]
            out[sel] = y[self.raw_idx[sel]]
        return out

    # ------------------------------------------------------------------ torch

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        key = str(device)
        if key not in self._torch:
            names = ("gather", "ia", "interval_fit", "raw_idx", "a_f", "a_row", "a_col", "a_p", "a_q",
                     "a_alpha", "a_beta", "r_f", "r_row", "r_plus", "r_minus", "pad_f", "pad_row",
                     "mom_a", "mom_b", "frac", "c0", "c1", "out_idx", "point_edge", "fit_edge_ids")
            self._torch[key] = {n: torch.tensor(getattr(self, n), device=device) for n in names}
        return self._torch[key]

    def curves_torch(self, points: Tensor) -> Tensor:
        """(B, N, 2) points -> (B, C, 2) float64 polylines, one batched solve for all edges."""
        t = self._tensors(points.device)
        y = points.to(torch.float64)[:, t["gather"]]
        if self.num_fit == 0:
            return y[:, t["raw_idx"]]
        bsz = y.shape[0]
        ya, yb = y[:, t["ia"]], y[:, t["ia"] + 1]
        chord = (yb - ya).pow(2).sum(-1).sqrt()
        fit = t["interval_fit"]
        zeros = torch.zeros(bsz, self.num_fit, dtype=torch.float64, device=y.device)
        total = zeros.index_add(1, fit, chord)
        bad = zeros.index_add(1, fit, (chord <= 0).to(torch.float64)) > 0
        bad = bad | ~(total > 0)
        h = chord / torch.where(bad, 1.0, total)[:, fit]
        h = torch.where(bad[:, fit], 1.0, h)
        slope = (yb - ya) / h[..., None]
        a = torch.zeros(bsz, self.num_fit, self.size, self.size, dtype=torch.float64, device=y.device)
        a[:, t["a_f"], t["a_row"], t["a_col"]] = t["a_alpha"] * h[:, t["a_p"]] + t["a_beta"] * h[:, t["a_q"]]
        a[:, t["pad_f"], t["pad_row"], t["pad_row"]] = 1.0
        rhs = torch.zeros(bsz, self.num_fit, self.size, 2, dtype=torch.float64, device=y.device)
        rhs[:, t["r_f"], t["r_row"]] = 6.0 * (slope[:, t["r_plus"]] - slope[:, t["r_minus"]])
        mom, info = torch.linalg.solve_ex(a, rhs)
        bad = bad | (info != 0)
        mom = mom.reshape(bsz, -1, 2)
        h2 = (h * h / 6.0)[..., None, None]
        f = t["frac"][None, None, :, None]
        samples = ((1.0 - f) * ya[:, :, None] + f * yb[:, :, None]
                   + h2 * (t["c0"][None, None, :, None] * mom[:, t["mom_a"]][:, :, None]
                           + t["c1"][None, None, :, None] * mom[:, t["mom_b"]][:, :, None]))
        finite = torch.isfinite(samples).all(-1).all(-1).to(torch.float64)
        bad = bad | (zeros.index_add(1, fit, 1.0 - finite) > 0)
        out = torch.cat([samples.reshape(bsz, -1, 2), y], 1)[:, t["out_idx"]]
        edge_bad = torch.zeros(bsz, len(self.edges), dtype=torch.bool, device=y.device)
        edge_bad[:, t["fit_edge_ids"]] = bad
        sel = edge_bad[:, t["point_edge"]]
        return torch.where(sel[..., None], y[:, t["raw_idx"]], out)


@lru_cache(maxsize=64)
def curve_plan(definition: LandmarkDefinition, density: int = SPLINE_DENSITY) -> CurvePlan:
    """The (cached) :class:`CurvePlan` of a definition's edges."""
    return CurvePlan(tuple((tuple(e.indices), e.closed) for e in definition.edges), density)


def fit_edge_curve_padded(points: np.ndarray, indices: tuple[int, ...], closed: bool,
                          density: int = SPLINE_DENSITY) -> np.ndarray:
    """One edge's polyline at its plan length (raw points padded when the fit fails)."""
    pts = np.asarray(points, np.float64)[list(indices)]
    curve = fit_edge_curve(pts, closed, density)
    length = _curve_length(len(indices), closed, density)
    if curve.shape[0] < length:
        curve = np.concatenate([curve, np.repeat(curve[-1:], length - curve.shape[0], 0)])
    return curve

