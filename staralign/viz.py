"""Drawing landmarks, face boxes and ambiguity ellipses on images (OpenCV, BGR, no torch).

Shared by ``staralign predict``, evaluation reports and the demos.  Everything
takes and returns HxWx3 uint8 BGR arrays and numpy coordinates in pixels
(pixel centres at integers); drawing is anti-aliased and sub-pixel accurate.
Sizes (point radius, line width, font) follow the face's size unless given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

__all__ = ["GROUND_TRUTH_COLOR", "PALETTE", "PREDICTION_COLOR", "add_legend", "draw_box", "draw_landmarks",
           "ellipse_axes", "make_grid"]

_SHIFT = 4  # fractional bits for sub-pixel drawing
_ONE = 1 << _SHIFT

# Distinct BGR colours (for several faces or several models on one image).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 255, 0), (0, 165, 255), (255, 128, 0), (255, 0, 255), (0, 255, 255), (0, 0, 255),
    (255, 255, 0), (128, 0, 255),
)


# Ground truth against prediction in reports.  Synthetic occluders take any colour at all
# (data.synth.params: uniform RGB), so no colour alone can be told from them: ground truth is
# drawn as hollow rings, predictions as filled dots, both with a dark rim, and each grid has a
# legend.  Yellow and red, not green: green reads as "correct" and was taken for ground truth.
GROUND_TRUTH_COLOR = (0, 230, 255)  # BGR yellow
PREDICTION_COLOR = (40, 40, 255)  # BGR red
OUTLINE_COLOR = (20, 20, 20)
AMBIGUITY_CLIP = 0.1  # ellipse semi-axes drawn at most this fraction of the face size


def _fix(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, np.float64) * _ONE).astype(np.int32)


def _as_canvas(image: np.ndarray, copy: bool) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 BGR image, got {img.dtype} {img.shape}")
    return img.copy() if copy or not img.flags.writeable or not img.flags.c_contiguous else img


def _face_size(landmarks: np.ndarray, box: Sequence[float] | None) -> float | None:
    """The face's size in pixels: the box's longer side, else the landmarks' span (None: unknown)."""
    if box is not None:
        return float(max(box[2] - box[0], box[3] - box[1]))
    finite = landmarks[np.isfinite(landmarks).all(-1)] if len(landmarks) else landmarks
    return float(np.ptp(finite, axis=0).max()) if len(finite) > 1 else None


def _auto_size(landmarks: np.ndarray, box: Sequence[float] | None, shape: tuple[int, ...]) -> float:
    """A length that scales marks with the face: ~1/100 of its size, at least 1 pixel."""
    extent = _face_size(landmarks, box)
    return max(1.0, (extent if extent is not None else min(shape[:2]) / 2) / 100.0)


