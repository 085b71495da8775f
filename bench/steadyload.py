"""A process of steady-shop traffic, for the steady scenario.

`python -m bench.steadyload CONFIG_JSON` runs `connections` closed-loop keep-alive
connections for `seconds`; each picks its next request at random with the mix's weights:

- browse: `GET /api/products` with the `If-None-Match` of the list it last saw, as a page does;
- reserve: one unit of a random product; the hold's id is kept;
- complete / cancel: one of the holds this process made and has not finished, newest first
  (a shopper pays or changes their mind soon after holding), never one within half a second
  of its expiry; with none at hand, it reserves instead.

Holds not completed or cancelled are left to expire. At the end it prints one JSON line:
per kind, the statuses, error codes and latencies (µs), requests per second of the run, and
the process's CPU seconds (so the report can show the generator is not the bottleneck).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import resource
import sys
import time
from collections import Counter, deque
from typing import Any

import uvloop

from bench.rawhttp import Connection, request_bytes

KINDS = ("browse", "reserve", "complete", "cancel")
_ID = re.compile(rb'"id":"([^"]+)"')
_CODE = re.compile(rb'"code":"([a-z_]+)"')


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.latencies_us: list[int] = []


async def main(config: dict[str, Any]) -> None:
    host, port = config["host"], config["port"]
    authority = f"{host}:{port}"
    products: list[int] = config["products"]
    weights = [config["mix"][k] for k in KINDS]
    hold_ms = config["hold_seconds"] * 1000
    rng = random.Random(config.get("seed"))
    holds: deque[tuple[str, float]] = deque()  # (id, created, monotonic ms), oldest first
    tallies = {k: Tally() for k in KINDS}
    fallbacks = 0
    per_second: Counter[int] = Counter()
    reserve = {
        p: request_bytes(
            "POST",
            "/api/reservations",
            authority,
            json.dumps({"productId": p, "quantity": 1}).encode(),
        )
        for p in products
    }

    connections = [Connection.open(host, port) for _ in range(config["connections"])]
    opened = await asyncio.gather(*connections)
    started = time.monotonic()
    end = started + config["seconds"]

    async def shopper(connection: Connection) -> None:
        nonlocal fallbacks
        etag = ""
        while True:
            now = time.monotonic()
            if now >= end:
                return
            kind = rng.choices(KINDS, weights)[0]
            hold = None
            if kind in ("complete", "cancel"):
                # Drop holds too close to expiry; take the newest.
                while holds and holds[0][1] < now * 1000 - hold_ms + 500:
                    holds.popleft()
                if holds:
                    hold = holds.pop()[0]
                else:
                    kind, fallbacks = "reserve", fallbacks + 1
            if kind == "browse":
                headers = {"If-None-Match": etag} if etag else None
                request = request_bytes("GET", "/api/products", authority, headers=headers)
            elif kind == "reserve":
                request = reserve[rng.choice(products)]
            else:
                request = request_bytes("POST", f"/api/reservations/{hold}/{kind}", authority)
            sent = time.perf_counter_ns()
            response = await connection.request(request)
            elapsed = (time.perf_counter_ns() - sent) // 1000
            tally = tallies[kind]
            tally.latencies_us.append(elapsed)
            tally.statuses[str(response.status)] += 1
            per_second[int(now - started)] += 1
            if response.status == 0:
                return  # the connection is gone; the tally shows it
            if kind == "browse":
                etag = (response.header(b"etag") or b"").decode() or etag
            elif response.status == 201:
                found = _ID.search(response.body)
                if found:
                    holds.append((found.group(1).decode(), now * 1000))
            if response.status >= 400:
                code = _CODE.search(response.body)
                tally.codes[code.group(1).decode() if code else str(response.status)] += 1

    await asyncio.gather(*(shopper(c) for c in opened))
    wall = time.monotonic() - started
    for connection in opened:
        connection.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "kinds": {
                    k: {
                        "statuses": dict(t.statuses),
                        "codes": dict(t.codes),
                        "latencies_us": t.latencies_us,
                    }
                    for k, t in tallies.items()
                },
                "fallbacks": fallbacks,
                "per_second": [per_second[s] for s in range(int(config["seconds"]))],
                "wall_seconds": wall,
                "cpu_seconds": usage.ru_utime + usage.ru_stime,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[1])))
