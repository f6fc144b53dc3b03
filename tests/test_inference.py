"""Inference API: crop geometry, inputs, face detectors, ambiguity, 98 -> 68, gradients, drawing."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from staralign import LandmarkDetector
from staralign.config import ModelConfig
from staralign.data import converters, transforms
from staralign.data.converters import box_to_crop as dataset_box_to_crop
from staralign.data.landmark_formats import convert_landmarks
from staralign.data.synth import render_face
from staralign.definitions import get_definition
from staralign.inference import geometry
from staralign.inference.detector import Ambiguity, Face
from staralign.inference.differentiable import DifferentiableLandmarks
from staralign.inference.faces import (
    HAAR_FRAMING,
    BoxFraming,
    DlibDetector,
    FaceDetector,
    FaceDetectorError,
    FixedBoxes,
    HaarDetector,
    MediaPipeDetector,
    WholeImage,
    calibrate_framing,
    get_face_detector,
    parse_box,
)
from staralign.inference.inputs import ImageReadError, as_bgr, load_image
from staralign.models import build_model, save_model
from staralign.viz import draw_landmarks, make_grid

from .conftest import load_reference, reference_path

HAS_HAAR = hasattr(cv2, "CascadeClassifier")


def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2), "WFLW").eval()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_model(tiny_model(), tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def face():
    image, landmarks, info = render_face(np.random.default_rng(3), 256)
    return image, landmarks.astype(np.float64), info


class ExactBackend:
    """Answers with given normalised landmarks/covariances: the pipeline's maths in isolation."""

    name = "exact"
    has_ambiguity = True
    conversions: dict = {}

    def __init__(self, size, landmarks, covariance):
        self.definition, self.input_size = get_definition("WFLW"), size
        self.landmarks, self.covariance = landmarks, covariance
        self.batches = []

    def run(self, batch, ambiguity=True):
        self.batches.append(batch.shape)
        n = len(batch)
        return np.repeat(self.landmarks[None], n, 0), np.repeat(self.covariance[None], n, 0)


# --------------------------------------------------------------------------- geometry


def test_crop_geometry_is_the_datasets():
    box = (31.0, 40.5, 170.0, 201.0)
    scale, center = geometry.box_to_crop(box)
    want_scale, want_center = dataset_box_to_crop(*box)
    assert scale == pytest.approx(want_scale) and center == pytest.approx(want_center)
    # One source: the box -> crop rule and its constants are the converters' own.
    assert (scale, center) == (want_scale, want_center)
    assert (geometry.BOX_MARGIN, geometry.FACE_SIZE) == (converters.BOX_MARGIN, converters.FACE_SIZE)
    assert geometry.FACE_SIZE == transforms.FACE_SIZE
    with pytest.raises(ValueError, match="empty"):
        geometry.box_to_crop((10, 10, 5, 20))
    np.testing.assert_allclose(geometry.crop_matrix(scale, center, 256),
                               transforms.crop_matrix(scale, *center, size=256), rtol=1e-6, atol=1e-4)
    pts = np.random.default_rng(0).uniform(-1, 1, (5, 2))
    np.testing.assert_allclose(geometry.denormalize_points(pts, 64), transforms.denormalize_points(pts, 64))
    for case in load_reference("crop_matrix.pt"):
        m = geometry.crop_matrix(case["scale"], (case["center_w"], case["center_h"]), 256)
        np.testing.assert_allclose(m, case["matrix"].double().numpy(), atol=1e-4)


def test_crop_and_uncrop_round_trip_without_a_model(face):
    """Known landmarks -> crop (the dataset's functions) -> normalised -> back to the image."""
    image, landmarks, info = face
    scale, center = geometry.box_to_crop(info["face_box"])
    matrix = transforms.crop_matrix(scale, *center, size=256)
    normalised = transforms.normalize_points(transforms.transform_points(landmarks, matrix), 256)
    back = geometry.points_to_image(normalised, geometry.crop_matrix(scale, center, 256), 256)
    np.testing.assert_allclose(back, landmarks, atol=1e-3)


