"""Draw a synthetic face with OpenCV and read out its exact 98 WFLW landmarks.

Everything is drawn as anti-aliased polygons/polylines with 1/16-pixel vertex
precision (``shift=4``) from the projected canonical vertex arrays, so the
landmarks (vertices of those arrays) lie on the drawn outlines.  Pixel coordinates
follow OpenCV's drawing convention: pixel (i, j) has its centre at x = i, y = j.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from ...crop import BOX_MARGIN, FACE_SIZE
from .geometry import Face, build_face, point_kinds
from .labels import curve_tangents
from .params import FaceParams, Occluder, face_tags, sample_params

__all__ = ["Pose", "render_face"]

_SHIFT = 4
_ONE = 1 << _SHIFT
_T32 = np.linspace(0, 2 * np.pi, 32, endpoint=False)
_UNIT_CIRCLE = np.column_stack([np.cos(_T32), np.sin(_T32)])


def _fix(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts, np.float64)[:, :2] * _ONE).astype(np.int32)


def _fill(img: np.ndarray, pts: np.ndarray, color: Any) -> None:
    cv2.fillPoly(img, [_fix(pts)], color, cv2.LINE_AA, _SHIFT)


def _stroke(img: np.ndarray, pts: np.ndarray, color: Any, width: int, closed: bool) -> None:
    cv2.polylines(img, [_fix(pts)], closed, color, max(1, int(width)), cv2.LINE_AA, _SHIFT)


class Pose:
    """Canonical (x, y, dz) -> image pixels: 3-D rotation, orthographic projection, then
    the similarity that puts the face box at ``params.center`` with side
    ``params.face_frac * size``."""

    def __init__(self, face: Face, size: int) -> None:
        p = face.params
        self.face = face
        r, y, t = (math.radians(v) for v in (p.roll, p.yaw, p.pitch))
        rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
        ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
        self.rot = (rz @ ry @ rx)[:2]  # only x and y survive the projection
        self.pivot = np.array([0.0, 0.3, 0.0])
        lm = self._project(face.canonical_landmarks())
        lo, hi = lm.min(axis=0), lm.max(axis=0)
        side = float(max(hi[0] - lo[0], hi[1] - lo[1]))
        self.scale = p.face_frac * size / side  # pixels per canonical unit
        self.offset = np.asarray(p.center, np.float64) * size - self.scale * (lo + hi) / 2

    def _project(self, pts: np.ndarray) -> np.ndarray:
        xyz = np.column_stack([pts[:, 0], pts[:, 1], self.face.depth(pts)]) - self.pivot
        return xyz @ self.rot.T

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """(M, 3) canonical points -> (M, 2) image pixels (float64)."""
        return self._project(pts) * self.scale + self.offset


# --------------------------------------------------------------------------- layers


def _background(size: int, p: FaceParams, rng: np.random.Generator) -> np.ndarray:
    c1 = np.asarray(p.background[0], np.float32)
    c2 = np.asarray(p.background[1], np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    # A linear colour ramp between the two background colours, drawn at 8x8 and
    # resized (bilinear resampling of a linear ramp is the ramp).
    ramp = np.linspace(-0.6, 0.6, 8, dtype=np.float32)
    w = math.cos(ang) * ramp[None, :] + math.sin(ang) * ramp[:, None] + 0.5
    small = np.clip(c1 + (c2 - c1) * w[..., None], 0, 255).astype(np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    # one draw for all shapes' numbers: [kind, cx, cy, r, a, aspect, ex, ey, width, 5 radii,
    # 5 angles], colours separately
    n = p.clutter
    r_all = rng.random((n, 19))
    colors = rng.integers(0, 256, (n, 3))
    for k in range(n):
        v = r_all[k]
        color = tuple(int(c) for c in colors[k])
        kind = int(v[0] * 4)
        c = (v[1:3] * 1.2 - 0.1) * size
        r = (0.04 + 0.26 * v[3]) * size
        if kind == 0:  # rotated rectangle
            a = v[4] * np.pi
            hw, hh = r, r * (0.2 + 0.8 * v[5])
            d = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            _fill(img, c + d @ rot.T, color)
        elif kind == 1:
            _fill(img, c + r * _UNIT_CIRCLE, color)
        elif kind == 2:
            e = c + (v[6:8] * 2 - 1) * size * 0.5
            _stroke(img, np.stack([c, e]), color, 1 + int(v[8] * max(1, size // 40)), False)
        else:
            t = np.sort(v[14:19]) * 2 * np.pi
            rr = r * (0.4 + 0.6 * v[9:14])
            _fill(img, c + rr[:, None] * np.column_stack([np.cos(t), np.sin(t)]), color)
    return img


def _occluder_polys(o: Occluder, lm: np.ndarray, side: float,
                    rng: np.random.Generator) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """Polygons (image pixels) and colours of one occluder."""
    a = math.radians(o.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    centre = lm[o.anchor] + np.asarray(o.offset) * side
    hw, hh = o.size[0] * side / 2, o.size[1] * side / 2
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    if o.kind == "ellipse":
        return [(centre + np.column_stack([hw * np.cos(t), hh * np.sin(t)]) @ rot.T, o.color)]
    if o.kind in ("rect", "bar"):
        d = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        return [(centre + d @ rot.T, o.color)]
    if o.kind == "blob":
        r = np.ones_like(t)
        for k in (2, 3, 5):
            r += rng.uniform(0, 0.25) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        return [(centre + np.column_stack([hw * r * np.cos(t), hh * r * np.sin(t)]) @ rot.T,
                 o.color)]
    if o.kind == "stripes":
        k = int(rng.integers(3, 8))
        edges = np.linspace(-hw, hw, k + 1)
        out = []
        for i in range(k):
            d = np.array([[edges[i], -hh], [edges[i + 1], -hh], [edges[i + 1], hh],
                          [edges[i], hh]])
            out.append((centre + d @ rot.T, o.color if i % 2 == 0 else o.color2))
        return out
    if o.kind == "sunglasses":
        dark = tuple(int(v * 0.25) for v in o.color)
        out = []
        eyes = [lm[60:68], lm[68:76]]
        centres = [e.mean(axis=0) for e in eyes]
        axis = centres[1] - centres[0]
        ang = math.atan2(axis[1], axis[0])
        r2 = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        for e, c in zip(eyes, centres, strict=True):
            ew = float(np.linalg.norm(e[4] - e[0]))
            rx, ry = 0.85 * ew, 0.65 * ew
            out.append((c + np.column_stack([rx * np.cos(t), ry * np.sin(t)]) @ r2.T, dark))
        mid = (centres[0] + centres[1]) / 2
        bw = float(np.linalg.norm(axis)) / 2
        d = np.array([[-bw, -0.05 * bw], [bw, -0.05 * bw], [bw, 0.05 * bw], [-bw, 0.05 * bw]])
        out.append((mid + d @ r2.T, dark))
        return out
    if o.kind == "facemask":
        top = lm[[4, 54, 28]].copy()
        top[1] = lm[54] + 0.3 * (lm[51] - lm[54])
        poly = np.concatenate([lm[4:29], top[[2, 1, 0]]])
        return [(poly, o.color)]
    raise ValueError(f"unknown occluder kind {o.kind!r}")


def _motion_kernel(length: int, angle: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = math.cos(math.radians(angle)) * c, math.sin(math.radians(angle)) * c
    cv2.line(k, (round((c - dx) * _ONE), round((c - dy) * _ONE)),
             (round((c + dx) * _ONE), round((c + dy) * _ONE)), 1.0, 1, cv2.LINE_AA, _SHIFT)
    return k / k.sum()


# --------------------------------------------------------------------------- render


def render_face(params_or_rng: FaceParams | np.random.Generator,
                size: int = 256) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render one face.

    ``params_or_rng``: a :class:`FaceParams`, or a ``numpy.random.Generator`` to draw
    one with :func:`sample_params`.  Returns the BGR uint8 image (size x size), the
    exact landmarks (98, 2) float32 in pixels, and an info dict: ``params``,
    ``tangents`` (98, 2) unit contour directions, ``kinds`` (0 contour, 1 corner, 2
    pupil), ``occluded`` / ``hidden`` / ``visible`` (98,) bool, ``tags`` (6 flags),
    ``face_box`` (x0, y0, x1, y1), ``scale`` and ``center`` (the STAR crop), ``iod``
    (outer-eye-corner distance), ``curves`` (the drawn landmark curves in pixels, for
    moving labels along them) and ``colors`` (the drawn base colours).
    """
    if isinstance(params_or_rng, np.random.Generator):
        params = sample_params(params_or_rng)
    elif isinstance(params_or_rng, FaceParams):
        params = params_or_rng
    else:
        raise TypeError(f"expected FaceParams or numpy.random.Generator, got "
                        f"{type(params_or_rng).__name__}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    face = build_face(params)
    pose = Pose(face, size)
    s = pose.scale
    detail = np.random.default_rng(params.detail_seed)

    img = _background(size, params, detail)
    # Project every vertex of the face in one call, then split per layer/curve.
    arrays = [layer.pts for layer in face.layers] + [c.pts for c in face.curves]
    arrays.append(face.canonical_landmarks())
    cuts = np.cumsum([len(a) for a in arrays])[:-1]
    projected = np.split(pose(np.concatenate(arrays)), cuts)
    outline_px = None
    for layer, pts in zip(face.layers, projected, strict=False):
        if layer.width > 0:
            _stroke(img, pts, layer.color, round(layer.width * s), layer.closed)
        else:
            _fill(img, pts, layer.color)
        if layer.role == "face":
            outline_px = pts
    landmarks = projected[-1]
    curves = []
    for c, pts in zip(face.curves, projected[len(face.layers):-1], strict=True):
        curves.append({"name": c.name, "points": pts, "marks": c.marks.copy(),
                       "ids": c.ids.copy(), "closed": c.closed})
    box_side = params.face_frac * size
    centre = np.asarray(params.center, np.float64) * size
    face_box = (centre[0] - box_side / 2, centre[1] - box_side / 2,
                centre[0] + box_side / 2, centre[1] + box_side / 2)

    # occluders (in front of everything), and which landmarks they cover
    occluded = np.zeros(98, bool)
    if params.occluders:
        mask = np.zeros((size, size), np.uint8)
        for o in params.occluders:
            for poly, color in _occluder_polys(o, landmarks, box_side, detail):
                _fill(img, poly, color)
                _fill(mask, poly, 255)
        ij = np.round(landmarks).astype(np.int64)
        inside = (ij[:, 0] >= 0) & (ij[:, 0] < size) & (ij[:, 1] >= 0) & (ij[:, 1] < size)
        occluded[inside] = mask[ij[inside, 1], ij[inside, 0]] >= 128
    hidden = np.zeros(98, bool)
    hidden[96:98] = face.pupil_hidden
    in_image = np.all((landmarks >= 0) & (landmarks <= size - 1), axis=1)

    img = _photometric(img, params, outline_px, face_box, detail)

    tags = face_tags(params, int(occluded.sum()))
    lm32 = landmarks.astype(np.float32)
    info: dict[str, Any] = {
        "params": params,
        "tangents": curve_tangents(curves, 98),
        "kinds": point_kinds(98),
        "occluded": occluded,
        "hidden": hidden,
        "visible": ~occluded & ~hidden & in_image,
        "tags": tags,
        "face_box": face_box,
        "scale": box_side / FACE_SIZE * BOX_MARGIN,  # the converters' box_to_crop rule
        "center": (float(centre[0]), float(centre[1])),
        "iod": float(np.linalg.norm(landmarks[60] - landmarks[72])),
        "pixels_per_unit": s,
        "curves": curves,
        "colors": dict(face.colors),
    }
    return img, lm32, info


def _photometric(img: np.ndarray, p: FaceParams, outline: np.ndarray | None,
                 face_box: tuple[float, float, float, float],
                 rng: np.random.Generator) -> np.ndarray:
    """Lighting (face shading, directional gradient, brightness, tint, contrast), then
    blur and noise; a neutral setting returns the drawn pixels unchanged."""
    size = img.shape[0]
    side = face_box[2] - face_box[0]
    neutral_light = (p.shading == 0 and p.light_strength == 0 and p.brightness == 1
                     and p.contrast == 1 and tuple(p.tint) == (1.0, 1.0, 1.0))
    if neutral_light and p.blur == 0 and p.noise == 0:
        return img
    if not neutral_light:
        cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
        a = math.radians(p.light_angle)
        k = p.light_strength / (0.5 * side)
        xs = (np.arange(size, dtype=np.float32) - cx) * np.float32(k * math.cos(a))
        ys = (np.arange(size, dtype=np.float32) - cy) * np.float32(k * math.sin(a)) + 1.0
        gain = xs[None, :] + ys[:, None]
        np.clip(gain, 0.15, 2.0, out=gain)
        if p.shading > 0 and outline is not None:
            small = max(8, size // 4)
            f = small / size
            m_small = np.zeros((small, small), np.uint8)
            _fill(m_small, (outline + 0.5) * f - 0.5, 255)
            m_small = cv2.GaussianBlur(m_small, (0, 0), max(0.5, 0.08 * side * f))
            blurred = cv2.resize(m_small, (size, size), interpolation=cv2.INTER_LINEAR)
            sharp = np.zeros((size, size), np.uint8)
            _fill(sharp, outline, 255)
            # darken by up to `shading` towards the outline, inside the face only
            rim = cv2.subtract(sharp, blurred)  # 0 in the middle, ~128 at the outline
            np.minimum(rim, 128, out=rim)
            gain *= 1.0 - (p.shading / 128.0) * rim.astype(np.float32)
        gain *= np.float32(p.brightness)
        # (numpy broadcasting over the channel axis is several times slower than these)
        out = cv2.multiply(img, cv2.merge([gain, gain, gain]), dtype=cv2.CV_32F)
        # tint and contrast as one per-channel affine map
        m = np.zeros((3, 4), np.float32)
        m[:, :3] = np.diag(np.asarray(p.tint, np.float32) * np.float32(p.contrast))
        m[:, 3] = 128.0 * (1.0 - p.contrast)
        out = cv2.transform(out, m)
    else:
        out = img.astype(np.float32)
    if p.blur > 0:
        sigma = p.blur * side
        if p.motion_blur:
            length = max(3, int(round(4 * sigma)) | 1)
            out = cv2.filter2D(out, -1, _motion_kernel(length, p.motion_angle))
        else:
            out = cv2.GaussianBlur(out, (0, 0), sigma)
    if p.noise > 0:
        # Luminance noise with a triangular distribution (the sum of two uniforms: close
        # to Gaussian, and ten times cheaper to draw), std = p.noise grey levels.
        u = rng.integers(0, 256, (2, size, size), dtype=np.uint8)
        n = cv2.add(u[0], u[1], dtype=cv2.CV_32F)
        n -= 255.0
        n *= np.float32(p.noise / (255.0 * math.sqrt(1.0 / 6.0)))
        out = cv2.add(out, cv2.merge([n, n, n]))
    np.maximum(out, 0.0, out=out)
    return cv2.convertScaleAbs(out)  # rounds and saturates at 255
