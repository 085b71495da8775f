"""What a month of past sales costs the operator and the pages (`bin/bench history`).

The month itself is loaded by `server.devtools.history`. Here: the operator console's
requests, timed (`operator_latency`), and the rate at which pages can open `/ws` and read
their snapshot (`socket_connect_rate`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import statistics
import struct
import time
from typing import cast
from urllib.parse import urlsplit

import httpx


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "p50": round(statistics.median(ordered), 2),
        "p90": at(0.90),
        "max": round(ordered[-1], 2),
        "count": len(ordered),
    }


def operator_requests(product_id: int, page_ids: list[int]) -> dict[str, str]:
    """The operator console's polling (every 2 s: a page of products, the figures of the
    ones it shows, the sums over every product, the ACTIVE holds, the chosen product's
    history), the first page of the stats (what a client that asks for every product's
    gets), and one product's own figures, holds and ledger."""
    ids = ",".join(map(str, page_ids))
    return {
        "GET /api/admin/stats (the first page, 100)": "/api/admin/stats",
        "GET /api/admin/stats?ids= (the console's 50)": f"/api/admin/stats?ids={ids}",
        "GET /api/admin/stats/totals": "/api/admin/stats/totals",
        "GET /api/products?limit=50 (the console's page)": "/api/products?limit=50",
        "GET /api/admin/reservations?status=ACTIVE&limit=200": (
            "/api/admin/reservations?status=ACTIVE&limit=200"
        ),
        "GET /api/admin/products/{id}/stats": f"/api/admin/products/{product_id}/stats",
        "GET /api/admin/reservations?productId={id}": (
            f"/api/admin/reservations?productId={product_id}&limit=100"
        ),
        "GET /api/admin/products/{id}/history": f"/api/admin/products/{product_id}/history",
        "GET /api/admin/products/{id}/ledger": f"/api/admin/products/{product_id}/ledger",
    }


def operator_latency(
    base_url: str,
    headers: dict[str, str],
    product_id: int,
    page_ids: list[int],
    *,
    samples: int = 30,
    budget_s: float = 20.0,
    timeout_s: float = 60.0,
) -> dict[str, dict[str, float]]:
    """Each console request, one after another on a keep-alive connection: latency in ms
    (p50, p90, max), `samples` times or for `budget_s` seconds, whichever ends first (at
    least three times: at a million holds some took seconds each). A request that takes
    longer than `timeout_s` counts as that long, and ends that request's sampling
    (`timed_out`)."""
    results: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s) as client:
        for name, path in operator_requests(product_id, page_ids).items():
            timings: list[float] = []
            timed_out = 0
            deadline = time.monotonic() + budget_s
            first = True  # a first call, not counted (the connection, the caches)
            while len(timings) < samples and (len(timings) < 3 or time.monotonic() < deadline):
                started = time.perf_counter()
                try:
                    client.get(path).raise_for_status()
                except httpx.TimeoutException:
                    timings.append(timeout_s * 1000)
                    timed_out += 1
                    break
                if not first:
                    timings.append((time.perf_counter() - started) * 1000)
                first = False
            results[name] = {**percentiles_ms(timings), "timed_out": timed_out}
            r = results[name]
            print(
                f"  {name:<52} p50 {r['p50']:8.1f} ms   p90 {r['p90']:8.1f} ms   "
                f"max {r['max']:8.1f} ms  ({r['count']:.0f}×"
                + (f", timed out after {timeout_s:g} s" if timed_out else "")
                + ")",
                flush=True,
            )
    return results


class _SnapshotReader(asyncio.Protocol):
    """Opens /ws, reads the first frame (the snapshot) to its end, and hangs up. Counts
    bytes only: parsing a 1.35 MB snapshot would cost this side as much as the server."""

    def __init__(self, host: str, target: str, done: asyncio.Future[int]) -> None:
        self._host, self._target, self._done = host, target, done
        self._buffer = b""  # until the handshake's answer and the frame's header are in
        self._upgraded = False
        self._need: int | None = None  # bytes of the first frame, header included
        self._got = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        key = base64.b64encode(os.urandom(16)).decode()
        self._transport.write(
            (
                f"GET {self._target} HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if self._need is not None:
            self._got += len(data)
        else:
            self._buffer += data
            if not self._upgraded:
                head, sep, rest = self._buffer.partition(b"\r\n\r\n")
                if not sep:
                    return
                if not head.startswith(b"HTTP/1.1 101"):
                    self._finish(RuntimeError(head[:200].decode(errors="replace")))
                    return
                self._upgraded, self._buffer = True, rest
            if len(self._buffer) < 10:
                return
            length, header = self._buffer[1] & 0x7F, 2
            if length == 126:
                length, header = struct.unpack_from("!H", self._buffer, 2)[0], 4
            elif length == 127:
                length, header = struct.unpack_from("!Q", self._buffer, 2)[0], 10
            self._need, self._got, self._buffer = header + length, len(self._buffer), b""
        if self._got >= self._need:
            self._finish(self._need)

    def _finish(self, result: int | BaseException) -> None:
        if not self._done.done():
            if isinstance(result, BaseException):
                self._done.set_exception(result)
            else:
                self._done.set_result(result)
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionError("closed before the snapshot"))


async def _connect_rate(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    sizes: list[int] = []
    timings: list[float] = []
    deadline = time.monotonic() + seconds

    async def one() -> None:
        done: asyncio.Future[int] = loop.create_future()
        started = time.perf_counter()
        transport, _ = await loop.create_connection(
            lambda: _SnapshotReader(f"{host}:{port}", target, done), host, port
        )
        try:
            sizes.append(await asyncio.wait_for(done, 30))
            timings.append((time.perf_counter() - started) * 1000)
        finally:
            transport.abort()

    async def worker() -> None:
        while time.monotonic() < deadline:
            await one()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "connects": len(sizes),
        "per_second": round(len(sizes) / elapsed, 1),
        "snapshot_bytes": round(statistics.mean(sizes)) if sizes else 0,
        **{f"latency_{k}_ms": v for k, v in percentiles_ms(timings).items() if k != "count"},
    }


def socket_connect_rate(url: str, *, seconds: float, concurrency: int = 16) -> dict[str, float]:
    """Pages opening the socket at `url` (`ws://…/ws`, or `…/ws?ids=…`; each reads its
    snapshot to the end, then leaves): connects per second, `concurrency` at a time, for
    `seconds`."""
    result = asyncio.run(_connect_rate(url, seconds, concurrency))
    print(
        f"  /ws connect + snapshot ({result['snapshot_bytes']:,} bytes)   "
        f"{result['per_second']:>9,.0f} /s   p50 {result['latency_p50_ms']:.1f} ms   "
        f"p90 {result['latency_p90_ms']:.1f} ms",
        flush=True,
    )
    return result
