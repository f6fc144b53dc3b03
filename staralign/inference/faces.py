"""Face detectors: where in a photo to look for landmarks.

A face detector is anything matching :class:`FaceDetector`: a callable taking an
HxWx3 uint8 BGR image and returning a list of ``(box, score)``, with ``box`` =
``(x1, y1, x2, y2)`` in image pixels (pixel-centre frame, see
:mod:`staralign.inference.geometry`) and ``score`` a float or None.

Detectors frame faces differently from the boxes the network was trained on
(the dataset's boxes hug the landmarks: brows to chin, jaw to jaw).  A detector
may carry a :class:`BoxFraming` attribute ``framing`` that maps its boxes onto
dataset-style boxes before the crop; detectors without one are taken as they
are.  :func:`calibrate_framing` measures a framing on synthetic faces whose
landmarks are known exactly.

Built in (``get_face_detector(name)``):

* ``opencv`` -- OpenCV's bundled Haar cascade, no download (OpenCV 4.x wheels ship
  it; OpenCV 5 does not, and the error says so);
* ``none`` -- the whole image is the face (pre-cropped faces);
* ``dlib`` -- dlib's HOG detector (built into dlib, no model file), if installed;
* ``mediapipe`` -- MediaPipe's BlazeFace (bundled with its legacy ``solutions``
  API), if installed.

A fixed box is :class:`FixedBoxes`.  Optional libraries are imported when the
detector is created, never at import time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from .geometry import BOX_MARGIN, FACE_SIZE, Box, whole_image_box

__all__ = [
    "DETECTORS",
    "BoxFraming",
    "DlibDetector",
    "FaceDetector",
    "FaceDetectorError",
    "FixedBoxes",
    "HaarDetector",
    "MediaPipeDetector",
    "WholeImage",
    "calibrate_framing",
    "framing_of",
    "get_face_detector",
    "parse_box",
]

Detection = tuple[Box, "float | None"]


class FaceDetectorError(RuntimeError):
    """A face detector cannot be created (library missing, model file absent); says what to do."""


@runtime_checkable
class FaceDetector(Protocol):
    """``image (HxWx3 uint8 BGR) -> [(box (x1, y1, x2, y2), score or None), ...]``."""

    def __call__(self, image: np.ndarray) -> list[Detection]: ...


@dataclass(frozen=True)
class BoxFraming:
    """How a detector's box relates to the dataset-style face box the network expects.

    ``expand``: dataset box side / detector box side; ``shift_x``, ``shift_y``: offset
    of the dataset box centre from the detector box centre, in detector box sides.
    """

    expand: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0

    def apply(self, box: Sequence[float]) -> Box:
        """The dataset-style box for a detector box."""
        x1, y1, x2, y2 = (float(v) for v in box)
        side = min(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2 + self.shift_x * side, (y1 + y2) / 2 + self.shift_y * side
        hw, hh = (x2 - x1) * self.expand / 2, (y2 - y1) * self.expand / 2
        return (cx - hw, cy - hh, cx + hw, cy + hh)


IDENTITY = BoxFraming()

# Measured with ``calibrate_framing(HaarDetector(framing=IDENTITY), count=400)`` on the
# synthetic faces (OpenCV 4.14): the cascade found 185 of 400; medians below
# (quartiles: expand 0.85..0.95, shift_y 0.15..0.20, shift_x -0.02..0.01).  The Haar
# box reaches from the forehead to the mouth, so the dataset box is a little
# smaller and lower.  Checked by eye on a real photograph (the framed box then
# spans brows to chin).  See docs/inference.md.
HAAR_FRAMING = BoxFraming(expand=0.89, shift_x=0.0, shift_y=0.18)


def framing_of(detector: Any) -> BoxFraming:
    """The detector's ``framing`` attribute, or no change."""
    framing = getattr(detector, "framing", None)
    return framing if isinstance(framing, BoxFraming) else IDENTITY


def _pixel_box(x: float, y: float, w: float, h: float) -> Box:
    """A detector's (x, y, w, h) over whole pixels -> the pixel-centre frame's box edges."""
    return (float(x) - 0.5, float(y) - 0.5, float(x + w) - 0.5, float(y + h) - 0.5)


def _check_box(values: Sequence[float]) -> Box:
    """Four finite numbers with x2 > x1 and y2 > y1, as a tuple of floats; else ValueError."""
    if len(values) != 4:
        raise ValueError(f"a box is 4 numbers x1,y1,x2,y2, got {len(values)}")
    x1, y1, x2, y2 = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box {[x1, y1, x2, y2]}: x1,y1,x2,y2 must be finite numbers")
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box {[x1, y1, x2, y2]} is empty: x1,y1,x2,y2 need x2 > x1 and y2 > y1")
    return (x1, y1, x2, y2)


