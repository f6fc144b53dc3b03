"""The FastAPI app behind ``staralign serve``: one page, ``POST /api/landmarks``, ``GET /api/info``.

Design choices, each for a reason:

* One :class:`~staralign.inference.LandmarkDetector` is loaded before the app is
  built and shared by every request; model calls are serialised with a lock (a
  network on a 2-core laptop gains nothing from running twice at once, and the
  face detector and backends need not be thread-safe), image decoding runs beside
  it, in worker threads, so the event loop keeps answering.
* Uploads are read from the raw stream (:mod:`.uploads`): nothing goes to disk,
  the size limit holds while reading.  The type comes from the magic bytes and
  the size from the header (:mod:`.images`) before the decoder sees the file.
* The answer is exactly the JSON ``staralign predict --json`` writes for one
  image (the same header, from :func:`~staralign.inference.report.report_header`),
  plus ``timing``; errors are ``{"error": code, "message": text}``.
* The page is plain HTML, JavaScript and CSS from the package, with a
  Content-Security-Policy that forbids any other origin, so it works offline and
  a stray CDN link would fail the browser test rather than phone home.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .images import ACCEPTED_TYPES, HeaderError, describe_unsupported, image_size, sniff_type
from .uploads import ApiError, read_upload

if TYPE_CHECKING:
    from ..inference.detector import LandmarkDetector

__all__ = ["STATIC_DIR", "Limits", "LandmarkService", "create_app"]

log = logging.getLogger("staralign.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "media-src 'self' blob: mediastream:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
       "frame-ancestors 'none'")


@dataclass(frozen=True)
class Limits:
    """What one request may cost: upload bytes, decoded pixels, pixels a side."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_side: int = 20_000


# --------------------------------------------------------------------------- response models


class ErrorResponse(BaseModel):
    """Every error: a stable code for programs and a sentence for people."""

    error: str = Field(description="machine-readable code, e.g. upload_too_large, unsupported_image_type")
    message: str = Field(description="what went wrong and what to do")


class Crop(BaseModel):
    scale: float = Field(description="face size in units of 200 pixels (the dataset's convention)")
    center: list[float] = Field(description="crop centre (x, y), pixels")


class AmbiguityOut(BaseModel):
    major_std: list[float] = Field(description="per landmark: std-dev along the heatmap's major axis, pixels")
    minor_std: list[float] = Field(description="per landmark: std-dev along the minor axis, pixels")
    tangent: list[list[float]] = Field(description="per landmark: unit (x, y) of the major axis, x >= 0")


class FaceOut(BaseModel):
    box: list[float] = Field(description="face box (x1, y1, x2, y2), pixels")
    score: float | None = Field(description="face detector confidence; null for 'none' and given boxes")
    layout: str = Field(description="landmark layout name, e.g. WFLW or 300W")
    landmarks: list[list[float]] = Field(description="(N, 2) points (x, y), pixels of the original image")
    crop: Crop
    ambiguity: AmbiguityOut | None = Field(None, description="only with ambiguity=true")


class ImageRecord(BaseModel):
    path: str = Field(description="the uploaded file's name (raw bodies: Content-Disposition's filename, "
                                  "else 'upload')")
    type: Literal["image"]
    width: int
    height: int
    faces: list[FaceOut] = Field(description="one entry per face; empty when none was found")


class Timing(BaseModel):
    read_ms: float = Field(description="receiving the upload")
    decode_ms: float = Field(description="checking and decoding the image")
    wait_ms: float = Field(description="waiting for the model (other requests first)")
    inference_ms: float = Field(description="face detection, network and ambiguity")
    total_ms: float = Field(description="from the first byte read to the answer")


class LandmarksResponse(BaseModel):
    """The JSON ``staralign predict --json`` writes, for one image, plus ``timing``."""

    staralign: str = Field(description="package version")
    weights: str = Field(description="checkpoint file name")
    backend: str = Field(description="torch or onnxruntime")
    detector: str = Field(description="face detector: opencv, none, box, ...")
    layout: str
    num_points: int
    coordinates: str
    inputs: list[ImageRecord] = Field(description="exactly one entry: the uploaded image")
    errors: list[dict[str, str]] = Field(description="always empty here (errors are HTTP errors)")
    timing: Timing


class EdgeOut(BaseModel):
    name: str
    closed: bool
    indices: list[int]


class LayoutOut(BaseModel):
    name: str
    num_points: int
    edges: list[EdgeOut] = Field(description="curves through landmarks, drawn as polylines")
    flip_pairs: list[list[int]] = Field(description="left/right landmark pairs")