def ellipse_axes(covariance: np.ndarray, n_std: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 2, 2) covariances -> semi-axes ``major``, ``minor`` (N,) at ``n_std`` standard
    deviations and the major axis angle (N,) in degrees (image x towards y)."""
    cov = np.asarray(covariance, np.float64)
    a, c, b = cov[..., 0, 0], cov[..., 1, 1], 0.5 * (cov[..., 0, 1] + cov[..., 1, 0])
    mid, radius = (a + c) / 2, np.hypot((a - c) / 2, b)
    major = np.sqrt(np.clip(mid + radius, 0, None)) * n_std
    minor = np.sqrt(np.clip(mid - radius, 0, None)) * n_std
    angle = np.degrees(0.5 * np.arctan2(2 * b, a - c))
    return major, minor, angle


def draw_box(image: np.ndarray, box: Sequence[float], color: tuple[int, int, int] = (0, 255, 0),
             thickness: int | None = None, label: str | None = None, copy: bool = True) -> np.ndarray:
    """A rectangle (x1, y1, x2, y2) with an optional text label above it."""
    canvas = _as_canvas(image, copy)
    t = thickness or max(1, round(_auto_size(np.zeros((0, 2)), box, canvas.shape) / 2))
    p1, p2 = _fix(box[:2]), _fix(box[2:4])
    cv2.rectangle(canvas, tuple(int(v) for v in p1), tuple(int(v) for v in p2), color, t, cv2.LINE_AA, _SHIFT)
    if label:
        scale = max(0.4, (box[2] - box[0]) / 400)
        org = (int(round(box[0])), max(int(round(box[1])) - 4, 12))
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, max(1, t // 2), cv2.LINE_AA)
    return canvas


def draw_landmarks(
    image: np.ndarray,
    landmarks: np.ndarray,
    box: Sequence[float] | None = None,
    ambiguity: Any = None,
    definition: Any = None,
    indices: bool = False,
    color: tuple[int, int, int] = (0, 255, 0),
    *,
    radius: float | None = None,
    thickness: int | None = None,
    n_std: float = 1.0,
    label: str | None = None,
    copy: bool = True,
    hollow: bool = False,
    outline: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Draw one face's landmarks (N, 2) on a BGR image; returns the drawn image.

    ``definition`` (a :class:`~staralign.definitions.LandmarkDefinition`): its edges
    as polylines.  ``ambiguity``: an :class:`~staralign.inference.detector.Ambiguity`
    (``Face.ambiguity``: its ``major``, ``minor`` and ``tangent`` are drawn as they
    are), another object with a ``covariance`` attribute, or (N, 2, 2) covariances in
    pixels squared; drawn as ellipses at ``n_std`` standard deviations, their semi-axes clipped to
    ``AMBIGUITY_CLIP`` of the face size (a weak model's spread would cover the whole face) and the
    scale stated under the ``box`` when one is given.  ``indices``: number each point.
    ``hollow``: rings instead of dots; ``outline``: a rim of that colour around each mark.
    Non-finite points are skipped.  ``copy=False`` draws in place.
    """
    canvas = _as_canvas(image, copy)
    pts = np.asarray(landmarks, np.float64).reshape(-1, 2)
    finite = np.isfinite(pts).all(-1)
    unit = _auto_size(pts, box, canvas.shape)
    r = radius if radius is not None else max(1.0, unit * 0.8)
    t = thickness or max(1, round(unit / 2))
    if box is not None:
        draw_box(canvas, box, color, t, label, copy=False)
    if definition is not None:
        edge_color = tuple(int(c * 0.6) for c in color)
        for edge in definition.edges:
            idx = [i for i in edge.indices if i < len(pts) and finite[i]]
            if len(idx) > 1:
                cv2.polylines(canvas, [_fix(pts[idx])], bool(edge.closed), edge_color, t, cv2.LINE_AA, _SHIFT)
    if ambiguity is not None:
        if all(hasattr(ambiguity, k) for k in ("major", "minor", "tangent")):  # an Ambiguity: axes known
            major = np.asarray(ambiguity.major, np.float64).reshape(-1) * n_std
            minor = np.asarray(ambiguity.minor, np.float64).reshape(-1) * n_std
            tangent = np.asarray(ambiguity.tangent, np.float64).reshape(-1, 2)
            angle = np.degrees(np.arctan2(tangent[:, 1], tangent[:, 0]))
        else:
            cov = np.asarray(getattr(ambiguity, "covariance", ambiguity), np.float64).reshape(-1, 2, 2)
            major, minor, angle = ellipse_axes(cov, n_std)
        amb_color = (255, 0, 255) if tuple(color) != (255, 0, 255) else (0, 255, 255)
        n = min(len(pts), len(major))
        face = _face_size(pts, box)
        cap = AMBIGUITY_CLIP * face if face else np.inf
        drawn = np.flatnonzero(finite[:n] & np.isfinite(major[:n]) & np.isfinite(minor[:n]))
        clipped = 0
        for i in drawn:
            shrink = min(1.0, cap / major[i]) if major[i] > 0 else 1.0  # keeps the ellipse's shape
            clipped += shrink < 1.0
            axes = (max(1, int(round(major[i] * shrink * _ONE))), max(1, int(round(minor[i] * shrink * _ONE))))
            centre = tuple(int(v) for v in _fix(pts[i]))
            cv2.ellipse(canvas, centre, axes, float(angle[i]), 0, 360, amb_color, max(1, t // 2 or 1),
                        cv2.LINE_AA, _SHIFT)
        if box is not None and len(drawn):
            note = f"ellipses: {n_std:g} sd" + (f", {clipped} of {len(drawn)} clipped at {cap:.0f} px"
                                                if clipped else "")
            _caption(canvas, note, box, amb_color)
    rr = max(1, int(round(r * _ONE)))
    ring = max(1, int(round(r * 0.6)))
    for i in np.flatnonzero(finite):
        centre = tuple(int(v) for v in _fix(pts[i]))
        if outline is not None:  # one pixel of rim on each side of a ring, around a dot
            if hollow:
                cv2.circle(canvas, centre, rr, outline, ring + 2, cv2.LINE_AA, _SHIFT)
            else:
                cv2.circle(canvas, centre, rr + _ONE, outline, -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(canvas, centre, rr, color, ring if hollow else -1, cv2.LINE_AA, _SHIFT)
    if indices:
        scale = max(0.25, unit * 0.2)
        for i in np.flatnonzero(finite):
            org = (int(round(pts[i, 0] + r + 1)), int(round(pts[i, 1] - r - 1)))
            cv2.putText(canvas, str(i), org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def _caption(canvas: np.ndarray, text: str, box: Sequence[float], color: tuple[int, int, int]) -> None:
    """``text`` under ``box`` (inside its bottom edge when the image ends there), readable on any
    background (a dark rim)."""
    scale = max(0.35, (box[2] - box[0]) / 600)
    (_, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    x = int(max(0, round(box[0])))
    y = int(round(box[3])) + h + 4
    if y + base > canvas.shape[0]:
        y = int(round(box[3])) - base - 2
    for c, thick in ((OUTLINE_COLOR, 3), (color, 1)):
        cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, c, thick, cv2.LINE_AA)


def add_legend(image: np.ndarray, entries: Sequence[tuple[str, tuple[int, int, int], bool]]) -> np.ndarray:
    """``image`` with a legend band above it: one (text, colour, hollow) entry per kind of mark,
    each drawn as :func:`draw_landmarks` draws it."""
    canvas = _as_canvas(image, copy=False)
    scale = max(0.45, min(1.0, canvas.shape[1] / 900))
    (_, h), _ = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    band = np.full((h + 14, canvas.shape[1], 3), 255, np.uint8)
    x, y = 8, h + 6
    r = max(3, h // 3)
    for text, color, hollow in entries:
        centre = (x + r, y - h // 2)
        cv2.circle(band, centre, r + 1, OUTLINE_COLOR, -1 if not hollow else 3, cv2.LINE_AA)
        cv2.circle(band, centre, r, color, max(1, r // 2) if hollow else -1, cv2.LINE_AA)
        x += 2 * r + 6
        cv2.putText(band, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
        x += cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] + 18
    return np.vstack([band, canvas])


def make_grid(images: Sequence[np.ndarray], cols: int = 4, pad: int = 2,
              background: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Tile images (any sizes, grey or BGR) row by row; each sits top-left in a cell of the largest size."""
    if not len(images):
        raise ValueError("make_grid: no images")
    tiles = [_as_canvas(im, copy=False) for im in images]
    cols = max(1, min(int(cols), len(tiles)))
    rows = -(-len(tiles) // cols)
    ch, cw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    grid = np.empty((rows * ch + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), np.uint8)
    grid[:] = np.asarray(background, np.uint8)
    for k, tile in enumerate(tiles):
        y, x = pad + (k // cols) * (ch + pad), pad + (k % cols) * (cw + pad)
        grid[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return grid