def test_crop_content_lands_where_the_matrix_says():
    """A bright dot in the image is found in the crop where the matrix maps it, and maps back."""
    image = np.zeros((300, 400, 3), np.uint8)
    dot = np.array([233.0, 121.0])
    image[int(dot[1]), int(dot[0])] = 255
    box = (150.0, 60.0, 290.0, 200.0)  # a 140 px face -> zoom 256 / 147 > 1: the dot spreads
    scale, center = geometry.box_to_crop(box)
    m = geometry.crop_matrix(scale, center, 256)
    crop = geometry.crop_image(image, m, 256)[:, :, 0].astype(np.float64)
    ys, xs = np.mgrid[:256, :256]
    found = np.array([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()
    expected = transforms.transform_points(dot[None], m)[0]
    np.testing.assert_allclose(found, expected, atol=0.1)
    normalised = (2 * found + 1) / 256 - 1
    np.testing.assert_allclose(geometry.points_to_image(normalised[None], m, 256)[0], dot, atol=0.1)


def test_detect_maps_network_output_back_to_the_image(face):
    image, landmarks, info = face
    box = info["face_box"]
    scale, center = geometry.box_to_crop(box)
    m = transforms.crop_matrix(scale, *center, size=256)
    normalised = transforms.normalize_points(transforms.transform_points(landmarks, m), 256)
    # Anisotropic covariance along x in normalised units.
    cov = np.tile(np.array([[4e-4, 0.0], [0.0, 1e-4]]), (98, 1, 1))
    backend = ExactBackend(256, normalised, cov)
    det = LandmarkDetector(backend, detector="none", batch_size=2)
    faces = det.detect(image, box=box)
    assert len(faces) == 1
    f = faces[0]
    np.testing.assert_allclose(f.landmarks, landmarks, atol=1e-3)
    assert f.box == pytest.approx(box) and f.score is None and f.layout == "WFLW"
    # One normalised unit is S / 2 crop pixels = scale * 100 image pixels.
    np.testing.assert_allclose(f.ambiguity.major, np.sqrt(4e-4) * scale * 100, rtol=1e-6)
    np.testing.assert_allclose(f.ambiguity.minor, np.sqrt(1e-4) * scale * 100, rtol=1e-6)
    np.testing.assert_allclose(np.abs(f.ambiguity.tangent), np.tile([1.0, 0.0], (98, 1)), atol=1e-9)
    # Three boxes on two images: one batch of 2 and one of 1, results in order.
    out = det.detect_batch([image, image], boxes=[[box, box], box])
    assert [len(x) for x in out] == [2, 1] and backend.batches[-2:] == [(2, 3, 256, 256), (1, 3, 256, 256)]


def test_ambiguity_follows_a_rotated_covariance():
    angle = np.radians(30)
    t = np.array([np.cos(angle), np.sin(angle)])
    n = np.array([-t[1], t[0]])
    cov = 9.0 * np.outer(t, t) + 1.0 * np.outer(n, n)
    amb = Ambiguity.from_covariance(cov[None])
    assert amb.major[0] == pytest.approx(3.0) and amb.minor[0] == pytest.approx(1.0)
    np.testing.assert_allclose(amb.tangent[0], t, atol=1e-9)
    mirrored = cov * np.array([[1, -1], [-1, 1]])  # the same ellipse mirrored: tangent at -30 degrees
    amb = Ambiguity.from_covariance(np.stack([mirrored, cov]))
    np.testing.assert_allclose(amb.tangent, [[t[0], -t[1]], t], atol=1e-9)  # signs normalised to x >= 0


# --------------------------------------------------------------------------- the real network


def test_detect_with_a_box_tiny_model(tiny_path, face):
    image, _, info = face
    det = LandmarkDetector.from_checkpoint(tiny_path, device="cpu")
    box = info["face_box"]
    faces = det.detect(image, box=box)
    assert len(faces) == 1
    f = faces[0]
    assert f.landmarks.shape == (98, 2) and np.isfinite(f.landmarks).all()
    assert f.ambiguity.major.shape == (98,) and f.ambiguity.tangent.shape == (98, 2)
    assert (f.ambiguity.major >= f.ambiguity.minor).all()
    # Soft-argmax stays inside the crop, which is the box widened by 5 %.
    side = box[2] - box[0]
    lo, hi = np.array(box[:2]) - 0.03 * side - 1, np.array(box[2:]) + 0.03 * side + 1
    assert ((f.landmarks >= lo) & (f.landmarks <= hi)).all()
    # The same image as RGB, as a path, as a PIL image: the same answer.
    rgb = det.detect(image[:, :, ::-1], color="rgb", box=box)[0]
    np.testing.assert_allclose(rgb.landmarks, f.landmarks, atol=1e-6)
    from PIL import Image

    pil = det.detect(Image.fromarray(image[:, :, ::-1].copy()), box=box)[0]
    np.testing.assert_allclose(pil.landmarks, f.landmarks, atol=1e-6)


def test_format_68_from_a_98_point_model(tiny_path, face):
    image, _, info = face
    det = LandmarkDetector.from_checkpoint(tiny_path, device="cpu", detector="none")
    native = det.detect(image, box=info["face_box"])
    f68 = det.detect(image, box=info["face_box"], format="68")[0]
    assert f68.landmarks.shape == (68, 2) and f68.layout == "300W"
    np.testing.assert_allclose(f68.landmarks, convert_landmarks(native[0].landmarks, "WFLW", "300W"))
    assert f68.ambiguity.major.shape == (68,)
    # Point 30 (nose tip) is WFLW 54 unchanged, ambiguity included.
    assert f68.ambiguity.major[30] == pytest.approx(native[0].ambiguity.major[54])
    converted = det.convert(native, "68")[0]
    np.testing.assert_allclose(converted.landmarks, f68.landmarks)
    assert LandmarkDetector.from_checkpoint(tiny_path, detector="none", format="68").detect(
        image)[0].landmarks.shape == (68, 2)
    with pytest.raises(ValueError, match="COFW"):
        det.convert(native, "COFW")


class LayoutBackend:
    """No network: only what the detector needs to answer which layouts a model gives."""

    name, input_size, has_ambiguity = "stub", 64, False

    def __init__(self, definition: str, conversions: dict | None = None):
        self.definition, self.conversions = get_definition(definition), conversions or {}


def test_formats_lists_what_detect_accepts():
    wflw = LandmarkDetector(LayoutBackend("WFLW"), detector=None)
    formats = wflw.formats()
    assert list(formats) == ["native", "68", "98", "WFLW", "300W"]
    assert {k: v.name for k, v in formats.items()} == {"native": "WFLW", "68": "300W", "98": "WFLW",
                                                       "WFLW": "WFLW", "300W": "300W"}
    assert formats["68"] is get_definition("300W") and wflw.layout() is wflw.definition
    assert [d.name for d in map(wflw.layout, ("native", "98", "68", "300w"))] == ["WFLW", "WFLW", "300W", "300W"]
    for fmt in ("29", "COFW", "300VW"):
        with pytest.raises(ValueError):
            wflw.layout(fmt)
    # No conversions from 300W: its own name, alias and "native" only.
    assert {k: v.name for k, v in LandmarkDetector(LayoutBackend("300W"), detector=None).formats().items()} == \
        {"native": "300W", "68": "300W", "300W": "300W"}
    # A conversion stored in the model file (as ONNX files carry them) counts too.
    stored = LandmarkDetector(LayoutBackend("300W", {"WFLW": np.zeros((98, 68))}), detector=None)
    assert list(stored.formats()) == ["native", "68", "98", "300W", "WFLW"]
    # The detector's default format is its layout(); "native" is still the model's.
    as68 = LandmarkDetector(LayoutBackend("WFLW"), detector=None, format="68")
    assert as68.layout().name == "300W" and as68.layout("native").name == "WFLW"
    assert as68.formats()["native"].name == "WFLW"


def test_a_registered_conversion_becomes_a_format():
    from staralign.data.landmark_formats import CONVERSIONS, register_conversion

    det = LandmarkDetector(LayoutBackend("WFLW"), detector=None)
    assert "COFW" not in det.formats()
    register_conversion("WFLW", "COFW", 98, [[(i, 1.0)] for i in range(29)])
    register_conversion("WFLW", "NOSUCHLAYOUT", 98, [[(0, 1.0)]])  # no definition: not offered
    try:
        formats = det.formats()
        assert formats["29"].name == formats["COFW"].name == "COFW" and "NOSUCHLAYOUT" not in formats
        assert list(formats) == ["native", "68", "98", "29", "WFLW", "300W", "COFW"]
    finally:
        CONVERSIONS.pop(("WFLW", "COFW"))
        CONVERSIONS.pop(("WFLW", "NOSUCHLAYOUT"))


def test_native_means_the_models_layout_for_any_default_format(tiny_path, face):
    image, _, info = face
    det = LandmarkDetector.from_checkpoint(tiny_path, device="cpu", detector="none", format="68")
    assert det.detect(image, box=info["face_box"])[0].layout == "300W"
    native = det.detect(image, box=info["face_box"], format="native")[0]
    assert native.layout == "WFLW" and native.landmarks.shape == (98, 2)


def test_format_68_converts_before_building_the_ambiguity(tiny_path, face, monkeypatch):
    """The same numbers as converting afterwards, with one eigen-decomposition per face."""
    image, _, info = face
    det = LandmarkDetector.from_checkpoint(tiny_path, device="cpu", detector="none")
    native = det.detect(image, box=[info["face_box"], (0, 0, 200, 210)])
    calls = []
    real = Ambiguity.from_covariance.__func__
    monkeypatch.setattr(Ambiguity, "from_covariance",
                        classmethod(lambda cls, cov: calls.append(len(cov)) or real(cls, cov)))
    f68 = det.detect(image, box=[info["face_box"], (0, 0, 200, 210)], format="68")
    assert calls == [68, 68]  # never for the 98 points thrown away
    for got, want in zip(f68, det.convert(native, "68"), strict=True):
        assert got.layout == want.layout == "300W" and got.box == want.box
        np.testing.assert_array_equal(got.landmarks, want.landmarks)
        for name in ("covariance", "major", "minor", "tangent"):
            np.testing.assert_array_equal(getattr(got.ambiguity, name), getattr(want.ambiguity, name))
    assert det.detect(image, box=info["face_box"], format="68", ambiguity=False)[0].ambiguity is None
    with pytest.raises(ValueError, match="COFW"):
        det.detect(image, box=info["face_box"], format="COFW")


def test_full_size_reference_checkpoint_end_to_end(face):
    path = reference_path("wflw_random.pkl")
    image, _, info = face
    det = LandmarkDetector.from_checkpoint(path, device="cpu", detector="none")
    assert det.input_size == 256 and det.definition.num_points == 98
    faces = det.detect(image)  # the whole image is the face
    assert len(faces) == 1 and faces[0].landmarks.shape == (98, 2)
    assert faces[0].box == pytest.approx((-0.5, -0.5, 255.5, 255.5))
    d = faces[0].to_dict()
    assert len(d["landmarks"]) == 98 and len(d["ambiguity"]["major_std"]) == 98


def test_face_to_dict_is_plain_json(face):
    import json

    f = Face((1.0, 2.0, 3.0, 4.0), np.ones((3, 2)), 0.5, Ambiguity.from_covariance(np.tile(np.eye(2), (3, 1, 1))),
             "WFLW", 1.2, (2.0, 3.0))
    d = json.loads(json.dumps(f.to_dict()))
    assert d["box"] == [1.0, 2.0, 3.0, 4.0] and d["score"] == 0.5 and d["landmarks"] == [[1.0, 1.0]] * 3
    assert set(d["ambiguity"]) == {"major_std", "minor_std", "tangent"}
    assert "ambiguity" not in f.to_dict(ambiguity=False)
    # A diverged checkpoint's NaN/Inf landmarks are nulls: the JSON stays strict.
    points = np.array([[1.0, np.nan], [np.inf, 2.0], [3.0, 4.0]])
    bad = Face((1.0, 2.0, 3.0, 4.0), points, 0.5, Ambiguity.from_covariance(np.full((3, 2, 2), np.nan)))
    d = json.loads(json.dumps(bad.to_dict(), allow_nan=False))
    assert d["landmarks"] == [[1.0, None], [None, 2.0], [3.0, 4.0]]
    assert d["ambiguity"]["major_std"] == [None] * 3


# --------------------------------------------------------------------------- inputs


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data needed to refuse it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(12000, 12000), (30000, 30000), (25000, 10)])
def test_absurd_image_is_refused_naming_the_file(tmp_path, size):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(*size))
    with pytest.raises(ImageReadError, match=r"huge\.png.*too large"):
        load_image(path)
    with pytest.raises(ImageReadError, match="too large"):
        as_bgr(np.zeros((1, 20001), np.uint8))


