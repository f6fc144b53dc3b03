"""``staralign serve`` under hostile or unlucky clients, and the micro-batching queue behind it.

UTF-8 file names, absurd boxes, HEAD, the Origin rule and batching run in-process
(FastAPI's test client); slow and stalled clients run against a real uvicorn server
on 127.0.0.1 with real sockets (every wait bounded; the server stops by itself).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'staralign[web]')")

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2; the test client still works with httpx
    warnings.simplefilter("ignore", UserWarning)
    from fastapi.testclient import TestClient  # noqa: E402

from staralign.cli import main  # noqa: E402
from staralign.data.synth import render_face  # noqa: E402
from staralign.inference import LandmarkDetector  # noqa: E402
from staralign.inference.batching import BatchingBackend, BatchQueueFull, MicroBatcher  # noqa: E402
from staralign.web.app import create_app  # noqa: E402
from staralign.web.cli import bind_socket  # noqa: E402
from staralign.web.guard import Guard, GuardSettings, normalise_origin  # noqa: E402
from staralign.web.server import ServerSettings, make_server  # noqa: E402


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


def face_png(seed: int, size: int = 160) -> bytes:
    ok, buf = cv2.imencode(".png", render_face(np.random.default_rng(seed), size)[0])
    assert ok
    return buf.tobytes()


def post_file(client, data: bytes, name: str = "face.png", headers: dict | None = None, **params):
    return client.post("/api/landmarks", params=params, files={"file": (name, data, "image/png")},
                       headers=headers or {})


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    return body


# --------------------------------------------------------------------------- UTF-8 file names


@pytest.mark.parametrize("name", ["照片.jpg", "face 😀.jpg", "Ångström.png"])
def test_utf8_file_names_are_answered_and_echoed(client, name):
    r = post_file(client, face_png(1), name=name)
    assert r.status_code == 200, r.text
    assert r.json()["inputs"][0]["path"] == name


def test_raw_body_names_itself_in_utf8(client):
    data = face_png(2)
    # RFC 6266's extended form (percent-encoded UTF-8) and the raw UTF-8 bytes browsers send.
    r = client.post("/api/landmarks", content=data, headers={
        "content-type": "image/png", "content-disposition": "inline; filename*=UTF-8''%E7%85%A7%E7%89%87.png"})
    assert r.status_code == 200, r.text
    assert r.json()["inputs"][0]["path"] == "照片.png"


# --------------------------------------------------------------------------- boxes, HEAD, Origin


@pytest.mark.parametrize("box", ["0,0,1e308,1e308", "nan,0,10,10", "50,50,10,10", "1000,1000,1100,1100",
                                 "-500,-500,-400,-400", "10,10,10.5,10.5", "0,0,inf,100"])
def test_absurd_boxes_are_422(client, box):
    assert_error(post_file(client, face_png(3), box=box), 422, "bad_box")


def test_a_sensible_box_still_works(client):
    r = post_file(client, face_png(3), box="-20,-20,180,180")  # a little beyond the image: allowed
    assert r.status_code == 200, r.text
    (face,) = r.json()["inputs"][0]["faces"]
    assert all(v is not None for point in face["landmarks"] for v in point)


def test_head_is_answered_without_a_body(client):
    for path in ("/", "/api/info", "/static/app.js"):
        r = client.head(path)
        assert r.status_code == 200, (path, r.status_code)
        assert r.content == b"", path
        assert r.headers["content-security-policy"]


def test_cross_origin_posts_are_refused(client):
    data = face_png(4)
    for origin in ("http://evil.example", "null", "http://testserver:8080", "https://testserver"):
        body = assert_error(post_file(client, data, headers={"origin": origin}), 403, "cross_origin")
        assert "--allow-origin" in body["message"]
    # the server's own page, and clients that send no Origin (curl, scripts), are served
    assert post_file(client, data, headers={"origin": "http://testserver"}).status_code == 200
    assert post_file(client, data).status_code == 200
    # reading is not a change: GETs from anywhere are answered (the browser keeps the answer from the page)
    assert client.get("/api/info", headers={"origin": "http://evil.example"}).status_code == 200


def test_allow_origin_lets_a_listed_site_post_and_read(detector):
    app = create_app(detector, allowed_origins=["HTTP://LocalHost:3000/"])
    with TestClient(app) as c:
        r = post_file(c, face_png(5), headers={"origin": "http://localhost:3000"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        pre = c.options("/api/landmarks", headers={"origin": "http://localhost:3000",
                                                   "access-control-request-method": "POST"})
        assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
        assert_error(post_file(c, face_png(5), headers={"origin": "http://localhost:3001"}), 403, "cross_origin")


def test_origins_are_normalised_and_checked():
    assert normalise_origin("HTTP://Example.COM:80/") == "http://example.com"
    assert normalise_origin("https://[::1]:8443") == "https://[::1]:8443"
    for bad in ("example.com", "ftp://x", "http://x/path", "http://x:99999", "null"):
        with pytest.raises(ValueError):
            normalise_origin(bad)


def test_serve_takes_allow_origin(weights, monkeypatch, capsys):
    import uvicorn

    assert main(["serve", "--weights", str(weights), "--allow-origin", "localhost:3000"]) == 2
    assert "--allow-origin" in capsys.readouterr().err
    assert main(["serve", "--weights", str(weights), "--max-batch", "0"]) == 2
    capsys.readouterr()
    served: list = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append((self.config, sockets)))
    assert main(["serve", "--weights", str(weights), "--detector", "none", "--port", "0",
                 "--allow-origin", "http://localhost:3000", "--allow-origin", "https://app.example",
                 "--max-batch", "4", "--upload-timeout", "2"]) == 0
    (config, sockets), = served
    sockets[0].close()
    (guard,) = [m for m in config.app.user_middleware if m.cls is Guard]
    settings = guard.kwargs["settings"]
    assert settings.allowed_origins == ("http://localhost:3000", "https://app.example")
    assert settings.body_idle_s == 2 and settings.body_deadline_s == 12
    assert config.app.state.service.max_batch == 4


# --------------------------------------------------------------------------- a real server, real sockets


@contextlib.contextmanager
def running_server(app, settings: ServerSettings):
    """uvicorn serving ``app`` on 127.0.0.1 in a thread; yields the port; stops within seconds."""
    server = make_server(app, settings, log_level="critical")
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = server.force_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def get_info(port: int, source: str = "127.0.0.1") -> tuple[int, float]:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/api/info")
        r = conn.getresponse()
        r.read()
        return r.status, time.monotonic() - start
    finally:
        conn.close()


def post_over(port: int, data: bytes, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", "/api/landmarks", body=data, headers={"content-type": "image/png"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def stalled_upload(port: int, source: str = "127.0.0.1") -> socket.socket:
    """Headers of a 100 kB upload and its first 3 bytes; then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    head = (f"POST /api/landmarks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
            "Content-Length: 100000\r\n\r\n").encode() + b"\x89PN"
    with contextlib.suppress(OSError):  # refused at once (connection cap): the answer is read below
        s.sendall(head)
    return s


