"""Synthetic videos with exact landmarks: one face moving smoothly, for temporal filters.

A sequence starts from one random face (:func:`~.params.sample_params`, without its
own blur and occluders) and moves each time-varying parameter along a smooth
random trajectory: pose (yaw, pitch, roll), position and size, expression (mouth,
smile, brows, gaze, blinks) and lighting (direction, strength, brightness).  A
trajectory is a sum of a few sinusoids with random frequencies (0.05 to
``max_hz``) and phases, so speeds vary and fast stretches occur.  Occluders enter
from one side of the face, cross it and leave.  Each frame gets fresh pixel noise
(a camera's), and, with ``label_noise`` > 0, labels slid along their contours by
that many inter-ocular distances (``labels.ambiguous_landmarks``); the exact
landmarks are always returned too.

:func:`synth_sequence` returns the whole sequence; frames are pure functions of
``(seed, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .labels import ambiguous_landmarks
from .params import FaceParams, Occluder, sample_params
from .render import render_face

__all__ = ["SyntheticSequence", "sequence_params", "synth_sequence"]


@dataclass
class SyntheticSequence:
    """``frames`` (T, S, S, 3) uint8 BGR, exact ``landmarks`` (T, 98, 2), ``labels`` (T, 98, 2)
    (= landmarks without label noise), ``face_boxes`` (T, 4) the dataset-style boxes,
    ``iod`` (T,) inter-ocular distances, ``occluded`` (T, 98) bool, and ``fps``."""

    frames: np.ndarray
    landmarks: np.ndarray
    labels: np.ndarray
    face_boxes: np.ndarray
    iod: np.ndarray
    occluded: np.ndarray
    fps: float


def _trajectory(rng: np.random.Generator, frames: int, fps: float, max_hz: float,
                components: int = 3) -> np.ndarray:
    """A smooth random curve over ``frames`` samples, roughly in [-1, 1]."""
    t = np.arange(frames) / fps
    out = np.zeros(frames)
    for _ in range(components):
        f = rng.uniform(0.05, max_hz)
        out += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return out / components * 1.6


def sequence_params(seed: int, frames: int, fps: float = 30.0, max_hz: float = 0.8,
                    occluders: int = 1) -> list[FaceParams]:
    """The :class:`FaceParams` of every frame of sequence ``seed``."""
    rng = np.random.default_rng([seed, 7])
    base = replace(sample_params(rng), blur=0.0, motion_blur=False, noise=0.0, occluders=(),
                   yaw=0.0, pitch=0.0, roll=0.0, face_frac=0.5, center=(0.5, 0.5))

    def traj() -> np.ndarray:
        return _trajectory(rng, frames, fps, max_hz)

    yaw, pitch, roll = 30 * traj(), 15 * traj(), 20 * traj()
    cx, cy = 0.5 + 0.16 * traj(), 0.5 + 0.12 * traj()
    frac = base.face_frac * (1 + 0.12 * traj())
    mouth = np.clip(0.5 * traj() + 0.1, 0, 1)
    smile = np.clip(0.6 * traj(), -0.3, 1)
    brow = np.clip(0.6 * traj(), 0, 1)
    gaze_x, gaze_y = 0.6 * traj(), 0.4 * traj()
    light_angle = base.light_angle + 90 * traj()
    light = np.clip(0.3 + 0.3 * traj(), 0, 0.8)
    bright = 1.0 + 0.2 * traj()
    # blinks: a 150 ms closure at random times
    closure = np.zeros(frames)
    for start in rng.integers(0, max(1, frames), size=max(1, frames // 60)):
        k = np.arange(frames) - start
        closure = np.maximum(closure, np.clip(1 - np.abs(k) / (0.075 * fps), 0, 1))
    # occluders: each crosses the face once, entering and leaving
    moving: list[tuple[Occluder, int, int, float]] = []
    for _ in range(occluders):
        kind = str(rng.choice(["ellipse", "rect", "blob", "bar"]))
        size = (float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.2, 0.4))) if kind != "bar" else (
            float(rng.uniform(0.6, 1.0)), float(rng.uniform(0.06, 0.12)))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        occ = Occluder(kind, 54, (0.0, 0.0), size, float(rng.uniform(-90, 90)), color, color)  # type: ignore[arg-type]
        span = int(rng.integers(max(2, frames // 4), max(3, frames // 2)))
        start = int(rng.integers(0, max(1, frames - span)))
        moving.append((occ, start, span, float(rng.uniform(-0.4, 0.4))))
    out = []
    for i in range(frames):
        occ_now = []
        for occ, start, span, dy in moving:
            if start <= i < start + span:
                u = (i - start) / max(1, span - 1)  # 0 -> 1: from the left edge to the right
                occ_now.append(replace(occ, offset=(-1.0 + 2.0 * u, dy)))
        c = float(np.clip(closure[i] + 0.05, 0, 1))
        out.append(replace(
            base, yaw=float(yaw[i]), pitch=float(pitch[i]), roll=float(roll[i]),
            center=(float(cx[i]), float(cy[i])), face_frac=float(frac[i]),
            mouth_open=float(mouth[i]), smile=float(smile[i]), brow_raise=float(brow[i]),
            gaze=(float(np.clip(gaze_x[i], -1, 1)), float(np.clip(gaze_y[i], -1, 1))),
            eye_closure=(c, c), light_angle=float(light_angle[i]), light_strength=float(light[i]),
            brightness=float(bright[i]), occluders=tuple(occ_now)))
    return out


def synth_sequence(seed: int, frames: int = 90, size: int = 256, fps: float = 30.0, max_hz: float = 0.8,
                   occluders: int = 1, noise: float = 3.0, label_noise: float = 0.0) -> SyntheticSequence:
    """Render sequence ``seed``: ``frames`` frames of ``size`` x ``size`` pixels at ``fps``.

    ``noise``: per-frame pixel noise std (grey levels); ``label_noise``: std of the
    label shift along contours, in inter-ocular distances (0: labels are exact).
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    params = sequence_params(seed, frames, fps, max_hz, occluders)
    noise_rng = np.random.default_rng([seed, 8])
    label_rng = np.random.default_rng([seed, 9])
    images, lms, labels, boxes, iods, occluded = [], [], [], [], [], []
    for p in params:
        image, lm, info = render_face(p, size)
        if noise > 0:
            image = np.clip(image + noise_rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        images.append(image)
        lms.append(lm)
        labels.append(ambiguous_landmarks(lm, info["curves"], label_noise, label_rng, iod=info["iod"],
                                          kinds=info["kinds"]))
        boxes.append(info["face_box"])
        iods.append(info["iod"])
        occluded.append(info["occluded"])
    return SyntheticSequence(np.stack(images), np.stack(lms).astype(np.float64), np.stack(labels).astype(np.float64),
                             np.asarray(boxes, np.float64), np.asarray(iods), np.stack(occluded), float(fps))
