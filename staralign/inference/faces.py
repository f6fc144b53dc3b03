"""Face detectors: where in a photo to look for landmarks.

A face detector is anything matching :class:`FaceDetector`: a callable taking an
HxWx3 uint8 BGR image and returning a list of ``(box, score)`` or ``(box, score,
keypoints)``, with ``box`` = ``(x1, y1, x2, y2)`` in image pixels (pixel-centre
frame, see :mod:`staralign.crop`), ``score`` a float or None and ``keypoints`` a
(5, 2) array (right eye, left eye, nose tip, right and left mouth corner: the
subject's right, so the right eye is on the image's left) or None.

Detectors frame faces differently from the crops the network was trained on
(the dataset's boxes hug the landmarks: brows to chin, jaw to jaw).  A detector
carries a ``framing`` attribute that turns its output into the training crop
(scale, centre, roll angle): a :class:`BoxFraming` (box -> box, no rotation) or a
:class:`KeypointFraming` (five keypoints -> centre, scale and in-plane rotation,
so a tilted face reaches the network upright).  Detectors without one are taken
as they are.  The built-in framings were fitted on 43 real faces
(``benchmarks/fit_framing.py``); :func:`calibrate_framing` measures a box
framing on synthetic faces.

Built in (``get_face_detector(name)``):

* ``yunet`` (default) -- OpenCV's YuNet (``cv2.FaceDetectorYN``, the OpenCV Zoo's
  229 kB ONNX file, downloaded once into the cache by :mod:`staralign.hub`, or a
  ``model=PATH``); boxes and five keypoints.  When the file cannot be had it falls
  back to ``opencv`` with one warning line saying what to download
  (:func:`yunet_or_haar`);
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
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from ..crop import BOX_MARGIN, FACE_SIZE, box_to_crop
from .geometry import Box, whole_image_box

__all__ = [
    "DETECTORS",
    "DETECTOR_NAMES",
    "BoxFraming",
    "DlibDetector",
    "FaceDetector",
    "FaceDetectorError",
    "FixedBoxes",
    "HaarDetector",
    "KeypointFraming",
    "MediaPipeDetector",
    "WholeImage",
    "YuNetDetector",
    "calibrate_framing",
    "framing_of",
    "get_face_detector",
    "keypoint_frame",
    "parse_box",
    "unpack_detection",
    "yunet_or_haar",
]

Detection = tuple  # (box, score) or (box, score, keypoints (5, 2) or None)
CropPlacement = tuple[float, tuple[float, float], float]  # (scale, centre, angle in degrees)


class FaceDetectorError(RuntimeError):
    """A face detector cannot be created (library missing, model file absent); says what to do."""


@runtime_checkable
class FaceDetector(Protocol):
    """``image (HxWx3 uint8 BGR) -> [(box (x1, y1, x2, y2), score or None[, keypoints]), ...]``."""

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

    def place(self, box: Sequence[float], keypoints: np.ndarray | None = None) -> CropPlacement:
        """(scale, centre, angle 0) of the training crop for a detector box (keypoints unused)."""
        scale, center = box_to_crop(*self.apply(box))
        return scale, center, 0.0


IDENTITY = BoxFraming()


def unpack_detection(detection: Sequence[Any]) -> tuple[Box, float | None, np.ndarray | None]:
    """A detector's ``(box, score)`` or ``(box, score, keypoints)`` -> the three (None if absent)."""
    box, score = detection[0], detection[1]
    kps = detection[2] if len(detection) > 2 else None
    return (tuple(float(v) for v in box), None if score is None else float(score),
            None if kps is None else np.asarray(kps, np.float64).reshape(5, 2))