def _tiff_header(width: int, height: int) -> bytes:
    """An uncompressed grey TIFF whose header claims width x height (a type only Pillow sizes)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
            (278, 4, height), (279, 4, width * height)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def test_files_are_read_once_and_sized_from_the_header(tmp_path, face, monkeypatch):
    from PIL import Image

    image = face[0][:40, :60]
    cv2.imwrite(str(tmp_path / "a.png"), image)
    cv2.imwrite(str(tmp_path / "a.jpg"), image)
    reads, real_fromfile = [], np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: reads.append(a[0]) or real_fromfile(*a, **k))
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("Pillow opened a PNG or JPEG"))
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), image)
    assert load_image(tmp_path / "a.jpg").shape == (40, 60, 3)
    assert len(reads) == 2  # one read per file: the header check and the decoder share the bytes
    # Types the header reader does not know: Pillow reads their header.
    monkeypatch.setattr(Image, "open", real_open)
    Image.fromarray(image[:, :, ::-1]).save(tmp_path / "a.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "a.tif"), image)


@pytest.mark.parametrize("size", [(25000, 10), (30000, 30000)])
def test_tiff_bombs_are_refused_before_decoding(tmp_path, size, monkeypatch):
    (tmp_path / "bomb.tif").write_bytes(_tiff_header(*size))
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded an oversize image"))
    with pytest.raises(ImageReadError, match=r"bomb\.tif.*too large.*100 megapixels, 20000 pixels a side"):
        load_image(tmp_path / "bomb.tif")


def test_corrupt_header_of_a_known_type_is_named(tmp_path):
    (tmp_path / "cut.png").write_bytes(_png_header(64, 64)[:20])
    with pytest.raises(ImageReadError, match=r"cut\.png.*truncated PNG header"):
        load_image(tmp_path / "cut.png")


def test_one_size_check_with_its_limits():
    from staralign.data.images import check_size, header_size

    check_size(20000, 5000)
    with pytest.raises(ImageReadError, match=r"x\.png.*9x9 pixels.*limits: 8e-05 megapixels, 9 pixels a side"):
        check_size(9, 9, "x.png", max_pixels=80, max_side=9)
    with pytest.raises(ImageReadError, match="10x1 pixels"):
        check_size(10, 1, max_side=9)
    data = _png_header(70, 30)
    assert header_size(data) == header_size(np.frombuffer(data, np.uint8)) == header_size(memoryview(data)) == (70, 30)
    assert header_size(_tiff_header(5, 5)) is None


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.jpg"):
        load_image(tmp_path / "nothere.jpg")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        load_image(tmp_path / "bad.png")


def test_grey_rgba_16bit_and_exif_inputs(tmp_path, face):
    from PIL import Image

    image = face[0][:200, :120]  # not square, so a rotation shows
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    bgra = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    cv2.imwrite(str(tmp_path / "deep.png"), image.astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png"), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), image)
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png"), image)
    np.testing.assert_array_equal(as_bgr(image.astype(np.uint16) * 257), image)
    np.testing.assert_array_equal(as_bgr(bgra), image)
    np.testing.assert_array_equal(as_bgr(cv2.cvtColor(image, cv2.COLOR_BGR2RGBA), "rgb"), image)
    # EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to be seen upright.
    stored = np.ascontiguousarray(np.rot90(image, k=1))  # what a camera stores for that tag
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored[:, :, ::-1].copy()).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "rotated.jpg")
    assert upright.shape == image.shape
    assert np.abs(upright.astype(int) - image).mean() < 4
    with Image.open(tmp_path / "rotated.jpg") as pil:
        assert np.abs(as_bgr(pil).astype(int) - image).mean() < 4
    # 16-bit PIL image
    assert as_bgr(Image.fromarray(grey.astype(np.uint16) * 257)).shape == image.shape


# --------------------------------------------------------------------------- face detectors


def test_no_face_is_an_empty_result(tiny_path):
    det = LandmarkDetector.from_checkpoint(tiny_path, detector=lambda image: [])
    assert det.detect(np.zeros((64, 64, 3), np.uint8)) == []
    assert det.detect_batch([np.zeros((64, 64, 3), np.uint8)] * 2) == [[], []]


@pytest.mark.skipif(not HAS_HAAR, reason="this OpenCV has no Haar cascades (OpenCV 5)")
def test_haar_finds_no_face_in_a_flat_image():
    assert HaarDetector()(np.full((200, 200, 3), 127, np.uint8)) == []


@pytest.mark.skipif(not HAS_HAAR, reason="this OpenCV has no Haar cascades (OpenCV 5)")
def test_haar_detects_a_synthetic_face_and_framing_matches_the_training_box(tiny_path):
    # This face is found by the cascade (OpenCV 4.14); the framed box must match the
    # dataset-style box: IoU 0.93 measured, > 0.7 required.
    image, _, info = render_face(np.random.default_rng([0, 4]), 256)
    found = HaarDetector()(image)
    assert found, "the cascade should find this face"
    box, score = found[0]
    assert isinstance(score, float)
    framed = HAAR_FRAMING.apply(box)
    truth = info["face_box"]
    ix = max(0, min(framed[2], truth[2]) - max(framed[0], truth[0]))
    iy = max(0, min(framed[3], truth[3]) - max(framed[1], truth[1]))
    union = (framed[2] - framed[0]) * (framed[3] - framed[1]) + (truth[2] - truth[0]) * (truth[3] - truth[1])
    assert ix * iy / (union - ix * iy) > 0.7
    faces = LandmarkDetector.from_checkpoint(tiny_path).detect(image)
    assert len(faces) >= 1 and faces[0].score is not None


def test_haar_without_cascades_says_what_to_do(monkeypatch):
    monkeypatch.delattr(cv2, "CascadeClassifier", raising=False)
    with pytest.raises(FaceDetectorError, match="opencv-python-headless<5"):
        HaarDetector()


def test_optional_detectors_missing_give_clear_errors(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dlib", None)
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(FaceDetectorError, match="pip install dlib"):
        DlibDetector()
    with pytest.raises(FaceDetectorError, match="pip install mediapipe"):
        get_face_detector("mediapipe")
    assert MediaPipeDetector.name == "mediapipe"
    with pytest.raises(FaceDetectorError, match="unknown face detector"):
        get_face_detector("yolo")


def test_parse_box_is_strict():
    assert parse_box("1,2.5, 30,40") == (1.0, 2.5, 30.0, 40.0)
    for text, why in [("1,2,3", "4 numbers"), ("1,2,3,4,5", "4 numbers"), ("", "not a number"),
                      ("1,2,x,4", "'x' is not a number"), ("0,0,inf,inf", "finite"), ("nan,0,1,1", "finite"),
                      ("0,0,-inf,5", "finite"), ("5,0,5,9", "x2 > x1"), ("0,9,5,2", "y2 > y1")]:
        with pytest.raises(ValueError, match=why):
            parse_box(text)
    # Boxes given as numbers pass the same checks.
    assert FixedBoxes([(0, 0, 4, 4), (1, 1, 3, 3)]).boxes == [(0.0, 0.0, 4.0, 4.0), (1.0, 1.0, 3.0, 3.0)]
    for bad in [(0, 0, np.inf, 9), (0, 0, 5, np.nan), (5, 5, 1, 1)]:
        with pytest.raises(ValueError, match="box"):
            FixedBoxes(bad)
    with pytest.raises(ValueError, match="finite"):
        LandmarkDetector(ExactBackend(64, np.zeros((98, 2)), np.zeros((98, 2, 2))), detector="none").detect(
            np.zeros((32, 32, 3), np.uint8), box=(0, 0, np.inf, np.inf))


def test_whole_image_and_protocol():
    assert WholeImage()(np.zeros((10, 20, 3), np.uint8)) == [((-0.5, -0.5, 19.5, 9.5), None)]
    assert isinstance(WholeImage(), FaceDetector)


def test_calibrate_framing_recovers_a_known_framing():
    """A fake detector answers with a box 1.25x the true one, 10 % of it higher."""
    truth = BoxFraming(expand=0.8, shift_x=0.0, shift_y=0.1)

    class Fake:
        def __init__(self):
            self.calls = 0

        def __call__(self, image):
            self.calls += 1
            info = render_face(np.random.default_rng([7, self.calls - 1]), 64)[2]
            (x1, y1, x2, y2), side = info["face_box"], info["scale"] * geometry.FACE_SIZE / geometry.BOX_MARGIN
            cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2 - 0.1 * side / 0.8, side / 0.8
            return [((cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), 1.0)]

    framing, stats = calibrate_framing(Fake(), count=6, seed=7, size=64)
    assert stats["found"] == 6
    assert framing.expand == pytest.approx(truth.expand, rel=1e-6)
    assert framing.shift_y == pytest.approx(truth.shift_y, abs=1e-6)
    assert framing.shift_x == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- differentiable path


def test_differentiable_landmarks_match_and_have_gradients(tiny_path, face):
    image, _, info = face
    model = tiny_model()
    diff = DifferentiableLandmarks(model)
    x = (torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1)[None].double() / 255).float()
    x = x.repeat(2, 1, 1, 1).requires_grad_(True)
    boxes = torch.tensor([info["face_box"], (-0.5, -0.5, 255.5, 255.5)], dtype=torch.float32)
    result = diff.run(x, boxes, ambiguity=True)
    assert result.landmarks.shape == (2, 98, 2) and result.covariance.shape == (2, 98, 2, 2)
    # The crop equals OpenCV's warp up to its fixed-point interpolation (1/32 px) and 8-bit rounding.
    scale, center = geometry.box_to_crop(info["face_box"])
    cv_crop = geometry.crop_image(image, geometry.crop_matrix(scale, center, 64), 64).astype(np.float32)
    ours = (result.crops[0].detach().permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(ours - cv_crop).max() <= 4.0 and np.abs(ours - cv_crop).mean() < 0.5
    # Landmarks match the non-differentiable path.
    det = LandmarkDetector.from_model(model, device="cpu", detector="none")
    want = det.detect_batch([image, image], boxes=[info["face_box"], None])
    for k in range(2):
        np.testing.assert_allclose(result.landmarks[k].detach().numpy(), want[k][0].landmarks, atol=0.25)
    # Gradients reach the image: finite and not all zero.
    result.landmarks[..., 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # frozen
    # Without boxes: the whole image.
    np.testing.assert_allclose(diff(x.detach()[1:]).numpy()[0], result.landmarks[1].detach().numpy(), atol=1e-4)


# --------------------------------------------------------------------------- drawing


def test_draw_landmarks_and_grid(face):
    image, landmarks, info = face
    cov = np.tile(np.diag([25.0, 4.0]), (98, 1, 1))
    out = draw_landmarks(image, landmarks, box=info["face_box"], ambiguity=cov, definition=get_definition("WFLW"),
                         indices=True, color=(0, 255, 0), label="0.9")
    assert out.shape == image.shape and out is not image
    assert not np.shares_memory(out, image)
    changed = np.any(out != image, axis=-1)
    ij = np.round(landmarks).astype(int)
    assert changed[ij[:, 1], ij[:, 0]].mean() > 0.95
    # Ellipses reach ~5 px left and right of an isolated point (major axis along x).
    plain = draw_landmarks(np.zeros((64, 64, 3), np.uint8), [[32, 32]], radius=1)
    ellipse = draw_landmarks(np.zeros((64, 64, 3), np.uint8), [[32, 32]], radius=1, ambiguity=cov[:1])
    cols = np.flatnonzero((ellipse != plain).any(-1).any(0))
    assert cols.min() <= 28 and cols.max() >= 36
    # An Ambiguity is drawn from its own axes (not re-derived from its covariance) ...
    amb = Ambiguity(np.array([5.0]), np.array([2.0]), np.array([[0.0, 1.0]]), np.zeros((1, 2, 2)))
    drawn = draw_landmarks(np.zeros((64, 64, 3), np.uint8), [[32, 32]], radius=1, ambiguity=amb)
    rows = np.flatnonzero((drawn != plain).any(-1).any(1))
    assert rows.min() <= 28 and rows.max() >= 36  # major axis along y
    # ... and gives the same ellipses as its covariance when both agree.
    rotated = np.array([[[9.0, 4.0], [4.0, 5.0]]])
    by_cov = draw_landmarks(np.zeros((64, 64, 3), np.uint8), [[32, 32]], radius=1, ambiguity=rotated)
    by_amb = draw_landmarks(np.zeros((64, 64, 3), np.uint8), [[32, 32]], radius=1,
                            ambiguity=Ambiguity.from_covariance(rotated))
    np.testing.assert_array_equal(by_amb, by_cov)
    grid = make_grid([image, image[:100], cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)], cols=2, pad=2)
    assert grid.shape == (2 * 256 + 3 * 2, 2 * 256 + 3 * 2, 3)
    buf = io.BytesIO(cv2.imencode(".png", grid)[1].tobytes())
    assert buf.getbuffer().nbytes > 0
