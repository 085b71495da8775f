"""What the console's stock history costs with a month of ledger behind it (issue 13, item
10): `python -m bench.stock_history [--database-url postgresql://…] [--rows-per-day N]`.

Loads a month of stock movements into a fresh database (SQLite by default; on PostgreSQL a
database made beside the one the URL names, dropped afterwards): one product sold per day,
each sale `--rows-per-day` ledger rows over its first hour (holds, completions, expiries),
plus the product being sold now, with a storm's worth of rows in its last ten minutes. Then
times, in process over the ASGI app and one after another, the console's requests — the
history of the sale now (per second), of a past day's sale, of a month — beside the bare
`GET /healthz` of the same app, and reports each as milliseconds and as a multiple of the
bare request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from starlette.applications import Starlette

from server.api.app import create_app
from server.domain.clock import iso, now_ms
from server.infra.settings import Settings
from server.storage import migrate
from server.storage.database import Store, sqlite_path


@asynccontextmanager
async def in_process(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app` in this process (its lifespan run around it): the service's own
    work for a request, without a socket or another process's scheduling."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        ) as client,
    ):
        yield client


DAY_MS = 86_400_000
TOKEN = "bench-operator"
COLUMNS = (
    "product_id",
    "version",
    "seq",
    "movement",
    "reservation_id",
    "units",
    "available",
    "held",
    "sold",
    "total",
    "actor",
    "at",
)


def sale_rows(
    product_id: int, start: int, rows: int, span_ms: int, stock: int
) -> Iterator[tuple[Any, ...]]:
    """A sale's ledger: created, then holds that are bought or expire, `rows` in all over
    `span_ms` from `start`; the units after each row add up as the service's would."""
    rng = random.Random(product_id)
    available, held, sold, total = stock, 0, 0, stock
    version = 1
    yield (
        product_id,
        version,
        0,
        "created",
        None,
        stock,
        available,
        held,
        sold,
        total,
        "operator",
        start - 60_000,
    )
    open_holds: list[int] = []
    for n in range(rows - 1):
        at = start + n * span_ms // rows
        version += 1
        if open_holds and (available == 0 or rng.random() < 0.5):
            units = open_holds.pop(0)
            if rng.random() < 0.7:
                held, sold, kind = held - units, sold + units, "completed"
            else:
                available, held, kind = available + units, held - units, "expired"
        elif available > 0:
            units = min(available, rng.randint(1, 3))
            available, held, kind = available - units, held + units, "held"
            open_holds.append(units)
        else:
            available, total, kind, units = available + 50, total + 50, "restocked", 50
        yield (
            product_id,
            version,
            0,
            kind,
            None,
            units,
            available,
            held,
            sold,
            total,
            "shopper",
            at,
        )


def month(rows_per_day: int, storm_rows: int) -> tuple[list[tuple[Any, ...]], int, int]:
    """Every row of the month, the product on sale now, and its sale's start (ms)."""
    now = now_ms()
    rows: list[tuple[Any, ...]] = []
    for day in range(30):
        start = now - (30 - day) * DAY_MS
        rows.extend(sale_rows(day + 1, start, rows_per_day, 3_600_000, 10_000))
    live_start = now - 600_000
    rows.extend(sale_rows(31, live_start, storm_rows, 600_000, 100_000))
    return rows, 31, live_start


def products(rows: list[tuple[Any, ...]], starts: dict[int, int]) -> list[tuple[Any, ...]]:
    last: dict[int, tuple[Any, ...]] = {}
    for row in rows:
        last[row[0]] = row
    out = []
    for pid, row in sorted(last.items()):
        available, held, sold, total = row[6], row[7], row[8], row[9]
        out.append(
            (
                pid,
                f"Sale {pid}",
                2500,
                total,
                available,
                row[1],
                starts[pid],
                starts[pid] - 60_000,
                row[11],
                held,
                sold,
                sold * 2500,
            )
        )
    return out


