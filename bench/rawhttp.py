"""A lean HTTP/1.1 keep-alive client for the load generators (storm shoppers, steady shop).

A raw asyncio protocol on uvloop that writes prepared request bytes and reads responses by
`Content-Length`: a few microseconds of Python per request, where a general client (httpx,
aiohttp) spends ten times more and would share the two cores with the service it measures.
It understands exactly what this service answers (no chunked bodies, no pipelining).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast


@dataclass(slots=True)
class Response:
    status: int  # 0: the connection failed or closed before an answer
    head: bytes  # status line and headers, lower-cased
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The value of a (lower-case) header, or None."""
        start = self.head.find(b"\r\n" + name + b":")
        if start < 0:
            return None
        start += len(name) + 3
        end = self.head.find(b"\r\n", start)
        return self.head[start : end if end >= 0 else len(self.head)].strip()


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.answered_at = 0.0  # epoch ms of the last response, taken as it arrives

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.answered_at = now_ms()
            self.waiter.set_result(Response(0, b"", b""))

    def send(self, request: bytes) -> asyncio.Future[Response]:
        """Write `request`; the future completes with its response."""
        assert self.transport is not None
        assert self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        if self.closed:
            self.waiter.set_result(Response(0, b"", b""))
        else:
            self.transport.write(request)
        return self.waiter

    async def request(self, request: bytes) -> Response:
        try:
            return await self.send(request)
        finally:
            self.waiter = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        if self.waiter is not None and not self.waiter.done():
            self.answered_at = now_ms()
            self.waiter.set_result(Response(int(head[9:12]), head, body))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def request_bytes(
    method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def now_ms() -> float:
    return time.time_ns() / 1e6
