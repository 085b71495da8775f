"""What `GET /api/queues` costs with a shop's history of waiting rooms behind it:
`python -m bench.queuecounts [--past-rooms N] [--samples N]`.

Makes a fresh SQLite database with `--past-rooms` products whose sales (each with a waiting
room) have ended, and five whose rooms are open with 100 shoppers waiting in each. Then
times, in process over the ASGI app and one after another, `GET /api/queues` (no `ids`),
the same with its ETag in If-None-Match (the 304 most polling pages get), and with `ids`
naming the five open rooms, beside the bare `GET /healthz` of the same app; reports each
as milliseconds and as a multiple of the bare request, with the body's size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stock_history import in_process
from server.api.app import create_app
from server.domain import inventory, waitingroom
from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.domain.model import Outcome, Product
from server.infra.settings import Settings
from server.storage import migrate
from server.storage.database import Store

DAY_MS = 86_400_000
OPEN_ROOMS = 5
WAITING = 100


async def load(url: str, past_rooms: int) -> list[int]:
    """The products; returns the ids of those with an open room."""
    store = Store(url)
    await store.connect()
    await migrate.migrate(store)
    now = now_ms()

    async def past(conn: Executor) -> None:
        for n in range(past_rooms):
            start = now - (past_rooms - n) * DAY_MS
            await inventory.create_product(
                conn,
                name=f"Past drop {n}",
                price_cents=5000,
                stock=10,
                sale_starts_at=start,
                queue="fifo",
                now=start - DAY_MS,
            )
        await conn.execute(
            "UPDATE products SET sale_ends_at = sale_starts_at + 3600000 WHERE queue = 'fifo'"
        )

    await store.write(past)
    open_ids = []
    for n in range(OPEN_ROOMS):

        async def upcoming(conn: Executor, n: int = n) -> Outcome[Product]:
            return await inventory.create_product(
                conn,
                name=f"Next drop {n}",
                price_cents=5000,
                stock=10,
                sale_starts_at=now + 600_000,
                queue="fifo",
                now=now,
            )

        product_id = (await store.write(upcoming)).result().id

        async def joins(conn: Executor, product_id: int = product_id) -> None:
            for s in range(WAITING):
                await waitingroom.join(conn, product_id, f"anon:{s}", now=now + s)

        await store.write(joins)
        open_ids.append(product_id)
    await store.close()
    return open_ids


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
    }


async def measure(url: str, open_ids: list[int], samples: int) -> dict[str, Any]:
    settings = Settings(database_url=url, redis_url="redis://127.0.0.1:1", admin_token="bench")
    app = create_app(settings)
    results: dict[str, Any] = {}
    async with in_process(app) as client:
        first = await client.get("/api/queues")
        etag = first.headers["etag"]
        requests: dict[str, tuple[str, dict[str, str], int]] = {
            "GET /healthz (bare)": ("/healthz", {}, 200),
            "GET /api/queues": ("/api/queues", {}, 200),
            "GET /api/queues, If-None-Match (304)": (
                "/api/queues",
                {"If-None-Match": etag},
                304,
            ),
            f"GET /api/queues?ids= ({OPEN_ROOMS} open rooms)": (
                "/api/queues?ids=" + ",".join(map(str, open_ids)),
                {},
                200,
            ),
        }
        for name, (path, headers, status) in requests.items():
            times = []
            for _ in range(samples):
                began = time.perf_counter()
                response = await client.get(path, headers=headers)
                times.append((time.perf_counter() - began) * 1000)
                assert response.status_code == status, (name, response.status_code)
            results[name] = {**summary(times), "body_bytes": len(response.content)}
    bare = results["GET /healthz (bare)"]["p50"]
    for value in results.values():
        value["x_bare_p50"] = round(value["p50"] / bare, 1)
    return results


async def run(past_rooms: int, samples: int) -> None:
    with tempfile.TemporaryDirectory() as work:
        url = f"sqlite:///{Path(work) / 'queues.db'}"
        open_ids = await load(url, past_rooms)
        results = await measure(url, open_ids, samples)
    print(json.dumps({"past_rooms": past_rooms, "latency_ms": results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--past-rooms", type=int, default=2_000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(run(args.past_rooms, args.samples))


if __name__ == "__main__":
    main()
