"""Faces followed through video frames: detect now and then, crop from the last landmarks in between.

Running the face detector on every frame costs time and makes boxes (and so
landmarks) jump.  :class:`FaceTracker` runs it on the first frame, every
``detect_every`` frames, and on the frame after any track's confidence dropped;
on the other frames each face's crop is built from its own previous landmarks:
their bounding box (as the 300W converter builds boxes) made square on its
geometric-mean side, scaled and shifted the way the track's last detection box
(a dataset-style box: the detector's framing applied) sat around the landmarks
found in it, then the converters' box -> crop rule.  So the network keeps seeing
the face framed as in training whatever the training set's box convention (the
landmarks' box as such gives crops up to 20 % tighter than the synthetic faces'
boxes, and a model trained on those then shrinks its crop frame after frame).
With ``detect_every=1`` every crop comes from a detection (no tracking: the
per-image behaviour, with track ids and filters).

Each face is a track with an id that stays the same across frames: on a detection
frame, detections are matched to tracks by the overlap (IoU) of the detection's
dataset-style box with the track's landmark box; unmatched detections start new
tracks (new ids, never reused), a matched track whose landmark box overlaps its
detection by less than ``reanchor_iou`` takes the detection's box for its crop
(it was drifting off its face), tracks the detector misses on more than
``max_missed`` detection frames in a row end, as do tracks whose confidence stays
low for ``max_missed + 1`` frames and tracks that converge onto the same face as an
older track.  Confidence is STAR's own signal: the heatmaps of a face the network
does not find spread out, so a track's ``spread`` (the median, over landmarks, of
the heatmap's major standard deviation, in face sizes) rising above ``spread_ratio``
times its value on the track's first frames means the face is lost.  (Relative, not
absolute: how wide a model's heatmaps are depends on its training.)

Each track's landmarks then go through its own temporal filter
(:mod:`~staralign.inference.smoothing`); the crops always come from the unfiltered
landmarks, so a filter's lag never shifts the crop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..crop import crop_to_box, landmark_box  # the 300W converter's box from landmarks (the one crop convention)
from . import geometry
from .detector import Ambiguity, Face, LandmarkDetector
from .faces import framing_of, unpack_detection
from .smoothing import DEFAULT_MOTION, LandmarkFilter, make_filter

__all__ = ["DEFAULT_DETECT_EVERY", "DEFAULT_SPREAD_RATIO", "FaceTracker", "TrackedFace", "box_iou"]

Box = tuple[float, float, float, float]

# The detector every 10 frames: measured on synthetic videos with a demo model trained to NME
# 3.8%, tracking costs no accuracy (NME 3.39% against 3.44% with a detection every frame, both
# smoothed) and gives 1.9x the frames per second with YuNet (docs/experiments.md).  A weak model
# drifts between detections (one at NME 14.5%: 20% against 12.7%): --detect-every 1 for those.
DEFAULT_DETECT_EVERY = 10
# See docs/inference.md, "Video": measured on the demo model.
DEFAULT_SPREAD_RATIO = 1.5
REFERENCE_FRAMES = 3  # a track's reference spread: the median over its first frames


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class TrackedFace:
    """One face in one frame: its ``track_id``, the filtered ``face`` (landmarks and, for the
    Kalman filter, the filtered covariance as its ``ambiguity``), the network's unfiltered
    ``raw`` face (model layout), whether this frame's crop came from a detection
    (``detected``), and the track's ``spread`` (median heatmap std-dev, face sizes)."""

    track_id: int
    face: Face
    raw: Face
    detected: bool
    spread: float

    def to_dict(self, ambiguity: bool = True) -> dict[str, Any]:
        """The face's JSON (:meth:`Face.to_dict`) with ``track_id``, ``detected`` and ``spread``."""
        return {"track_id": self.track_id, **self.face.to_dict(ambiguity=ambiguity),
                "detected": self.detected,
                "spread": None if not np.isfinite(self.spread) else round(float(self.spread), 5)}


@dataclass
class _Track:
    track_id: int
    box: Box  # crop box for the next frame (the landmarks' box, or a detection's)
    filter: LandmarkFilter
    score: float | None = None
    missed: int = 0  # detection frames in a row without a matching detection
    uncertain: int = 0  # frames in a row with spread > spread_ratio x the reference spread
    age: int = 0
    spreads: list[float] = field(default_factory=list)  # the first REFERENCE_FRAMES spreads
    anchored: bool = True  # this frame's crop box is a detection's (dataset-style) box
    framing: tuple[float, float, float] = (1.0, 0.0, 0.0)  # detection box vs landmark box: side ratio, shift


