"""The FastAPI app behind ``staralign serve``: one page, ``POST /api/landmarks``, ``GET /api/info``.

Design choices, each for a reason:

* One :class:`~staralign.inference.LandmarkDetector` is loaded before the app is
  built and shared by every request.  Each request decodes its image and finds its
  faces in a worker thread (the face detector one call at a time, it keeps state);
  the crops then go through a micro-batching queue
  (:mod:`staralign.inference.batching`): crops of requests that arrive within a few
  milliseconds run through the network together, in one call, on one thread, and
  each request gets back its own rows.  The event loop keeps answering meanwhile.
* Uploads are read from the raw stream (:mod:`.uploads`): nothing goes to disk,
  the size limit holds while reading.  The type comes from the magic bytes and
  the size from the header (:mod:`.images`) before the decoder sees the file.
* The answer is exactly the JSON ``staralign predict --json`` writes for one
  image (the same header, from :func:`~staralign.inference.report.report_header`),
  plus ``timing``; errors are ``{"error": code, "message": text}``.
* The page is plain HTML, JavaScript and CSS from the package, with a
  Content-Security-Policy that forbids any other origin, so it works offline and
  a stray CDN link would fail the browser test rather than phone home.
* Who may send what, and how slowly (Host and Origin checks, uploads per client,
  the body-read timeout) is the guard's (:mod:`.guard`); connection limits are the
  server's (:mod:`.server`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
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

from .guard import CSP, Guard, GuardSettings
from .images import ACCEPTED_TYPES, HeaderError, describe_unsupported, image_size, sniff_type
from .uploads import ApiError, read_upload, request_timing

if TYPE_CHECKING:
    from ..inference.detector import LandmarkDetector

__all__ = ["CSP", "MAX_BOX_OVER_IMAGE", "STATIC_DIR", "Limits", "LandmarkService", "create_app"]

log = logging.getLogger("staralign.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# A given face box may be at most this many times the image's longer side, and must overlap the image.
MAX_BOX_OVER_IMAGE = 4.0


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
    angle: float = Field(description="the face's roll in degrees (eye line, clockwise on screen), undone by the crop")
    refined: bool = Field(description="placed from a first pass's landmarks (refine)")


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
    keypoints: list[list[float]] | None = Field(description="the detector's five points (eyes, nose tip, mouth "
                                                            "corners), pixels; null when it gives none")
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
    wait_ms: float = Field(description="waiting for a decoding slot (other requests first)")
    inference_ms: float = Field(description="face detection, network (shared with the requests batched "
                                            "with this one) and ambiguity")
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
    detectors: list[str] = Field(description="accepted values of ?detector= (the face detector per image)")
    input_size: int = Field(description="network input, pixels a side")
    ambiguity: bool = Field(description="whether the model reports per-landmark ambiguity")
    definition: LayoutOut = Field(description="the model's own landmark definition")
    formats: dict[str, LayoutOut] = Field(description="accepted values of ?format= and the layout each gives")
    limits: LimitsOut
    max_batch: int = Field(description="most faces of concurrent requests run through the network in one call "
                                        "(1: no batching)")
    accepted_types: list[str] = Field(description="image types accepted (checked by magic bytes)")


# --------------------------------------------------------------------------- the model, shared


def _layout_dict(definition: Any) -> dict[str, Any]:
    return {
        "name": definition.name,
        "num_points": definition.num_points,
        "edges": [{"name": e.name, "closed": bool(e.closed), "indices": list(e.indices)} for e in definition.edges],
        "flip_pairs": [list(p) for p in definition.flip_pairs],
    }


# Face detectors a request may choose (?detector=): those needing no extra package.
WEB_DETECTORS = ("yunet", "opencv", "none")


class LandmarkService:
    """One detector shared by all requests: validates and decodes images, batches their crops.

    ``max_batch``: most crops in one network call (1: every request alone, one call
    at a time); ``batch_wait_s``: how long a crop waits for others to join it.
    ``pixel_budget`` (default twice ``limits.max_pixels``, the memory of two images at
    the limit) bounds the pixels of the decoded images held at once: many webcam
    frames can wait for one batch together, two images at the limit cannot be joined
    by a third.
    """

    def __init__(self, detector: LandmarkDetector, weights_name: str, limits: Limits,
                 pixel_budget: int | None = None, max_batch: int = 8, batch_wait_s: float = 0.005) -> None:
        from ..inference.batching import BatchingBackend, LockedFaceDetector
        from ..inference.detector import LandmarkDetector
        from ..inference.report import face_detector_name

        self.weights_name, self.limits = weights_name, limits
        self.max_batch = max(1, int(max_batch))
        self.pixel_budget = max(1, int(pixel_budget or 2 * limits.max_pixels))
        self._pixels_held = 0
        self._pixels_free = threading.Condition()
        self.layouts = detector.formats()  # the values ?format= accepts, and the layout of each
        # Created now, not on the first request: an unavailable detector fails at start-up.
        self.detector_name = face_detector_name(detector)
        # What requests run on: the loaded detector's face detector (one call at a time) and
        # network, whose calls the batching backend merges across requests.
        self.batching = BatchingBackend(detector.backend, max_batch=self.max_batch, max_wait_s=batch_wait_s,
                                        max_queue=max(64, 8 * self.max_batch))
        self.detector = LandmarkDetector(self.batching, detector=LockedFaceDetector(detector.face_detector),
                                         format=detector.format, batch_size=self.max_batch,
                                         ambiguity=detector.ambiguity, weights=detector.weights)
        self._named_face_detectors: dict[str, Any] = {}
        self._named_lock = threading.Lock()

    def face_detector(self, name: str | None) -> Any:
        """The face detector of one request: the server's own (``name`` None or its name) or a
        named one from :data:`WEB_DETECTORS`, each created once and called by one thread at a time."""
        from ..inference.batching import LockedFaceDetector
        from ..inference.faces import get_face_detector

        if name is None or name == self.detector_name:
            return self.detector.face_detector
        with self._named_lock:
            if name not in self._named_face_detectors:
                self._named_face_detectors[name] = LockedFaceDetector(get_face_detector(name))
            return self._named_face_detectors[name]

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
            "detectors": list(WEB_DETECTORS),
            "input_size": int(self.detector.input_size),
            "ambiguity": bool(getattr(backend, "has_ambiguity", False)),
            "definition": _layout_dict(self.detector.definition),
            "formats": {k: _layout_dict(v) for k, v in self.layouts.items()},
            "limits": {"max_upload_bytes": self.limits.max_upload_bytes, "max_pixels": self.limits.max_pixels,
                       "max_side": self.limits.max_side},
            "max_batch": self.max_batch,
            "accepted_types": list(ACCEPTED_TYPES.values()),
        }

    def check_format(self, fmt: str) -> None:
        """422 unless ``fmt`` is a layout this model can answer in (``?format=``)."""
        if fmt not in self.layouts:
            raise ApiError(422, "bad_format", f"format={fmt!r} is not available for this model; "
                                              f"choose from {', '.join(self.layouts)}")

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
            box: tuple[float, float, float, float] | None,
            face_detector: str | None = None) -> tuple[dict[str, Any], dict[str, float]]:
        """Decode and predict one upload; (report, seconds spent decoding / waiting / in the model).

        The image's pixels (from its header) are reserved from the pixel budget before
        decoding and returned when the model is done with it, so the decoded images
        waiting for the model stay within the budget however many requests queue.
        """
        t0 = time.perf_counter()
        with self.admitted(data):
            t1 = time.perf_counter()
            image = self.decode(data)
            if box is not None:
                check_box_fits(box, image.shape[1], image.shape[0])
            t2 = time.perf_counter()
            report, wait, infer = self.predict(image, name, ambiguity, fmt, box, face_detector)
        return report, {"decode": t2 - t1, "wait": wait + (t1 - t0), "inference": infer}

    @contextlib.contextmanager
    def admitted(self, data: bytes) -> Iterator[None]:
        """One upload's way to the model, for every route that runs it: its header checked, its
        pixels reserved from the budget until the model is done with it, the batching queue
        told a request is coming, and the model's errors as API errors (:func:`model_errors`)."""
        _, width, height = self.check(data)
        with model_errors(), self.batching.batcher.expecting(), self._reserve_pixels(width * height):
            yield

    @contextlib.contextmanager
    def _reserve_pixels(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.pixel_budget)  # one image at the limit always fits alone
        with self._pixels_free:
            while self._pixels_held + pixels > self.pixel_budget:
                self._pixels_free.wait()
            self._pixels_held += pixels
        try:
            yield
        finally:
            with self._pixels_free:
                self._pixels_held -= pixels
                self._pixels_free.notify_all()

    def predict(self, image: np.ndarray, name: str, ambiguity: bool, fmt: str,
                box: tuple[float, float, float, float] | None,
                face_detector: str | None = None) -> tuple[dict[str, Any], float, float]:
        """The ``staralign predict`` report for one image; returns (report, wait s, inference s).

        ``face_detector``: a name from :data:`WEB_DETECTORS` for this image (None: the server's)."""
        from ..inference.faces import FaceDetectorError
        from ..inference.report import report_header

        t1 = time.perf_counter()
        try:
            used = self.face_detector(face_detector)
        except FaceDetectorError as exc:
            raise ApiError(422, "bad_detector", f"detector={face_detector!r} is unavailable: {exc}") from None
        with model_errors():
            faces = self.detector.detect(image, box=box, format=fmt, ambiguity=ambiguity, detector=used)
        t2 = time.perf_counter()
        record = {"path": name, "type": "image", "width": int(image.shape[1]), "height": int(image.shape[0]),
                  "faces": [f.to_dict(ambiguity=ambiguity) for f in faces]}
        report = {**report_header(self.detector, self.weights_name, box=box is not None, format=fmt,
                                  face_detector=used),
                  "inputs": [record], "errors": []}
        return report, 0.0, t2 - t1


