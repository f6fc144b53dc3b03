"""YuNet, crops placed from five keypoints (tilted faces reach the network upright), the
Haar fallback, ``refine``, non-finite model output, and the crop convention's module.

Geometry is tested exactly with a stand-in network; YuNet itself on real photos
(scikit-image's astronaut).  Tests needing the YuNet file skip when
``../shared/models`` lacks it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from staralign import crop
from staralign.data.converters import box_to_crop as converter_box_to_crop
from staralign.data.synth import render_face
from staralign.definitions import get_definition
from staralign.inference import LandmarkDetector
from staralign.inference import faces as faces_mod
from staralign.inference.detector import ModelOutputError
from staralign.inference.faces import (
    YUNET_FRAMING,
    HaarDetector,
    YuNetDetector,
    get_face_detector,
    keypoint_frame,
)

from .conftest import REFERENCE_DIR

YUNET_PATH = REFERENCE_DIR.parent / "models" / "face_detection_yunet_2026may.onnx"
HAS_HAAR = hasattr(cv2, "CascadeClassifier")
needs_yunet = pytest.mark.skipif(not YUNET_PATH.is_file(), reason=f"{YUNET_PATH} is absent")
WFLW = get_definition("WFLW")


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """The WFLW layout's five points (right eye, left eye, nose, mouth corners) as YuNet orders them."""
    return np.stack([np.asarray(landmarks)[np.atleast_1d(g)].mean(0) for g in WFLW.five_points])


def rotation(angle_deg: float, center: tuple[float, float]) -> np.ndarray:
    """(3, 3) cv2.getRotationMatrix2D: turns the picture by ``angle_deg`` counter-clockwise on screen."""
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D(center, angle_deg, 1.0)
    return m


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ m[:2, :2].T + m[:2, 2]


class StandIn:
    """A network stand-in: records the crops it is given, answers fixed landmarks and covariances."""

    name = "stand-in"
    definition = WFLW
    input_size = 64
    has_ambiguity = True
    conversions: dict = {}

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.points = rng.uniform(-0.6, 0.6, (98, 2))
        a = rng.normal(size=(98, 2, 2)) * 0.01
        self.cov = a @ np.swapaxes(a, 1, 2) + np.eye(2) * 1e-4
        self.batches: list[np.ndarray] = []

    def run(self, batch: np.ndarray, ambiguity: bool = True):
        self.batches.append(batch.copy())
        n = len(batch)
        return np.tile(self.points, (n, 1, 1)), (np.tile(self.cov, (n, 1, 1, 1)) if ambiguity else None)


class KeypointDetector:
    """A face detector that reports given keypoints (and their bounding box), framed like YuNet."""

    name = "keypoints"
    framing = YUNET_FRAMING

    def __init__(self, keypoints: np.ndarray) -> None:
        self.keypoints = np.asarray(keypoints, np.float64)

    def __call__(self, image: np.ndarray):
        (x1, y1), (x2, y2) = self.keypoints.min(0), self.keypoints.max(0)
        return [((x1, y1, x2, y2), 0.99, self.keypoints)]


# --------------------------------------------------------------------------- the crop convention


def test_crop_module_is_the_one_home_and_round_trips():
    from staralign.data import transforms
    from staralign.inference import geometry

    assert transforms.crop_matrix.__module__ == "staralign.data.transforms"  # a float32 wrapper of crop's
    assert converter_box_to_crop is crop.box_to_crop
    assert transforms.normalize_points is crop.normalize_points and geometry.FACE_SIZE is crop.FACE_SIZE
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 63, (50, 2))
    np.testing.assert_allclose(crop.denormalize_points(crop.normalize_points(pts, 64), 64), pts, atol=1e-12)
    t = torch.from_numpy(pts)
    assert torch.allclose(crop.denormalize_points(crop.normalize_points(t, 64), 64), t)
    for angle in (0.0, 30.0, -75.0):
        m = crop.crop_matrix(1.3, 140.0, 90.0, 64, angle)
        # the centre lands in the crop's middle, scale * 200 pixels span the crop
        np.testing.assert_allclose(apply(m, [[140.0, 90.0]]), [[31.5, 31.5]], atol=1e-9)
        assert np.linalg.det(m[:2, :2]) == pytest.approx((64 / (1.3 * 200)) ** 2)
        back = apply(np.linalg.inv(m), apply(m, pts))
        np.testing.assert_allclose(back, pts, atol=1e-9)
    # angle: the direction (clockwise on screen) of a line that the crop makes horizontal
    m = crop.crop_matrix(1.0, 0.0, 0.0, 64, 30.0)
    d = apply(m, [[math.cos(math.radians(30)), math.sin(math.radians(30))]]) - apply(m, [[0.0, 0.0]])
    assert abs(d[0, 1]) < 1e-12 and d[0, 0] > 0


