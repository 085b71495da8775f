"""A month of past sales (bench/history.py): the loader writes balanced books, on both
databases, that the service reads as it would read its own."""

from __future__ import annotations

import asyncio

import pytest

from server.devtools import history
from server.domain import inventory
from server.domain.clock import now_ms
from server.storage.database import Store

SMALL = history.History(holds=3_000, products=30)


async def test_loaded_history_balances_and_is_all_ended(store: Store, database_url: str) -> None:
    loaded = await asyncio.to_thread(history.load, database_url, SMALL)

    async with store.reader() as conn:
        found = {s.product_id: s for s in await inventory.stats(conn)}
        (row,) = await conn.fetch_all(
            "SELECT COUNT(*) AS n, "
            "SUM(CASE WHEN status = 'ACTIVE' THEN 1 ELSE 0 END) AS active, "
            "SUM(CASE WHEN idempotency_key IS NULL THEN 0 ELSE 1 END) AS keyed, "
            "MAX(ended_at) AS last_end FROM reservations"
        )
    assert row["n"] == SMALL.holds
    assert row["active"] == 0
    # About half carry a key (a seeded coin per hold).
    assert 0.45 * SMALL.holds < row["keyed"] < 0.55 * SMALL.holds
    assert row["last_end"] < now_ms()
    assert sorted(found) == sorted(loaded.products)
    assert len(found) == SMALL.products
    for product_id, books in loaded.products.items():
        s = found[product_id]
        assert (s.total, s.available, s.held) == (books.total, books.available, 0)
        assert (s.sold, s.expired, s.cancelled) == (books.sold, books.expired, books.cancelled)
        assert s.available + s.held + s.sold == s.total
    assert sum(loaded.by_status.values()) == SMALL.holds
    assert loaded.keys_older_than_a_day == await asyncio.to_thread(
        history.key_backlog, database_url
    )


def test_the_same_history_twice_is_the_same_month() -> None:
    first = history._Month(SMALL, now=1_800_000_000_000)
    second = history._Month(SMALL, now=1_800_000_000_000)
    assert list(first.reservation_rows()) == list(second.reservation_rows())
    assert list(first.product_rows()) == list(second.product_rows())


async def test_history_refuses_a_database_that_has_products(
    store: Store, database_url: str
) -> None:
    await asyncio.to_thread(history.load, database_url, history.History(holds=10, products=1))
    with pytest.raises(ValueError, match="already has products"):
        await asyncio.to_thread(history.load, database_url, history.History(holds=10))
    async with store.reader() as conn:
        (row,) = await conn.fetch_all("SELECT COUNT(*) AS n FROM reservations")
    assert row["n"] == 10