def answer_of(s: socket.socket) -> int | None:
    """The HTTP status the server sent on this socket before closing it (None: closed without one)."""
    data = b""
    with contextlib.suppress(OSError):
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    s.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


@pytest.mark.slow  # waits out the server's stall deadlines: ~5 s
def test_stalled_uploads_cannot_hold_the_server(detector):
    """The issue's attack: 66 clients send headers and 3 bytes of a 100 kB body, then wait."""
    guard = GuardSettings(uploads_per_client=8, body_idle_s=5.0, body_deadline_s=10.0)
    app = create_app(detector, allowed_hosts=["127.0.0.1"], guard=guard)
    with running_server(app, ServerSettings(connections_per_client=32, header_timeout_s=5.0)) as port:
        start = time.monotonic()
        stalled = [stalled_upload(port) for _ in range(66)]
        time.sleep(0.3)
        # Meanwhile: the same client can still read /api/info, another client can upload.
        status, took = get_info(port)
        assert status == 200 and took < 2.0, (status, took)
        assert post_over(port, face_png(6), source="127.0.0.2") == 200
        assert time.monotonic() - start < guard.body_idle_s, "checked too late: the stalls may be over"
        answers = [answer_of(s) for s in stalled]
        elapsed = time.monotonic() - start
    held = answers.count(408)  # read until the body timeout, then refused
    refused = answers.count(429)  # refused at once: uploads per client, or connections per client
    assert held == guard.uploads_per_client, answers
    assert held + refused == 66, answers
    assert elapsed < guard.body_idle_s + 5, elapsed