@contextlib.contextmanager
def model_errors() -> Iterator[None]:
    """The model's failures as API errors: a full batching queue is 503 ``busy`` (retry), a
    network whose output is not finite 500 ``model_output_not_finite`` naming its weights."""
    from ..inference.batching import BatchQueueFull
    from ..inference.detector import ModelOutputError

    try:
        yield
    except ModelOutputError as exc:
        raise ApiError(500, "model_output_not_finite", str(exc)) from None
    except BatchQueueFull:
        raise ApiError(503, "busy", "the model has too much work queued; try again in a moment",
                       headers={"retry-after": "1"}) from None


def check_box_fits(box: tuple[float, float, float, float], width: int, height: int) -> None:
    """422 for a box no face in this image can have: sides under a pixel or over
    :data:`MAX_BOX_OVER_IMAGE` times the image's longer side, or no overlap with the image."""
    x1, y1, x2, y2 = box
    shown = ",".join(f"{v:g}" for v in box)
    longest = MAX_BOX_OVER_IMAGE * max(width, height)
    if not all(math.isfinite(v) for v in box) or not (x2 - x1 >= 1 and y2 - y1 >= 1):
        raise ApiError(422, "bad_box", f"box={shown}: a face box needs x2 - x1 >= 1 and y2 - y1 >= 1 pixels")
    if x2 - x1 > longest or y2 - y1 > longest:
        raise ApiError(422, "bad_box", f"box={shown} is larger than {MAX_BOX_OVER_IMAGE:g} times this "
                                       f"{width}x{height} image; give the face's box in the image's pixels")
    if x1 >= width - 0.5 or y1 >= height - 0.5 or x2 <= -0.5 or y2 <= -0.5:
        raise ApiError(422, "bad_box", f"box={shown} lies outside this {width}x{height} image")


