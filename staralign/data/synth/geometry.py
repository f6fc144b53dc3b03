"""The face as a parametric 2-D model with a little depth, and its pose.

Every feature is a curve ``g(t) -> (x, y, dz)`` in the canonical frame (see
``params``).  Each curve is sampled densely at equal arc-length steps and its landmarks
are particular vertices of that sampling (evenly spaced along the contour, as WFLW's
are); the same vertex arrays are drawn and read out as landmarks.  So after the pose
transform (applied pointwise to everything) a landmark is exactly a vertex of the
polygon or polyline that was drawn: it lies on the drawn feature by construction.

Depth: a point's depth is ``face_depth / half_width^2 * (hw(y)^2 - x^2)`` (zero on the
face outline, largest in the middle; ``hw`` is the outline half-width at height ``y``)
plus a per-feature extra ``dz`` (the nose stands out, hair and ears sit behind).  Pose is a
3-D rotation (roll, yaw, pitch) and an orthographic projection, so yaw compresses the
far side and shifts the features towards it.  The depth profile's slope is bounded so
the projection stays one-to-one along each row for |yaw| <= 45 degrees: the outline
remains the silhouette.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .params import OPEN_MAX, FaceParams

__all__ = ["Curve", "Face", "Layer", "build_face", "CORNER_IDS", "PUPIL_IDS", "point_kinds"]

# Landmarks that are ends or corners (semantically well defined along their contour):
# jaw ends, brow ends, nose tip, eye corners, outer and inner mouth corners.
CORNER_IDS = (0, 32, 33, 37, 42, 46, 54, 60, 64, 68, 72, 76, 82, 88, 92)
PUPIL_IDS = (96, 97)
KIND_CONTOUR, KIND_CORNER, KIND_PUPIL = 0, 1, 2


def point_kinds(num_points: int = 98) -> np.ndarray:
    """(98,) int8: 0 a point on a contour, 1 a corner/end point, 2 a pupil."""
    kinds = np.zeros(num_points, np.int8)
    kinds[list(CORNER_IDS)] = KIND_CORNER
    kinds[list(PUPIL_IDS)] = KIND_PUPIL
    return kinds


@dataclass
class Curve:
    """A landmark curve: dense canonical vertices, which of them are landmarks, and which."""

    name: str
    pts: np.ndarray  # (M, 3): x, y, extra depth dz
    marks: np.ndarray  # (K,) vertex index of each landmark
    ids: np.ndarray  # (K,) landmark index (WFLW numbering)
    closed: bool


@dataclass
class Layer:
    """One drawing operation in canonical coordinates; ``width`` 0 means fill."""

    pts: np.ndarray  # (M, 3)
    color: tuple[int, int, int]
    width: float = 0.0  # stroke width in canonical units
    closed: bool = True
    role: str = ""  # "face" marks the skin polygon (used for the shading mask)


@dataclass
class Face:
    """A face in the canonical frame: landmark curves, pupils and the layers to draw."""

    params: FaceParams
    curves: list[Curve]
    pupils: np.ndarray  # (2, 3)
    pupil_hidden: tuple[bool, bool]  # pupil centre behind a (partly) closed eyelid
    layers: list[Layer] = field(default_factory=list)
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # geometry needed by the projection
    a_left: float = 0.5
    a_right: float = 0.5
    y0: float = -0.1
    jaw_b: float = 0.95
    jaw_n: float = 2.5
    cranium: float = 0.78
    depth_k: float = 0.5

    # ----------------------------------------------------------------- depth
    def half_width(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Outline half-width at height ``y`` on the side of ``x`` (0 above/below the head)."""
        a = np.where(x < 0, self.a_left, self.a_right)
        u = np.clip((y - self.y0) / self.jaw_b, 0.0, 1.0)
        jaw = a * (1.0 - u ** self.jaw_n) ** (1.0 / self.jaw_n)
        v = np.clip((self.y0 - y) / self.cranium, 0.0, 1.0)
        cap = a * np.sqrt(1.0 - v * v)
        return np.where(y >= self.y0, jaw, cap)

    def depth(self, pts: np.ndarray) -> np.ndarray:
        """Depth of canonical points: the face surface under them plus their own ``dz``."""
        x, y = pts[:, 0], pts[:, 1]
        hw = self.half_width(x, y)
        return self.depth_k * np.maximum(hw * hw - x * x, 0.0) + pts[:, 2]

    # ----------------------------------------------------------------- landmarks
    def canonical_landmarks(self) -> np.ndarray:
        """(98, 3) canonical landmarks (x, y, dz), read off the curve vertices."""
        out = np.zeros((98, 3))
        for c in self.curves:
            out[c.ids] = c.pts[c.marks]
        out[96:98] = self.pupils
        return out