class LimitsOut(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_side: int


class InfoResponse(BaseModel):
    staralign: str
    checkpoint: str = Field(description="checkpoint file name")
    backend: str
    device: str | None = Field(description="PyTorch device, null for onnxruntime")
    detector: str
    input_size: int = Field(description="network input, pixels a side")
    ambiguity: bool = Field(description="whether the model reports per-landmark ambiguity")
    definition: LayoutOut = Field(description="the model's own landmark definition")
    formats: dict[str, LayoutOut] = Field(description="accepted values of ?format= and the layout each gives")
    limits: LimitsOut
    accepted_types: list[str] = Field(description="image types accepted (checked by magic bytes)")


# --------------------------------------------------------------------------- the model, shared


def _layout_dict(definition: Any) -> dict[str, Any]:
    return {
        "name": definition.name,
        "num_points": definition.num_points,
        "edges": [{"name": e.name, "closed": bool(e.closed), "indices": list(e.indices)} for e in definition.edges],
        "flip_pairs": [list(p) for p in definition.flip_pairs],
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


class LandmarkService:
    """One detector shared by all requests: validates, decodes and runs images one model call at a time."""

    def __init__(self, detector: LandmarkDetector, weights_name: str, limits: Limits, decode_slots: int = 2) -> None:
        from ..inference.report import face_detector_name

        self.detector, self.weights_name, self.limits = detector, weights_name, limits
        self.lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(max(1, decode_slots))
        self.layouts = detector.formats()  # the values ?format= accepts, and the layout of each
        # Created now, not on the first request: an unavailable detector fails at start-up.
        self.detector_name = face_detector_name(detector)

    def info(self) -> dict[str, Any]:
        from .. import __version__

        backend = self.detector.backend
        device = getattr(backend, "device", None)
        return {
            "staralign": __version__,
            "checkpoint": self.weights_name,
            "backend": backend.name,
            "device": None if device is None else str(device),
            "detector": self.detector_name,
            "input_size": int(self.detector.input_size),
            "ambiguity": bool(getattr(backend, "has_ambiguity", False)),
            "definition": _layout_dict(self.detector.definition),
            "formats": {k: _layout_dict(v) for k, v in self.layouts.items()},
            "limits": {"max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels,
                       "max_side": self.limits.max_side},
            "accepted_types": list(ACCEPTED_TYPES.values()),
        }

    def check(self, data: bytes) -> tuple[str, int, int]:
        """Type by magic bytes (415), size from the header (400 if corrupt, 413 if too large)."""
        kind = sniff_type(data)
        if kind is None:
            what = describe_unsupported(data)
            raise ApiError(415, "unsupported_image_type",
                           f"{'this file' if what == 'unknown' else 'a ' + what + ' file'} is not accepted; "
                           "send a JPEG, PNG, BMP or WebP image")
        try:
            width, height = image_size(data, kind)
        except HeaderError as exc:
            raise ApiError(400, "corrupt_image", f"not a readable image: {exc}") from None
        self._check_size(width, height)
        return kind, width, height

    def _check_size(self, width: int, height: int) -> None:
        """413 over the limits: the check ``staralign predict`` makes, with the server's limits."""
        from ..data.images import ImageReadError, check_size

        try:
            check_size(width, height, "upload", max_pixels=self.limits.max_pixels, max_side=self.limits.max_side)
        except ImageReadError as exc:
            raise ApiError(413, "image_too_large",
                           f"{exc.reason} (limit set by staralign serve --max-megapixels)") from None

    def decode(self, data: bytes) -> np.ndarray:
        """HxWx3 uint8 BGR, read like ``staralign predict`` reads files (EXIF orientation applied)."""
        from ..data.images import ImageReadError, decode_image

        self.check(data)
        try:
            image = decode_image(np.frombuffer(data, np.uint8))
        except ImageReadError:
            raise ApiError(400, "corrupt_image", "not a readable image: the decoder could not read it "
                                                 "(truncated or corrupt file?)") from None
        self._check_size(image.shape[1], image.shape[0])
        return image

    def run(self, data: bytes, name: str, ambiguity: bool, fmt: str,
            box: tuple[float, float, float, float] | None) -> tuple[dict[str, Any], dict[str, float]]:
        """Decode and predict one upload; (report, seconds spent decoding / waiting / in the model).

        A slot is held from decoding until the model is done with the image, so at most
        ``decode_slots`` decoded images exist at once however many requests queue for the model.
        """
        t0 = time.perf_counter()
        with self._decode_slots:
            t1 = time.perf_counter()
            image = self.decode(data)
            t2 = time.perf_counter()
            report, wait, infer = self.predict(image, name, ambiguity, fmt, box)
        return report, {"decode": t2 - t1, "wait": wait + (t1 - t0), "inference": infer}

    def predict(self, image: np.ndarray, name: str, ambiguity: bool, fmt: str,
                box: tuple[float, float, float, float] | None) -> tuple[dict[str, Any], float, float]:
        """The ``staralign predict`` report for one image; returns (report, wait s, inference s)."""
        from ..inference.report import report_header

        t0 = time.perf_counter()
        with self.lock:
            t1 = time.perf_counter()
            faces = self.detector.detect(image, box=box, format=fmt, ambiguity=ambiguity)
            t2 = time.perf_counter()
        record = {"path": name, "type": "image", "width": int(image.shape[1]), "height": int(image.shape[0]),
                  "faces": [f.to_dict(ambiguity=ambiguity) for f in faces]}
        report = {**report_header(self.detector, self.weights_name, box=box is not None, format=fmt),
                  "inputs": [record], "errors": []}
        return report, t1 - t0, t2 - t1


def _parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    from ..inference.faces import parse_box

    if text is None or text == "":
        return None
    try:
        return parse_box(text)
    except ValueError as exc:
        raise ApiError(422, "bad_box", f"box={text!r}: {exc}") from None


# --------------------------------------------------------------------------- ASGI guard


def _host_of(header: str) -> str:
    """The host part of a Host header, without the port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Guard:
    """Security headers on every answer and, when bound to loopback, a Host-header check.

    The Host check stops DNS rebinding: a web page on another site that resolves its
    own name to 127.0.0.1 must not be able to use (and read) the local server.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed is not None:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if _host_of(host) not in self.allowed:
                body = JSONResponse({"error": "bad_host", "message": f"Host {host!r} is not served here; "
                                     f"open http://127.0.0.1:{scope.get('server', ('', ''))[1]}/"}, 400)
                await body(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                            (b"permissions-policy", b"camera=(self), microphone=()")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- the app


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "corrupt image, malformed or empty upload"},
    413: {"model": ErrorResponse, "description": "upload over the byte limit, or image over the pixel limit"},
    415: {"model": ErrorResponse, "description": "not a JPEG, PNG, BMP or WebP image, or a wrong Content-Type"},
    422: {"model": ErrorResponse, "description": "bad query option (format, box, ambiguity)"},
}
_IMAGE_BODY = {"type": "string", "format": "binary"}
_REQUEST_BODY = {
    "required": True,
    "description": "the image: a multipart form field `file`, or the raw bytes with an image/* Content-Type",
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": _IMAGE_BODY}}},
        **{t: {"schema": _IMAGE_BODY} for t in ACCEPTED_TYPES.values()},
    },
}


