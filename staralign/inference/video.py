"""Video options shared by ``staralign predict`` and the web page, and the video speed benchmark.

``--smooth`` and ``--detect-every`` are defined here once (the parser and the
tracker built from them), so the command line and the web API mean the same.
:func:`video_fps` times a :class:`~.tracking.FaceTracker` over frames already in
memory (decoding excluded), for ``staralign bench video``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .smoothing import SMOOTHERS

__all__ = ["DEFAULT_SMOOTH", "add_video_arguments", "tracker_from_args", "video_fps"]

# Chosen from ``staralign experiment stability`` on the demo model (docs/experiments.md).
DEFAULT_SMOOTH = "ambiguity"


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    """``--smooth`` and ``--detect-every``."""
    from .tracking import DEFAULT_DETECT_EVERY

    p.add_argument("--smooth", choices=SMOOTHERS, default=DEFAULT_SMOOTH,
                   help="temporal filter on video landmarks: none, oneeuro (One Euro) or ambiguity (Kalman filter "
                        "trusting each landmark by its heatmap covariance)")
    p.add_argument("--detect-every", type=int, default=DEFAULT_DETECT_EVERY, metavar="N",
                   help="in videos, run the face detector every N frames and crop each face from its previous "
                        "landmarks in between (1: crop from a detection on every frame)")


def tracker_from_args(detector: Any, args: argparse.Namespace, boxes: Sequence[Sequence[float]] | None = None) -> Any:
    """A new :class:`~.tracking.FaceTracker` for one video, from the parsed options."""
    from .tracking import FaceTracker

    if args.detect_every < 1:
        raise ValueError(f"--detect-every must be at least 1, got {args.detect_every}")
    return FaceTracker(detector, smooth=args.smooth, detect_every=args.detect_every, boxes=boxes)


def video_fps(detector: Any, frames: Sequence[np.ndarray], fps: float = 30.0, detect_every: int = 10,
              smooth: str = "none", repeats: int = 1) -> dict[str, Any]:
    """Frames per second of tracking ``frames`` (best of ``repeats`` passes), detector calls and faces."""
    from .tracking import FaceTracker

    best, faces, detections = float("inf"), 0, 0
    for _ in range(max(1, repeats)):
        tracker = FaceTracker(detector, smooth=smooth, detect_every=detect_every)
        found = 0
        start = time.perf_counter()
        for i, frame in enumerate(frames):
            found += len(tracker.step(frame, t=i / fps))
        best = min(best, time.perf_counter() - start)
        faces, detections = found, tracker.detections_run
    return {"detect_every": detect_every, "smooth": smooth, "frames": len(frames), "seconds": round(best, 3),
            "fps": round(len(frames) / best, 2), "detector_calls": detections, "faces": faces}
