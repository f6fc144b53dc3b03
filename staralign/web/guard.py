"""The ASGI layer in front of the app: who may send what, and how slowly.

Each rule is here for a reason a test reproduces:

* Security headers on every answer (the page's Content-Security-Policy and friends).
* A Host check when bound to loopback: a page on another site whose name resolves
  to 127.0.0.1 (DNS rebinding) must not be able to use, and read, the local server.
* An Origin check on requests that change or cost something (POST and the other
  non-safe methods): a browser sends ``Origin`` with every cross-origin POST, so a
  page on another site could otherwise make the user's browser upload to the local
  model.  Same-origin requests and clients that send no ``Origin`` (curl, scripts)
  pass; other origins only if listed (``staralign serve --allow-origin``), and those
  get the CORS headers that let their page read the answer.
* A per-client cap on uploads in progress: one address may have at most
  ``uploads_per_client`` POSTs being read or waiting for the model; more get 429
  at once, without reading their body, so stalled uploads from one client cannot
  take every slot.
* A body-read timeout: an upload that sends nothing for ``body_idle_s`` seconds, or
  is not complete ``body_deadline_s`` seconds after its headers, gets 408 and the
  connection is closed.  (Connections that never finish their headers are the
  server's business: :mod:`.server`.)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .uploads import ApiError

__all__ = ["CSP", "Guard", "GuardSettings", "host_of", "normalise_origin"]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "media-src 'self' blob: mediastream:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
       "frame-ancestors 'none'")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                     (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                     (b"permissions-policy", b"camera=(self), microphone=()")]


@dataclass(frozen=True)
class GuardSettings:
    """What the guard allows; the defaults are what ``staralign serve`` uses."""

    allowed_hosts: tuple[str, ...] | None = None  # Host names accepted (None: any)
    allowed_origins: tuple[str, ...] = ()  # other origins that may POST, e.g. "http://localhost:3000"
    uploads_per_client: int = 8  # POSTs in progress per client address
    body_idle_s: float = 10.0  # longest pause between two pieces of a request body
    body_deadline_s: float = 60.0  # longest time to receive a whole request body


def host_of(header: str) -> str:
    """The host part of a Host header, without the port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, without a default port or a trailing slash.

    ValueError for anything that is not an http(s) origin (a path, a query, no host).
    """
    text = origin.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port], e.g. http://localhost:3000")
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r}: the port is not a number from 0 to 65535") from None
    shown = f"[{host}]" if ":" in host else host
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _own_origin(scope: Scope) -> str | None:
    host = _header(scope, b"host")
    if not host:
        return None
    try:
        return normalise_origin(f"{scope.get('scheme', 'http')}://{host.strip()}")
    except ValueError:
        return None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "message": message}, status, headers=headers)


class Guard:
    """ASGI middleware applying :class:`GuardSettings` (see the module docstring for the why)."""

    def __init__(self, app: ASGIApp, settings: GuardSettings | None = None) -> None:
        self.app = app
        self.settings = settings or GuardSettings()
        hosts = self.settings.allowed_hosts
        self.allowed_hosts = None if hosts is None else {h.lower().strip("[]") for h in hosts}
        self.allowed_origins = {normalise_origin(o) for o in self.settings.allowed_origins}
        self.uploads: Counter[str] = Counter()  # client address -> POSTs in progress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        cors = origin is not None and self._listed(origin)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + _SECURITY_HEADERS
                if cors and origin is not None:
                    headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
                message = {**message, "headers": headers}
            await send(message)

        refusal = self._refusal(scope, origin, cors)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        if scope["method"] == "OPTIONS" and cors:  # a CORS preflight from a listed origin
            await Response(status_code=204, headers={
                "access-control-allow-methods": "GET, HEAD, POST",
                "access-control-allow-headers": "content-type, content-disposition",
                "access-control-max-age": "600"})(scope, receive, send_with_headers)
            return
        if scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send_with_headers)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        if self.uploads[client] >= self.settings.uploads_per_client:
            await _error(429, "too_many_uploads",
                         f"this client already has {self.uploads[client]} uploads in progress (the limit); "
                         "wait for an answer before sending more",
                         {"retry-after": "1", "connection": "close"})(scope, receive, send_with_headers)
            return
        self.uploads[client] += 1
        try:
            await self.app(scope, _timed_receive(receive, self.settings), send_with_headers)
        finally:
            self.uploads[client] -= 1
            if self.uploads[client] <= 0:
                del self.uploads[client]

    def _listed(self, origin: str) -> bool:
        try:
            return normalise_origin(origin) in self.allowed_origins
        except ValueError:
            return False

    def _refusal(self, scope: Scope, origin: str | None, listed: bool) -> Response | None:
        """An error answer for a request refused before the app sees it, else None."""
        if self.allowed_hosts is not None:
            host = _header(scope, b"host") or ""
            if host_of(host) not in self.allowed_hosts:
                port = scope.get("server", ("", ""))[1]
                return _error(400, "bad_host", f"Host {host!r} is not served here; open http://127.0.0.1:{port}/")
        if origin is not None and scope["method"] not in SAFE_METHODS and not listed:
            own = _own_origin(scope)
            try:
                same = own is not None and normalise_origin(origin) == own
            except ValueError:  # "null" (sandboxed frames, file: pages) and junk
                same = False
            if not same:
                return _error(403, "cross_origin",
                              f"requests from {origin!r} are not accepted: the page must be served by this server "
                              "(start it with --allow-origin ORIGIN to accept another site)")
        return None


def _timed_receive(receive: Receive, settings: GuardSettings) -> Receive:
    """``receive`` that gives up (408, closing the connection) on a body that stalls or takes too long."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.body_deadline_s
    done = False

    async def timed() -> Message:
        nonlocal done
        if done:  # the body is complete: waiting for a disconnect is not a body read
            return await receive()
        wait = min(settings.body_idle_s, deadline - loop.time())
        try:
            message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
        except TimeoutError:
            raise ApiError(408, "upload_timeout",
                           f"the upload stalled: no complete body within {settings.body_deadline_s:g} s or "
                           f"a pause over {settings.body_idle_s:g} s; send the image again",
                           headers={"connection": "close"}) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    return timed
