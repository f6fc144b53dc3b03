"""``staralign predict``: folders, odd images, videos, JSON, annotated outputs and errors."""

from __future__ import annotations

import json
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from staralign.cli import main
from staralign.config import ModelConfig
from staralign.data.synth import render_face
from staralign.models import build_model, save_model

from .conftest import reference_path

HAS_HAAR = hasattr(cv2, "CascadeClassifier")
VIDEO_FRAMES, VIDEO_FPS = 6, 12.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2), "WFLW").eval()
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _huge_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _write_video(path, codec: str, frames: int = VIDEO_FRAMES) -> bool:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), VIDEO_FPS, (128, 96))
    if not writer.isOpened():
        return False
    for i in range(frames):
        writer.write(cv2.resize(render_face(np.random.default_rng(i), 128)[0], (128, 96)))
    writer.release()
    return True


def _count_frames(path) -> tuple[int, float]:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return n, fps


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of awkward inputs: grey, RGBA, 16-bit, EXIF-rotated, videos, a broken and a huge file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    (root / "nested").mkdir()
    image = render_face(np.random.default_rng(2), 160)[0][:, :120]  # 160 x 120, not square
    cv2.imwrite(str(root / "plain.png"), image)
    cv2.imwrite(str(root / "nested" / "grey.png"), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(root / "nested" / "rgba.png"), cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(root / "deep.png"), image.astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(np.ascontiguousarray(np.rot90(image, 1)[:, :, ::-1])).save(root / "exif.jpg", exif=exif)
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "huge.png").write_bytes(_huge_png(30000, 30000))
    assert _write_video(root / "clip.avi", "MJPG"), "every OpenCV build writes Motion-JPEG"
    videos = ["clip.avi"]
    if _write_video(root / "clip.mp4", "mp4v"):
        videos.append("clip.mp4")
    return {"root": root, "shape": image.shape, "videos": videos}


def _check_face(face: dict, points: int, with_ambiguity: bool) -> None:
    assert set(face) >= {"box", "score", "landmarks", "layout", "crop"}
    assert len(face["box"]) == 4 and all(isinstance(v, float) for v in face["box"])
    assert face["score"] is None or isinstance(face["score"], float)
    assert len(face["landmarks"]) == points
    assert all(len(p) == 2 and all(isinstance(v, float) and np.isfinite(v) for v in p) for p in face["landmarks"])
    if with_ambiguity:
        amb = face["ambiguity"]
        assert len(amb["major_std"]) == len(amb["minor_std"]) == len(amb["tangent"]) == points
        assert all(a >= b >= 0 for a, b in zip(amb["major_std"], amb["minor_std"], strict=True))
        assert all(abs(np.hypot(*t) - 1) < 1e-3 for t in amb["tangent"])
    else:
        assert "ambiguity" not in face


def test_predict_folder_of_awkward_inputs(weights, inputs, tmp_path, capsys):
    root = inputs["root"]
    out, report_path = tmp_path / "out", tmp_path / "out" / "landmarks.json"
    rc = main(["predict", str(root), str(tmp_path / "missing.jpg"), "--weights", str(weights), "--detector",
               "none", "--out-dir", str(out), "--json", str(report_path), "--draw-ambiguity", "--batch-size", "3"])
    err = capsys.readouterr().err
    assert rc == 1  # something was skipped
    for name in ("broken.jpg", "huge.png", "missing.jpg"):
        assert name in err
    assert "too large" in err and "Traceback" not in err

    report = json.loads(report_path.read_text())
    assert report["layout"] == "WFLW" and report["num_points"] == 98 and report["backend"] == "torch"
    assert {e["path"].rsplit("/", 1)[-1] for e in report["errors"]} == {"broken.jpg", "huge.png", "missing.jpg"}
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in report["inputs"]}
    images = {"plain.png", "grey.png", "rgba.png", "deep.png", "exif.jpg"}
    assert set(by_name) == images | set(inputs["videos"])
    h, w = inputs["shape"][:2]
    for name in images:
        record = by_name[name]
        assert record["type"] == "image" and (record["height"], record["width"]) == (h, w), name
        assert len(record["faces"]) == 1
        _check_face(record["faces"][0], 98, with_ambiguity=True)
        drawn = cv2.imread(record["output"])
        assert drawn.shape == (h, w, 3)
    # Folders are mirrored under --out-dir.
    assert (out / root.name / "nested" / "grey.png").is_file()
    # The EXIF-rotated JPEG was read upright, so its face is where the plain one's is.
    np.testing.assert_allclose(by_name["exif.jpg"]["faces"][0]["landmarks"],
                               by_name["plain.png"]["faces"][0]["landmarks"], atol=2.0)
    for name in inputs["videos"]:
        record = by_name[name]
        assert record["type"] == "video" and record["frame_count"] == VIDEO_FRAMES
        assert record["fps"] == pytest.approx(VIDEO_FPS)
        assert [f["index"] for f in record["frames"]] == list(range(VIDEO_FRAMES))
        _check_face(record["frames"][0]["faces"][0], 98, with_ambiguity=True)
        frames, fps = _count_frames(record["output"])
        assert frames == VIDEO_FRAMES and fps == pytest.approx(VIDEO_FPS)