# --------------------------------------------------------------------------- sampling


def _arc_run(g: Callable[[np.ndarray], np.ndarray], segments: int,
             per_segment: int) -> np.ndarray:
    """``g`` on [0, 1] resampled at equal arc-length steps: ``segments * per_segment + 1``
    exact curve points, so vertex ``k * per_segment`` is at arc fraction ``k / segments``
    (that is where the landmarks go: equally spaced along the contour, as WFLW's are)."""
    n = segments * per_segment + 1
    t = _lin(0.0, 1.0, n)
    p = g(t)
    s = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(p[:, 0]), np.diff(p[:, 1])))])
    return g(np.interp(t * s[-1], s, t) if s[-1] > 0 else t)


def _closed_curve(name: str, upper: Callable, lower: Callable, upper_segments: int,
                  lower_segments: int, ids: list[int], per_segment: int = 10) -> Curve:
    """A closed outline from an upper run and a lower run back, landmarks equally spaced
    along each run.

    ``upper`` goes from the image-left corner to the image-right corner, ``lower`` from
    the right corner back to the left one; the corners (landmarks) are stored once.
    """
    up = _arc_run(upper, upper_segments, per_segment)
    lo = _arc_run(lower, lower_segments, per_segment)[1:-1]  # corners already in ``up``
    pts = np.concatenate([up, lo])
    marks = np.concatenate([np.arange(upper_segments + 1) * per_segment,
                            len(up) - 1 + np.arange(1, lower_segments) * per_segment])
    return Curve(name, pts, marks, np.asarray(ids), True)


def _xyz(x: np.ndarray, y: np.ndarray, dz: float | np.ndarray = 0.0) -> np.ndarray:
    out = np.empty((np.shape(x)[0], 3))
    out[:, 0] = x
    out[:, 1] = y
    out[:, 2] = dz
    return out


@lru_cache(maxsize=64)
def _lin(t0: float, t1: float, n: int) -> np.ndarray:
    """A cached, read-only ``np.linspace`` (the same few grids are used for every face)."""
    t = np.linspace(t0, t1, n)
    t.flags.writeable = False
    return t


def _bump(u: np.ndarray, peak: float) -> np.ndarray:
    """0 at u = 0 and 1, 1 at u = peak: a skewed arch."""
    gamma = math.log(0.5) / math.log(peak)
    return np.sin(np.pi * np.clip(u, 0.0, 1.0) ** gamma)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, dz: float = 0.0,
             n: int = 40) -> np.ndarray:
    t = _lin(0.0, 2 * np.pi * (n - 1) / n, n)
    ca, sa = math.cos(angle), math.sin(angle)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return _xyz(cx + ca * x - sa * y, cy + sa * x + ca * y, dz)


def _scale_color(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(v * f)))) for v in c)  # type: ignore[return-value]


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], w: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - w) + y * w)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


# --------------------------------------------------------------------------- the face


