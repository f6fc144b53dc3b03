"""Edge maps: each edge's spline rasterised, in numpy (loader workers) and torch (device).

The authors clip the spline (:mod:`.splines`) to the image, draw it as a 4 px wide
polyline on a 4x (1024x1024) canvas with vertices ``round(4 p)``, area-resize that to
256 and resize it bilinearly to 64.

The original canvas is float32, and OpenCV draws anti-aliased lines only on 8-bit
images, so the curve is in fact rasterised *without* anti-aliasing (a filled 4 px wide
quadrilateral per segment, its outline, and a radius-2 disc at every vertex).  An area
resize by 4 followed by an integer-factor bilinear resize makes every heatmap pixel the
mean of a fixed block of canvas pixels (8x8 at stride 16 for 256 -> 64), so only those
blocks matter.  The numpy path draws with OpenCV on small canvases covering each
curve's bounding box and sums the blocks; the torch path evaluates OpenCV's
rasterisation rules (fixed-point quadrilateral scan conversion, sub-pixel outline
lines, midpoint discs) for every canvas pixel in the blocks a segment can touch,
batched over samples and segments, with no per-sample loop.  Both reproduce the
authors' maps to float rounding (see ``tests/test_data_targets.py``).

``image_size`` (the crop side, 256) must be a multiple of ``heatmap_size`` (the map
side, 64): the block structure above.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from ...definitions import LandmarkDefinition
from .splines import curve_plan

__all__ = ["CANVAS_SCALE", "EDGE_THICKNESS", "edge_maps", "edge_maps_torch"]

# The original draws edges on a canvas this many times larger than the crop ...
CANVAS_SCALE = 4
# ... with lines this wide on that canvas (1 px at the crop's resolution).
EDGE_THICKNESS = 4

_SHIFT = 16  # OpenCV's fixed-point precision for drawing (XY_SHIFT)
_ONE = 1 << _SHIFT
_HALF = _ONE >> 1


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
