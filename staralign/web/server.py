"""The HTTP server under ``staralign serve``: uvicorn, with limits per client and per connection.

uvicorn's own knobs cover part of what a server on a shared machine needs:
``limit_concurrency`` answers 503 past a number of open connections, and
``timeout_keep_alive`` closes idle connections *between* requests.  They fall
short in two ways, found by holding the server with slow clients:

* ``limit_concurrency`` counts every open connection, so a few dozen clients that
  open a connection and then stall made every other request a 503;
* nothing limits how long a client may take to send a request's headers (the
  keep-alive timer is cancelled by the first byte that arrives).

So the HTTP protocol here is uvicorn's h11 protocol plus a per-client connection cap
(connections past :attr:`ServerSettings.connections_per_client` from one address
get a 429 and are closed) and a header deadline (a connection that has not sent a
complete request head within :attr:`ServerSettings.header_timeout_s` is closed).
Request *bodies* are timed by the app's guard (:mod:`.guard`), which also caps
uploads per client.  ``limit_concurrency`` stays as the last resort, set high
enough that the per-client caps act first.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

__all__ = ["ServerSettings", "guarded_h11_protocol", "make_server"]


@dataclass(frozen=True)
class ServerSettings:
    """Connection limits of ``staralign serve``; the defaults are what it uses."""

    connections_per_client: int = 32  # open connections from one address (browsers use up to 6)
    header_timeout_s: float = 10.0  # to send a complete request head, from connecting or the last answer
    max_connections: int = 512  # uvicorn's limit_concurrency: 503 past this many, whoever they are
    keep_alive_s: int = 5  # uvicorn's timeout_keep_alive: idle time allowed between requests


_REFUSED = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s")
_REFUSED_BODY = (b'{"error":"too_many_connections","message":"this client has too many open connections '
                 b'to the server; close some and try again"}')


def guarded_h11_protocol(settings: ServerSettings) -> type:
    """uvicorn's h11 protocol class with the per-client connection cap and the header deadline.

    Each call makes a new class with its own per-address count, so two servers in one
    process (tests) do not share it.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_by_client: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        """H11Protocol + a per-client connection cap and a deadline for request heads."""

        counts = open_by_client

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: Any = None
            self._address = (self.client or ("unknown", 0))[0]
            open_by_client[self._address] += 1
            if open_by_client[self._address] > settings.connections_per_client:
                transport.write(_REFUSED % (len(_REFUSED_BODY), _REFUSED_BODY))
                transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            open_by_client[self._address] -= 1
            if open_by_client[self._address] <= 0:
                del open_by_client[self._address]
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():  # the head is complete: the app times the body
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self._in_request():
                self._arm_header_timer()

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(settings.header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._in_request() or self.transport.is_closing():
                return
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    return GuardedH11Protocol


def make_server(app: Any, settings: ServerSettings | None = None, log_level: str = "info") -> uvicorn.Server:
    """The uvicorn server ``staralign serve`` runs (``server.run(sockets=[sock])``)."""
    import uvicorn

    settings = settings or ServerSettings()
    config = uvicorn.Config(app, http=guarded_h11_protocol(settings), ws="none", lifespan="on",
                            log_level=log_level, server_header=False, proxy_headers=False,
                            timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.max_connections)
    return uvicorn.Server(config)