def test_upright_landmark_crop_is_the_300w_rule_and_turns_with_the_face():
    _, lm, _ = render_face(np.random.default_rng(5), 256)
    lm = lm.astype(np.float64)
    (x1, y1), (x2, y2) = lm.min(0), lm.max(0)
    assert crop.upright_landmark_crop(lm) == crop.box_to_crop(x1, y1, x2, y2)
    scale0, c0 = crop.upright_landmark_crop(lm, 0.0)
    r = rotation(-25.0, (128.0, 128.0))  # the face turns 25 degrees clockwise on screen
    scale1, c1 = crop.upright_landmark_crop(apply(r, lm), 25.0)
    assert scale1 == pytest.approx(scale0, rel=1e-9)
    np.testing.assert_allclose(c1, apply(r, [c0])[0], atol=1e-9)


# --------------------------------------------------------------------------- keypoint crops


@pytest.mark.parametrize("turn", [30.0, -30.0, 90.0])
def test_a_tilted_face_reaches_the_network_upright_and_its_landmarks_turn_back(turn):
    image, lm, _ = render_face(np.random.default_rng(11), 256)
    lm = lm.astype(np.float64)
    r = rotation(turn, (127.5, 127.5))  # the picture turns counter-clockwise by `turn`
    tilted = cv2.warpAffine(image, r[:2].astype(np.float32), (256, 256), flags=cv2.INTER_LINEAR)
    lm_tilted = apply(r, lm)

    upright_net, tilted_net = StandIn(), StandIn()
    upright = LandmarkDetector(upright_net, detector=KeypointDetector(five_points(lm)), ambiguity=True)
    turned = LandmarkDetector(tilted_net, detector=KeypointDetector(five_points(lm_tilted)), ambiguity=True)
    (f0,), (f1,) = upright.detect(image), turned.detect(tilted)

    # The crop's angle is the face's roll: the upright face's plus the turn (clockwise on screen).
    roll0 = keypoint_frame(five_points(lm))["angle"]
    assert f1.angle == pytest.approx(((roll0 - turn) + 180) % 360 - 180, abs=1e-9)
    assert f1.scale == pytest.approx(f0.scale, rel=1e-9)
    np.testing.assert_allclose(f1.center, apply(r, [f0.center])[0], atol=1e-9)
    np.testing.assert_allclose(f1.keypoints, five_points(lm_tilted), atol=1e-9)
    # In the crop the eyes are level: the network sees the face upright.
    m1 = crop.crop_matrix(f1.scale, *f1.center, 64, f1.angle)
    eyes = apply(m1, five_points(lm_tilted)[:2])
    assert abs(eyes[1, 1] - eyes[0, 1]) < 1e-9 and eyes[1, 0] > eyes[0, 0]
    # ... and the same picture as the upright face's crop (up to resampling at the corners).
    a, b = upright_net.batches[0][0], tilted_net.batches[0][0]
    inner = (slice(None), slice(16, 48), slice(16, 48))
    assert np.abs(a[inner] - b[inner]).mean() < 0.05  # normalised units (1 = 127.5 grey levels)
    # Landmarks and ambiguity go back into the tilted photo: the upright answers, turned.
    np.testing.assert_allclose(f1.landmarks, apply(r, f0.landmarks), atol=1e-6)
    rot = r[:2, :2]
    np.testing.assert_allclose(f1.ambiguity.covariance, rot @ f0.ambiguity.covariance @ rot.T, atol=1e-6)
    np.testing.assert_allclose(f1.ambiguity.major, f0.ambiguity.major, rtol=1e-6)