def test_predict_full_model_with_box_and_68_points(tmp_path, capsys):
    path = reference_path("wflw_random.pkl")
    image, _, info = render_face(np.random.default_rng(4), 256)
    cv2.imwrite(str(tmp_path / "face.png"), image)
    box = ",".join(f"{v:.1f}" for v in info["face_box"])
    rc = main(["predict", str(tmp_path / "face.png"), "--weights", str(path), "--box", box, "--format", "68",
               "--json", "-"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "300W" and report["num_points"] == 68 and report["detector"] == "box"
    face = report["inputs"][0]["faces"][0]
    _check_face(face, 68, with_ambiguity=False)
    x1, y1, x2, y2 = info["face_box"]
    pts = np.asarray(face["landmarks"])
    margin = 0.03 * (x2 - x1) + 1
    assert (pts[:, 0] >= x1 - margin).all() and (pts[:, 0] <= x2 + margin).all()
    assert (pts[:, 1] >= y1 - margin).all() and (pts[:, 1] <= y2 + margin).all()


def test_default_detector_no_face_or_clear_error(weights, tmp_path, capsys):
    flat = tmp_path / "wall.png"
    cv2.imwrite(str(flat), np.full((120, 160, 3), 90, np.uint8))
    rc = main(["predict", str(flat), "--weights", str(weights), "--json", str(tmp_path / "r.json")])
    if HAS_HAAR:
        assert rc == 0
        assert json.loads((tmp_path / "r.json").read_text())["inputs"][0]["faces"] == []
    else:  # OpenCV 5 ships no cascades: a one-line error that says what to do
        err = capsys.readouterr().err
        assert rc == 2 and "opencv-python-headless<5" in err and "Traceback" not in err


def test_bad_arguments_and_checkpoints_are_user_errors(weights, tmp_path, capsys):
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    assert main(["predict", str(image), "--weights", str(weights), "--box", "1,2,3"]) == 2
    assert "--box" in capsys.readouterr().err
    for box in ("0,0,inf,inf", "0,0,nan,5", "1,2,x,4", "5,5,1,1"):  # never NaN landmarks
        assert main(["predict", str(image), "--weights", str(weights), "--box", box]) == 2, box
        err = capsys.readouterr().err
        assert "--box" in err and "Traceback" not in err
    pickled = tmp_path / "needs_pickle.pkl"
    torch.save({"net": {"w": torch.zeros(1)}, "args": ModelConfig()}, pickled)
    assert main(["predict", str(image), "--weights", str(pickled), "--detector", "none"]) == 2
    err = capsys.readouterr().err
    assert "needs_pickle.pkl" in err and "--allow-pickle" in err
    assert main(["predict", str(image), "--weights", str(tmp_path / "none.pkl"), "--detector", "none"]) == 2
    assert "none.pkl" in capsys.readouterr().err


def test_only_unreadable_inputs_exit_nonzero(weights, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "gone"), "--weights", str(weights), "--detector", "none"]) == 1
    assert "gone" in capsys.readouterr().err