def build_face(p: FaceParams) -> Face:
    """Build the canonical face for ``p``: landmark curves, pupils and drawing layers."""
    open_amt = OPEN_MAX * p.mouth_open
    face = Face(
        params=p, curves=[], pupils=np.zeros((2, 3)), pupil_hidden=(False, False),
        a_left=p.half_width * (1 - p.asym), a_right=p.half_width * (1 + p.asym),
        y0=p.temple_y, jaw_b=p.jaw_length + 0.5 * open_amt, jaw_n=p.jaw_square,
        cranium=p.cranium, depth_k=p.face_depth / p.half_width ** 2,
    )
    skin = p.skin
    colors = face.colors
    colors["skin"] = skin
    colors["lip"] = p.lip_color
    colors["lash"] = _scale_color(p.hair_color, 0.5) if p.hair_style else (25, 25, 30)
    colors["lash"] = _mix(colors["lash"], (15, 15, 20), 0.6)
    colors["lower_lid"] = _scale_color(skin, 0.55)
    colors["pupil"] = (12, 12, 14)
    colors["sclera"] = (222, 228, 232)
    colors["brow"] = p.brow_color
    colors["nose_line"] = _scale_color(skin, 0.6)
    colors["mouth"] = (40, 35, 85)
    colors["lip_line"] = _scale_color(p.lip_color, 0.5)

    curves: dict[str, Curve] = {}
    layers_behind: list[Layer] = []
    layers_front: list[Layer] = []

    # ---- head outline: jaw (landmarks 0..32) + cranium cap (no landmarks), closed
    a_l, a_r, y0, b, n_sq, h = face.a_left, face.a_right, face.y0, face.jaw_b, face.jaw_n, face.cranium

    def jaw(t: np.ndarray) -> np.ndarray:
        th = (t - 0.5) * np.pi
        s, c = np.sin(th), np.abs(np.cos(th))
        a = np.where(s < 0, a_l, a_r)
        return _xyz(a * np.sign(s) * np.abs(s) ** (2 / n_sq), y0 + b * c ** (2 / n_sq))

    jaw_pts = _arc_run(jaw, 32, 5)
    jaw_marks = np.arange(33) * 5
    phi = _lin(0.0, np.pi, 72)[1:-1]
    cap = _xyz(np.where(np.cos(phi) >= 0, a_r, a_l) * np.cos(phi), y0 - h * np.sin(phi))
    outline = np.concatenate([jaw_pts, cap])
    curves["face_contour"] = Curve("face_contour", outline, jaw_marks, np.arange(33), True)

    # ---- eyes (image-left eye = WFLW right eye 60..67, pupil 96)
    hidden = []
    pupils = []
    eye_layers: list[Layer] = []
    for k, side in enumerate((-1, 1)):
        ew = p.eye_w
        cx, cy = side * p.eye_x, p.eye_y
        inner = (cx - side * ew / 2, cy)
        outer = (cx + side * ew / 2, cy - p.eye_tilt)
        left, right = (outer, inner) if side < 0 else (inner, outer)
        h_up, h_lo = p.eye_open * ew, p.eye_low * ew
        closure = p.eye_closure[k]
        pk_up = 0.55 if side < 0 else 0.45  # upper lid highest nearer the inner corner
        pk_lo = 0.45 if side < 0 else 0.55

        def line(u: np.ndarray, left=left, right=right) -> tuple[np.ndarray, np.ndarray]:
            return left[0] + u * (right[0] - left[0]), left[1] + u * (right[1] - left[1])

        def upper(u: np.ndarray, line=line, h_up=h_up, h_lo=h_lo, c=closure, pu=pk_up,
                  pl=pk_lo) -> np.ndarray:
            x, y = line(u)
            return _xyz(x, y - h_up * (1 - c) * _bump(u, pu) + c * h_lo * _bump(u, pl))

        def lower(t: np.ndarray, line=line, h_lo=h_lo, pl=pk_lo) -> np.ndarray:
            u = 1.0 - t
            x, y = line(u)
            return _xyz(x, y + h_lo * _bump(u, pl))

        base = 60 if side < 0 else 68
        eye = _closed_curve("right_eye" if side < 0 else "left_eye", upper, lower, 4, 4,
                            [base, base + 1, base + 2, base + 3, base + 4,
                             base + 5, base + 6, base + 7])
        curves[eye.name] = eye

        # Iris and pupil, clipped to the eye opening column by column (exact
        # intersection of a disc with a region bounded above and below by the lids).
        ri = p.iris_r * ew
        icx = cx + p.gaze[0] * 0.15 * ew
        icy = cy - 0.08 * ew + p.gaze[1] * 0.05 * ew
        x_lo, x_hi = left[0], right[0]
        span = x_hi - x_lo

        def clip_disc(r: float, icx=icx, icy=icy, x_lo=x_lo, x_hi=x_hi, span=span,
                      upper=upper, lower=lower) -> np.ndarray | None:
            xs = np.linspace(max(icx - r, x_lo), min(icx + r, x_hi), 24)
            if xs[-1] <= xs[0]:
                return None
            half = np.sqrt(np.maximum(r * r - (xs - icx) ** 2, 0.0))
            u = (xs - x_lo) / span
            lid_up, lid_lo = upper(u)[:, 1], lower(1.0 - u)[:, 1]
            top = np.clip(icy - half, lid_up, lid_lo)
            bot = np.clip(icy + half, lid_up, lid_lo)
            if np.all(bot - top <= 1e-6):
                return None
            return _xyz(np.concatenate([xs, xs[::-1]]), np.concatenate([top, bot[::-1]]))

        u_c = (icx - x_lo) / span
        up_c = float(upper(np.array([u_c]))[0, 1])
        lo_c = float(lower(np.array([1.0 - u_c]))[0, 1])
        margin = 0.15 * p.pupil_r * ri
        hidden.append(not (0.0 < u_c < 1.0 and up_c + margin < icy < lo_c - margin))
        pupils.append((icx, icy, 0.0))

        # eyelid skin (darker, or eye shadow with make-up) between crease and lid
        crease_gap = 0.15 * ew
        uu = _lin(0.0, 1.0, 32)
        lx, ly = line(uu)
        crease_y = ly - (h_up + crease_gap) * _bump(uu, pk_up)
        lid_region = np.concatenate([_xyz(lx, crease_y), upper(uu[::-1])])
        lid_color = _mix(skin, p.shadow_color, 0.55) if p.makeup else _scale_color(skin, 0.95)
        eye_layers.append(Layer(lid_region, lid_color))
        crease = _xyz(lx[3:-3], crease_y[3:-3])
        eye_layers.append(Layer(crease, _scale_color(skin, 0.78), 0.006, closed=False))
        # the eye opening, iris, pupil, highlight
        eye_layers.append(Layer(eye.pts, colors["sclera"]))
        iris = clip_disc(ri)
        if iris is not None:
            eye_layers.append(Layer(iris, p.iris_color))
        pupil = clip_disc(p.pupil_r * ri)
        if pupil is not None:
            eye_layers.append(Layer(pupil, colors["pupil"]))
        hl = _ellipse(icx - 0.42 * ri, icy - 0.42 * ri, 0.17 * ri, 0.17 * ri, n=12)
        hx = np.clip(hl[:, 0], x_lo, x_hi)
        hu = (hx - x_lo) / span
        hl[:, 1] = np.clip(hl[:, 1], upper(hu)[:, 1], lower(1 - hu)[:, 1])
        hl[:, 0] = hx
        eye_layers.append(Layer(hl, (245, 245, 245)))
        # the lower-lid rim (a thin crescent just below the lower lid), then the lash
        # line along the upper lid (drawn last, so the corners are lash-coloured)
        n_up = int(eye.marks[4])  # the right corner ends the upper run
        lower_run = np.concatenate([eye.pts[n_up:], eye.pts[:1]])
        uu_run = (lower_run[:, 0] - x_lo) / span
        rim = lower_run.copy()
        rim[:, 1] += 0.012 * np.sin(np.pi * np.clip(uu_run, 0, 1)) ** 0.5
        eye_layers.append(Layer(np.concatenate([lower_run, rim[::-1]]), colors["lower_lid"]))
        lash_w = (0.016 if p.makeup else 0.011) * (1 + 0.5 * closure)
        eye_layers.append(Layer(eye.pts[: n_up + 1], colors["lash"], lash_w, closed=False))
    face.pupils = np.asarray(pupils, np.float64)
    face.pupil_hidden = (bool(hidden[0]), bool(hidden[1]))

    # ---- eyebrows (33..41 image-left, 42..50 image-right)
    brow_layers: list[Layer] = []
    raise_ = p.brow_raise
    for side in (-1, 1):
        inner_pt = (side * p.brow_inner_x, p.eye_y - p.brow_gap - 0.06 * raise_)
        outer_pt = (side * (p.eye_x + p.eye_w / 2 + p.brow_ext),
                    inner_pt[1] + p.brow_tilt - 0.02 * raise_)
        left, right = (outer_pt, inner_pt) if side < 0 else (inner_pt, outer_pt)
        peak = 0.4 if side < 0 else 0.6
        arch = p.brow_arch + 0.03 * raise_

        def centre(u: np.ndarray, left=left, right=right, peak=peak, arch=arch,
                   side=side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            x = left[0] + u * (right[0] - left[0])
            y = left[1] + u * (right[1] - left[1]) - arch * _bump(u, peak)
            w_in = u if side < 0 else 1.0 - u
            th = p.brow_thick * np.sin(np.pi * np.clip(u, 0, 1)) ** 0.3 * (0.5 + 0.5 * w_in)
            return x, y, th

        def b_upper(u: np.ndarray, centre=centre) -> np.ndarray:
            x, y, th = centre(u)
            return _xyz(x, y - th / 2)

        def b_lower(t: np.ndarray, centre=centre) -> np.ndarray:
            x, y, th = centre(1.0 - t)
            return _xyz(x, y + th / 2)

        base = 33 if side < 0 else 42
        brow = _closed_curve("right_eyebrow" if side < 0 else "left_eyebrow", b_upper, b_lower,
                             4, 5, list(range(base, base + 9)))
        curves[brow.name] = brow
        brow_layers.append(Layer(brow.pts, p.brow_color))

    # ---- nose: bridge 51..54 (extended above 51), bottom 55..59 (extended into the wings)
    nd = p.nose_depth
    top, tip = p.nose_top_y, p.nose_tip_y

    def bridge(t: np.ndarray) -> np.ndarray:
        return _xyz(np.zeros_like(t), top + t * (tip - top), nd * (0.2 + 0.8 * np.clip(t, -0.3, 1)))

    # 51..54 at t = 0, 1/3, 2/3, 1 (vertices 6, 14, 22, 30), extended up to t = -1/4
    br_pts = bridge(np.arange(-6, 25) / 24.0)
    br_marks = np.array([6, 14, 22, 30])
    curves["nose_line"] = Curve("nose_line", br_pts, br_marks, np.arange(51, 55), False)

    alar, sub, nw = p.nose_alar_y, p.nose_sub, p.nose_w

    def nose_bottom(u: np.ndarray) -> np.ndarray:
        return _xyz(u * nw, alar + sub * (1 - u * u), nd * 0.45 * np.maximum(1 - 0.6 * u * u, 0.1))

    # 55..59 at u = -1, -0.5, 0, 0.5, 1 (vertices 6, 16, .., 46), extended to |u| = 1.3
    nb_pts = nose_bottom(np.arange(-26, 27) / 20.0)
    nb_marks = np.array([6, 16, 26, 36, 46])
    curves["nose"] = Curve("nose", nb_pts, nb_marks, np.arange(55, 60), False)

    nose_layers: list[Layer] = []
    lx = math.cos(math.radians(p.light_angle))  # the side away from the light is darker
    for side in (-1, 1):
        ys = np.linspace(top + 0.08 * (tip - top), alar - 0.04, 12)
        frac = (ys - top) / (alar - top)
        xs = side * (0.035 + 0.5 * nw * frac ** 1.5)
        dark = 0.86 if side * lx > 0 else 0.8
        nose_layers.append(Layer(_xyz(xs, ys, nd * 0.3), _scale_color(skin, dark), 0.018,
                                 closed=False))
    # the highlight along the ridge passes through 51..53 (vertices 4..28 of the bridge)
    nose_layers.append(Layer(br_pts[4:29], _scale_color(skin, 1.07), 0.016, closed=False))
    nose_layers.append(Layer(_ellipse(0.0, tip, 0.04, 0.032, dz=nd, n=24),
                             _scale_color(skin, 1.05)))
    for side in (-1, 1):  # alar wings and nostrils
        ang = _lin(math.pi / 2, math.pi / 2 - side * 2.6, 16)
        wcx, wcy, wr = side * nw * 0.8, alar - 0.035, 0.045
        wing = _xyz(wcx + wr * np.cos(ang), wcy + wr * np.sin(ang), nd * 0.35)
        wing[0, :2] = (side * nw, alar)
        nose_layers.append(Layer(wing, _scale_color(skin, 0.72), 0.01, closed=False))
        ny = alar + sub * 0.75 - 0.013
        nose_layers.append(Layer(_ellipse(side * nw * 0.5, ny, 0.03, 0.011,
                                          angle=side * 0.25, dz=nd * 0.4, n=20),
                                 _scale_color(skin, 0.3)))
    nose_layers.append(Layer(nb_pts, colors["nose_line"], 0.009, closed=False))

    # ---- mouth: outer lip 76..87, inner lip 88..95
    mw = p.mouth_hw * (1 + 0.12 * p.smile - 0.15 * p.mouth_open)
    my = p.mouth_y
    ri_m = 0.88

    def mline(u: np.ndarray) -> np.ndarray:
        return my - p.smile * 0.035 * u * u

    def lip_dz(u: np.ndarray) -> np.ndarray:
        return 0.03 * (1 - np.clip(u * u, 0, 1))

    def outer_up(t: np.ndarray) -> np.ndarray:
        u = 2 * t - 1
        bow = (1 - u * u).clip(0) ** 0.6 * (1 - p.lip_bow * np.exp(-(u / 0.16) ** 2))
        return _xyz(u * mw, mline(u) - p.lip_up * bow, lip_dz(u))

    def outer_lo(t: np.ndarray) -> np.ndarray:
        u = 1 - 2 * t
        return _xyz(u * mw, mline(u) + (p.lip_low + open_amt) * (1 - u * u).clip(0) ** 0.7,
                    lip_dz(u))

    def inner_up(t: np.ndarray) -> np.ndarray:
        v = 2 * t - 1
        u = ri_m * v
        return _xyz(u * mw, mline(u) - 0.05 * open_amt * (1 - v * v).clip(0) ** 0.8, lip_dz(u))

    def inner_lo(t: np.ndarray) -> np.ndarray:
        v = 1 - 2 * t
        u = ri_m * v
        return _xyz(u * mw, mline(u) + open_amt * (1 - v * v).clip(0) ** 0.6, lip_dz(u))

    outer = _closed_curve("outer_lip", outer_up, outer_lo, 6, 6, list(range(76, 88)))
    inner = _closed_curve("inner_lip", inner_up, inner_lo, 4, 4, list(range(88, 96)))
    curves["outer_lip"] = outer
    curves["inner_lip"] = inner
    mouth_layers = [Layer(outer.pts, p.lip_color)]
    hl_y = my + open_amt + p.lip_low * 0.5
    mouth_layers.append(Layer(_ellipse(0.0, hl_y, mw * 0.22, p.lip_low * 0.16, dz=0.03, n=20),
                              _scale_color(p.lip_color, 1.18)))
    if open_amt > 0.004:
        mouth_layers.append(Layer(inner.pts, colors["mouth"]))
        if open_amt > 0.02:
            t = _lin(0.06, 0.94, 24)
            top_t = inner_up(t)
            bot_y = np.minimum(top_t[:, 1] + min(0.035, 0.45 * open_amt), inner_lo(1 - t)[:, 1])
            teeth = np.concatenate([top_t, _xyz(top_t[::-1, 0], bot_y[::-1], top_t[::-1, 2])])
            mouth_layers.append(Layer(teeth, (210, 222, 228)))
    if open_amt < 0.02:  # the line between closed lips (an open mouth shows its interior)
        mouth_layers.append(Layer(inner.pts[: int(inner.marks[4]) + 1], colors["lip_line"],
                                  0.007, closed=False))

    # ---- behind the face: clothes, hair at the back, neck, ears
    chin = y0 + b
    layers_behind.append(Layer(_ellipse(0.0, chin + 0.8, 1.05, 0.5, dz=-0.15, n=48),
                               p.clothes_color))
    a_mean = p.half_width
    vol = p.hair_volume
    if p.hair_style == 2:
        ph = _lin(0.0, np.pi, 40)
        hw_ = a_mean + vol + 0.02
        cap_h = np.stack([hw_ * np.cos(ph), y0 - (h + vol) * np.sin(ph)], 1)
        bottom = y0 + p.hair_length
        flare = 0.05 + 0.1 * p.hair_length
        back = np.concatenate([[[hw_ + flare, bottom]], cap_h, [[-hw_ - flare, bottom]]])
        layers_behind.append(Layer(_xyz(back[:, 0], back[:, 1], -0.15),
                                   _scale_color(p.hair_color, 0.85)))
    elif p.hair_style == 1:
        ph = _lin(-0.25, np.pi + 0.25, 40)
        back = _xyz((a_mean + 0.6 * vol) * np.cos(ph), y0 - (h + 0.6 * vol) * np.sin(ph), -0.1)
        layers_behind.append(Layer(back, _scale_color(p.hair_color, 0.85)))
    neck_top = y0 + 0.55 * b
    neck = _xyz(np.array([-0.27, 0.27, 0.31, -0.31]) * a_mean / 0.5,
                np.array([neck_top, neck_top, chin + 0.55, chin + 0.55]), -0.12)
    layers_behind.append(Layer(neck, _scale_color(skin, 0.72)))
    if p.ears:
        ey = p.eye_y + 0.13
        for side in (-1, 1):
            hw_e = float(face.half_width(np.array([side * 0.1]), np.array([ey]))[0])
            ex = side * (hw_e - 0.005)
            layers_behind.append(Layer(_ellipse(ex, ey, 0.065, 0.15, dz=-0.05, n=32),
                                       _scale_color(skin, 0.86)))
            layers_behind.append(Layer(_ellipse(ex + side * 0.02, ey, 0.03, 0.09, dz=-0.05,
                                                n=24), _scale_color(skin, 0.68)))

    # ---- hair in front of the forehead (above the hairline, which meets the outline
    # just above the jaw ends, so no contour landmark is covered)
    if p.hair_style > 0:
        y_ts = y0 - 0.04
        hw_ts_r = float(face.half_width(np.array([1.0]), np.array([y_ts]))[0])
        hw_ts_l = float(face.half_width(np.array([-1.0]), np.array([y_ts]))[0])
        s0 = math.asin(min(1.0, (y0 - y_ts) / (h + vol)))
        ph = np.linspace(s0, np.pi - s0, 40)
        outer_cap = _xyz(np.where(np.cos(ph) >= 0, a_r + vol, a_l + vol) * np.cos(ph),
                         y0 - (h + vol) * np.sin(ph), 0.01)
        w = _lin(-1.0, 1.0, 40)
        q = 3.0
        hx = np.where(w < 0, hw_ts_l, hw_ts_r) * w
        hy = y_ts - (y_ts - p.hairline_y) * (1 - np.abs(w) ** q) ** (1 / q)
        hairline = _xyz(hx, hy, 0.01)
        layers_front.append(Layer(np.concatenate([outer_cap, hairline]), p.hair_color,
                                  role="hair"))

    face.curves = [curves[k] for k in ("face_contour", "right_eyebrow", "left_eyebrow",
                                       "nose_line", "nose", "right_eye", "left_eye",
                                       "outer_lip", "inner_lip")]
    face.layers = (layers_behind + [Layer(outline, skin, role="face")] + layers_front
                   + nose_layers + brow_layers + eye_layers + mouth_layers)
    return face