def test_keypoint_framing_without_keypoints_uses_the_box():
    place = YUNET_FRAMING.place((10.0, 20.0, 110.0, 140.0), None)
    assert place[2] == 0.0
    assert place[:2] == YUNET_FRAMING.box.place((10.0, 20.0, 110.0, 140.0))[:2]


def test_refine_recrops_from_the_first_pass_landmarks():
    image, lm, _ = render_face(np.random.default_rng(4), 256)
    det = LandmarkDetector(StandIn(), detector=KeypointDetector(five_points(lm.astype(np.float64))))
    (first,) = det.detect(image)
    (second,) = det.detect(image, refine=True)
    assert not first.refined and second.refined
    want_angle = det._refined_angle(first.landmarks, first.angle)
    scale, center = crop.upright_landmark_crop(first.landmarks, want_angle)
    assert second.angle == pytest.approx(want_angle) and second.scale == pytest.approx(scale)
    np.testing.assert_allclose(second.center, center)
    d = second.to_dict()
    assert d["crop"]["refined"] is True and len(d["keypoints"]) == 5


# --------------------------------------------------------------------------- YuNet


@needs_yunet
def test_yunet_finds_the_astronaut_with_keypoints_where_her_face_is():
    skimage_data = pytest.importorskip("skimage.data")
    image = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
    found = YuNetDetector(YUNET_PATH)(image)
    assert len(found) == 1, found
    (x1, y1, x2, y2), score, kps = found[0]
    assert score > 0.8
    # Eileen Collins's face in the 512 x 512 picture: roughly x 170-260, y 50-160.
    assert 150 < x1 < (x1 + x2) / 2 < x2 < 290 and 20 < y1 < (y1 + y2) / 2 < y2 < 190
    assert kps.shape == (5, 2) and np.all((kps >= [x1, y1]) & (kps <= [x2, y2]))
    assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]  # right eye and mouth corner on the image's left
    assert kps[:2, 1].max() < kps[2, 1] < kps[3:, 1].min()  # eyes above the nose above the mouth
    # The placed crop covers the face: landmarks of a network would fall inside.
    scale, center, angle = YUNET_FRAMING.place(found[0][0], kps)
    assert x1 - 20 < center[0] < x2 + 20 and abs(angle) < 20 and 0.5 < scale * 200 / (x2 - x1) < 2.0


@needs_yunet
@pytest.mark.parametrize("turn", [30.0, -60.0])
def test_yunet_roll_search_reads_a_tilted_face_so_the_crop_turns_with_it(turn):
    skimage_data = pytest.importorskip("skimage.data")
    image = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
    upright = YuNetDetector(YUNET_PATH)(image)[0]
    roll0 = YUNET_FRAMING.place(upright[0], upright[2])[2]
    tilted = cv2.warpAffine(image, rotation(turn, (255.5, 255.5))[:2], (512, 512))
    found = YuNetDetector(YUNET_PATH)(tilted)
    assert len(found) == 1
    angle = YUNET_FRAMING.place(found[0][0], found[0][2])[2]
    assert abs(((angle - (roll0 - turn)) + 180) % 360 - 180) < 10  # the face's roll, clockwise on screen
    # YuNet's own keypoints barely turn with the face: why the search is there.
    raw = YuNetDetector(YUNET_PATH, roll_search=None)(tilted)[0]
    assert abs(keypoint_frame(raw[2])["angle"] - roll0) < abs(turn) / 2


