"""What every HTTP request goes through first: the in-flight limit, a request id, its
latency in the histogram, and one log line (`Observed`); then the body limit (`BodyLimit`).

Overload is answered, not queued (DESIGN.md §1, promise 4): past `MAX_IN_FLIGHT` requests in
flight in a process, the next ones get 503 with Retry-After at once, while the admitted ones
keep their latency. Health, readiness and metrics are never refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.http import MAX_BODY_BYTES, RequestError, error_response
from server.infra.metrics import DEFERRED, OVERLOADED, REQUEST_DURATION

logger = logging.getLogger("flashsale.access")

NEVER_REFUSED = frozenset({"/healthz", "/readyz", "/metrics"})
_VALID_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class Observed:
    """Pure ASGI middleware: cheap enough to sit in front of every request."""

    def __init__(self, app: ASGIApp, *, max_in_flight: int, access_log: bool = True) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.access_log = access_log
        self.in_flight = 0
        self._prefix = os.urandom(3).hex()
        self._count = 0
        self._histograms: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        request_id = self._request_id(scope["headers"])
        if self.in_flight >= self.max_in_flight and path not in NEVER_REFUSED:
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
        started = time.perf_counter()

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
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            key = (getattr(route, "path", "unmatched"), scope["method"], status // 100)
            histogram = self._histograms.get(key)
            if histogram is None:
                histogram = REQUEST_DURATION.labels(key[0], key[1], f"{key[2]}xx")
                self._histograms[key] = histogram
            DEFERRED.observe(histogram, elapsed)
            if self.access_log and logger.isEnabledFor(logging.INFO):
                logger.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    path,
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


class BodyLimit:
    """Refuses bodies over `MAX_BODY_BYTES` with 413, before they are read."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine: in the common case it hands back the next app's own, so that it
        # adds no frame for every later resume of the request to pass through.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    return self._refuse(scope, receive, send)
                return self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return self.app(scope, receive, send)
        return self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A body without a Content-Length (chunked): count it as it arrives."""
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise RequestError(413, "payload_too_large", self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"The request body is larger than {self.limit // 1024} KiB."

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large", self._message())
        await response(scope, receive, send)
