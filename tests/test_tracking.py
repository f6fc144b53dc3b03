"""FaceTracker: track ids stay with their faces through a crossing; lost faces end, new faces get new ids.

The scene is two coloured discs on black ("faces"), one red and one green, that
cross with the green one passing in front; the face detector and the network
are stand-ins that see only pixels: the detector boxes each coloured blob, the
"network" puts 98 points on a circle around the blob nearest its crop's centre.
So the tracker's real path runs: detection frames, crops from the previous
landmarks, the crop geometry both ways, matching and ids.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from staralign.definitions import get_definition
from staralign.inference.detector import LandmarkDetector
from staralign.inference.tracking import FaceTracker, box_iou

W, H, R = 240, 130, 14
RED, GREEN = (0, 0, 255), (0, 255, 0)
ANGLES = np.linspace(0, 2 * np.pi, 98, endpoint=False)
SPAN = 1.5  # landmarks on a circle of SPAN * blob radius


def _blobs(image: np.ndarray, min_area: int = 20) -> list[tuple[np.ndarray, float]]:
    """(centroid (x, y), radius) of every red or green blob."""
    b, g, r = (image[..., k].astype(int) for k in range(3))
    out = []
    for mask in ((r > 128) & (g < 100), (g > 128) & (r < 100)):
        n, _, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
        for k in range(1, n):
            if stats[k, cv2.CC_STAT_AREA] >= min_area:
                out.append((cents[k], float(np.sqrt(stats[k, cv2.CC_STAT_AREA] / np.pi))))
    return out


class BlobDetector:
    name = "blobs"

    def __call__(self, image):
        return [((c[0] - SPAN * r, c[1] - SPAN * r, c[0] + SPAN * r, c[1] + SPAN * r), 1.0)
                for c, r in _blobs(image, 60)]


class BlobNetwork:
    """A Backend: 98 points around the blob nearest the crop centre (normalised units)."""

    name = "blobs"
    definition = get_definition("WFLW")
    input_size = 64
    has_ambiguity = True
    conversions: dict = {}

    def run(self, batch, ambiguity=True):
        # A crop with no blob gets what a real network gives for a crop without a face:
        # finite points (a small circle at the centre) with wide heatmaps (large covariance).
        s = self.input_size
        points = np.broadcast_to(0.2 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1), (len(batch), 98, 2))
        points = points.astype(np.float32)
        cov = np.broadcast_to(np.eye(2, dtype=np.float32) * 0.02 ** 2, (len(batch), 98, 2, 2)).copy()
        for i, crop in enumerate(batch):
            image = np.clip(np.transpose(crop, (1, 2, 0)) * 127.5 + 127.5, 0, 255).astype(np.uint8)
            found = _blobs(image)
            if not found:
                cov[i] = np.eye(2, dtype=np.float32) * 0.5 ** 2
                continue
            c, r = min(found, key=lambda b: np.hypot(*(b[0] - (s - 1) / 2)))
            pts = c + SPAN * r * np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1)
            points[i] = (2 * pts + 1) / s - 1
        return points, cov


def _scene(t: int) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """Red goes right along y=50, green goes left along y=70 (in front) until frame 40 and then
    leaves; a second green face appears at frame 48 at the left."""
    image = np.zeros((H, W, 3), np.uint8)
    where = {"red": (30.0 + 3 * t, 50.0)}
    if t < 40:
        where["green"] = (190.0 - 4 * t, 70.0)
    if t >= 48:
        where["new"] = (40.0, 100.0)
    cv2.circle(image, tuple(int(round(v)) for v in where["red"]), R, RED, -1)
    for name in ("green", "new"):
        if name in where:
            cv2.circle(image, tuple(int(round(v)) for v in where[name]), R, GREEN, -1)
    return image, where


@pytest.mark.parametrize("smooth", ["none", "ambiguity"])
def test_ids_follow_faces_through_a_crossing(smooth):
    det = LandmarkDetector(BlobNetwork(), detector=BlobDetector())
    tracker = FaceTracker(det, smooth=smooth, detect_every=5)
    owner: dict[str, int] = {}
    seen_ids: list[set[int]] = []
    for t in range(60):
        image, where = _scene(t)
        tracked = tracker.step(image, t=t / 30)
        seen_ids.append({f.track_id for f in tracked})
        for f in tracked:
            centre = f.raw.landmarks.mean(0)
            name = min(where, key=lambda k: np.hypot(*(centre - where[k])))
            assert np.hypot(*(centre - where[name])) < 5, (t, name, centre)
            assert owner.setdefault(name, f.track_id) == f.track_id, f"frame {t}: {name} changed id"
            assert np.isfinite(f.face.landmarks).all()
        if t < 40:
            assert len(tracked) == 2, t  # both found in every frame, crossing included
    assert owner["red"] != owner["green"]
    assert owner["new"] not in (owner["red"], owner["green"])  # a new face gets a new id, never a reused one
    assert owner["green"] not in seen_ids[-1]  # the face that left: its track ended
    assert all(owner["green"] not in ids for ids in seen_ids[48:])
    # the detector ran on the detection frames (and when a track was lost), not on every frame
    assert 12 <= tracker.detections_run < 30


def test_detect_every_frame_mode_crops_from_detections():
    det = LandmarkDetector(BlobNetwork(), detector=BlobDetector())
    tracker = FaceTracker(det, smooth="none", detect_every=1)
    for t in range(12):
        tracked = tracker.step(_scene(t)[0], t=t / 30)
        assert sorted(f.track_id for f in tracked) == [0, 1]
    assert tracker.detections_run == 12


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0


class FadingNetwork(BlobNetwork):
    """Heatmaps 10x wider once ``fade_at`` is set: the network has lost the face."""

    def __init__(self) -> None:
        self.fade_at = None

    def run(self, batch, ambiguity=True):
        points, cov = super().run(batch, ambiguity)
        if self.fade_at is not None:
            cov *= 100.0
        return points, cov


def test_wide_heatmaps_ask_for_a_detection_and_end_the_track():
    net = FadingNetwork()
    det = LandmarkDetector(net, detector=BlobDetector())
    tracker = FaceTracker(det, smooth="none", detect_every=100)
    image = _scene(0)[0]
    for t in range(4):
        assert sorted(f.track_id for f in tracker.step(image, t=t / 30)) == [0, 1]
    assert tracker.detections_run == 1
    net.fade_at = 4
    spread_before = tracker.tracks[0].spreads[0]
    first = tracker.step(image, t=4 / 30)  # spread 10x the track's reference: still reported, detection asked
    assert sorted(f.track_id for f in first) == [0, 1] and first[0].spread > 5 * spread_before
    tracker.step(image, t=5 / 30)  # detection frame; the second wide frame in a row ends both tracks
    assert tracker.detections_run == 2
    later = tracker.step(image, t=6 / 30)  # no tracks left: detect again, new ids
    assert sorted(f.track_id for f in later) == [2, 3]
