"""uvicorn's httptools protocol with the bounds a front server sets on what one client may
hold: the size of a request's head, the time to send it and its body, and the connections
one address keeps open. Run it with `uvicorn --http server.api.protocol:BoundedHttpToolsProtocol`
(the Procfile does).

Why our own code: uvicorn with httptools bounds none of these (a 64 MiB header value was
buffered and answered 200; connections that sent nothing, half a head, or a body shorter
than its Content-Length stayed open for minutes; `--timeout-keep-alive` only applies
between requests). uvicorn's h11 protocol bounds the head's size
(`--h11-max-incomplete-event-size`) but not the time, and costs 2.6–3× the CPU a request:
`bin/bench protocol` measures the three (bench/README.md, "Hostile clients"); this subclass
costs about 7% more than plain httptools (a few Python calls a request; no clock reading
and no timer for a request that arrives in one read). What it adds:

- **Head size**: a request line over `MAX_URL_BYTES` is answered 414; a head (request line
  and headers) over `HTTP_MAX_HEADER_BYTES` or with more than `HTTP_MAX_HEADERS` headers,
  431 (nginx allows 8 KiB a line and 32 KiB in all, gunicorn 100 headers of 8 KiB each).
  httptools keeps a header's value in memory until it ends, so the bytes of a head still
  arriving are counted as they come, and it is refused as soon as they pass the bound.
- **Time**: a connection must finish a request's head within `HTTP_HEADER_TIMEOUT_SECONDS`
  of opening (or of the first read of a request that left its head unfinished, on a
  kept-alive connection) and its body within `HTTP_BODY_TIMEOUT_SECONDS` of the head;
  otherwise 408 and the connection is closed (one that sent nothing is closed without a
  word). Like HAProxy's
  `timeout http-request` and nginx's `client_header_timeout`/`client_body_timeout`. A
  WebSocket handshake is a request head like any other.
- **Connections per address**: at most `MAX_CONNECTIONS_PER_CLIENT` open per web process
  from one address (`server.infra.clients.address_key`: an IPv6 client by its /64); past it
  a new connection is closed at once. Not applied to the proxies of `FORWARDED_ALLOW_IPS`,
  which carry many clients: behind a proxy, the proxy must bound connections per client.
- **Protocol errors** (a malformed request line, a bad Content-Length) are answered in the
  service's JSON error shape, like every other 4xx, instead of uvicorn's plain text.
- **Pipelining**: at most `MAX_PIPELINED` requests sent ahead of their answers wait on one
  connection; the next is refused 429 (uvicorn parses every request of a read and queues
  each, about 1 KB apiece: one read of 256 KiB of `GET /healthz` queued 7,700 of them, 8.7
  MiB, and each answer let it read another 256 KiB).
- **Refusals in order**: a refusal of a request that came pipelined behind others still
  being answered is written after their answers (`on_response_complete`), as HTTP/1.1 wants
  them in order. Written at once, it went ahead of them and half-closed the connection
  under them: their answers raised `RuntimeError: Cannot call write() after write_eof()`,
  two ERROR tracebacks (98 log lines) for a request of 49 bytes, and were never sent.

Each refusal is one access-log line and a count in `flashsale_http_refusals_total{reason}`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from server.api.http import error_body
from server.infra.clients import Proxies, address_key
from server.infra.metrics import DEFERRED, HTTP_REFUSALS
from server.infra.settings import Settings
from server.infra.sockets import abort

logger = logging.getLogger("flashsale.access")

MAX_URL_BYTES = 8 * 1024
# Set in a request's ASGI scope when the body timeout ended it (the middleware logs 408).
TIMED_OUT = "flashsale.timed_out"
# After writing a refusal, how long the client is given to read it while what it still
# sends is discarded (nginx's lingering_timeout is 5 s, its lingering_time 30 s).
LINGER_S = 2.0
# Requests one connection may have waiting behind the one being answered (HTTP/1.1
# pipelining; browsers do not pipeline, and HTTP clients that do keep a few in flight).
MAX_PIPELINED = 16
# A request line's bytes beside its URL, at most: the method (httptools knows none longer
# than 16 characters), two spaces, `HTTP/1.1` and the line's end.
_REQUEST_LINE_EXTRA = 16 + 2 + 8 + 2

_IDLE, _HEAD, _BODY, _DONE = range(4)  # where the connection is in its current request


@functools.cache
def _settings() -> Settings:
    return Settings.from_env()


@functools.cache
def _proxies(spec: str) -> Proxies:
    return Proxies(spec)


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


# Open connections per client address in this process (only those that hold some).
OPEN: Counter[str] = Counter()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = _settings()
        self._max_head = settings.max_header_bytes
        self._max_headers = settings.max_headers
        self._head_timeout = settings.header_timeout_seconds
        self._body_timeout = settings.body_timeout_seconds
        self._max_connections = settings.max_connections_per_client
        spec = config.forwarded_allow_ips
        self._proxies = _proxies(spec if isinstance(spec, str) else ",".join(spec))
        self._phase = _IDLE
        self._began = False  # whether a request has begun on this connection
        self._head_bytes = 0  # bytes received of the head being read (an upper bound)
        self._began_here = False  # whether the request being read began in this read
        self._header_count = 0
        self._chunk = 0  # the size of the read being parsed
        self._due: float | None = None  # when the current phase must be over (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._key: str | None = None  # the address whose connection count this holds
        self._refusal: _Refusal | None = None
        # A refusal waiting for the answers of the requests before it (pipelined).
        self._deferred: _Refusal | None = None
        self._lost = False

    # -- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if host not in self._proxies:
            key = address_key(host)
            if OPEN[key] >= self._max_connections:
                # Closed before a byte is read: an RST, no TIME_WAIT, nothing kept.
                DEFERRED.inc(HTTP_REFUSALS.labels("too_many_connections"))
                self._phase = _DONE
                abort(transport)
                return
            OPEN[key] += 1
            self._key = key
        self._expect(self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._release()
        self._phase = _DONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._key is not None:
            OPEN[self._key] -= 1
            if OPEN[self._key] <= 0:
                del OPEN[self._key]
            self._key = None

    def data_received(self, data: bytes) -> None:
        if self._phase == _DONE:
            return
        self._unset_keepalive_if_required()
        self._chunk = len(data)
        self._began_here = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                # The socket is the WebSocket protocol's from now on; its count of sockets
                # per client is the application's (WS_MAX_PER_CLIENT).
                self._phase = _DONE
                self._due = None
                self._release()
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            self._refuse(
                self._refusal or _Refusal(400, "malformed", "The request is not valid HTTP/1.1.")
            )
            return
        # Deadlines are set only for what is still arriving after a read: a request that
        # came whole in one read (nearly all) costs no clock reading and no timer.
        phase = self._phase
        if phase == _HEAD:
            if self._began_here:
                # Requests before it (pipelined, or a body's end) came in the same read.
                self._head_bytes = self._head_begun(data)
            else:
                self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._refuse(self._head_too_large())
            elif self._due is None:
                self._expect(self._head_timeout)
        elif phase == _BODY and self._due is None:
            self._expect(self._body_timeout)

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = True
        self._phase = _HEAD
        self._due = None
        self._head_bytes = 0
        self._header_count = 0
        self._began_here = True

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_count += 1
        if self._header_count > self._max_headers:
            self._refusal = _Refusal(
                431, "too_many_headers", f"The request has more than {self._max_headers} headers."
            )
            raise self._refusal

    def on_headers_complete(self) -> None:
        # A head that arrived over several reads was counted as it came (data_received);
        # one that ended in this read may still be too large: measure it exactly.
        if len(self.url) > MAX_URL_BYTES:
            self._refusal = _Refusal(
                414, "url_too_long", f"The URL is longer than {MAX_URL_BYTES // 1024} KiB."
            )
            raise self._refusal
        if self._head_bytes + self._chunk > self._max_head:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self._max_head:
                self._refusal = self._head_too_large()
                raise self._refusal
        if len(self.pipeline) >= MAX_PIPELINED:
            self._refusal = _Refusal(
                429,
                "too_many_pipelined",
                f"More than {MAX_PIPELINED} requests were sent ahead of their answers on "
                "one connection.",
            )
            raise self._refusal
        self._phase = _BODY
        self._due = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._due = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # the next pipelined request starts, if any
        refusal = self._deferred
        if refusal is not None and not self._answering() and not self.transport.is_closing():
            self._deferred = None
            self._unset_keepalive_if_required()
            self._write_error(refusal.status, refusal.reason, refusal.message)
            self._close()

    def _head_begun(self, data: bytes) -> int:
        """An upper bound (bytes) on the unfinished head that began in the read `data`, after
        the requests before it in the same read: what follows the read's last blank line
        (the end of a head before it; a body after that head is counted too), or what the
        parser has of it (the URL, the whole headers, and the request line's method and
        version) and the line still arriving, whichever is less. The whole read counted
        pipelined requests as this one's head: ten pipelined requests of 2 KB and the start
        of an eleventh were refused 431 with a 16 KiB bound."""
        ends = [at + len(sep) for sep in (b"\n\n", b"\n\r\n") if (at := data.rfind(sep)) >= 0]
        after_blank_line = len(data) - max(ends, default=0)
        line = len(data) - (data.rfind(b"\n") + 1)
        fields = sum(len(name) + len(value) + 4 for name, value in self.headers)
        parsed = _REQUEST_LINE_EXTRA + len(self.url) + fields + line
        return min(after_blank_line, parsed)

    def _answering(self) -> bool:
        """Whether requests of this connection are being answered, or wait their turn."""
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    # -- deadlines -----------------------------------------------------------------------

    def _expect(self, seconds: float) -> None:
        """The current phase must be over within `seconds`. One timer per connection, moved
        only when it fires early: a request that arrives promptly costs no timer at all."""
        self._due = self.loop.time() + seconds
        if self._timer is None:
            self._timer = self.loop.call_at(self._due, self._check_due)

    def _check_due(self) -> None:
        self._timer = None
        if self._due is None or self._lost or self.transport.is_closing():
            return
        if self.loop.time() < self._due:
            self._timer = self.loop.call_at(self._due, self._check_due)
            return
        self._due = None
        if self._phase == _IDLE:
            if not self._began:  # never sent a byte: no answer owed
                DEFERRED.inc(HTTP_REFUSALS.labels("header_timeout"))
                abort(self.transport)
            return  # between requests: uvicorn's keep-alive timeout is in charge
        if self._phase == _HEAD:
            self._refuse(
                _Refusal(
                    408,
                    "header_timeout",
                    f"The request's headers did not arrive within {self._head_timeout:g} s.",
                )
            )
        elif self._phase == _BODY:
            self._body_timed_out()

    def _body_timed_out(self) -> None:
        cycle = self.cycle
        DEFERRED.inc(HTTP_REFUSALS.labels("body_timeout"))
        if cycle is not None and not cycle.response_complete:
            cycle.scope[TIMED_OUT] = True  # type: ignore[literal-required]
            answered = cycle.response_started
            cycle.disconnected = True  # the application's receive() now says so
            cycle.message_event.set()
            if not answered:
                message = f"The request's body did not arrive within {self._body_timeout:g} s."
                self._write_error(408, "body_timeout", message)
        self._close()

    # -- answers -------------------------------------------------------------------------

    def _head_too_large(self) -> _Refusal:
        return _Refusal(
            431,
            "header_too_large",
            f"The request's headers are larger than {self._max_head // 1024} KiB in all.",
        )

    def _refuse(self, refusal: _Refusal) -> None:
        """Answer a request that never reached the application, and close: at once, or
        after the answers of the requests before it, when they are still being answered
        (pipelined: answers go in order, `on_response_complete`). Nothing more is read."""
        self._phase = _DONE
        self._due = None
        DEFERRED.inc(HTTP_REFUSALS.labels(refusal.reason))
        logger.info("- %d %s", refusal.status, refusal.reason)
        if self._answering():
            self._deferred = refusal
            self.flow.pause_reading()
            return
        self._write_error(refusal.status, refusal.reason, refusal.message)
        self._close()

    def _write_error(self, status: int, code: str, message: str) -> None:
        body = error_body(status, code, message)
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))

    def send_400_response(self, msg: str) -> None:
        """uvicorn's own 400 (plain text), in the JSON error shape."""
        self._refuse(_Refusal(400, "malformed", "The request is not valid HTTP/1.1."))

    def _close(self) -> None:
        """Close after the answer, as nginx's lingering close does: stop sending (FIN), but
        read and discard what the client is still sending for up to `LINGER_S`, so that it
        can read the answer (closing outright while data still arrives makes the kernel
        send an RST, which destroys the answer unread). Then the socket is dropped."""
        self._phase = _DONE
        self._due = None
        transport = self.transport
        self.flow.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        self.loop.call_later(LINGER_S, _abort_if_open, self, transport)


def _abort_if_open(protocol: BoundedHttpToolsProtocol, transport: asyncio.Transport) -> None:
    if not protocol._lost:
        abort(transport)