class FaceTracker:
    """Track the faces of a frame sequence (a video, a webcam) with one :class:`LandmarkDetector`.

    ``smooth``: ``none``, ``oneeuro`` or ``ambiguity`` (see :mod:`.smoothing`);
    ``filter_options`` go to :func:`~staralign.inference.smoothing.make_filter`.
    ``boxes``: fixed dataset-style face boxes used instead of the face detector on
    detection frames.  ``format``: output layout (None: the detector's).  Call
    :meth:`step` once per frame, in order.
    """

    def __init__(self, detector: LandmarkDetector, smooth: str = "ambiguity",
                 detect_every: int = DEFAULT_DETECT_EVERY, spread_ratio: float = DEFAULT_SPREAD_RATIO,
                 max_missed: int = 1, match_iou: float = 0.3, reanchor_iou: float = 0.7, merge_iou: float = 0.7,
                 boxes: Sequence[Sequence[float]] | None = None, format: str | None = None,
                 filter_options: dict[str, float] | None = None) -> None:
        if detect_every < 1:
            raise ValueError(f"detect_every must be at least 1, got {detect_every}")
        make_filter(smooth)  # fail now on an unknown name
        self.detector, self.smooth, self.detect_every = detector, smooth, int(detect_every)
        self.spread_ratio, self.max_missed = float(spread_ratio), int(max_missed)
        self.match_iou, self.reanchor_iou, self.merge_iou = float(match_iou), float(reanchor_iou), float(merge_iou)
        self.boxes = None if boxes is None else [tuple(float(v) for v in b) for b in boxes]
        self.format = format
        self.filter_options = {"motion": DEFAULT_MOTION, **(filter_options or {})}
        self.tracks: list[_Track] = []
        self.frame_index = 0
        self.next_id = 0
        self.detections_run = 0
        self._detect_next = True

    def reset(self) -> None:
        """Forget every track (ids keep counting up)."""
        self.tracks, self.frame_index, self._detect_next = [], 0, True

    # ------------------------------------------------------------------ detection frames

    def _detections(self, frame: np.ndarray) -> list[tuple[Box, float | None]]:
        """Dataset-style boxes (the detector's framing applied) and scores."""
        self.detections_run += 1
        if self.boxes is not None:
            return [(b, None) for b in self.boxes]  # type: ignore[misc]
        framing = framing_of(self.detector.face_detector)
        out = []
        for detection in self.detector.find_faces(frame):  # (box, score) or YuNet's (box, score, keypoints)
            box, score, keypoints = unpack_detection(detection)
            # The training crop this detector's framing gives, as a dataset-style box: tracked crops
            # are upright, so a keypoint framing's roll angle is not kept here.
            scale, center, _angle = framing.place(box, keypoints)
            out.append((crop_to_box(scale, center), score))
        return out

    def _match(self, detections: list[tuple[Box, float | None]]) -> None:
        """Greedy IoU matching; unmatched detections become tracks, long-missed tracks end."""
        pairs = sorted(((box_iou(tr.box, d[0]), i, j) for i, tr in enumerate(self.tracks)
                        for j, d in enumerate(detections)), reverse=True)
        used_t, used_d = set(), set()
        for iou, i, j in pairs:
            if iou < self.match_iou or i in used_t or j in used_d:
                continue
            used_t.add(i)
            used_d.add(j)
            self.tracks[i].missed, self.tracks[i].score = 0, detections[j][1]
            # no tracking (every crop from a detection), or a track drifting off its face: re-anchor
            if self.detect_every == 1 or iou < self.reanchor_iou:
                self.tracks[i].box, self.tracks[i].anchored = detections[j][0], True
        kept = []
        for i, tr in enumerate(self.tracks):
            if i not in used_t:
                tr.missed += 1
                if tr.missed > self.max_missed:
                    continue
            kept.append(tr)
        for j, (box, score) in enumerate(detections):
            if j not in used_d:
                kept.append(_Track(self.next_id, box, make_filter(self.smooth, **self.filter_options), score))
                self.next_id += 1
        self.tracks = kept

    # ------------------------------------------------------------------ every frame

    def step(self, frame: np.ndarray, t: float | None = None) -> list[TrackedFace]:
        """The tracked faces of the next frame (8-bit BGR); ``t`` its time in seconds
        (default: the clock, for live streams).  Oldest tracks first."""
        t = time.monotonic() if t is None else float(t)
        detect = self._detect_next or not self.tracks or self.frame_index % self.detect_every == 0
        if detect:
            self._match(self._detections(frame))
        self.frame_index += 1
        self._detect_next = False
        self.tracks = [tr for tr in self.tracks if _usable(tr.box)]
        if not self.tracks:
            return []
        faces = self.detector.detect_batch([frame], boxes=[[tr.box for tr in self.tracks]], format="native",
                                           ambiguity=True)[0]
        alive: list[tuple[_Track, Face, float, bool]] = []
        for tr, face in zip(self.tracks, faces, strict=True):
            unit = face.scale * geometry.FACE_SIZE
            spread = _spread(face, unit)
            was_detected = tr.anchored
            if tr.anchored:  # how the detection framed the face the network found in it
                tr.framing = _framing(tr.box, face.landmarks)
                tr.anchored = False
            if len(tr.spreads) < REFERENCE_FRAMES:
                tr.spreads.append(spread)
            reference = float(np.median(tr.spreads))
            tr.uncertain = tr.uncertain + 1 if not spread <= self.spread_ratio * reference else 0
            # Ends: uncertain for too long, or uncertain while the detector no longer finds it
            # (the network and the detector agree the face is gone: not reported once more).
            if tr.uncertain > self.max_missed or (tr.uncertain and tr.missed):
                continue
            if tr.uncertain:
                self._detect_next = True
            alive.append((tr, face, spread, was_detected))
        alive = self._merge(alive)
        out = []
        for tr, face, spread, was_detected in alive:
            tr.age += 1
            tr.box = _crop_box(face.landmarks, tr.framing)
            unit = face.scale * geometry.FACE_SIZE
            cov = None if face.ambiguity is None else face.ambiguity.covariance
            points, cov_f = tr.filter.update(face.landmarks, cov, t, unit)
            smoothed = Face(face.box, points, tr.score, None if cov_f is None else Ambiguity.from_covariance(cov_f),
                            face.layout, face.scale, face.center)
            if self.format is not None or self.detector.format != self.detector.definition.name:
                smoothed = self.detector.convert([smoothed], self.format or self.detector.format)[0]
            out.append(TrackedFace(tr.track_id, smoothed, face, was_detected, spread))
        self.tracks = [a[0] for a in alive]
        return out

    def _merge(self, alive: list[tuple[_Track, Face, float, bool]]) -> list[tuple[_Track, Face, float, bool]]:
        """Two tracks whose landmarks now frame the same face: the newer one ends."""
        boxes = [landmark_box(face.landmarks) for _, face, _, _ in alive]
        drop = set()
        for i in range(len(alive)):
            for j in range(i + 1, len(alive)):
                if i in drop or j in drop:
                    continue
                if box_iou(boxes[i], boxes[j]) > self.merge_iou:
                    drop.add(j if alive[j][0].track_id > alive[i][0].track_id else i)
        return [a for k, a in enumerate(alive) if k not in drop]


