"""A process of shoppers in a waiting room (issue 17), for the `queue` scenario.

`python -m bench.queuers HOST PORT PRODUCT_ID` reads from stdin one JSON line:
`{"offsets": [ms, ...], "cookies": ["shopper=...", ...]}`: for each shopper, when it joins
the line (ms from the sale's start; negative: before it) and its identity (the `shopper`
cookie the shop page sets). Each shopper is a page already open: a `/ws` socket with its
cookie, opened when the page loads (the server pushes its `ticket` frames there), and the
join goes over that socket (`{"type": "join", "productId": …}`, answered by its `ticket`
frame): the page has the connection already, as a real one would, so only the join is
timed, from the message sent to its answer. A connection of its own for requests is opened
only when the shopper reserves (its `fetch`), and again if the server closed it idle. It
prints `ready N` once every socket has its snapshot, then reads a second line,
`{"start_ms": epoch ms}` (the sale's start, set once every page is open), then, for each
shopper:

1. at its time, the join over its socket;
2. when its socket says `admitted`, at once `POST /api/reservations` (one unit), and on
   the 201 `POST /api/reservations/{id}/complete` (it buys: the room closes once nothing
   is available and nothing is held);
3. it is done when its ticket's state is final: `sold_out`, or `reserved` once bought, or
   `lapsed` / `left` (it does not join again).

When every shopper is done, or at the start + the deadline (`QUEUERS_DEADLINE_S`, 60 s), it
prints one JSON line `{"shoppers": [Row, ...], "cpu_seconds": s, "cpu_at_start": s,
"lags_ms": [ms, ...]}` (its CPU in all and up to the sale's start; how late its event
loop ran a tick due every 10 ms from a second before the start: a client that is behind
sends its joins late and reads their answers late), where Row is
`[offset, join_sent, join_answered, join_status, admitted_at, reserve_sent,
reserve_answered, reserve_status, complete_answered, complete_status, final_state,
final_at, position_at_admission, frames, reconnects, join_made_at]` (epoch ms, 0 where it
did not happen; `join_status`: 200 for a ticket frame, else the error frame's code;
`reconnects`: request connections opened, the first included; `join_made_at`: the answer's
`serverTime`, when the server made it, on the same machine's clock: what splits a join's
time into its way to the server and through it, and the answer's way back).

The clients are lean (raw asyncio protocols on uvloop), as the storm's are: the measuring
must not take the CPU the server needs.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import re
import resource
import sys
from typing import cast

import uvloop

from bench.rawhttp import Connection, Response, now_ms, request_bytes
from bench.wsclients import Client, _returning

FINAL = {"sold_out", "lapsed", "left"}
# How often the process checks that its own loop keeps up (s): see `lags_ms`.
LAG_TICK_S = 0.01
_STATE = re.compile(rb'"state":"([a-z_]+)"')
_POSITION = re.compile(rb'"position":(\d+|null)')
_ID = re.compile(rb'"id":"([^"]+)"')
_CODE = re.compile(rb'"code":"([a-z_]+)"')
_SERVER_TIME = re.compile(rb'"serverTime":"([^"]+)"')


def _epoch_ms(found: re.Match[bytes] | None) -> float:
    """The epoch ms of an ISO 8601 time (`serverTime`: "2026-12-02T16:13:16.123Z"), 0 if
    none."""
    if found is None:
        return 0
    text = found.group(1).decode().replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp() * 1000


class Shopper(Client):
    """One shopper's page: its socket (ticket frames) and its connection (requests)."""

    def __init__(self, product_id: int, address: tuple[str, int], path: str, cookie: str) -> None:
        super().__init__(product_id, f"{address[0]}:{address[1]}", path)
        self.address = address
        self.reconnects = 0  # connections opened (the first, and again after an idle close)
        self.cookie = cookie
        self.http: Connection | None = None
        self.row: list[object] = [0] * 16
        self.frames = 0  # ticket frames received
        self.state = ""
        self.joined = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()
        self.busy = False  # reserving or completing: one request at a time on its connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nCookie: {self.cookie}\r\n\r\n"
            ).encode()
        )

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9 and self.transport is not None:  # ping: answer, masked (key 0)
            self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            return
        if opcode != 0x1:
            return
        if not self.ready.done() and payload.startswith(b'{"type":"snapshot"'):
            self.ready.set_result(None)
            return
        if payload.startswith(b'{"type":"error"') and self.row[1] and not self.joined.done():
            code = _CODE.search(payload)
            self.row[2], self.row[3] = now_ms(), code.group(1).decode() if code else "error"
            self.joined.set_result(None)
            self.finish(f"join {self.row[3]}", 0)
            return
        if b'"type":"ticket"' not in payload[:40]:
            return  # stock and queue frames: every page gets them; the shopper needs none
        found = _STATE.search(payload)
        if not found:
            return
        at = now_ms()
        if self.row[1] and not self.joined.done():  # the answer to its join
            self.row[2], self.row[3] = at, 200
            self.row[15] = _epoch_ms(_SERVER_TIME.search(payload))
            self.joined.set_result(None)
        self.frames += 1
        state = found.group(1).decode()
        if state == self.state:
            return
        self.state = state
        if state == "admitted" and not self.row[4]:
            self.row[4] = at
            position = _POSITION.search(payload)
            self.row[12] = (
                int(position.group(1)) if position and position.group(1) != b"null" else 0
            )
            asyncio.get_running_loop().create_task(self.buy())
        elif state in FINAL:
            self.finish(state, at)

    def finish(self, state: str, at: float) -> None:
        if not self.done.done():
            self.row[10], self.row[11] = state, at
            self.done.set_result(None)

    def result(self) -> list[object]:
        self.row[13] = self.frames
        self.row[14] = self.reconnects
        if not self.done.done():
            self.row[10] = self.state or "no ticket frame"
        return self.row

    async def send(self, request: bytes) -> Response:
        """`request` on the shopper's connection, opened again first if the server closed it
        (it closes one idle for a few seconds, as a browser's would be), and sent once more
        if it was closed under it before any answer (every request here may be repeated: a
        join is idempotent, a reservation carries an Idempotency-Key)."""
        for attempt in (1, 2):
            if self.http is None or self.http.closed:
                self.http = await Connection.open(self.address[0], self.address[1])
                self.reconnects += 1
            response = await self.http.request(request)
            if response.status or attempt == 2:
                return response
        raise AssertionError("unreachable")

    def join(self, message: bytes) -> None:
        """Join over the socket: one masked text frame (key 0; `message` under 126 bytes).
        Its answer is the first ticket (or error) frame after it (`_frame`)."""
        assert self.transport is not None
        self.row[1] = now_ms()
        self.transport.write(bytes([0x81, 0x80 | len(message)]) + b"\0\0\0\0" + message)

    async def buy(self) -> None:
        await self.joined
        authority = self.host
        body = json.dumps({"productId": int(self.product), "quantity": 1}).encode()
        self.row[5] = now_ms()
        headers = {"Cookie": self.cookie, "Idempotency-Key": os.urandom(12).hex()}
        response = await self.send(
            request_bytes("POST", "/api/reservations", authority, body, headers)
        )
        assert self.http is not None
        self.row[6], self.row[7] = self.http.answered_at, response.status
        if response.status != 201:
            found = _CODE.search(response.body)
            self.finish(f"reserve {response.status} {found.group(1).decode() if found else ''}", 0)
            return
        hold = _ID.search(response.body)
        assert hold is not None
        done = await self.send(
            request_bytes(
                "POST",
                f"/api/reservations/{hold.group(1).decode()}/complete",
                authority,
                b"",
                {"Cookie": self.cookie},
            )
        )
        self.row[8], self.row[9] = self.http.answered_at, done.status
        self.finish("reserved", self.http.answered_at)


