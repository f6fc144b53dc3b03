"""``POST /api/track``: the webcam's live mode keeps track ids across requests, per stream."""

from __future__ import annotations

import warnings

import cv2
import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'staralign[web]')")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient  # noqa: E402

from staralign.inference.detector import LandmarkDetector  # noqa: E402
from staralign.web.app import create_app  # noqa: E402

from .test_tracking import BlobDetector, BlobNetwork, _scene  # noqa: E402


def _png(t: int) -> bytes:
    return cv2.imencode(".png", _scene(t)[0])[1].tobytes()


@pytest.fixture(scope="module")
def client():
    det = LandmarkDetector(BlobNetwork(), detector=BlobDetector())
    with TestClient(create_app(det, weights_name="blobs")) as c:
        yield c


def _post(client, t, stream="cam1", **params):
    return client.post("/api/track", params={"stream": stream, "t": t / 30, **params}, content=_png(t),
                       headers={"Content-Type": "image/png"})


def test_track_ids_persist_across_requests_of_one_stream(client):
    ids = []
    for t in range(0, 30, 2):
        r = _post(client, t, smooth="ambiguity", ambiguity="true")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["stream"] == "cam1" and body["smooth"] == "ambiguity"
        faces = body["inputs"][0]["faces"]
        assert len(faces) == 2 and all("ambiguity" in f for f in faces)
        ids.append(sorted(f["track_id"] for f in faces))
        assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] >= 0
    assert all(i == [0, 1] for i in ids)
    # another stream starts its own tracks (ids from 0), the first one is not disturbed
    other = _post(client, 0, stream="cam2").json()["inputs"][0]["faces"]
    assert sorted(f["track_id"] for f in other) == [0, 1]
    again = _post(client, 30, smooth="ambiguity").json()["inputs"][0]["faces"]
    assert sorted(f["track_id"] for f in again) == [0, 1]


def test_bad_stream_and_smooth_are_422(client):
    assert _post(client, 0, stream="bad id!").status_code == 422
    r = _post(client, 0, smooth="median")
    assert r.status_code == 422 and r.json()["error"] == "bad_smooth"


def test_a_nan_or_infinite_time_is_422_not_a_frozen_stream(client):
    for bad in ("nan", "inf"):
        r = client.post("/api/track", params={"stream": "cam9", "t": bad}, content=_png(0),
                        headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and r.json()["error"] == "bad_time", r.text


@pytest.mark.parametrize("route", ["/api/landmarks", "/api/track?stream=s1"])
def test_model_failures_are_the_same_answers_on_both_routes(route, nan_wflw_weights):
    """Both routes go through LandmarkService.admitted: a full queue is 503 busy with
    retry-after, a broken model 500 naming its weights (the track route once gave 500
    internal_error for both)."""
    from staralign.inference.batching import BatchQueueFull

    det = LandmarkDetector.from_checkpoint(nan_wflw_weights, device="cpu", detector="none")
    with TestClient(create_app(det, weights_name=nan_wflw_weights.name)) as c:
        r = c.post(route, content=_png(0), headers={"Content-Type": "image/png"})
        assert r.status_code == 500 and r.json()["error"] == "model_output_not_finite", r.text
        assert "diverged.safetensors" in r.json()["message"]

        def full(*_a, **_k):
            raise BatchQueueFull("queue full")

        c.app.state.service.batching.batcher.run = full
        r = c.post(route, content=_png(0), headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and r.json()["error"] == "busy" and r.headers["retry-after"] == "1", r.text
