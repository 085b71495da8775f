"""A Redis outage on the real stack (issue 15, promise 2): the Procfile's web processes and
worker, a Redis of the test's own that is killed, SQLite and PostgreSQL.

No hold keeps its units past its expiresAt because Redis is down: the next reservation that
needs them expires them in its own transaction (lazy expiry), and the worker's sweeper, which
needs only the database, expires the rest. When Redis is back, every hold was expired once:
one `expired` row in the ledger each, the counters and the ledger agree.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.devtools.embedded_redis import EmbeddedRedis
from server.devtools.processes import Service, running
from server.storage.database import Store
from tests.support import assert_invariant, eventually, stats

pytestmark = pytest.mark.slow

Body = dict[str, Any]


async def until(check: Callable[[], Awaitable[Any]], what: str, within: float = 30.0) -> Any:
    return await eventually(check, within=within, what=what)


async def reserve(client: httpx.AsyncClient, product_id: int, quantity: int = 1) -> httpx.Response:
    return await client.post(
        "/api/reservations", json={"productId": product_id, "quantity": quantity}
    )


def spread(service: Service) -> httpx.AsyncClient:
    """A new connection per request, so that requests reach every web process."""
    return service.client(limits=httpx.Limits(max_connections=10, max_keepalive_connections=0))


async def expired_rows(store: Store) -> Counter[str]:
    """How many `expired` ledger rows each hold has."""
    async with store.reader() as conn:
        found = await conn.fetch_all(
            "SELECT reservation_id FROM stock_ledger WHERE movement = 'expired'"
        )
    return Counter(str(row["reservation_id"]) for row in found)


async def all_holds(store: Store) -> dict[str, str]:
    async with store.reader() as conn:
        found = await conn.fetch_all("SELECT id, status FROM reservations")
    return {str(row["id"]): str(row["status"]) for row in found}


async def test_with_redis_down_overdue_holds_go_to_the_next_shopper_and_the_worker_sweeps(
    database_url: str, own_redis: EmbeddedRedis, tmp_path: Path, store: Store
) -> None:
    with running(
        database_url, own_redis.url, tmp_path / "logs",
        worker=False, web_concurrency=2, HOLD_SECONDS="1", SWEEP_SECONDS="1",
    ) as service:  # fmt: skip
        wanted = await service.new_product(3)  # a shopper comes back for its units
        left = await service.new_product(2)  # nobody does: the worker's sweeper expires them
        async with spread(service) as client:
            first = [await reserve(client, wanted["id"]) for _ in range(3)]
            first += [await reserve(client, left["id"]) for _ in range(2)]
            assert [r.status_code for r in first] == [201] * 5, [r.text for r in first]
            sold_out = await reserve(client, wanted["id"])
            assert sold_out.status_code == 409, sold_out.text

            await asyncio.to_thread(own_redis.kill)

            async def all_read_expired() -> bool:
                for response in first:
                    read = await client.get(f"/api/reservations/{response.json()['id']}")
                    if read.json()["status"] != "EXPIRED":
                        return False
                return True

            await until(all_read_expired, "every hold to be past its expiresAt")
            # Past expiresAt, and nothing has expired them: no worker, no Redis for jobs.
            assert (await stats(store, wanted["id"])).held == 3

            # The units go to the next shoppers, on their first try, whichever web process
            # answers (each with its own view of the stock).
            started = time.monotonic()
            again = [await reserve(client, wanted["id"]) for _ in range(3)]
            took = time.monotonic() - started
            assert [r.status_code for r in again] == [201] * 3, [r.text for r in again]
            print(f"three reservations of the overdue units answered in {took * 1000:.0f} ms")
            s = await assert_invariant(store, wanted["id"])
            assert (s.held, s.expired) == (3, 3)
            assert (await stats(store, left["id"])).held == 2

        # The worker, started while Redis is still down, sweeps the rest (and, a second
        # later, the new holds).
        service.worker.start()

        async def everything_back() -> bool:
            for product in (wanted, left):
                s = await assert_invariant(store, product["id"])
                if s.available != s.total:
                    return False
            return True

        await until(everything_back, "the worker's sweeper, Redis down")

        # Redis back: the books show every hold expired exactly once.
        await asyncio.to_thread(own_redis.start)
        holds = await all_holds(store)
        assert len(holds) == 8
        assert set(holds.values()) == {"EXPIRED"}
        assert await expired_rows(store) == Counter(dict.fromkeys(holds, 1))
        assert (await stats(store, wanted["id"])).expired == 6
        assert (await stats(store, left["id"])).expired == 2
        async with service.client() as client:
            reconciled = await client.get("/api/admin/reconcile", headers=service.admin_headers())
        assert reconciled.status_code == 200, reconciled.text
        assert reconciled.json()["ok"], reconciled.json()