def keypoint_frame(keypoints: np.ndarray) -> dict[str, Any]:
    """The face's own frame from five keypoints (right eye, left eye, nose, right and left mouth).

    ``angle``: the eye line's direction in degrees (image +x towards +y, i.e. clockwise
    on screen; 0 for an upright face); ``u`` the unit eye-line vector, ``v`` the unit
    vector perpendicular to it pointing from the eyes towards the mouth side;
    ``eyes`` the eyes' midpoint; ``eye_mouth`` the distance from ``eyes`` to the mouth
    corners' midpoint along ``v``; ``eye_eye`` the eye distance; ``nose_u`` the
    nose's offset from ``eyes`` along ``u`` (it grows as the head turns).
    """
    k = np.asarray(keypoints, np.float64).reshape(5, 2)
    eyes, mouth = (k[0] + k[1]) / 2, (k[3] + k[4]) / 2
    d = k[1] - k[0]
    eye_eye = float(np.hypot(*d))
    u = d / eye_eye if eye_eye > 0 else np.array([1.0, 0.0])
    v = np.array([-u[1], u[0]])
    return {"angle": math.degrees(math.atan2(u[1], u[0])), "u": u, "v": v, "eyes": eyes,
            "eye_mouth": float((mouth - eyes) @ v), "eye_eye": eye_eye,
            "nose_u": float((k[2] - eyes) @ u)}


@dataclass(frozen=True)
class KeypointFraming:
    """Five keypoints -> the training crop (scale, centre, roll angle).

    In the face's frame (:func:`keypoint_frame`): the crop side ``scale * 200`` is
    ``side_eye_mouth * eye_mouth + side_eye_eye * eye_eye``; the centre is the eyes'
    midpoint plus ``center_v`` crop sides along ``v`` and ``center_u`` crop sides plus
    ``center_nose`` times the nose offset along ``u``; the angle is the eye line's.
    Without keypoints (or with degenerate ones) ``box`` frames the detector box.
    """

    side_eye_mouth: float
    side_eye_eye: float
    center_u: float
    center_v: float
    center_nose: float
    box: BoxFraming = IDENTITY

    def place(self, box: Sequence[float], keypoints: np.ndarray | None = None) -> CropPlacement:
        """(scale, centre, angle in degrees) of the training crop for one detection."""
        if keypoints is None:
            return self.box.place(box)
        f = keypoint_frame(keypoints)
        side = self.side_eye_mouth * f["eye_mouth"] + self.side_eye_eye * f["eye_eye"]
        if not (side > 0 and math.isfinite(side)):
            return self.box.place(box)
        along_u = self.center_u * side + self.center_nose * f["nose_u"]
        c = f["eyes"] + along_u * f["u"] + self.center_v * side * f["v"]
        return side / FACE_SIZE, (float(c[0]), float(c[1])), float(f["angle"])


# Fitted by benchmarks/fit_framing.py on the real faces of ../shared/faces, untilted (the
# cascade finds 39 of 43, and 10 and 9 when they are turned by -30 and +30 degrees;
# OpenCV 4.14): least squares from the Haar box to the 300W converter's crop.  The Haar
# box reaches from the forehead to the mouth, so the dataset box is smaller and lower.
# Before, a framing measured on synthetic faces with calibrate_framing (expand 0.89,
# shift_y 0.18) was used; on the real faces it frames worse (see docs/inference.md).
HAAR_FRAMING = BoxFraming(expand=0.7978, shift_x=0.0192, shift_y=0.138)


def framing_of(detector: Any) -> BoxFraming | KeypointFraming:
    """The detector's ``framing`` attribute, or no change."""
    framing = getattr(detector, "framing", None)
    return framing if isinstance(framing, (BoxFraming, KeypointFraming)) else IDENTITY


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


# Fitted by benchmarks/fit_framing.py on the 43 faces of ../shared/faces (dlib's examples,
# 68 points each), each also turned by -30 and +30 degrees: least squares from YuNet's
# keypoints (after its roll search) to the 300W converter's crop, turned with the face.
# Leave-one-out, the crop centre is off by 5.1% of the face size on average (worst 14%),
# the crop side by 4%, the roll by 6.8 degrees, alike at every tilt (the nose term follows
# heads turned sideways).  docs/inference.md has the table.
YUNET_FRAMING = KeypointFraming(side_eye_mouth=1.4754, side_eye_eye=0.8076, center_u=-0.0151,
                                center_v=0.3093, center_nose=-1.4766,
                                box=BoxFraming(expand=0.9393, shift_x=0.0045, shift_y=0.1451))
YUNET_FILE = "face_detection_yunet_2026may.onnx"
ROLL_SEARCH_ANGLES = (-60.0, -30.0, 0.0, 30.0, 60.0)  # YuNetDetector's roll search, degrees
ROLL_PATCH = 128  # pixels a side of the roll search's patches
ROLL_FINE_STEP = 15.0  # then the best angle +- this, degrees