def test_incomplete_headers_are_closed_and_others_served(detector):
    app = create_app(detector, allowed_hosts=["127.0.0.1"])
    settings = ServerSettings(connections_per_client=32, header_timeout_s=1.0)
    with running_server(app, settings) as port:
        start = time.monotonic()
        slow = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /api/landmarks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")  # never finished
            slow.append(s)
        status, took = get_info(port)
        assert status == 200 and took < 2.0
        answers = [answer_of(s) for s in slow]  # closed by the server after the header deadline
        closed_after = time.monotonic() - start
    assert answers == [None] * 20
    assert settings.header_timeout_s <= closed_after < settings.header_timeout_s + 5


def test_connections_per_client_are_capped(detector):
    app = create_app(detector, allowed_hosts=["127.0.0.1"])
    settings = ServerSettings(connections_per_client=10, header_timeout_s=5.0)
    with running_server(app, settings) as port:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.3", 0))
                for _ in range(14)]
        time.sleep(0.3)
        assert get_info(port)[0] == 200  # another client is not affected
        refused = []
        for s in idle[10:]:
            data = s.recv(4096)
            assert data.startswith(b"HTTP/1.1 429"), data
            refused.append(json.loads(data.split(b"\r\n\r\n", 1)[1])["error"])
        for s in idle:
            s.close()
        time.sleep(0.3)  # the server sees the closes: the client may connect again
        assert get_info(port, source="127.0.0.3")[0] == 200
    assert refused == ["too_many_connections"] * 4


def test_utf8_name_keeps_the_connection_alive(detector):
    app = create_app(detector, allowed_hosts=["127.0.0.1"])
    data = face_png(7)
    with running_server(app, ServerSettings()) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for name in ("照片.jpg", "face 😀.jpg"):
                boundary = "b0undary"
                body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                        "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
                conn.request("POST", "/api/landmarks", body=body,
                             headers={"content-type": f"multipart/form-data; boundary={boundary}"})
                r = conn.getresponse()
                answer = json.loads(r.read())
                assert r.status == 200, answer
                assert answer["inputs"][0]["path"] == name
            assert conn.sock is not None  # one keep-alive connection served both
            conn.request("HEAD", "/")
            r = conn.getresponse()
            assert r.status == 200 and r.read() == b""
        finally:
            conn.close()


# --------------------------------------------------------------------------- micro-batching


