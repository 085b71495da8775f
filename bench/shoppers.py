"""A process of storm shoppers: each holds one keep-alive connection and sends one
reservation at the sale's start.

`python -m bench.shoppers HOST PORT COUNT START_MS BODY [KIND [KEYS]]` opens COUNT
connections (a shopper's page is already open: its connection is made before the sale, as a
browser's would be), prints `ready N`, waits for the epoch millisecond START_MS, writes every
request in one pass, and prints one JSON line when every answer is in: `{"results": [[sent
ms, answered ms, status, code], ...], "cpu_seconds": s}`. KIND: who the shoppers are
(`bench/identities.py`: `none`, the default, `cookie` or `jwt`), each a distinct shopper.
KEYS `keys`: each request carries an Idempotency-Key of its own (random), as a client that
retries safely sends.

They fire at the start exactly, not before: the service and the shoppers read the same
clock, so a request sent at the start is processed after it, and every 409 `sale_not_started`
in the report is a clock disagreement, not a shopper's impatience.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import sys
import uuid
from dataclasses import dataclass

import uvloop

from bench import identities
from bench.rawhttp import Connection, now_ms, request_bytes

_CODE = re.compile(rb'"code":"([a-z_]+)"')


@dataclass(frozen=True, slots=True)
class Volley:
    """What every shopper process of a storm sends, and when: `body` (JSON) at the epoch
    millisecond `start_ms`, as `kind` of shopper, with an Idempotency-Key each if `keys`.
    Carried to the processes as the arguments after COUNT (`args`, `from_args`)."""

    start_ms: float
    body: str
    kind: str = "none"
    keys: bool = False

    def args(self) -> list[str]:
        return [str(self.start_ms), self.body, self.kind, "keys" if self.keys else "none"]

    @classmethod
    def from_args(cls, args: list[str]) -> Volley:
        start_ms, body, *rest = args
        kind = rest[0] if rest else "none"
        return cls(float(start_ms), body, kind, len(rest) > 1 and rest[1] == "keys")


async def main(host: str, port: int, count: int, volley: Volley) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    connections: list[Connection] = []
    for start in range(0, count, 200):  # in batches: the listen backlog is finite
        connections += await asyncio.gather(
            *(Connection.open(host, port) for _ in range(start, min(start + 200, count)))
        )
    authority = f"{host}:{port}"
    requests = [
        request_bytes(
            "POST",
            "/api/reservations",
            authority,
            volley.body.encode(),
            {**headers, "Idempotency-Key": uuid.uuid4().hex} if volley.keys else headers,
        )
        for headers in identities.headers(volley.kind, count)
    ]
    print(f"ready {count}", flush=True)

    # asyncio's timers are about a millisecond coarse: sleep to just before, then spin.
    delay = (volley.start_ms - now_ms()) / 1000 - 0.005
    if delay > 0:
        await asyncio.sleep(delay)
    while now_ms() < volley.start_ms:
        pass
    sent, futures = [], []
    for connection, request in zip(connections, requests, strict=True):
        sent.append(now_ms())
        futures.append(connection.send(request))
    await asyncio.wait(futures, timeout=120)

    results = []
    for at, connection, future in zip(sent, connections, futures, strict=True):
        response = future.result() if future.done() else None
        status = response.status if response else 0
        code = ""
        if response is not None and status >= 400:
            found = _CODE.search(response.body)
            code = found.group(1).decode() if found else ""
        answered = connection.answered_at if response else 0.0
        results.append([round(at, 2), round(answered, 2), status, code])
        connection.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"results": results, "cpu_seconds": usage.ru_utime + usage.ru_stime}))
    await asyncio.sleep(0.05)  # let the closes go out


if __name__ == "__main__":
    host, port, count = sys.argv[1:4]
    uvloop.run(main(host, int(port), int(count), Volley.from_args(sys.argv[4:])))
