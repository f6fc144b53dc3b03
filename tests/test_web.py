"""``staralign serve``'s API: answers, the JSON of ``staralign predict``, safety limits, concurrency.

The app is driven in-process with FastAPI's test client (httpx); a few tests call
the ASGI app directly to count how much of a request body it reads.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import json
import os
import struct
import tempfile
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'staralign[web]')")

from fastapi import FastAPI, Request  # noqa: E402

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2; the test client still works with httpx
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient  # noqa: E402

from staralign.cli import build_parser, main  # noqa: E402
from staralign.data import images as data_images  # noqa: E402
from staralign.data.synth import render_face  # noqa: E402
from staralign.definitions import get_definition  # noqa: E402
from staralign.inference import LandmarkDetector  # noqa: E402
from staralign.web import images as web_images  # noqa: E402
from staralign.web.app import STATIC_DIR, InfoResponse, LandmarksResponse, Limits, create_app  # noqa: E402
from staralign.web.cli import is_loopback  # noqa: E402

HAS_HAAR = hasattr(cv2, "CascadeClassifier")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def weights(tiny_wflw_weights):
    return tiny_wflw_weights


@pytest.fixture(scope="module")
def detector(weights):
    return LandmarkDetector.from_checkpoint(weights, device="cpu", detector="none")


@pytest.fixture(scope="module")
def client(detector):
    with TestClient(create_app(detector, weights_name="tiny.safetensors")) as c:
        yield c


def encode(image: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


def face_png(seed: int, size: int = 160) -> tuple[bytes, np.ndarray]:
    image = render_face(np.random.default_rng(seed), size)[0]
    return encode(image), image


def post_file(client, data: bytes, name: str = "face.png", ctype: str = "image/png", **params):
    return client.post("/api/landmarks", params=params, files={"file": (name, data, ctype)})


def post_raw(client, data: bytes, ctype: str = "image/png", **params):
    return client.post("/api/landmarks", params=params, content=data, headers={"content-type": ctype})


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_error(response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    for word in words:
        assert word.lower() in body["message"].lower(), body["message"]
    return body


# --------------------------------------------------------------------------- good images


def test_good_image_gives_every_point_inside_the_image(client):
    data, image = face_png(1, 160)
    r = post_file(client, data, ambiguity="true")
    assert r.status_code == 200, r.text
    body = r.json()
    LandmarksResponse.model_validate(body)  # the documented schema is the real one
    assert body["layout"] == "WFLW" and body["num_points"] == 98 and body["detector"] == "none"
    assert body["weights"] == "tiny.safetensors" and body["errors"] == []
    (record,) = body["inputs"]
    assert record["path"] == "face.png" and (record["height"], record["width"]) == image.shape[:2]
    (face,) = record["faces"]
    points = np.asarray(face["landmarks"])
    assert points.shape == (98, 2) and np.isfinite(points).all()
    h, w = image.shape[:2]
    assert (points >= -0.5).all() and (points[:, 0] <= w - 0.5).all() and (points[:, 1] <= h - 0.5).all()
    amb = face["ambiguity"]
    assert len(amb["major_std"]) == len(amb["minor_std"]) == len(amb["tangent"]) == 98
    assert all(a >= b >= 0 for a, b in zip(amb["major_std"], amb["minor_std"], strict=True))
    timing = body["timing"]
    assert timing["inference_ms"] > 0 and timing["total_ms"] >= timing["inference_ms"]


def test_answer_is_what_staralign_predict_writes(client, weights, tmp_path, capsys):
    data, _ = face_png(2, 200)
    (tmp_path / "face.png").write_bytes(data)
    for options, flags in (({"ambiguity": "true"}, ["--ambiguity"]), ({}, []), ({"format": "68"}, ["--format", "68"])):
        out = tmp_path / "predict.json"
        # --threads 1: the server's requests run on the one thread the test fixture sets; another
        # count changes float summation order, and a last rounded digit with it
        assert main(["predict", str(tmp_path / "face.png"), "--weights", str(weights), "--detector", "none",
                     "--device", "cpu", "--threads", "1", "--json", str(out), *flags]) == 0
        expected = json.loads(out.read_text())
        got = post_file(client, data, **options).json()
        assert got.pop("timing")
        for report in (expected, got):
            report.pop("weights")
            report["inputs"][0].pop("path")
        assert got == expected, options
    capsys.readouterr()


def test_predict_and_serve_write_the_same_header(detector, weights, tmp_path, capsys):
    """One report_header builds both: the same keys, in the same order, with the same values."""
    from staralign.inference.report import report_header

    header = list(report_header(detector, str(weights)))
    assert header == ["staralign", "weights", "backend", "detector", "layout", "num_points", "coordinates"]
    data, _ = face_png(9, 160)
    (tmp_path / "face.png").write_bytes(data)
    with TestClient(create_app(detector, weights_name=str(weights))) as c:
        for options, flags in (({}, []), ({"format": "68", "box": "20,30,140,150"},
                                          ["--format", "68", "--box", "20,30,140,150"])):
            out = tmp_path / "predict.json"
            assert main(["predict", str(tmp_path / "face.png"), "--weights", str(weights), "--detector", "none",
                         "--device", "cpu", "--json", str(out), *flags]) == 0
            cli, web = json.loads(out.read_text()), post_file(c, data, **options).json()
            assert list(cli) == [*header, "inputs", "errors"] and list(web) == [*header, "inputs", "errors", "timing"]
            assert {k: cli[k] for k in header} == {k: web[k] for k in header}, options
    assert web["layout"] == "300W" and web["num_points"] == 68 and web["detector"] == "box"
    capsys.readouterr()


def test_raw_body_gives_the_same_as_multipart(client):
    data, _ = face_png(3)
    jpeg = encode(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), ".jpg")
    for payload, ctype in ((data, "image/png"), (jpeg, "image/jpeg"), (jpeg, "application/octet-stream")):
        a, b = post_file(client, payload, ctype=ctype).json(), post_raw(client, payload, ctype).json()
        assert a["inputs"][0]["faces"] == b["inputs"][0]["faces"]
        assert b["inputs"][0]["path"] == "upload"
    r = client.post("/api/landmarks", content=data, headers={"content-type": "image/png",
                                                             "content-disposition": 'inline; filename="../x/me.png"'})
    assert r.json()["inputs"][0]["path"] == "me.png"  # a base name only


def test_every_accepted_format_decodes(client):
    _, image = face_png(4, 96)
    payloads = {"jpeg": encode(image, ".jpg"), "png": encode(image, ".png"), "bmp": encode(image, ".bmp"),
                "webp": encode(image, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90])}
    for kind, data in payloads.items():
        r = post_raw(client, data, f"image/{kind}")
        assert r.status_code == 200, (kind, r.text)
        assert (r.json()["inputs"][0]["width"], r.json()["inputs"][0]["height"]) == (96, 96)


def test_format_68_and_a_given_box(client):
    data, _ = face_png(5, 200)
    body = post_file(client, data, format="68", box="20,30,180,190").json()
    assert body["layout"] == "300W" and body["num_points"] == 68 and body["detector"] == "box"
    face = body["inputs"][0]["faces"][0]
    assert len(face["landmarks"]) == 68 and face["box"] == [20.0, 30.0, 180.0, 190.0] and face["score"] is None
    assert_error(post_file(client, data, format="17"), 422, "bad_format", "native", "68")
    assert_error(post_file(client, data, box="1,2,3"), 422, "bad_box", "x1,y1,x2,y2")
    assert_error(post_file(client, data, box="5,5,1,1"), 422, "bad_box")
    assert_error(post_file(client, data, box="0,0,inf,inf"), 422, "bad_box", "finite")
    assert_error(post_file(client, data, box="0,0,x,9"), 422, "bad_box", "not a number")
    assert_error(post_file(client, data, ambiguity="perhaps"), 422, "invalid_request", "ambiguity")


@pytest.mark.skipif(not HAS_HAAR, reason="this OpenCV has no Haar cascades (OpenCV 5)")
def test_no_face_is_an_empty_list_not_an_error(weights):
    det = LandmarkDetector.from_checkpoint(weights, device="cpu", detector="opencv")
    rng = np.random.default_rng(0)
    with TestClient(create_app(det)) as c:
        for image in (np.full((120, 160, 3), 90, np.uint8), rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)):
            r = post_file(c, encode(image))
            assert r.status_code == 200, r.text
            assert r.json()["inputs"][0]["faces"] == [] and r.json()["detector"] == "opencv"


def test_nan_weights_are_an_error_naming_the_file_not_null_landmarks(nan_wflw_weights):
    # A broken (NaN) model is an error that names its file, never a face with null landmarks.
    path = nan_wflw_weights
    det = LandmarkDetector.from_checkpoint(path, device="cpu", detector="none")
    with TestClient(create_app(det, weights_name=path.name)) as c:
        r = post_file(c, face_png(0)[0])
    assert r.status_code == 500 and r.json()["error"] == "model_output_not_finite"
    assert "diverged.safetensors" in r.json()["message"] and "not finite" in r.json()["message"]


def test_the_face_detector_can_be_chosen_per_image(client):
    info = client.get("/api/info").json()
    assert info["detector"] == "none" and {"yunet", "opencv", "none"} <= set(info["detectors"])
    data, _ = face_png(3, 200)
    whole = post_file(client, data).json()
    assert whole["detector"] == "none" and len(whole["inputs"][0]["faces"]) == 1
    assert whole["inputs"][0]["faces"][0]["box"] == [-0.5, -0.5, 199.5, 199.5]
    if HAS_HAAR:
        haar = post_file(client, data, detector="opencv").json()
        assert haar["detector"] == "opencv"
        for face in haar["inputs"][0]["faces"]:
            assert face["box"] != [-0.5, -0.5, 199.5, 199.5] and face["keypoints"] is None
    assert_error(post_file(client, data, detector="mtcnn"), 422, "bad_detector", "choose from")


def test_onnx_model_serves_the_same_landmarks(weights, client, tmp_path):
    pytest.importorskip("onnxruntime")
    from staralign.inference.export import export_onnx
    from staralign.models import load_model

    path = tmp_path / "tiny.onnx"
    export_onnx(load_model(weights), path, with_ambiguity=True, exporter="torchscript", check=False)
    det = LandmarkDetector.from_checkpoint(path, detector="none")
    data, _ = face_png(8)
    with TestClient(create_app(det, weights_name=path.name)) as c:
        info = c.get("/api/info").json()
        assert info["backend"] == "onnxruntime" and info["device"] is None and info["ambiguity"] is True
        got = post_file(c, data, ambiguity="true").json()
    want = post_file(client, data, ambiguity="true").json()
    assert got["backend"] == "onnxruntime" and got["num_points"] == 98
    np.testing.assert_allclose(got["inputs"][0]["faces"][0]["landmarks"], want["inputs"][0]["faces"][0]["landmarks"],
                               atol=0.01)


# --------------------------------------------------------------------------- bad uploads


def test_corrupt_images_are_400(client):
    data, _ = face_png(6)
    assert_error(post_raw(client, data[:300]), 400, "corrupt_image", "not a readable image")  # truncated data
    assert_error(post_raw(client, data[:20]), 400, "corrupt_image", "truncated")  # truncated header
    jpeg = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + os.urandom(200)
    assert_error(post_raw(client, jpeg, "image/jpeg"), 400, "corrupt_image")
    assert_error(post_raw(client, b""), 400, "empty_upload")
    assert_error(post_file(client, b""), 400, "empty_upload")
    r = client.post("/api/landmarks", files={"other": ("face.png", data, "image/png")})
    assert_error(r, 400, "missing_file", "'file'")
    r = client.post("/api/landmarks", content=b"--xyz\r\nnonsense", headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "bad_multipart", "boundary")


def test_wrong_types_are_415(client):
    assert_error(post_file(client, b"just some text\n" * 20, "notes.txt", "text/plain"), 415,
                 "unsupported_image_type", "text")
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00"
    assert_error(post_raw(client, gif, "image/gif"), 415, "unsupported_image_type", "GIF")
    _, image = face_png(7, 64)
    tiff = encode(image, ".tiff")
    assert_error(post_raw(client, tiff, "image/tiff"), 415, "unsupported_image_type", "TIFF", "JPEG, PNG")
    data, _ = face_png(7, 64)
    for ctype in ("text/plain", "application/json", ""):
        assert_error(post_raw(client, data, ctype), 415, "unsupported_media_type", "multipart/form-data")


def test_oversize_uploads_are_413(detector):
    limit = 65_536
    with TestClient(create_app(detector, limits=Limits(max_upload_bytes=limit))) as c:
        big = encode(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
        assert len(big) > limit
        assert_error(post_raw(c, big), 413, "upload_too_large", "0.0625 MB")
        assert_error(post_file(c, big), 413, "upload_too_large")
        small = encode(np.zeros((50, 50, 3), np.uint8))
        assert post_file(c, small).status_code == 200


def _call_asgi(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict, int]:
    """Run one POST /api/landmarks through the ASGI app; returns (status, JSON body, chunks the app read)."""
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await asyncio.sleep(3600)  # never happens if the app stops reading

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/landmarks", "raw_path": b"/api/landmarks", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


def test_reading_stops_at_the_limit(detector):
    limit, chunk = 100_000, b"\x89PNG\r\n\x1a\n" + b"\0" * (16 * 1024 - 8)
    app = create_app(detector, limits=Limits(max_upload_bytes=limit))
    endless = [chunk] * 1000  # 16 MB, sent without a Content-Length (chunked)
    status, body, pulled = _call_asgi(app, [(b"content-type", b"image/png")], endless)
    assert status == 413 and body["error"] == "upload_too_large"
    assert pulled == limit // len(chunk) + 1  # one chunk past the limit, then no more
    # The same through the multipart parser.
    head = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n"
    status, body, pulled = _call_asgi(app, [(b"content-type", b"multipart/form-data; boundary=b")], [head, *endless])
    assert status == 413 and pulled < 20
    # A declared Content-Length over the limit is refused before reading any of the body.
    status, body, pulled = _call_asgi(app, [(b"content-type", b"image/png"), (b"content-length", b"16000000")],
                                      endless)
    assert status == 413 and pulled == 0 and "15.3 MB" in body["message"]
    status, body, pulled = _call_asgi(app, [(b"content-type", b"image/png"), (b"content-length", b"lots")], endless)
    assert status == 400 and body["error"] == "bad_content_length"


def test_decompression_bombs_are_refused_before_decoding(client, monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("the decoder was called on an oversize image")

    monkeypatch.setattr(cv2, "imdecode", must_not_decode)
    body = assert_error(post_raw(client, png_header_only(30000, 30000)), 413, "image_too_large", "30000x30000")
    assert "900.0 megapixels" in body["message"]
    assert_error(post_file(client, png_header_only(8000, 6000)), 413, "image_too_large", "48.0 megapixels")  # > 40
    # A real JPEG whose frame header was edited to claim 60000 x 60000.
    jpeg = bytearray(encode(np.zeros((16, 16, 3), np.uint8), ".jpg"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    assert_error(post_raw(client, bytes(jpeg), "image/jpeg"), 413, "image_too_large", "60000x60000")


def test_header_sizes_match_pillow():
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    cases = []
    for fmt, options in (("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("BMP", {}),
                         ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt, **options)
        cases.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(buf, "WEBP", quality=80)  # alpha: VP8X
    cases.append(buf.getvalue())
    exif = Image.Exif()
    exif[0x010F] = "camera"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif)  # APP1 segment before the frame header
    cases.append(buf.getvalue())
    top_down = bytearray(encode(rgb[:, :, ::-1], ".bmp"))
    top_down[22:26] = struct.pack("<i", -37)
    cases.append(bytes(top_down))
    for data in cases:
        kind = web_images.sniff_type(data)
        assert kind is not None, data[:16]
        assert web_images.image_size(data, kind) == (53, 37), kind
    assert web_images.sniff_type(b"GIF89a" + b"\0" * 20) is None
    with pytest.raises(web_images.HeaderError):
        web_images.image_size(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\xff\xda", "jpeg")


# --------------------------------------------------------------------------- sharing the model


def test_parallel_requests_equal_sequential_ones(detector, monkeypatch):
    images = [face_png(seed, 96 + 16 * seed)[0] for seed in range(8)]
    # batching off: every request's crops in a call of their own; a pixel limit that makes the budget bind
    app = create_app(detector, max_batch=1, limits=Limits(max_pixels=60_000))
    with TestClient(app) as c:
        sequential = [post_file(c, data, ambiguity="true").json()["inputs"][0] for data in images]
        active, most, held, most_held = 0, 0, 0, 0
        guard = threading.Lock()
        real_detect = app.state.service.detector.detect
        real_run = detector.backend.run
        real_decode = data_images.decode_image

        def spying_decode(*args, **kwargs):
            nonlocal held, most_held
            image = real_decode(*args, **kwargs)
            with guard:
                held += image.shape[0] * image.shape[1]
                most_held = max(most_held, held)
            return image

        def spying_run(*args, **kwargs):
            nonlocal active, most
            with guard:
                active += 1
                most = max(most, active)
            time.sleep(0.02)  # widen the window in which a second call could sneak in
            try:
                return real_run(*args, **kwargs)
            finally:
                with guard:
                    active -= 1

        def spying_detect(image, *args, **kwargs):
            nonlocal held
            try:
                return real_detect(image, *args, **kwargs)
            finally:
                with guard:
                    held -= image.shape[0] * image.shape[1]  # the model is done with this decoded image

        monkeypatch.setattr(detector.backend, "run", spying_run)
        monkeypatch.setattr(app.state.service.detector, "detect", spying_detect)
        monkeypatch.setattr(data_images, "decode_image", spying_decode)
        order = [i for _ in range(3) for i in range(len(images))]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: (i, post_file(c, images[i], ambiguity="true")), order))
    for i, r in results:
        assert r.status_code == 200, r.text
        assert r.json()["inputs"][0] == sequential[i], i
    assert most == 1  # model calls never overlapped
    # decoded images waiting for the model stay within the pixel budget (2 x max_pixels), which binds here
    assert most_held <= 2 * 60_000 < sum(cv2.imdecode(np.frombuffer(d, np.uint8), 1).size // 3 for d in images)
    assert len({json.dumps(s["faces"]) for s in sequential}) == len(images)  # the images really differ


def test_no_file_is_written_during_a_request(client, monkeypatch):
    """Uploads over 1 MB would be spooled to disk by Starlette's form parser; ours stay in memory."""
    data = encode(np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8))
    assert len(data) > 1.2 * 2**20
    writes: list[str] = []
    _forbid_disk_writes(monkeypatch, writes)
    r = post_file(client, data, "big.png")
    assert r.status_code == 200, r.text
    r = post_raw(client, data)
    assert r.status_code == 200, r.text
    assert writes == []


