"""``staralign predict`` on a video with tracking: one JSON frame per video frame, track ids, filtered ambiguity."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from staralign.cli import main
from staralign.data.synth.sequence import synth_sequence


@pytest.fixture(scope="module")
def weights(tiny_wflw_weights):
    return tiny_wflw_weights


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    seq = synth_sequence(3, frames=7, size=96)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 96))
    assert writer.isOpened(), "every OpenCV build writes Motion-JPEG"
    for frame in seq.frames:
        writer.write(frame)
    writer.release()
    cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    return path, count


@pytest.mark.parametrize("smooth", ["none", "oneeuro", "ambiguity"])
def test_video_json_has_one_frame_per_video_frame(weights, video, tmp_path, smooth):
    path, count = video
    out = tmp_path / "out.json"
    code = main(["predict", str(path), "--weights", str(weights), "--detector", "none", "--json", str(out),
                 "--smooth", smooth, "--detect-every", "3", "--ambiguity", "--out-dir", str(tmp_path / "drawn")])
    assert code == 0
    record = json.loads(out.read_text())["inputs"][0]
    assert count == 7
    assert record["type"] == "video" and record["frame_count"] == count == len(record["frames"])
    assert [f["index"] for f in record["frames"]] == list(range(count))
    first = record["frames"][0]["faces"]
    assert len(first) == 1 and first[0]["track_id"] == 0 and first[0]["detected"] is True
    for frame in record["frames"]:
        for face in frame["faces"]:
            assert isinstance(face["track_id"], int)
            assert len(face["landmarks"]) == 98 and np.isfinite(face["landmarks"]).all()
            amb = face["ambiguity"]
            assert all(a >= b >= 0 for a, b in zip(amb["major_std"], amb["minor_std"], strict=True))
    drawn = list((tmp_path / "drawn").iterdir())
    assert len(drawn) == 1
    cap = cv2.VideoCapture(str(drawn[0]))
    written = 0
    while cap.read()[0]:
        written += 1
    cap.release()
    assert written == count


def test_detect_every_must_be_positive(weights, video, capsys):
    path, _ = video
    assert main(["predict", str(path), "--weights", str(weights), "--detect-every", "0"]) != 0
    assert "--detect-every" in capsys.readouterr().err


def test_video_in_another_layout_is_tracked_in_the_model_layout(weights, video, tmp_path):
    path, count = video
    out = tmp_path / "out.json"
    assert main(["predict", str(path), "--weights", str(weights), "--detector", "none", "--json", str(out),
                 "--format", "68", "--ambiguity"]) == 0
    frames = json.loads(out.read_text())["inputs"][0]["frames"]
    assert len(frames) == count
    faces = [f for fr in frames for f in fr["faces"]]
    assert faces and all(f["layout"] == "300W" and len(f["landmarks"]) == 68 for f in faces)
    assert all(len(f["ambiguity"]["major_std"]) == 68 for f in faces)


@pytest.mark.parametrize("detect_every", ["1", "3"])
def test_video_with_the_default_yunet_detector(weights, tmp_path, yunet_cached, detect_every):
    """YuNet's detections carry five keypoints and a keypoint framing: the tracker takes them (it
    once unpacked only (box, score) and the default video path crashed)."""
    path = tmp_path / "faces.avi"
    seq = synth_sequence(5, frames=6, size=256)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (256, 256))
    for frame in seq.frames:
        writer.write(frame)
    writer.release()
    out = tmp_path / "out.json"
    assert main(["predict", str(path), "--weights", str(weights), "--json", str(out),
                 "--detect-every", detect_every]) == 0
    record = json.loads(out.read_text())["inputs"][0]
    assert record["frame_count"] == len(record["frames"]) == 6
    faces = [f for frame in record["frames"] for f in frame["faces"]]
    assert faces and {f["track_id"] for f in faces} == {0}  # YuNet finds the synthetic face; one track
    assert json.loads(out.read_text())["detector"] == "yunet"
