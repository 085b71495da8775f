"""What every HTTP request goes through first (`Observed`): a request id, the body read in full
(at most `MAX_BODY_BYTES`), the in-flight limit, its latency in the histogram, and one log
line.

Overload is answered, not queued (README promise 4): past `MAX_IN_FLIGHT` requests in flight
in a process, the next ones get 503 with Retry-After at once, while the admitted ones keep their
latency. Health and readiness are never refused.

In flight means *work*: a request counts from the moment its body has arrived whole, not
while the client is still sending it. Bodies are read here, before the request is admitted
(as nginx buffers a request before passing it on), so that 200 connections that each send
14 bytes of a 100-byte body and stop hold no slot: they wait in the protocol, which gives
each `HTTP_BODY_TIMEOUT_SECONDS` (server/api/protocol.py), and each address a bounded number
of connections. Once they had held `MAX_IN_FLIGHT` full for as long as they liked.

A client that goes away mid-body is not an error: one access line with status 499 (nginx's
"client closed request"; 408 when the protocol's body timeout ended it), no traceback, no 5xx
in the metrics. It once made a 500 with two tracebacks, about 100 log lines per abort.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.http import MAX_BODY_BYTES, error_response, loggable_path
from server.api.protocol import TIMED_OUT
from server.infra.logs import loggable
from server.infra.metrics import DEFERRED, OVERLOADED, REQUEST_DURATION, method_label

logger = logging.getLogger("flashsale.access")

NEVER_REFUSED = frozenset({"/healthz", "/readyz"})
_VALID_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
REQUEST_TIMEOUT = 408


class _Gone(Exception):
    """The client left (or timed out) before its body was complete."""


class _TooLarge(Exception):
    pass


class Observed:
    """Pure ASGI middleware: cheap enough to sit in front of every request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        access_log: bool = True,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0
        self._prefix = os.urandom(3).hex()
        self._count = 0
        self._histograms: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._request_id(scope["headers"])
        length = _body_length(scope)
        if length is not None:
            if length > self.max_body_bytes:
                await self._answer_too_large(scope, receive, send, request_id, started)
                return
            try:
                receive = await self._read_body(receive)
            except _Gone:
                status = REQUEST_TIMEOUT if scope.get(TIMED_OUT) else CLIENT_CLOSED_REQUEST
                self._done(scope, status, started, request_id)
                return
            except _TooLarge:
                await self._answer_too_large(scope, receive, send, request_id, started)
                return
        if self.in_flight >= self.max_in_flight and scope["path"] not in NEVER_REFUSED:
            DEFERRED.inc(OVERLOADED)  # a storm of refusals must stay cheap
            response = error_response(
                503,
                "overloaded",
                "The shop is very busy right now; please try again in a moment.",
                headers={"Retry-After": "1", "X-Request-ID": request_id.decode()},
            )
            await response(scope, receive, send)
            return

        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.in_flight -= 1
            self._done(scope, status, started, request_id)

    async def _read_body(self, receive: Receive) -> Receive:
        """Receive the whole body; a `receive` that hands it to the application in one
        message, then carries on with the real one (for the disconnect that follows)."""
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {
            "type": "http.request",
            "body": chunks[0] if len(chunks) == 1 else b"".join(chunks),
            "more_body": False,
        }
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if not handed:
                handed = True
                return whole
            return await receive()

        return replay

    async def _answer_too_large(
        self, scope: Scope, receive: Receive, send: Send, request_id: bytes, started: float
    ) -> None:
        response = error_response(
            413,
            "payload_too_large",
            f"The request body is larger than {self.max_body_bytes // 1024} KiB.",
            # Closing saves reading the rest of a body that may be megabytes long.
            headers={"X-Request-ID": request_id.decode(), "Connection": "close"},
        )
        await response(scope, receive, send)
        self._done(scope, 413, started, request_id)

    def _done(self, scope: Scope, status: int, started: float, request_id: bytes) -> None:
        """Count the request in the histogram and write its access line."""
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        # Every label value from a closed set: route templates, standard methods, classes.
        key = (getattr(route, "path", "unmatched"), method_label(scope["method"]), status // 100)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = REQUEST_DURATION.labels(key[0], key[1], f"{key[2]}xx")
            self._histograms[key] = histogram
        DEFERRED.observe(histogram, elapsed)
        if self.access_log and logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s %s %d %.1fms",
                loggable(scope["method"], 20),
                loggable_path(scope),
                status,
                elapsed * 1000,
                extra={"request_id": request_id.decode()},
            )

    def _request_id(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The caller's X-Request-ID if it is a sane one, else a new one."""
        for name, value in headers:
            if name == b"x-request-id":
                if 0 < len(value) <= 64 and set(value.decode("latin-1")) <= _VALID_ID:
                    return value
                break
        self._count += 1
        return f"{self._prefix}-{self._count:x}".encode()


def _body_length(scope: Scope) -> int | None:
    """The body's announced length; 0 for a chunked body (length unknown); None for none."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = int(value) if value.isdigit() else 0
            return length or None
        if name == b"transfer-encoding":
            return 0
    return None