def parse_box(text: str) -> Box:
    """``"x1,y1,x2,y2"`` (pixels) -> a box; ValueError for a wrong count, a non-number,
    a non-finite value, or x2 <= x1 or y2 <= y1."""
    parts = str(text).split(",")
    values = []
    for part in parts:
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a number (expected x1,y1,x2,y2)") from None
    return _check_box(values)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade: bundled with OpenCV 4.x, no download.

    Fast and dependency-free but frontal only (profile faces and strong rotation
    are missed).  Images whose longer side exceeds ``max_side`` are searched at a
    reduced size.  ``score`` is the cascade's level weight (larger is surer).
    """

    name = "opencv"

    def __init__(self, cascade: str | os.PathLike | None = None, scale_factor: float = 1.1,
                 min_neighbors: int = 5, min_size: int = 24, max_side: int = 1280,
                 framing: BoxFraming = HAAR_FRAMING) -> None:
        if not hasattr(cv2, "CascadeClassifier"):
            raise FaceDetectorError(
                f"the 'opencv' face detector needs OpenCV's Haar cascades, which OpenCV "
                f"{cv2.__version__} does not have (OpenCV 5 moved them out of the main package). "
                "Install opencv-python-headless<5, or use another detector: 'none' for cropped "
                "faces, a --box, 'dlib' or 'mediapipe'")
        if cascade is None:
            folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
            cascade = Path(folder) / "haarcascade_frontalface_default.xml"
        path = Path(cascade)
        if not path.is_file():
            raise FaceDetectorError(
                f"{path}: Haar cascade file not found; this OpenCV build ({cv2.__version__}) does not "
                "bundle cv2.data.haarcascades. Install opencv-python-headless<5 or pass cascade=PATH")
        self.classifier = cv2.CascadeClassifier(str(path))
        if self.classifier.empty():
            raise FaceDetectorError(f"{path}: not a readable Haar cascade")
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self.min_size, self.max_side, self.framing = min_size, max_side, framing

    def __call__(self, image: np.ndarray) -> list[Detection]:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        zoom = min(1.0, self.max_side / max(grey.shape[:2]))
        if zoom < 1.0:
            grey = cv2.resize(grey, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        rects, _, weights = self.classifier.detectMultiScale3(
            grey, self.scale_factor, self.min_neighbors, minSize=(self.min_size, self.min_size),
            outputRejectLevels=True)
        found = [(_pixel_box(*(np.asarray(r, np.float64) / zoom)), float(w))
                 for r, w in zip(rects, np.ravel(weights), strict=False)]
        return sorted(found, key=lambda d: -d[1])


class WholeImage:
    """The whole image is one face (``--detector none``): for faces already cropped."""

    name = "none"
    framing = IDENTITY

    def __call__(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        return [(whole_image_box(w, h), None)]


class FixedBoxes:
    """Boxes the caller knows (``--box``), dataset-style: used as they are on every image."""

    name = "box"
    framing = IDENTITY

    def __init__(self, boxes: Sequence[Sequence[float]] | Sequence[float]) -> None:
        arr = np.asarray(boxes, np.float64)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError(f"a box is 4 numbers x1, y1, x2, y2; got {np.asarray(boxes).tolist()}")
        self.boxes: list[Box] = [_check_box(b) for b in arr]

    def __call__(self, image: np.ndarray) -> list[Detection]:
        return [(b, None) for b in self.boxes]


class DlibDetector:
    """dlib's HOG frontal face detector (built into dlib: no model file to download).

    ``score`` is dlib's detection confidence.  Framing: uncalibrated here (dlib is
    not a dependency); measure it with :func:`calibrate_framing` and pass ``framing``.
    """

    name = "dlib"

    def __init__(self, upsample: int = 1, framing: BoxFraming = IDENTITY) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise FaceDetectorError(
                "the 'dlib' face detector needs the dlib package (pip install dlib); "
                "the default 'opencv' detector needs nothing extra") from exc
        self._detector = dlib.get_frontal_face_detector()
        self.upsample, self.framing = upsample, framing

    def __call__(self, image: np.ndarray) -> list[Detection]:
        rgb = np.ascontiguousarray(image[:, :, ::-1])
        rects, scores, _ = self._detector.run(rgb, self.upsample, 0.0)
        return [((r.left() - 0.5, r.top() - 0.5, r.right() + 0.5, r.bottom() + 0.5), float(s))
                for r, s in zip(rects, scores, strict=False)]


class MediaPipeDetector:
    """MediaPipe's BlazeFace through its legacy ``solutions`` API (model bundled in the wheel).

    Framing uncalibrated here (see :class:`DlibDetector`).
    """

    name = "mediapipe"

    def __init__(self, min_confidence: float = 0.5, full_range: bool = True,
                 framing: BoxFraming = IDENTITY) -> None:
        try:
            import mediapipe as mp
        except ImportError as exc:
            raise FaceDetectorError(
                "the 'mediapipe' face detector needs the mediapipe package (pip install mediapipe); "
                "the default 'opencv' detector needs nothing extra") from exc
        solutions = getattr(mp, "solutions", None)
        if solutions is None or not hasattr(solutions, "face_detection"):
            raise FaceDetectorError(
                f"mediapipe {getattr(mp, '__version__', '?')} has no bundled face detector "
                "(mediapipe.solutions.face_detection); install a mediapipe version that has it")
        self._detector = solutions.face_detection.FaceDetection(
            model_selection=1 if full_range else 0, min_detection_confidence=min_confidence)
        self.framing = framing

    def __call__(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        result = self._detector.process(np.ascontiguousarray(image[:, :, ::-1]))
        out: list[Detection] = []
        for d in result.detections or []:
            r = d.location_data.relative_bounding_box
            x1, y1 = r.xmin * w, r.ymin * h
            out.append(((x1 - 0.5, y1 - 0.5, x1 + r.width * w - 0.5, y1 + r.height * h - 0.5),
                        float(d.score[0]) if d.score else None))
        return out


DETECTORS: dict[str, Callable[..., FaceDetector]] = {
    "opencv": HaarDetector,
    "none": WholeImage,
    "dlib": DlibDetector,
    "mediapipe": MediaPipeDetector,
}


def get_face_detector(detector: str | FaceDetector | None = "opencv", **options: Any) -> FaceDetector:
    """A detector by name (``DETECTORS``), or the given object/callable unchanged."""
    if detector is None:
        return WholeImage()
    if isinstance(detector, str):
        if detector not in DETECTORS:
            raise FaceDetectorError(
                f"unknown face detector {detector!r}; choose from {', '.join(DETECTORS)} "
                "or pass a callable image -> [(box, score)]")
        return DETECTORS[detector](**options)
    if not callable(detector):
        raise TypeError(f"a face detector is a name or a callable, got {type(detector).__name__}")
    return detector


def calibrate_framing(detector: FaceDetector, count: int = 400, seed: int = 0,
                      size: int = 256) -> tuple[BoxFraming, dict[str, Any]]:
    """Measure a detector's :class:`BoxFraming` on synthetic faces with exact landmarks.

    Runs ``detector`` (with its own framing ignored: pass its raw boxes) on ``count``
    rendered faces; for each face it finds (the largest box containing the true box
    centre), compares the box with the dataset-style crop box.  Returns the median
    framing and statistics (``found``, quartiles).  Raises ValueError if it finds none.
    """
    from ..data.synth import render_face

    ratios, shifts = [], []
    for i in range(count):
        image, _, info = render_face(np.random.default_rng([seed, i]), size)
        side_t = info["scale"] * FACE_SIZE / BOX_MARGIN  # the face box's side
        cx, cy = info["center"]
        hits = [b for b, _ in detector(image) if b[0] < cx < b[2] and b[1] < cy < b[3]]
        if not hits:
            continue
        x1, y1, x2, y2 = max(hits, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        side = min(x2 - x1, y2 - y1)
        ratios.append(side_t / side)
        shifts.append(((cx - (x1 + x2) / 2) / side, (cy - (y1 + y2) / 2) / side))
    if not ratios:
        raise ValueError(f"the detector found none of {count} synthetic faces; cannot calibrate")
    r, s = np.asarray(ratios), np.asarray(shifts)
    framing = BoxFraming(float(np.median(r)), float(np.median(s[:, 0])), float(np.median(s[:, 1])))
    stats = {
        "found": len(r), "count": count,
        "expand_quartiles": np.percentile(r, [25, 75]).round(3).tolist(),
        "shift_x_quartiles": np.percentile(s[:, 0], [25, 75]).round(3).tolist(),
        "shift_y_quartiles": np.percentile(s[:, 1], [25, 75]).round(3).tolist(),
    }
    return framing, stats