class YuNetDetector:
    """OpenCV's YuNet face detector (``cv2.FaceDetectorYN``): boxes, five keypoints, scores.

    Far better than the Haar cascade on real photos (turned, tilted, small faces), and
    faster (docs/benchmarks.md).  ``model``: the ONNX file; None fetches it through
    :func:`staralign.hub.fetch` (cache, mirror and offline rules; raises
    :class:`staralign.hub.Unavailable` when it cannot be had).

    YuNet runs at the image's own size (its input size is set per image), except that
    an image whose longer side exceeds ``max_side`` is searched at a reduced size and
    the boxes and keypoints are scaled back: the cost grows with the pixel count
    (1.8x from 1280x720 to 1920x1080, measured) while a face that is still 10 pixels wide
    after the reduction is found, so only faces smaller than about 15 pixels in a
    1920-pixel photo are given up.  ``max_side=None`` searches every image whole.
    ``score`` is YuNet's confidence in [0, 1]; detections below ``score_threshold``
    are dropped.  One instance is safe to share between threads (a lock guards the
    input size).

    **Roll search.**  YuNet's keypoints barely turn with the face: on a photo turned by
    30 degrees its eye line still reads within a few degrees of level (its training
    faces were upright), so the crop would not turn either.  Its detection score does
    fall as a face leans, so for each face it finds, YuNet is run again on a small
    patch (``ROLL_PATCH`` pixels, 2.2 face boxes wide) around the face turned by each
    of ``roll_search``'s angles, then by the best of them +-15 degrees; the keypoints
    of the surest of these runs, whose face is then nearly upright, are mapped back
    into the photo and replace the first ones.  On the 43 shared faces turned by -30
    and +30 degrees this brings the crop's roll error from 27 degrees to 6.8 (as on
    the untilted photos, where it is mostly the heads' own roll); it costs seven small
    YuNet runs per face (benchmarks/fit_framing.py, docs/benchmarks.md).
    ``roll_search=None`` keeps YuNet's own keypoints.
    """

    name = "yunet"

    def __init__(self, model: str | os.PathLike | None = None, score_threshold: float = 0.7,
                 nms_threshold: float = 0.3, top_k: int = 500, max_side: int | None = 1280,
                 framing: KeypointFraming | BoxFraming | None = None,
                 roll_search: Sequence[float] | None = ROLL_SEARCH_ANGLES) -> None:
        import threading

        if not hasattr(cv2, "FaceDetectorYN"):
            raise FaceDetectorError(
                f"the 'yunet' face detector needs cv2.FaceDetectorYN (OpenCV >= 4.8); OpenCV "
                f"{cv2.__version__} lacks it. Upgrade opencv-python-headless or use --detector opencv")
        if model is None:
            from .. import hub

            model = hub.fetch("yunet")
        path = Path(model)
        if not path.is_file():
            raise FaceDetectorError(f"{path}: YuNet model file not found")
        try:
            self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), float(score_threshold),
                                                  float(nms_threshold), int(top_k))
            self._patch_net = cv2.FaceDetectorYN.create(str(path), "", (ROLL_PATCH, ROLL_PATCH), 0.3,
                                                        float(nms_threshold), 20)
        except cv2.error as exc:
            raise FaceDetectorError(f"{path}: not a readable YuNet ONNX file ({exc.msg.strip()})") from None
        self.model_path, self.max_side = path, max_side
        self.roll_search = None if roll_search is None else tuple(float(a) for a in roll_search)
        self.framing = YUNET_FRAMING if framing is None else framing
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray) -> list[Detection]:
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        original = image
        h, w = image.shape[:2]
        zoom = 1.0 if self.max_side is None else min(1.0, self.max_side / max(h, w))
        if zoom < 1.0:
            image = cv2.resize(image, (max(1, round(w * zoom)), max(1, round(h * zoom))),
                               interpolation=cv2.INTER_AREA)
            zoom_x, zoom_y = image.shape[1] / w, image.shape[0] / h
        else:
            zoom_x = zoom_y = 1.0
        with self._lock:
            self._net.setInputSize((image.shape[1], image.shape[0]))
            _, rows = self._net.detect(np.ascontiguousarray(image))
        out: list[Detection] = []
        for r in (() if rows is None else rows):
            r = np.asarray(r, np.float64)
            # Read as the Haar boxes are (pixel (0, 0) spanning [0, 1]) and moved to this
            # package's frame (pixel centres at integers); the framing's fit absorbs the rest.
            x, y, bw, bh = r[0] / zoom_x, r[1] / zoom_y, r[2] / zoom_x, r[3] / zoom_y
            kps = r[4:14].reshape(5, 2) / (zoom_x, zoom_y) - 0.5
            box = (x - 0.5, y - 0.5, x + bw - 0.5, y + bh - 0.5)
            if self.roll_search:
                kps = self._upright_keypoints(original, box, kps)
            out.append((box, float(r[14]), kps))
        return sorted(out, key=lambda d: -d[1])

    def _upright_keypoints(self, image: np.ndarray, box: Box, keypoints: np.ndarray) -> np.ndarray:
        """The keypoints of the surest YuNet run on the face's patch turned by each search angle
        (then by the best angle +-15 degrees), in the photo's pixels; ``keypoints`` unchanged
        when no run finds the face."""
        x1, y1, x2, y2 = box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        zoom = ROLL_PATCH / (2.2 * max(x2 - x1, y2 - y1))
        half = (ROLL_PATCH - 1) / 2
        best: tuple[float, float, np.ndarray] = (-1.0, 0.0, keypoints)  # score, angle, keypoints

        def run(angle: float) -> None:
            nonlocal best
            m = cv2.getRotationMatrix2D((cx, cy), angle, zoom)  # turns the picture counter-clockwise
            m[:, 2] += (half - cx, half - cy)
            patch = cv2.warpAffine(image, m, (ROLL_PATCH, ROLL_PATCH), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            with self._lock:
                _, rows = self._patch_net.detect(patch)
            for r in (() if rows is None else rows):
                if not (r[0] < half < r[0] + r[2] and r[1] < half < r[1] + r[3]) or r[14] <= best[0]:
                    continue
                inv = cv2.invertAffineTransform(m)
                pts = np.asarray(r[4:14], np.float64).reshape(5, 2) - 0.5
                best = (float(r[14]), angle, pts @ inv[:, :2].T + inv[:, 2])

        for angle in self.roll_search or ():
            run(angle)
        if best[0] >= 0 and ROLL_FINE_STEP:
            coarse = best[1]
            for angle in (coarse - ROLL_FINE_STEP, coarse + ROLL_FINE_STEP):
                run(angle)
        return best[2]


_FALLBACK_WARNED: set[str] = set()  # fallback warnings already printed in this process


def yunet_or_haar(model: str | os.PathLike | None = None, **options: Any) -> FaceDetector:
    """YuNet when its file can be had, else the Haar cascade with one warning line on stderr.

    The warning says why, what to download (``staralign models download yunet``) and
    where the file goes; the same warning is printed once per process.  Each call tries
    YuNet again, so a file downloaded meanwhile is used.  ``options`` go to YuNet.
    """
    from ..cli import UserError

    try:
        return YuNetDetector(model, **options)
    except (UserError, FaceDetectorError) as exc:
        message = (f"staralign: warning: using the Haar face detector (opencv) because YuNet is "
                   f"unavailable: {exc}; run 'staralign models download yunet' once to get it")
        if message not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(message)
            print(message, file=sys.stderr, flush=True)
    return HaarDetector()


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
    "yunet": yunet_or_haar,
    "opencv": HaarDetector,
    "none": WholeImage,
    "dlib": DlibDetector,
    "mediapipe": MediaPipeDetector,
}
DETECTOR_NAMES = tuple(DETECTORS)  # the names get_face_detector takes (the CLIs' --detector choices)


def get_face_detector(detector: str | FaceDetector | None = "yunet", **options: Any) -> FaceDetector:
    """A detector by name (``DETECTORS``), or the given object/callable unchanged.

    ``"yunet"`` falls back to ``"opencv"`` (Haar) with a warning when YuNet's file
    cannot be had; ``YuNetDetector(model=PATH)`` takes a file explicitly.
    """
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
