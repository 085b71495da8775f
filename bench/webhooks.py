"""Scenario: webhooks from the outbox, delivered by the worker to a local receiver.

A receiver process (`bench/receiver.py`) is registered as the shop's endpoint, then:

- **steady**: reservations through the API at a steady rate (`rate` per second over ten
  products, for `seconds`), as a busy shop makes them; lateness is each event's arrival at
  the receiver minus its own timestamp (the commit of the change): p50, p99, max.
- **burst, many products**: `burst` holds over 16 products written at once (straight to the
  database, as a storm's batches would), then delivered: deliveries per second from the
  first arrival to the last, and as a share of the bare endpoint.
- **burst, one product**: `burst // 4` holds of one product: its events go one at a time,
  in order (the price of ordering per product).

The worker delivers with its defaults (WEBHOOK_CONCURRENCY=16, WEBHOOK_POLL_MS=200) unless
`--set` says otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from server.devtools.embedded_redis import free_port
from server.devtools.processes import Service
from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.model import HoldRequest
from server.storage.database import Store


@contextmanager
def receiver(work: Path) -> Iterator[str]:
    port = free_port()
    log = (work / "receiver.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "bench.receiver:app", "--host", "127.0.0.1",
            "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--log-level", "warning", "--no-access-log",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/stats", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the receiver did not start") from None
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _stats(base: str) -> list[tuple[str, int, int, str]]:
    rows: list[tuple[str, int, int, str]] = [
        (str(r[0]), int(r[1]), int(r[2]), str(r[3]))
        for r in httpx.get(f"{base}/stats", timeout=30).json()
    ]
    return rows


def _wait_for(base: str, count: int, within: float) -> list[tuple[str, int, int, str]]:
    deadline = time.monotonic() + within
    while True:
        rows = _stats(base)
        if len({r[0] for r in rows}) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def _percentile(values: list[int], share: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0


def _product(service: Service, stock: int) -> int:
    response = httpx.post(
        f"{service.base_url}/api/admin/products",
        json={"name": f"Hooks {stock}", "price": 1, "stock": stock},
        headers=service.admin_headers(),
    )
    response.raise_for_status()
    product_id: int = response.json()["id"]
    return product_id


async def _outbox_count(database_url: str) -> int:
    store = Store(database_url)
    await store.connect()
    try:
        async with store.reader() as conn:
            row = await conn.fetch_one("SELECT COUNT(*) AS n FROM outbox")
        return 0 if row is None else int(row["n"])
    finally:
        await store.close()


async def _hold_many(database_url: str, products: list[int], count: int) -> None:
    store = Store(database_url)
    await store.connect()
    try:
        for start in range(0, count, 256):
            n = min(256, count - start)
            requests = [HoldRequest(products[(start + i) % len(products)], 1) for i in range(n)]
            await store.write(
                functools.partial(
                    inventory.reserve, requests=requests, now=now_ms(), hold_ms=3_600_000
                )
            )
    finally:
        await store.close()


async def _steady(service: Service, products: list[int], rate: float, seconds: float) -> int:
    made = 0
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) + 1
            batch = []
            while made < due:
                body = {"productId": products[made % len(products)], "quantity": 1}
                batch.append(client.post("/api/reservations", json=body))
                made += 1
            for response in await asyncio.gather(*batch):
                response.raise_for_status()
            await asyncio.sleep(max(0.0, (made / rate) - (time.monotonic() - started)))
    return made


def _summary(rows: list[tuple[str, int, int, str]], expected: int) -> dict[str, Any]:
    first: dict[str, tuple[int, int]] = {}
    for event_id, arrived, stamped, _ in rows:
        first.setdefault(event_id, (arrived, stamped))
    lateness = [arrived - stamped for arrived, stamped in first.values()]
    arrivals = sorted(a for a, _ in first.values())
    span = (arrivals[-1] - arrivals[0]) / 1000 if len(arrivals) > 1 else 0.0
    return {
        "events": expected,
        "delivered": len(first),
        "attempts": len(rows),
        "lateness_p50_ms": _percentile(lateness, 0.5),
        "lateness_p99_ms": _percentile(lateness, 0.99),
        "lateness_max_ms": max(lateness, default=0),
        "deliveries_per_second": round(len(first) / span, 1) if span else None,
    }


def run(
    service: Service,
    work: Path,
    database_url: str,
    *,
    rate: float = 100,
    seconds: float = 10,
    burst: int = 8_000,
    bare_rps: float | None = None,
    then: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The phases' figures; `then`, when given, runs at the end with the endpoint still
    registered and its receiver up (the expiry wave, measured while its events go out), its
    result under "then"."""
    result: dict[str, Any] = {}
    with receiver(work) as base:
        made = httpx.post(
            f"{service.base_url}/api/admin/webhooks",
            json={"url": f"{base}/hooks"},
            headers=service.admin_headers(),
        )
        made.raise_for_status()

        def steady(products: list[int]) -> None:
            asyncio.run(_steady(service, products, rate, seconds))

        def many(products: list[int]) -> None:
            asyncio.run(_hold_many(database_url, products, burst))

        def one(products: list[int]) -> None:
            asyncio.run(_hold_many(database_url, products, burst // 4))

        phases = [
            ("steady", 10, steady),
            ("burst, 16 products", 16, many),
            ("burst, one product", 1, one),
        ]
        for name, count, drive in phases:
            products = [_product(service, 10**9) for _ in range(count)]
            httpx.post(f"{base}/reset").raise_for_status()
            before = asyncio.run(_outbox_count(database_url))
            drive(products)
            expected = asyncio.run(_outbox_count(database_url)) - before
            rows = _wait_for(base, expected, within=max(120.0, expected / 50))
            summary = _summary(rows, expected)
            if bare_rps and summary["deliveries_per_second"]:
                summary["share_of_bare"] = round(summary["deliveries_per_second"] / bare_rps, 4)
            print(
                f"  webhooks, {name:<20} {summary['delivered']:>6}/{expected} events, "
                f"{summary['deliveries_per_second'] or 0:>8.0f}/s, lateness p50 "
                f"{summary['lateness_p50_ms']} ms, p99 {summary['lateness_p99_ms']} ms",
                flush=True,
            )
            result[name] = summary
        if then is not None:
            result["then"] = then()
    return result