async def main(host: str, port: int, product_id: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    plan = json.loads(sys.stdin.readline())
    offsets: list[float] = plan["offsets"]
    cookies: list[str] = plan["cookies"]
    loop = asyncio.get_running_loop()
    shoppers: list[Shopper] = []
    for start in range(0, len(offsets), 100):  # in batches: the listen backlog is finite
        batch = [
            Shopper(product_id, (host, port), "/ws", cookie)
            for cookie in cookies[start : start + 100]
        ]
        await asyncio.gather(*(loop.create_connection(_returning(s), host, port) for s in batch))
        await asyncio.gather(*(s.ready for s in batch))
        shoppers += batch
    print(f"ready {len(shoppers)}", flush=True)
    # The sale's start, set once every page is open.
    start_ms = float(json.loads(await loop.run_in_executor(None, sys.stdin.readline))["start_ms"])

    # Whether this process is itself behind (its loop late, so that its joins go out late
    # and their answers are read late, which would be counted as the server's time): a tick
    # every LAG_TICK_S from a second before the start, each one's lateness kept, and the
    # CPU used from the start on.
    lags: list[float] = []
    cpu_at_start: list[float] = []
    ticking = [True]

    def tick(expected: float) -> None:
        now = loop.time()
        lags.append(round((now - expected) * 1000, 2))
        if ticking[0]:
            loop.call_at(now + LAG_TICK_S, tick, now + LAG_TICK_S)

    def at_start() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_at_start.append(usage.ru_utime + usage.ru_stime)

    first_tick = loop.time() + max(0.0, (start_ms - 1000 - now_ms()) / 1000)
    loop.call_at(first_tick, tick, first_tick)
    loop.call_at(loop.time() + max(0.0, (start_ms - now_ms()) / 1000), at_start)

    join = json.dumps({"type": "join", "productId": product_id}).encode()
    order = sorted(range(len(shoppers)), key=lambda i: offsets[i])
    for shopper, offset in zip(shoppers, offsets, strict=True):
        shopper.row[0] = offset
    for i in order:
        due = start_ms + offsets[i]
        delay = (due - now_ms()) / 1000
        if delay > 0.002:
            await asyncio.sleep(delay - 0.001)
        shoppers[i].join(join)
    deadline = start_ms + float(os.environ.get("QUEUERS_DEADLINE_S", "60")) * 1000
    await asyncio.wait(
        [asyncio.ensure_future(s.done) for s in shoppers],
        timeout=max(0.0, (deadline - now_ms()) / 1000),
    )
    ticking[0] = False
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "shoppers": [s.result() for s in shoppers],
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
                "cpu_at_start": cpu_at_start[0] if cpu_at_start else None,
                "lags_ms": lags,
            }
        ),
        flush=True,
    )
    for shopper in shoppers:
        if shopper.transport is not None:
            shopper.transport.close()
        if shopper.http is not None:
            shopper.http.close()
    await asyncio.sleep(0.05)  # let the closes go out


if __name__ == "__main__":
    host, port, product_id = sys.argv[1:4]
    uvloop.run(main(host, int(port), int(product_id)))