@needs_yunet
def test_yunet_reduces_large_images_and_maps_boxes_back():
    skimage_data = pytest.importorskip("skimage.data")
    small = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
    big = cv2.resize(small, (2048, 2048), interpolation=cv2.INTER_CUBIC)  # 4x
    whole = YuNetDetector(YUNET_PATH, max_side=None)(big)
    reduced = YuNetDetector(YUNET_PATH, max_side=1024)(big)
    assert whole and reduced  # the surest of each (the whole 2048 px search also finds a badge)
    side = whole[0][0][2] - whole[0][0][0]
    np.testing.assert_allclose(reduced[0][0], whole[0][0], atol=0.05 * side)
    np.testing.assert_allclose(reduced[0][2], whole[0][2], atol=0.08 * side)  # YuNet differs a little by scale
    at_own_size = YuNetDetector(YUNET_PATH)(small)
    np.testing.assert_allclose(np.asarray(reduced[0][0]) + 0.5, (np.asarray(at_own_size[0][0]) + 0.5) * 4,
                               atol=0.05 * side)


@needs_yunet
def test_yunet_is_fetched_from_the_cache_by_name(yunet_cached):
    det = get_face_detector("yunet")
    assert isinstance(det, YuNetDetector) and det.model_path == yunet_cached


@pytest.mark.skipif(not HAS_HAAR, reason="this OpenCV has no Haar cascades")
def test_without_the_yunet_file_it_falls_back_to_haar_with_one_warning_line(capsys, monkeypatch):
    # conftest: an empty cache and STARALIGN_OFFLINE, so staralign.hub.fetch raises Unavailable.
    monkeypatch.setattr(faces_mod, "_FALLBACK_WARNED", set())
    det = get_face_detector("yunet")
    assert isinstance(det, HaarDetector)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "staralign models download yunet" in err[0] and "face_detection_yunet_2026may.onnx" in err[0]
    get_face_detector("yunet")  # the same reason again: no second warning
    assert capsys.readouterr().err == ""


def test_a_bad_explicit_yunet_file_is_an_error(tmp_path):
    bad = tmp_path / "yunet.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(faces_mod.FaceDetectorError, match="yunet.onnx"):
        YuNetDetector(bad)
    with pytest.raises(faces_mod.FaceDetectorError, match="not found"):
        YuNetDetector(tmp_path / "missing.onnx")


# --------------------------------------------------------------------------- sanity of outputs


def test_nan_weights_raise_an_error_naming_the_file(nan_wflw_weights):
    path = nan_wflw_weights
    det = LandmarkDetector.from_checkpoint(path, device="cpu", detector="none")
    with pytest.raises(ModelOutputError, match=r"diverged\.safetensors: the model's output is not finite"):
        det.detect(np.zeros((64, 64, 3), np.uint8))


def test_predict_with_nan_weights_is_a_one_line_error(tmp_path, capsys, nan_wflw_weights):
    from staralign.cli import main

    path = nan_wflw_weights
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), render_face(np.random.default_rng(0), 96)[0])
    out = tmp_path / "out.json"
    assert main(["predict", str(image), "--weights", str(path), "--detector", "none", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged.safetensors" in err[0] and "not finite" in err[0]
    assert not out.exists()  # no report with null landmarks


@pytest.mark.skipif(not HAS_HAAR, reason="this OpenCV has no Haar cascades")
def test_bench_detect_prints_one_json_result_per_detector_and_size(capsys):
    import json

    from staralign.cli import main

    detectors = "yunet,opencv" if YUNET_PATH.is_file() else "opencv"
    argv = ["bench", "detect", "--json", "--sizes", "96x64,128x96", "--detectors", detectors,
            "--iters", "1", "--repeats", "3"] + (["--yunet", str(YUNET_PATH)] if YUNET_PATH.is_file() else [])
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "detect" and out["cpu_count"] >= 1 and len(out["load_average_before"]) == 3
    got = {(r["detector"], r["width"], r["height"]) for r in out["results"]}
    assert got == {(d, w, h) for d in detectors.split(",") for w, h in ((96, 64), (128, 96))}
    assert all(0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"] for r in out["results"])  # 3 samples each
    assert all(isinstance(r["faces"], int) and r["faces"] >= 0 for r in out["results"])