class Gate:
    """A batch function that blocks its first call until released, recording every call."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[int, object]] = []
        self.fail_on = fail_on

    def __call__(self, rows: np.ndarray, key):
        self.calls.append((len(rows), key))
        self.entered.set()
        assert self.release.wait(10)
        if self.fail_on is not None and (rows == self.fail_on).any():
            raise ValueError(f"bad row {self.fail_on}")
        return rows * 10.0 + (1 if key else 0), None


def test_concurrent_submissions_share_one_call_and_get_their_own_rows():
    gate = Gate()
    with MicroBatcher(gate, max_batch=8, max_wait_s=0.001) as batcher:
        first = batcher.submit(np.array([[0.0]]))
        assert gate.entered.wait(5)  # the worker is busy with the first call
        futures = [batcher.submit(np.array([[i], [i + 0.5]], np.float64)) for i in range(1, 4)]
        gate.release.set()
        assert np.array_equal(first.result(5)[0], [[0.0]])
        for i, f in enumerate(futures, 1):
            rows, extra = f.result(5)
            assert np.array_equal(rows, [[10.0 * i], [10.0 * i + 5]]) and extra is None
    assert [n for n, _ in gate.calls] == [1, 6]  # the three waiting submissions ran as one call


def test_a_failing_row_fails_only_its_caller():
    gate = Gate(fail_on=2.0)
    with MicroBatcher(gate, max_batch=8) as batcher:
        blocker = batcher.submit(np.array([[0.0]]))
        assert gate.entered.wait(5)
        futures = [batcher.submit(np.array([[float(i)]])) for i in (1, 2, 3)]
        gate.release.set()
        blocker.result(5)
        assert futures[0].result(5)[0][0, 0] == 10.0 and futures[2].result(5)[0][0, 0] == 30.0
        with pytest.raises(ValueError, match="bad row 2"):
            futures[1].result(5)


def test_the_queue_is_bounded_and_keys_do_not_mix():
    gate = Gate()
    with MicroBatcher(gate, max_batch=4, max_queue=5) as batcher:
        blocker = batcher.submit(np.zeros((1, 1)), key=False)
        assert gate.entered.wait(5)
        a = batcher.submit(np.ones((2, 1)), key=True)
        b = batcher.submit(np.ones((2, 1)), key=False)
        with pytest.raises(BatchQueueFull):
            batcher.submit(np.ones((2, 1)), key=True)  # 4 waiting + 2 > 5
        c = batcher.submit(np.ones((1, 1)), key=True)
        gate.release.set()
        blocker.result(5)
        assert np.array_equal(a.result(5)[0], [[11.0], [11.0]]) and np.array_equal(b.result(5)[0], [[10.0]] * 2)
        assert np.array_equal(c.result(5)[0], [[11.0]])
    assert gate.calls == [(1, False), (3, True), (2, False)]  # a and c together; b alone, never mixed


def test_batching_backend_equals_the_direct_backend(detector):
    rng = np.random.default_rng(0)
    crops = rng.standard_normal((5, 3, 64, 64)).astype(np.float32)
    shared = BatchingBackend(detector.backend, max_batch=8)
    try:
        assert shared.name == detector.backend.name and shared.input_size == detector.backend.input_size
        with ThreadPoolExecutor(5) as pool:
            got = list(pool.map(lambda i: shared.run(crops[i:i + 1], ambiguity=i % 2 == 0), range(5)))
    finally:
        shared.close()
    for i, (points, cov) in enumerate(got):
        want_points, want_cov = detector.backend.run(crops[i:i + 1], ambiguity=i % 2 == 0)
        np.testing.assert_allclose(points, want_points, atol=1e-5)
        assert (cov is None) == (i % 2 == 1)
        if cov is not None:
            np.testing.assert_allclose(cov, want_cov, atol=1e-6)


def test_concurrent_requests_are_batched_without_cross_talk(detector, monkeypatch):
    images = [face_png(seed, 96 + 16 * seed) for seed in range(8)]
    app = create_app(detector, max_batch=8, batch_wait_s=0.02)
    sizes: list[int] = []
    real_run = detector.backend.run

    def counting_run(batch, ambiguity=True):
        sizes.append(len(batch))
        time.sleep(0.05)  # a slow network: requests arriving meanwhile queue up and join the next call
        return real_run(batch, ambiguity)

    with TestClient(app) as c:
        alone = [post_file(c, data, ambiguity="true").json()["inputs"][0] for data in images]
        monkeypatch.setattr(detector.backend, "run", counting_run)
        order = [i for _ in range(3) for i in range(len(images))]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: (i, post_file(c, images[i], ambiguity="true")), order))
    assert sum(sizes) == len(order) and max(sizes) > 1, sizes  # crops of several requests shared calls
    assert len(sizes) < len(order)
    assert len({json.dumps(a["faces"]) for a in alone}) == len(images)  # the answers really differ
    for i, r in results:
        assert r.status_code == 200, r.text
        got, want = r.json()["inputs"][0], alone[i]
        assert (got["width"], got["height"]) == (want["width"], want["height"])
        np.testing.assert_allclose(got["faces"][0]["landmarks"], want["faces"][0]["landmarks"], atol=0.01)
        np.testing.assert_allclose(got["faces"][0]["ambiguity"]["major_std"],
                                   want["faces"][0]["ambiguity"]["major_std"], atol=0.01)


def test_batching_backend_keeps_calls_with_different_options_apart():
    class Fake:
        name = "fake"
        calls: list[tuple[int, bool, int]] = []

        def run(self, batch, ambiguity=True, stacks=4):
            self.calls.append((len(batch), ambiguity, stacks))
            time.sleep(0.02)
            return batch[:, 0, 0, 0][:, None] * stacks, (batch[:, 0, 0, 0] if ambiguity else None)

    fake = Fake()
    shared = BatchingBackend(fake, max_batch=8, max_wait_s=0.01)
    jobs = [(float(i), i % 2 == 0, 1 + i % 3) for i in range(12)]
    try:
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda j: shared.run(np.full((1, 1, 1, 1), j[0]), j[1], stacks=j[2]), jobs))
    finally:
        shared.close()
    for (value, amb, stacks), (points, cov) in zip(jobs, got, strict=True):
        assert points[0, 0] == value * stacks and (cov is None) == (not amb)
    assert sum(n for n, _, _ in fake.calls) == 12 and shared.name == "fake"


def test_a_trickling_upload_meets_the_body_deadline(detector):
    """A body that keeps arriving, a few bytes at a time, is cut off at the deadline, not the pause limit."""
    import asyncio

    app = create_app(detector, guard=GuardSettings(body_idle_s=1.0, body_deadline_s=1.5))
    sent: list[dict] = []
    pieces = 0

    async def receive():
        nonlocal pieces
        await asyncio.sleep(0.2)  # never a pause near body_idle_s
        pieces += 1
        return {"type": "http.request", "body": b"\x89PNG"[:1], "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/landmarks", "raw_path": b"/api/landmarks", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver"), (b"content-type", b"image/png")],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    start = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    took = time.monotonic() - start
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"] == "upload_timeout"
    assert 1.5 <= took < 4 and pieces >= 5


def test_the_worker_waits_only_for_announced_callers():
    calls: list[int] = []

    def fn(rows, key):
        calls.append(len(rows))
        return (rows,)

    with MicroBatcher(fn, max_batch=8, max_wait_s=2.0) as batcher:
        start = time.monotonic()
        batcher.run(np.zeros((1, 1)))  # nobody announced: runs at once, not after max_wait_s
        assert time.monotonic() - start < 1.0
        announced = threading.Event()

        def late_caller():
            with batcher.expecting():
                announced.set()
                time.sleep(0.3)  # still decoding its image
                return batcher.run(np.ones((1, 1)))

        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(late_caller)
            assert announced.wait(5)
            start = time.monotonic()
            early = batcher.run(np.full((1, 1), 2.0))  # waits for the announced caller, then both run
            waited = time.monotonic() - start
            assert late.result(5)[0][0, 0] == 1.0 and early[0][0, 0] == 2.0
    assert calls == [1, 2] and 0.2 < waited < 2.0


def test_a_client_that_leaves_mid_upload_is_a_400_not_a_crash():
    import asyncio

    from starlette.requests import Request

    from staralign.web.uploads import ApiError, read_upload

    messages = [{"type": "http.request", "body": b"\x89PNG\r\n", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/api/landmarks", "query_string": b"",
             "headers": [(b"content-type", b"image/png")]}
    with pytest.raises(ApiError) as err:
        asyncio.run(read_upload(Request(scope, receive), 10_000))
    assert (err.value.status, err.value.code) == (400, "client_disconnected")