def _parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    from ..inference.faces import parse_box

    if text is None or text == "":
        return None
    try:
        return parse_box(text)
    except ValueError as exc:
        raise ApiError(422, "bad_box", f"box={text!r}: {exc}") from None


# --------------------------------------------------------------------------- the app


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "corrupt image, malformed or empty upload"},
    413: {"model": ErrorResponse, "description": "upload over the byte limit, or image over the pixel limit"},
    415: {"model": ErrorResponse, "description": "not a JPEG, PNG, BMP or WebP image, or a wrong Content-Type"},
    403: {"model": ErrorResponse, "description": "a cross-origin request (see staralign serve --allow-origin)"},
    408: {"model": ErrorResponse, "description": "the upload stalled or took too long"},
    422: {"model": ErrorResponse, "description": "bad query option (format, box, ambiguity)"},
    429: {"model": ErrorResponse, "description": "too many uploads in progress from this client"},
    503: {"model": ErrorResponse, "description": "too much work queued for the model"},
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
               allowed_hosts: Sequence[str] | None = None, allowed_origins: Sequence[str] = (),
               guard: GuardSettings | None = None, max_batch: int = 8, batch_wait_s: float = 0.005) -> FastAPI:
    """The web app around a loaded :class:`~staralign.inference.LandmarkDetector`.

    ``weights_name`` is shown to users (a file name, not a server path).
    ``allowed_hosts``: Host header values accepted (None: any; ``staralign serve``
    passes the loopback names when listening on loopback).  ``allowed_origins``:
    other sites whose pages may POST here.  ``guard``: the rest of the guard's
    settings (uploads per client, body timeouts).  ``max_batch``, ``batch_wait_s``:
    the micro-batching of crops across requests (``max_batch=1`` turns it off).
    """
    from .. import __version__

    guard = guard or GuardSettings()
    guard = dataclasses.replace(
        guard, allowed_hosts=guard.allowed_hosts if allowed_hosts is None else tuple(allowed_hosts),
        allowed_origins=(*guard.allowed_origins, *allowed_origins))
    service = LandmarkService(detector, weights_name, limits or Limits(), max_batch=max_batch,
                              batch_wait_s=batch_wait_s)
    app = FastAPI(title="staralign web", version=__version__, docs_url=None, redoc_url=None,
                  description="Facial landmarks and their ambiguity (STAR loss) for one uploaded image. "
                              "The interactive docs pages are off because they load assets from a CDN; "
                              "the schema is at /openapi.json.")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.code, "message": exc.message}, exc.status, headers=exc.headers)

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

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", response_model=InfoResponse, summary="The model: landmark layout, edges, limits")
    async def info() -> dict[str, Any]:
        """What the page needs to draw: the landmark definition (edges, flip pairs), formats, limits."""
        return service.info()

    app.add_api_route("/api/info", info, methods=["HEAD"], response_model=InfoResponse, include_in_schema=False)

    @app.post("/api/landmarks", response_model=LandmarksResponse, responses=_ERRORS,
              summary="Faces, landmarks and ambiguity in one image",
              openapi_extra={"requestBody": _REQUEST_BODY})
    async def landmarks(
        request: Request,
        ambiguity: bool = Query(False, description="include per-landmark ambiguity (heatmap spread, pixels)"),
        format: str = Query("native", description="landmark layout: native, or 68 (300W points from WFLW)"),
        box: str | None = Query(None, description="x1,y1,x2,y2: use this face box instead of the detector"),
        detector: str | None = Query(None, description="face detector for this image: "
                                                       f"{', '.join(WEB_DETECTORS)} (default: the server's)"),
    ) -> Response:
        """The JSON ``staralign predict --json`` writes for this one image, plus ``timing``.

        Send the image as a multipart form field ``file`` or as the raw body with an
        ``image/*`` Content-Type.  No face found is a 200 with an empty ``faces`` list.
        """
        start = time.perf_counter()
        service.check_format(format)
        face_box = _parse_box(box)
        if detector is not None and detector not in WEB_DETECTORS:
            raise ApiError(422, "bad_detector", f"detector={detector!r}: choose from {', '.join(WEB_DETECTORS)}")
        upload = await read_upload(request, service.limits.max_upload_bytes)
        read = time.perf_counter()
        report, spent = await run_in_threadpool(service.run, upload.data, upload.filename, ambiguity, format,
                                                face_box, detector)
        report["timing"] = request_timing(start, read, spent, time.perf_counter())
        return JSONResponse(report)

    from .streams import add_track_route

    app.state.streams = add_track_route(app, service)  # POST /api/track: the webcam's live mode, tracked
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(Guard, settings=guard)
    return app