PRODUCT_COLUMNS = (
    "id, name, price_cents, total_stock, available_stock, version, sale_starts_at, created_at, "
    "updated_at, held_units, sold_units, revenue_cents"
)


async def load(url: str, rows: list[tuple[Any, ...]], product_rows: list[tuple[Any, ...]]) -> None:
    store = Store(url)
    await store.connect()
    await migrate.migrate(store)
    await store.close()
    if url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(url))
        with conn:
            conn.executemany(
                f"INSERT INTO products ({PRODUCT_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                product_rows,
            )
            conn.executemany(
                f"INSERT INTO stock_ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 12)})",
                rows,
            )
        conn.execute("ANALYZE")
        conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        await pg.copy_records_to_table(
            "products",
            records=product_rows,
            columns=[c.strip() for c in PRODUCT_COLUMNS.split(",")],
        )
        await pg.copy_records_to_table("stock_ledger", records=rows, columns=list(COLUMNS))
        await pg.execute("VACUUM ANALYZE")
    finally:
        await pg.close()


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
    }


async def measure(url: str, live: int, live_start: int, samples: int) -> dict[str, Any]:
    settings = Settings(database_url=url, redis_url="redis://127.0.0.1:1", admin_token=TOKEN)
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    now = now_ms()
    requests = {
        "GET /healthz (bare)": ("/healthz", {}),
        "history of the sale now (10 min, per second)": (f"/api/admin/products/{live}/history", {}),
        "history of a past day's sale (its day, per 5 min)": (
            "/api/admin/products/15/history",
            {"since": iso(now - 16 * DAY_MS), "until": iso(now - 15 * DAY_MS)},
        ),
        "history of a month (per 2 h)": (
            "/api/admin/products/15/history",
            {"since": iso(now - 30 * DAY_MS), "until": iso(now)},
        ),
    }
    results: dict[str, Any] = {}
    async with in_process(app) as client:
        for name, (path, params) in requests.items():
            times = []
            for _ in range(samples):
                began = time.perf_counter()
                response = await client.get(path, params=params, headers=headers)
                times.append((time.perf_counter() - began) * 1000)
                assert response.status_code == 200, response.text
            results[name] = {**summary(times), "points": len(response.json().get("points", []))}
    bare = results["GET /healthz (bare)"]["p50"]
    for value in results.values():
        value["x_bare_p50"] = round(value["p50"] / bare, 1)
    return results


async def run(database_url: str | None, rows_per_day: int, storm_rows: int, samples: int) -> None:
    rows, live, live_start = month(rows_per_day, storm_rows)
    starts = {day + 1: now_ms() - (30 - day) * DAY_MS for day in range(30)}
    starts[live] = live_start
    product_rows = products(rows, starts)
    with tempfile.TemporaryDirectory() as work:
        made = None
        if database_url and database_url.startswith("postgres"):
            made = f"bench_history_{secrets.token_hex(4)}"
            admin = await asyncpg.connect(database_url)
            await admin.execute(f'CREATE DATABASE "{made}"')
            await admin.close()
            url = database_url.rsplit("/", 1)[0] + "/" + made
        else:
            url = f"sqlite:///{Path(work) / 'history.db'}"
        try:
            began = time.perf_counter()
            await load(url, rows, product_rows)
            loaded = time.perf_counter() - began
            results = await measure(url, live, live_start, samples)
        finally:
            if made is not None:
                admin = await asyncpg.connect(database_url)
                await admin.execute(f'DROP DATABASE IF EXISTS "{made}" WITH (FORCE)')
                await admin.close()
    print(
        json.dumps(
            {
                "database": "postgresql" if made else "sqlite",
                "ledger_rows": len(rows),
                "loaded_seconds": round(loaded, 1),
                "latency_ms": results,
            },
            indent=2,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--rows-per-day", type=int, default=60_000)
    parser.add_argument("--storm-rows", type=int, default=60_000)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(run(args.database_url, args.rows_per_day, args.storm_rows, args.samples))


if __name__ == "__main__":
    main()
