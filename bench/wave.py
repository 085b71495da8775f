"""Scenario: an expiry wave. N holds fall due within one second; how late is each restored
(its units back, in the database) and announced (its EXPIRED frame received from Redis)?

The holds are written straight to the database with exact expiry times spread evenly over
the second, and their jobs are scheduled with the web process's own ExpiryScheduler, so the
worker sees exactly what a storm of reservations would have left it.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from pydantic_core import from_json
from redis.asyncio import Redis

from bench.stack import cpu_seconds
from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.model import HoldRequest
from server.infra.keys import EVENTS_CHANNEL
from server.infra.redis_client import redis_client
from server.service.expiry import ExpiryScheduler
from server.storage.database import Store

LEAD_MS = 30_000  # time to write the holds and schedule their jobs before the first is due
GROUPS = 100  # distinct expiry times within the second


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": ordered[-1]}


async def run(
    database_url: str,
    redis_url: str,
    *,
    holds: int,
    bucket_ms: int,
    within_s: float = 60,
    lead_ms: int = LEAD_MS,
    cpu_of: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Make the wave and measure it; `lead_ms` is the time allowed to write the holds and
    schedule their jobs before the first is due (more while the worker is busy with
    something else, such as a backlog of idempotency keys). `cpu_of`: processes by name
    (the worker's, the web's pid) whose CPU time while the wave ran, from a second before
    the first hold is due until every frame is in, is reported (ms): what the wave cost
    them, a figure other load on the machine moves far less than the lateness."""
    store = Store(database_url)
    await store.connect()
    redis = redis_client(redis_url)
    listener = Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(EVENTS_CHANNEL)
    announced: dict[str, int] = {}
    try:
        product = (
            await store.write(
                lambda conn: inventory.create_product(
                    conn,
                    name="Wave",
                    price_cents=100,
                    stock=holds,
                    sale_starts_at=None,
                    now=now_ms(),
                )
            )
        ).result()
        first_due = now_ms() + lead_ms
        expires: dict[str, int] = {}
        per_group = holds // GROUPS
        for group in range(GROUPS):
            due = first_due + group * 1000 // GROUPS
            requests = [HoldRequest(product.id, 1)] * per_group
            outcomes, _ = await store.write(
                functools.partial(
                    inventory.reserve, requests=requests, now=due - 60_000, hold_ms=60_000
                )
            )
            for outcome in outcomes:
                expires[outcome.result().reservation.id] = due
        scheduler = ExpiryScheduler(redis, bucket_ms=bucket_ms)
        scheduler.start()
        scheduler.schedule(set(expires.values()))
        await scheduler.wait_idle()
        await scheduler.stop()
        if now_ms() > first_due:
            raise RuntimeError("setting up the wave took longer than its lead time")
        await asyncio.sleep(max(0, first_due - 1000 - now_ms()) / 1000)
        cpu_before = {name: cpu_seconds(pid) for name, pid in (cpu_of or {}).items()}

        deadline = first_due + 1000 + within_s * 1000
        while len(announced) < len(expires) and now_ms() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is None:
                continue
            frame = from_json(message["data"])
            if frame.get("type") == "reservation" and frame["reservation"]["status"] == "EXPIRED":
                announced.setdefault(frame["reservation"]["id"], now_ms())

        cpu_ms = {
            name: round((cpu_seconds(pid) - cpu_before[name]) * 1000)
            for name, pid in (cpu_of or {}).items()
        }
        restored: dict[str, int] = {}
        async with store.reader() as conn:
            rows = await conn.fetch_all(
                "SELECT id, ended_at FROM reservations "
                "WHERE product_id = :p AND status = 'EXPIRED'",
                {"p": product.id},
            )
        restored = {str(r["id"]): int(r["ended_at"]) for r in rows}
        restore_late = [restored[i] - expires[i] for i in restored]
        announce_late = [announced[i] - expires[i] for i in announced if i in expires]
        return {
            "holds": len(expires),
            "restored": len(restored),
            "announced": len(announced),
            "missed": len(expires) - len(restored),
            "restore_lateness_ms": percentiles(restore_late),
            "announce_lateness_ms": percentiles(announce_late),
            "bucket_ms": bucket_ms,
            "cpu_ms": cpu_ms,
            "series": {"restore_lateness_ms": sorted(restore_late)},
        }
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await redis.aclose()
        await store.close()


def run_sync(database_url: str, redis_url: str, **kwargs: Any) -> dict[str, Any]:
    result = asyncio.run(run(database_url, redis_url, **kwargs))
    r, a = result["restore_lateness_ms"], result["announce_lateness_ms"]
    print(
        f"  {result['holds']} holds: restored {result['restored']}, missed {result['missed']}; "
        f"lateness restored p50 {r.get('p50')} p99 {r.get('p99')} max {r.get('max')} ms, "
        f"announced p50 {a.get('p50')} p99 {a.get('p99')} max {a.get('max')} ms"
        + "".join(f"; {name} CPU {ms} ms" for name, ms in result["cpu_ms"].items()),
        flush=True,
    )
    return result