def create_app(detector: LandmarkDetector, *, weights_name: str = "model", limits: Limits | None = None,
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The web app around a loaded :class:`~staralign.inference.LandmarkDetector`.

    ``weights_name`` is shown to users (a file name, not a server path).
    ``allowed_hosts``: Host header values accepted (None: any; ``staralign serve``
    passes the loopback names when listening on loopback).
    """
    from .. import __version__

    service = LandmarkService(detector, weights_name, limits or Limits())
    app = FastAPI(title="staralign web", version=__version__, docs_url=None, redoc_url=None,
                  description="Facial landmarks and their ambiguity (STAR loss) for one uploaded image. "
                              "The interactive docs pages are off because they load assets from a CDN; "
                              "the schema is at /openapi.json.")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "message": "; ".join(parts)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"http_{exc.status_code}", "message": str(exc.detail)}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s", request.url.path)
        return JSONResponse({"error": "internal_error", "message": f"{type(exc).__name__}: {exc}"}, 500)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", response_model=InfoResponse, summary="The model: landmark layout, edges, limits")
    async def info() -> dict[str, Any]:
        """What the page needs to draw: the landmark definition (edges, flip pairs), formats, limits."""
        return service.info()

    @app.post("/api/landmarks", response_model=LandmarksResponse, responses=_ERRORS,
              summary="Faces, landmarks and ambiguity in one image",
              openapi_extra={"requestBody": _REQUEST_BODY})
    async def landmarks(
        request: Request,
        ambiguity: bool = Query(False, description="include per-landmark ambiguity (heatmap spread, pixels)"),
        format: str = Query("native", description="landmark layout: native, or 68 (300W points from WFLW)"),
        box: str | None = Query(None, description="x1,y1,x2,y2: use this face box instead of the detector"),
    ) -> Response:
        """The JSON ``staralign predict --json`` writes for this one image, plus ``timing``.

        Send the image as a multipart form field ``file`` or as the raw body with an
        ``image/*`` Content-Type.  No face found is a 200 with an empty ``faces`` list.
        """
        start = time.perf_counter()
        if format not in service.layouts:
            raise ApiError(422, "bad_format", f"format={format!r} is not available for this model; "
                                              f"choose from {', '.join(service.layouts)}")
        face_box = _parse_box(box)
        try:
            upload = await read_upload(request, service.limits.max_upload_bytes)
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client went away during the upload") from None
        read = time.perf_counter()
        report, spent = await run_in_threadpool(service.run, upload.data, upload.filename, ambiguity, format,
                                                face_box)
        report["timing"] = {"read_ms": _ms(read - start), "decode_ms": _ms(spent["decode"]),
                            "wait_ms": _ms(spent["wait"]), "inference_ms": _ms(spent["inference"]),
                            "total_ms": _ms(time.perf_counter() - start)}
        return JSONResponse(report)

    from .streams import add_track_route

    app.state.streams = add_track_route(app, service)  # POST /api/track: the webcam's live mode, tracked
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)
    return app
