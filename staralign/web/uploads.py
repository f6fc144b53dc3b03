"""Reading an uploaded image from the raw request stream, in memory, within a size limit.

Starlette's ``request.form()`` spools any upload over 1 MB to a temporary file on
disk; a demo server that people point at their own photos should leave no copies
behind, so the body is read here chunk by chunk instead: multipart/form-data
(field ``file``) is parsed as it streams with python-multipart's push parser,
raw bytes (``Content-Type: image/*``) are simply collected.  A declared
``Content-Length`` over the limit is refused before reading a byte, and reading
stops as soon as the running total passes the limit, so an oversize or endless
body costs at most one chunk more than the limit.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from starlette.requests import ClientDisconnect, Request

__all__ = ["MULTIPART_SLACK", "ApiError", "Upload", "read_upload", "request_timing"]

# Room for multipart boundaries and part headers on top of the image's own limit.
MULTIPART_SLACK = 64 * 1024
FILE_FIELD = "file"
_EXTENDED_FILENAME = re.compile(rb"filename\*\s*=\s*([A-Za-z0-9_-]*)'[^']*'([^;\s]+)", re.IGNORECASE)
RAW_TYPES_HINT = ("send multipart/form-data with the image in a field named 'file', "
                  "or the raw image bytes with Content-Type: image/jpeg, image/png, image/bmp or image/webp")


class ApiError(Exception):
    """An error answered as JSON ``{"error": code, "message": message}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


@dataclass(frozen=True)
class Upload:
    """The bytes of one uploaded image and the name it came with ("upload" for raw bodies)."""

    data: bytes
    filename: str
    content_type: str


def _too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, "upload_too_large",
                    f"{what} is larger than the server's limit of {limit / 2**20:g} MB "
                    "(staralign serve --max-upload-mb); send a smaller image")


def _parse_options(value: str | bytes) -> tuple[str, dict[str, str]]:
    """A header's value and parameters; parameter values are read as UTF-8.

    Browsers send a file's name as raw UTF-8 bytes in the multipart part header
    (``filename="照片.jpg"``, as the HTML standard says), and HTTP headers reach us
    as Latin-1 text, so a ``str`` is turned back into its bytes first (Latin-1 if
    it can be, else UTF-8) and the parser gets bytes, never text it would have to
    encode itself.
    """
    from python_multipart.multipart import parse_options_header

    if isinstance(value, str):
        try:
            value = value.encode("latin-1")
        except UnicodeEncodeError:
            value = value.encode("utf-8")
    media, params = parse_options_header(value)
    out = {k.decode("latin-1").lower(): v.decode("utf-8", "replace") for k, v in params.items()}
    extended = _EXTENDED_FILENAME.search(value)  # RFC 6266: filename*=UTF-8''%E7%85%A7.jpg wins
    if extended:
        charset = extended.group(1).decode("latin-1").strip() or "utf-8"
        with contextlib.suppress(LookupError):  # an unknown charset: keep the plain filename
            out["filename"] = unquote(extended.group(2).decode("latin-1"), encoding=charset, errors="replace")
    return media.decode("latin-1").lower(), out


def _clean_name(name: str) -> str:
    """The file name a browser sent, reduced to a base name (it is only echoed back in the JSON)."""
    base = os.path.basename(name.replace("\\", "/")).strip()
    return "".join(c for c in base if c.isprintable())[:255] or "upload"


class _MultipartFile:
    """Push-parser callbacks that keep the first part named ``file`` in memory, up to ``limit`` bytes."""

    def __init__(self, boundary: str, limit: int) -> None:
        from python_multipart.multipart import MultipartParser

        self.limit = limit
        self.data: bytearray | None = None
        self.filename = "upload"
        self.content_type = ""
        self._headers: dict[str, str] = {}
        self._field, self._value = bytearray(), bytearray()
        self._capturing = False
        self._done = False
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, params = _parse_options(self._headers.get("content-disposition", ""))
        self._capturing = params.get("name") == FILE_FIELD and not self._done
        if self._capturing:
            self.data = bytearray()
            self.filename = _clean_name(params.get("filename", "upload"))
            self.content_type = self._headers.get("content-type", "")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._capturing and self.data is not None:
            self.data.extend(data[start:end])
            if len(self.data) > self.limit:
                raise _too_large(self.limit, "the image")

    def _part_end(self) -> None:
        if self._capturing:
            self._capturing, self._done = False, True

    def write(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise ApiError(400, "bad_multipart", f"malformed multipart/form-data body: {exc}") from None

    def finish(self) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self.parser.finalize()
        except MultipartParseError as exc:
            raise ApiError(400, "bad_multipart", f"malformed multipart/form-data body: {exc}") from None
        if not self._done:
            raise ApiError(400, "missing_file",
                           f"the multipart form has no complete field named '{FILE_FIELD}'; {RAW_TYPES_HINT}")


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The image bytes of a request: multipart field ``file`` or a raw ``image/*`` body.

    Raises :class:`ApiError`: 413 past ``max_bytes`` (declared or counted), 415 for
    other content types, 400 for an empty or malformed body or a client that went away
    mid-upload.  Nothing touches disk.
    """
    media, params = _parse_options(request.headers.get("content-type", ""))
    multipart = media == "multipart/form-data"
    if not multipart and not (media.startswith("image/") or media == "application/octet-stream"):
        shown = media or "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type {shown} is not accepted; {RAW_TYPES_HINT}")
    body_limit = max_bytes + (MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(400, "bad_content_length", f"Content-Length {declared!r} is not a number") from None
        if length > body_limit:
            raise _too_large(max_bytes, f"the upload ({length / 2**20:.1f} MB)")
    form: _MultipartFile | None = None
    raw = bytearray()
    if multipart:
        boundary = params.get("boundary", "")
        if not boundary:
            raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
        form = _MultipartFile(boundary, max_bytes)
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > body_limit:  # stop reading: the rest of the body is never pulled in
                raise _too_large(max_bytes, "the upload")
            if form is not None:
                form.write(chunk)
            else:
                raw.extend(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away during the upload") from None
    if form is not None:
        form.finish()
        data, name, ctype = bytes(form.data or b""), form.filename, form.content_type
    else:  # a raw body may name itself: Content-Disposition: inline; filename="photo.jpg"
        _, disposition = _parse_options(request.headers.get("content-disposition", ""))
        data, name, ctype = bytes(raw), _clean_name(disposition.get("filename", "upload")), media
    if not data:
        raise ApiError(400, "empty_upload", "the uploaded image is empty")
    return Upload(data, name, ctype)


def request_timing(start: float, read: float, spent: dict[str, float], end: float) -> dict[str, float]:
    """The ``timing`` of an answer, in milliseconds: reading the upload (``start`` to ``read``,
    ``time.perf_counter`` values), then decoding, waiting for the network and running it
    (``spent``, seconds), and the whole request (``start`` to ``end``)."""
    def ms(seconds: float) -> float:
        return round(seconds * 1000.0, 2)

    return {"read_ms": ms(read - start), "decode_ms": ms(spent["decode"]), "wait_ms": ms(spent["wait"]),
            "inference_ms": ms(spent["inference"]), "total_ms": ms(end - start)}