def _spread(face: Face, unit: float) -> float:
    """Median heatmap major std-dev over the landmarks, in face sizes (0 for a model without ambiguity)."""
    if face.ambiguity is None:
        return 0.0  # a model without heatmap covariance: confidence unknown, never drops
    return float(np.median(face.ambiguity.major)) / max(unit, 1e-9)


def _framing(box: Box, landmarks: np.ndarray) -> tuple[float, float, float]:
    """(side ratio, x shift, y shift) of a dataset-style ``box`` relative to the landmarks' box:
    the crop rule's side (the shorter one) over the landmark box's geometric-mean side, and the
    centre offset in those sides."""
    x1, y1, x2, y2 = landmark_box(landmarks)
    side = float(np.sqrt(max(x2 - x1, 1e-6) * max(y2 - y1, 1e-6)))
    ratio = min(box[2] - box[0], box[3] - box[1]) / side
    return (ratio, ((box[0] + box[2]) - (x1 + x2)) / 2 / side, ((box[1] + box[3]) - (y1 + y2)) / 2 / side)


def _crop_box(landmarks: np.ndarray, framing: tuple[float, float, float]) -> Box:
    """The next crop's box from this frame's landmarks, framed as the track's detection was."""
    x1, y1, x2, y2 = landmark_box(landmarks)
    side = float(np.sqrt(max(x2 - x1, 1e-6) * max(y2 - y1, 1e-6)))
    ratio, dx, dy = framing
    cx, cy, half = (x1 + x2) / 2 + dx * side, (y1 + y2) / 2 + dy * side, ratio * side / 2
    return (cx - half, cy - half, cx + half, cy + half)


def _usable(box: Box) -> bool:
    """A crop box with a finite, non-degenerate extent."""
    return all(np.isfinite(box)) and min(box[2] - box[0], box[3] - box[1]) > 2.0
