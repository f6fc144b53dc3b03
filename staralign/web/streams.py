"""``POST /api/track``: webcam frames tracked and smoothed across requests (the page's live mode).

A live webcam sends one frame per request; each request names its ``stream`` (an
id the page draws at random when the camera starts).  The server keeps one
:class:`~staralign.inference.tracking.FaceTracker` per stream, so a frame's faces
are cropped from the previous frame's landmarks, keep their track ids, and go
through the chosen temporal filter, exactly as ``staralign predict --smooth`` does
for video files.  At most ``max_streams`` trackers are kept; the one idle longest
is dropped first, and any idle for ``idle_seconds`` is dropped.

The answer is the ``/api/landmarks`` JSON with ``track_id``, ``detected`` and
``spread`` on every face (and, with ``ambiguity=true`` and ``smooth=ambiguity``,
the filtered covariance as the face's ambiguity), plus ``stream`` and ``smooth``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..inference.smoothing import SMOOTHERS
from ..inference.video import DEFAULT_SMOOTH
from .uploads import ApiError, read_upload, request_timing

__all__ = ["StreamTrackers", "add_track_route"]

STREAM_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class StreamTrackers:
    """One tracker per live stream, created on its first frame (or when its options change).

    ``service`` is the app's :class:`~staralign.web.app.LandmarkService` (its batched
    ``detector``, ``decode`` and ``weights_name``); not imported here, so the app module,
    which adds this route, and this one do not import each other."""

    def __init__(self, service: Any, max_streams: int = 8, idle_seconds: float = 60.0) -> None:
        self.service, self.max_streams, self.idle_seconds = service, int(max_streams), float(idle_seconds)
        # stream -> (tracker, its lock: one frame of a stream at a time, options, last used)
        self._trackers: OrderedDict[str, tuple[Any, threading.Lock, tuple[str, str], float]] = OrderedDict()
        self._lock = threading.Lock()

    def _tracker(self, stream: str, smooth: str, fmt: str) -> tuple[Any, threading.Lock]:
        from ..inference.tracking import FaceTracker

        now = time.monotonic()
        with self._lock:
            for key in [k for k, (*_, used) in self._trackers.items() if now - used > self.idle_seconds]:
                del self._trackers[key]
            entry = self._trackers.pop(stream, None)
            if entry is None or entry[2] != (smooth, fmt):
                tracker, lock = FaceTracker(self.service.detector, smooth=smooth, format=fmt), threading.Lock()
            else:
                tracker, lock = entry[0], entry[1]
            self._trackers[stream] = (tracker, lock, (smooth, fmt), now)
            while len(self._trackers) > self.max_streams:
                self._trackers.popitem(last=False)
            return tracker, lock

    def run(self, data: bytes, name: str, stream: str, smooth: str, ambiguity: bool, fmt: str,
            t: float | None) -> tuple[dict[str, Any], dict[str, float]]:
        """Decode one frame, track it; (report, seconds spent decoding / waiting / in the model)."""
        from ..inference.report import report_header

        service = self.service
        t0 = time.perf_counter()
        with service.admitted(data):  # the same checks, pixel budget and error answers as /api/landmarks
            image = service.decode(data)
            t1 = time.perf_counter()
            tracker, lock = self._tracker(stream, smooth, fmt)
            with lock:  # frames of other streams run meanwhile; their crops share the batching queue
                t2 = time.perf_counter()
                tracked = tracker.step(image, t=t)
                t3 = time.perf_counter()
        record = {"path": name, "type": "image", "width": int(image.shape[1]), "height": int(image.shape[0]),
                  "faces": [f.to_dict(ambiguity=ambiguity) for f in tracked]}
        report = {**report_header(service.detector, service.weights_name, format=fmt), "inputs": [record],
                  "errors": [], "stream": stream, "smooth": smooth}
        return report, {"decode": t1 - t0, "wait": t2 - t1, "inference": t3 - t2}


def add_track_route(app: FastAPI, service: Any) -> StreamTrackers:
    """Add ``POST /api/track`` to the app (see the module docstring)."""
    streams = StreamTrackers(service)

    @app.post("/api/track", summary="One webcam frame, tracked: track ids and smoothed landmarks",
              openapi_extra={"requestBody": {"required": True, "description": "the frame, as for /api/landmarks",
                                             "content": {"image/jpeg": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}}})
    async def track(
        request: Request,
        stream: str = Query(..., pattern=STREAM_PATTERN, description="the live stream's id (1-64 of A-Z a-z 0-9 _ -)"),
        smooth: str = Query(DEFAULT_SMOOTH, description=f"temporal filter: {', '.join(SMOOTHERS)}"),
        ambiguity: bool = Query(False, description="include per-landmark ambiguity (filtered, for smooth=ambiguity)"),
        format: str = Query("native", description="landmark layout: native, or 68"),
        t: float | None = Query(None, description="the frame's time in seconds (default: when it arrived)"),
    ) -> Response:
        """The ``/api/landmarks`` answer for a frame of a live stream, with ``track_id`` on every face."""
        start = time.perf_counter()
        if t is not None and not math.isfinite(t):  # a NaN or infinite time would freeze the filters
            raise ApiError(422, "bad_time", f"t={t}: the frame's time must be a finite number of seconds")
        if smooth not in SMOOTHERS:
            raise ApiError(422, "bad_smooth", f"smooth={smooth!r}; choose from {', '.join(SMOOTHERS)}")
        service.check_format(format)
        upload = await read_upload(request, service.limits.max_upload_bytes)
        read = time.perf_counter()
        report, spent = await run_in_threadpool(streams.run, upload.data, upload.filename, stream, smooth,
                                                ambiguity, format, t)
        report["timing"] = request_timing(start, read, spent, time.perf_counter())
        return JSONResponse(report)

    return streams