def _forbid_disk_writes(monkeypatch, writes: list[str]) -> None:
    def refuse(name):
        def fail(*args, **kwargs):
            writes.append(name)
            raise AssertionError(f"{name} called: a request wrote to disk")
        return fail

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse(f"tempfile.{name}"))
    real_open, real_os_open = builtins.open, os.open

    def open_read_only(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            return refuse(f"open({file!r}, {mode!r})")()
        return real_open(file, mode, *args, **kwargs)

    def os_open_read_only(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            return refuse(f"os.open({path!r})")()
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_read_only)
    monkeypatch.setattr(os, "open", os_open_read_only)


def test_the_disk_write_check_catches_starlettes_spooling(monkeypatch):
    """Control: the same check fails an app that parses the form the usual way."""
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        form = await request.form()
        return {"size": len(await form["file"].read())}

    writes: list[str] = []
    with TestClient(app, raise_server_exceptions=False) as c:
        _forbid_disk_writes(monkeypatch, writes)
        r = c.post("/upload", files={"file": ("big.bin", b"\0" * (2 * 2**20), "application/octet-stream")})
    assert r.status_code != 200 and any("TemporaryFile" in w or "os.open" in w for w in writes), writes


# --------------------------------------------------------------------------- info, schema, page, guard


def test_info_describes_the_model(client):
    body = client.get("/api/info").json()
    InfoResponse.model_validate(body)
    wflw = get_definition("WFLW")
    assert body["checkpoint"] == "tiny.safetensors" and body["backend"] == "torch" and body["device"] == "cpu"
    assert body["detector"] == "none" and body["input_size"] == 64 and body["ambiguity"] is True
    assert body["definition"]["name"] == "WFLW" and body["definition"]["num_points"] == 98
    assert [e["indices"] for e in body["definition"]["edges"]] == [list(e.indices) for e in wflw.edges]
    assert body["definition"]["flip_pairs"] == [list(p) for p in wflw.flip_pairs]
    assert body["formats"]["68"]["name"] == "300W" and body["formats"]["68"]["num_points"] == 68
    assert body["formats"]["native"]["name"] == "WFLW"
    assert body["limits"] == {"max_upload_bytes": 10 * 2**20, "max_pixels": 40_000_000, "max_side": 20_000}
    assert body["accepted_types"] == ["image/jpeg", "image/png", "image/bmp", "image/webp"]


def test_openapi_documents_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/api/landmarks"]["post"]
    assert {"multipart/form-data", "image/jpeg", "image/png"} <= set(post["requestBody"]["content"])
    assert post["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
    assert {p["name"] for p in post["parameters"]} == {"ambiguity", "format", "box", "detector"}
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/LandmarksResponse")
    for status in ("400", "413", "415", "422"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    info = schema["paths"]["/api/info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert info["$ref"].endswith("/InfoResponse")
    face = schema["components"]["schemas"]["FaceOut"]["properties"]
    assert {"box", "score", "layout", "landmarks", "crop", "keypoints", "ambiguity"} == set(face)


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "http" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("static/app.js", "static/style.css"):
        assert asset in page.text
        assert client.get("/" + asset).status_code == 200
    for path in STATIC_DIR.iterdir():  # no CDN, no remote font, no analytics: works offline
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name
    assert client.get("/docs").status_code == 404  # FastAPI's docs pages load a CDN: off


def test_host_check_stops_dns_rebinding(detector):
    app = create_app(detector, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    for host, ok in (("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True),
                     ("evil.example:8000", False), ("127.0.0.1.evil.example", False)):
        with TestClient(app, base_url=f"http://{host}") as c:
            r = c.get("/api/info")
        assert (r.status_code == 200) == ok, host
        if not ok:
            assert_error(r, 400, "bad_host")


# --------------------------------------------------------------------------- the command


def test_serve_is_a_command(weights, tmp_path, monkeypatch, capsys):
    import uvicorn

    assert "serve" in build_parser().format_help()
    assert main(["serve", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["serve", "--weights", str(weights), "--max-upload-mb", "0"]) == 2
    capsys.readouterr()

    served: list = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append((self.config, sockets)))
    assert main(["serve", "--weights", str(weights), "--detector", "none", "--port", "0", "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr()
    assert "warning" in out.err and "0.0.0.0" in out.err and "no authentication" in out.err
    (config, sockets), = served
    port = sockets[0].getsockname()[1]
    assert f"open http://127.0.0.1:{port}/" in out.out and "tiny.safetensors (WFLW, 98 points" in out.out

    # Loopback by default, without a warning; a busy port is a one-line error.
    assert main(["serve", "--weights", str(weights), "--detector", "none", "--port", "0"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err
    (_, sockets) = served[-1]
    assert sockets[0].getsockname()[0] == "127.0.0.1"
    busy = sockets[0].getsockname()[1]
    sockets[0].listen()
    assert main(["serve", "--weights", str(weights), "--detector", "none", "--port", str(busy)]) == 2
    assert f"127.0.0.1:{busy}" in capsys.readouterr().err
    for _, socks in served:
        socks[0].close()


def test_loopback_names():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2", "app.localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))


def test_serve_names_the_face_detector_it_really_uses(weights, tmp_path, monkeypatch, capsys):
    """Without the YuNet file (offline, empty cache), the startup line says the Haar cascade runs."""
    import uvicorn

    monkeypatch.setenv("STARALIGN_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("STARALIGN_OFFLINE", "1")
    served: list = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(sockets))
    assert main(["serve", "--weights", str(weights), "--port", "0"]) == 0
    out = capsys.readouterr()
    assert "Haar face detector (opencv)" in out.err
    assert "detector opencv)" in out.out and "detector yunet" not in out.out
    served[0][0].close()
