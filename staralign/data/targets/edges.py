"""Training targets: one Gaussian *point map* per landmark and one *edge map* per curve.

The authors build both at the input resolution and then shrink them:

* point maps: a Gaussian (sigma 1.5, peak 1) on a 256x256 canvas per landmark,
  centred on the integer grid (window columns ``int(x - 3 sigma)`` ..
  ``int(x + 3 sigma + 1) - 1``, peak at ``int(x - 3 sigma) + floor((6 sigma + 1) / 2)``,
  so the sub-pixel part of the point is dropped), then a bilinear resize
  (align_corners=False) to 64x64;
* edge maps: per edge an interpolating cubic spline through its landmarks
  (scipy ``splprep(s=0, k=3)``, periodic when closed, 5 samples per knot
  interval, the raw points when the fit fails), clipped to the image, drawn as a
  4 px wide polyline on a 4x (1024x1024) canvas with vertices ``round(4 p)``,
  area-resized to 256 and bilinearly resized to 64.

We compute the same numbers without the big canvases:

* A 2-D Gaussian and a bilinear resize are both separable, so a point map is the
  outer product of two resized 1-D profiles.  A profile depends on the
  coordinate only through the integer window start, so all of them are
  tabulated once and a map costs two table look-ups and an outer product.  Exact.
* The spline is the same interpolant FITPACK builds for ``s=0`` (not-a-knot
  cubic for open curves, periodic cubic for closed ones, chord-length
  parameters), solved directly for its second derivatives; a :class:`CurvePlan`
  fits all edges of a definition with one batched solve.
* The drawing: the original canvas is float32, and OpenCV draws anti-aliased
  lines only on 8-bit images, so the curve is in fact rasterised *without*
  anti-aliasing (a filled 4 px wide quadrilateral per segment, its outline, and a
  radius-2 disc at every vertex).  An area resize by 4 followed by an
  integer-factor bilinear resize makes every heatmap pixel the mean of a fixed
  block of canvas pixels (8x8 at stride 16 for 256 -> 64), so only those blocks
  matter.  The numpy path draws with OpenCV on small canvases covering each
  curve's bounding box and sums the blocks; the torch path evaluates OpenCV's
  rasterisation rules (fixed-point quadrilateral scan conversion, sub-pixel
  outline lines, midpoint discs) for every canvas pixel in the blocks a segment
  can touch, batched over samples and segments, with no per-sample loop.  Both
  reproduce the authors' maps to float rounding (see ``tests/test_data_targets.py``).

Sizes: ``image_size`` is the crop side (256) and ``heatmap_size`` the map side
(64).  Point maps accept any sizes; edge maps need ``image_size`` to be a
multiple of ``heatmap_size`` (the block structure above).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch
from torch import Tensor

from ..definitions import LandmarkDefinition

__all__ = [
    "CANVAS_SCALE",
    "EDGE_THICKNESS",
    "SPLINE_DENSITY",
    "CurvePlan",
    "batch_targets",
    "curve_plan",
    "edge_maps",
    "edge_maps_torch",
    "fit_edge_curve",
    "fit_edge_curve_torch",
    "point_maps",
    "point_maps_torch",
]

# The original draws edges on a canvas this many times larger than the crop ...
CANVAS_SCALE = 4
# ... with lines this wide on that canvas (1 px at the crop's resolution).
EDGE_THICKNESS = 4
# Samples of the fitted spline per interval between two landmarks.
SPLINE_DENSITY = 5

_SHIFT = 16  # OpenCV's fixed-point precision for drawing (XY_SHIFT)
_ONE = 1 << _SHIFT
_HALF = _ONE >> 1


# --------------------------------------------------------------------------- shared helpers


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


def _block_layout(image_size: int, heatmap_size: int) -> tuple[int, int, int]:
    """Canvas block behind each heatmap pixel: (offset, length, stride) along one axis.

    Bilinear resizing by an integer factor f samples the crop at ``f i + (f - 1) / 2``:
    the mean of the two middle pixels of each f-block when f is even, the middle one
    when f is odd.  Each crop pixel is the mean of a 4x4 canvas block.
    """
    if image_size % heatmap_size:
        raise ValueError(f"edge maps need image_size ({image_size}) to be a multiple of "
                         f"heatmap_size ({heatmap_size})")
    f = image_size // heatmap_size
    first = f // 2 - 1 if f % 2 == 0 else (f - 1) // 2
    count = 2 if f % 2 == 0 else 1
    return CANVAS_SCALE * first, CANVAS_SCALE * count, CANVAS_SCALE * f


# --------------------------------------------------------------------------- point maps


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


# --------------------------------------------------------------------------- spline fitting


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


def fit_edge_curve_torch(points: Tensor, closed: bool, density: int = SPLINE_DENSITY) -> Tensor:
    """Batched :func:`fit_edge_curve` for one edge: (B, n, 2) -> (B, m, 2) float64.

    A sample whose fit fails gets its raw points padded to the common length.
    """
    plan = CurvePlan(((tuple(range(points.shape[1])), closed),), density)
    return plan.curves_torch(points)


# --------------------------------------------------------------------------- edge maps (numpy)


def _axis_blocks(lo: int, hi: int, size: int, layout: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """Heatmap index range [i0, i1] whose canvas blocks may meet [lo, hi], the canvas origin
    (at or before both the shape and the first block, never below 0, so OpenCV clips the
    drawing exactly where the original's full canvas does) and the first block's offset."""
    off, blen, stride = layout
    i0 = max(0, -((off + blen - 1 - lo) // stride))  # ceil((lo - off - blen + 1) / stride)
    i1 = min(size - 1, (hi - off) // stride)
    start = off + stride * i0
    origin = max(0, min(start, lo))
    return i0, i1, origin, start - origin


def edge_maps(
    points: np.ndarray,
    definition: LandmarkDefinition,
    image_size: int = 256,
    heatmap_size: int = 64,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """(N, 2) crop-pixel points -> (E, H, H) float32 edge maps, equal to the original's
    (written into ``out`` when given)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    layout = _block_layout(image_size, heatmap_size)
    off, blen, stride = layout
    if out is None:
        out = np.zeros((definition.num_edges, heatmap_size, heatmap_size), np.float32)
    else:
        out.fill(0.0)
    margin = EDGE_THICKNESS  # the drawing reaches at most 3 px beyond the vertices
    plan = curve_plan(definition)
    curves = np.clip(plan.curves(pts), 0, image_size - 1)
    vertices = np.floor(curves * CANVAS_SCALE + 0.5).astype(np.int32)
    for k, edge in enumerate(definition.edges):
        poly = vertices[plan.offsets[k]:plan.offsets[k + 1]]
        (x_lo, y_lo), (x_hi, y_hi) = poly.min(0) - margin, poly.max(0) + margin
        i0, i1, ox, ax = _axis_blocks(int(x_lo), int(x_hi), heatmap_size, layout)
        j0, j1, oy, ay = _axis_blocks(int(y_lo), int(y_hi), heatmap_size, layout)
        if i1 < i0 or j1 < j0:
            continue
        ni, nj = i1 - i0 + 1, j1 - j0 + 1
        canvas = np.zeros((ay + stride * nj, ax + stride * ni), np.uint8)
        # Drawn with value blen^2, an area resize by blen gives each block's pixel count exactly.
        cv2.polylines(canvas, [poly - np.array([ox, oy], np.int32)], edge.closed, blen * blen,
                      EDGE_THICKNESS, cv2.LINE_8)
        counts = cv2.resize(canvas[ay:, ax:], (stride * ni // blen, stride * nj // blen),
                            interpolation=cv2.INTER_AREA)
        step = stride // blen
        out[k, j0:j1 + 1, i0:i1 + 1] = counts[::step, ::step] * np.float32(1.0 / (blen * blen))
    return out


# --------------------------------------------------------------------------- edge maps (torch)


def _trunc_div(a: Tensor, b: Tensor) -> Tensor:
    return torch.div(a, b, rounding_mode="trunc")


def _outcode(p: Tensor, last: int) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    return (x < 0).long() + (x > last).long() * 2 + (y < 0).long() * 4 + (y > last).long() * 8


def _slide(u: Tensor, v: Tensor, u_other: Tensor, v_other: Tensor, do: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Where ``do``, move the point (u, v) along the line to (u_other, v_other) until v == t,
    with OpenCV's truncating fixed-point arithmetic (rows: u = x, v = y; columns swapped)."""
    step = ((t - v).to(torch.float64) * (u_other - u).to(torch.float64)
            / torch.where(v_other == v, 1, v_other - v).to(torch.float64)).to(torch.int64)
    return torch.where(do, u + step, u), torch.where(do, t, v)


def _clip_lines(a: Tensor, b: Tensor, canvas: int) -> tuple[Tensor, Tensor, Tensor]:
    """OpenCV's clipLine for fixed-point lines on a canvas x canvas image: (a, b, visible).

    Its integer arithmetic decides which pixels a line that leaves the canvas sets.  Each end
    is moved in turn, the second one along the line through the first one's new position.
    """
    last = (canvas << _SHIFT) - 1
    x1, y1, x2, y2 = a[..., 0], a[..., 1], b[..., 0], b[..., 1]
    c1, c2 = _outcode(a, last), _outcode(b, last)
    act = ((c1 & c2) == 0) & ((c1 | c2) != 0)
    # Rows first ...
    do = act & ((c1 & 12) != 0)
    x1, y1 = _slide(x1, y1, x2, y2, do, torch.where(c1 < 8, 0, last))
    c1 = torch.where(do, (x1 < 0).long() + (x1 > last).long() * 2, c1)
    do = act & ((c2 & 12) != 0)
    x2, y2 = _slide(x2, y2, x1, y1, do, torch.where(c2 < 8, 0, last))
    c2 = torch.where(do, (x2 < 0).long() + (x2 > last).long() * 2, c2)
    # ... then columns.
    act2 = act & ((c1 & c2) == 0) & ((c1 | c2) != 0)
    do = act2 & (c1 != 0)
    y1, x1 = _slide(y1, x1, y2, x2, do, torch.where(c1 == 1, 0, last))
    c1 = torch.where(do, 0, c1)
    do = act2 & (c2 != 0)
    y2, x2 = _slide(y2, x2, y1, x1, do, torch.where(c2 == 1, 0, last))
    c2 = torch.where(do, 0, c2)
    return torch.stack([x1, y1], -1), torch.stack([x2, y2], -1), (c1 | c2) == 0


def _segment_geometry(p0: Tensor, p1: Tensor, canvas: int) -> dict[str, Tensor]:
    """Per segment (S, 2) int64 endpoints: OpenCV's thick-line quadrilateral and its parts."""
    nondeg = (p0 != p1).any(-1)
    dxf = (p0[:, 0] - p1[:, 0]).to(torch.float64)
    dyf = (p1[:, 1] - p0[:, 1]).to(torch.float64)
    norm = torch.sqrt(dxf * dxf + dyf * dyf)
    r = torch.where(nondeg, (EDGE_THICKNESS << (_SHIFT - 1)) / torch.where(nondeg, norm, 1.0), 0.0)
    dp = torch.stack([torch.round(dyf * r), torch.round(dxf * r)], -1).to(torch.int64)
    f0, f1 = p0 << _SHIFT, p1 << _SHIFT
    quad = torch.stack([f0 + dp, f0 - dp, f1 - dp, f1 + dp], 1)  # (S, 4, 2) fixed point
    vy = (quad[..., 1] + _HALF) >> _SHIFT  # rounded rows
    imin = torch.argmin(quad[..., 1], dim=1)
    ymin = vy.gather(1, imin[:, None])[:, 0]
    ymax = vy.max(1).values
    steps = torch.arange(4, device=p0.device)
    chains = torch.stack([(imin[:, None] + steps) % 4, (imin[:, None] - steps) % 4], 1)  # (S, 2, 4)
    # The quadrilateral's outline, drawn edge by edge with OpenCV's sub-pixel line.
    a, b, visible = _clip_lines(quad[:, [3, 0, 1, 2]], quad, canvas)
    d = b - a
    xmajor = d[..., 0].abs() > d[..., 1].abs()
    swap = torch.where(xmajor, d[..., 0] < 0, d[..., 1] < 0)
    s1 = torch.where(swap[..., None], b, a)
    s2 = torch.where(swap[..., None], a, b)
    dd = s2 - s1
    major = torch.where(xmajor, 0, 1)
    minor = 1 - major
    amaj = dd.gather(-1, major[..., None])[..., 0]  # >= 0 after the swap
    dmin = dd.gather(-1, minor[..., None])[..., 0]
    step = _trunc_div(dmin << _SHIFT, amaj | 1)
    ecount = amaj >> _SHIFT
    start_major = (s1.gather(-1, major[..., None])[..., 0] + _HALF) >> _SHIFT
    start_minor = s1.gather(-1, minor[..., None])[..., 0] + _HALF
    end = (s2 + _HALF) >> _SHIFT
    return {
        "p0": p0, "p1": p1, "nondeg": nondeg, "quad": quad, "vy": vy, "ymin": ymin, "ymax": ymax,
        "chains": chains, "xmajor": xmajor, "step": step, "ecount": ecount,
        "start_major": start_major, "start_minor": start_minor, "end": end,
        "visible": visible & nondeg[:, None],
    }


def _covered(g: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Whether canvas pixel (x, y) is set by drawing segment g (tensors broadcast over pixels).

    ``g``'s tensors are indexed per pixel group (leading dim P), ``x``/``y`` are (P, K).
    """
    hit = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for end in ("p0", "p1"):
        c = g[end]
        hit |= (x - c[:, 0:1]) ** 2 + (y - c[:, 1:2]) ** 2 <= (EDGE_THICKNESS // 2) ** 2
    # Scan conversion of the quadrilateral (rows ymin .. ymax - 1).
    rows_ok = (y >= g["ymin"][:, None]) & (y < g["ymax"][:, None]) & g["nondeg"][:, None]
    vy, quad = g["vy"], g["quad"]
    bounds = []
    for c in range(2):
        chain = g["chains"][:, c]  # (P, 4) vertex order from the top vertex
        cy = vy.gather(1, chain)  # (P, 4)
        below = cy[:, None, 1:] > y[..., None]  # (P, K, 3)
        bpos = 1 + torch.argmax(below.to(torch.int8), dim=-1)  # first vertex below the row
        bidx = chain.gather(1, bpos.view(bpos.shape[0], -1)).view_as(bpos)
        aidx = chain.gather(1, (bpos - 1).view(bpos.shape[0], -1)).view_as(bpos)
        ax_ = quad[..., 0].gather(1, aidx.view(aidx.shape[0], -1)).view_as(aidx)
        bx_ = quad[..., 0].gather(1, bidx.view(bidx.shape[0], -1)).view_as(bidx)
        ay_ = vy.gather(1, aidx.view(aidx.shape[0], -1)).view_as(aidx)
        by_ = vy.gather(1, bidx.view(bidx.shape[0], -1)).view_as(bidx)
        rows = torch.clamp(by_ - ay_, min=1)
        dx = _trunc_div((bx_ - ax_) * 2 + rows, 2 * rows)
        bounds.append(ax_ + (y - ay_) * dx)
    left = torch.minimum(bounds[0], bounds[1])
    right = torch.maximum(bounds[0], bounds[1])
    hit |= rows_ok & (x >= (left + _HALF) >> _SHIFT) & (x <= (right + _HALF) >> _SHIFT)
    # The four outline lines.
    for e in range(4):
        xm = g["xmajor"][:, e:e + 1]
        pmaj = torch.where(xm, x, y)
        pmin = torch.where(xm, y, x)
        k = pmaj - g["start_major"][:, e:e + 1]
        on = (k >= 0) & (k <= g["ecount"][:, e:e + 1])
        on &= pmin == (g["start_minor"][:, e:e + 1] + k * g["step"][:, e:e + 1]) >> _SHIFT
        end = g["end"][:, e]
        on |= (x == end[:, 0:1]) & (y == end[:, 1:2])
        hit |= on & g["visible"][:, e:e + 1]
    return hit


def edge_maps_torch(
    points: Tensor,
    definition: LandmarkDefinition,
    image_size: int = 256,
    heatmap_size: int = 64,
    chunk: int = 16384,
    method: str = "auto",
) -> Tensor:
    """Batched edge maps on the points' device: (B, N, 2) crop pixels -> (B, E, H, H) float32.

    ``method="torch"``: splines for the whole batch in one batched solve, the drawing
    evaluated only on the canvas blocks each segment's bounding box meets (``chunk``
    segment-block pairs at a time bound the memory); no per-sample loop, for GPUs.
    ``"numpy"``: :func:`edge_maps` sample by sample (OpenCV draws faster than tensor
    arithmetic on a CPU).  ``"auto"`` (default) picks numpy for CPU tensors, torch
    otherwise.  Both give the same maps.
    """
    if method not in ("auto", "torch", "numpy"):
        raise ValueError(f"method must be 'auto', 'torch' or 'numpy', got {method!r}")
    if method == "numpy" or (method == "auto" and points.device.type == "cpu"):
        pts = points.detach().to("cpu", torch.float64).numpy()
        maps = np.stack([edge_maps(p, definition, image_size, heatmap_size) for p in pts]) if len(pts) else \
            np.zeros((0, definition.num_edges, heatmap_size, heatmap_size), np.float32)
        return torch.from_numpy(maps).to(points.device)
    device = points.device
    pts = points.detach().to(torch.float64)
    bsz = pts.shape[0]
    num_edges = definition.num_edges
    off, blen, stride = _block_layout(image_size, heatmap_size)
    hsz = heatmap_size
    starts, ends, edge_ids = [], [], []
    plan = curve_plan(definition)
    curves = plan.curves_torch(pts)
    verts = torch.floor(curves.clamp(0, image_size - 1) * CANVAS_SCALE + 0.5).to(torch.int64)
    for k, edge in enumerate(definition.edges):
        q = verts[:, plan.offsets[k]:plan.offsets[k + 1]]
        if edge.closed:
            a, b = q, torch.roll(q, -1, dims=1)
        else:
            a, b = q[:, :-1], q[:, 1:]
        starts.append(a)
        ends.append(b)
        edge_ids.append(torch.full((a.shape[1],), k, dtype=torch.int64, device=device))
    p0 = torch.cat(starts, 1)  # (B, S, 2)
    p1 = torch.cat(ends, 1)
    nseg = p0.shape[1]
    seg_edge = torch.cat(edge_ids)[None].expand(bsz, -1).reshape(-1)
    seg_batch = torch.arange(bsz, device=device)[:, None].expand(-1, nseg).reshape(-1)
    p0, p1 = p0.reshape(-1, 2), p1.reshape(-1, 2)
    geom = _segment_geometry(p0, p1, image_size * CANVAS_SCALE)

    # Heatmap pixels (blocks) each segment's drawing can reach.
    margin = EDGE_THICKNESS
    lo = torch.minimum(p0, p1) - margin
    hi = torch.maximum(p0, p1) + margin
    first = torch.clamp(-torch.div(off + blen - 1 - lo, stride, rounding_mode="floor"), min=0)
    last = torch.clamp(torch.div(hi - off, stride, rounding_mode="floor"), max=hsz - 1)
    span = torch.clamp(last - first + 1, min=0)  # (S, 2) blocks along x, y
    counts = span[:, 0] * span[:, 1]
    seg_of_pair = torch.repeat_interleave(torch.arange(counts.shape[0], device=device), counts)
    local = torch.arange(seg_of_pair.shape[0], device=device) - (torch.cumsum(counts, 0) - counts)[seg_of_pair]
    nx = span[seg_of_pair, 0]
    bi = first[seg_of_pair, 0] + local % torch.clamp(nx, min=1)
    bj = first[seg_of_pair, 1] + local // torch.clamp(nx, min=1)
    block = ((seg_batch[seg_of_pair] * num_edges + seg_edge[seg_of_pair]) * hsz + bj) * hsz + bi

    sub = torch.arange(blen, device=device)
    sub_x = sub.repeat(blen)  # pixel order inside a block: row-major
    sub_y = sub.repeat_interleave(blen)
    uniq, inverse = torch.unique(block, return_inverse=True)
    # How many segments set each canvas pixel of each touched block (> 0: the pixel is set).
    hits = torch.zeros(uniq.shape[0] * blen * blen, dtype=torch.int32, device=device)
    cols = torch.arange(blen * blen, device=device)
    for s in range(0, seg_of_pair.shape[0], chunk):
        sl = slice(s, s + chunk)
        seg = seg_of_pair[sl]
        g = {k: v[seg] for k, v in geom.items()}
        x = (off + stride * bi[sl])[:, None] + sub_x[None]
        y = (off + stride * bj[sl])[:, None] + sub_y[None]
        hit = _covered(g, x, y)
        hits.index_add_(0, (inverse[sl][:, None] * (blen * blen) + cols).reshape(-1),
                        hit.reshape(-1).to(torch.int32))
    out = torch.zeros(bsz * num_edges * hsz * hsz, dtype=torch.float32, device=device)
    set_pixels = (hits.view(-1, blen * blen) > 0).sum(1, dtype=torch.int32)
    out[uniq] = set_pixels.to(torch.float32) / float(blen * blen)
    return out.view(bsz, num_edges, hsz, hsz)


def batch_targets(
    batch: dict, definition: LandmarkDefinition, image_size: int, heatmap_size: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(point maps, edge maps) of a batch on ``device``: those the loader built (``"pointmaps"`` /
    ``"edgemaps"`` keys) are moved there, the others built there from ``batch["points"]``.

    Where each map is built is a speed choice only: both ways give the same maps.
    """
    built = {k: batch[k].to(device, non_blocking=True) for k in ("pointmaps", "edgemaps") if k in batch}
    if len(built) < 2:
        points = batch["points"].to(device, non_blocking=True)
        if "pointmaps" not in built:
            built["pointmaps"] = point_maps_torch(points, image_size, heatmap_size)
        if "edgemaps" not in built:
            built["edgemaps"] = edge_maps_torch(points, definition, image_size, heatmap_size)
    return built["pointmaps"], built["edgemaps"]
