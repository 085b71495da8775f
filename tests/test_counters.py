"""Per-product counters (migration 0002): the operator's stats read them instead of summing
every hold, so they must always equal a full recount of the holds; and the database itself
refuses a products row whose books do not balance (promise 1)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.errors import DomainError
from server.domain.executor import Executor
from server.domain.model import HoldRequest, Reservation, Status
from server.service.expiry import Expirer
from server.service.shop import Shop
from server.storage import migrate
from server.storage.database import Store
from tests.conftest import Published
from tests.support import (
    assert_invariant,
    complete_one,
    hold,
    make_product,
    migrated_up_to,
    recount,
    stats,
)

CHECK_VIOLATIONS = (sqlite3.IntegrityError, asyncpg.exceptions.CheckViolationError)


async def test_stats_equal_a_full_recount_after_storms_cancels_and_expiries(
    database_url: str,
) -> None:
    """Two shops on two connections (two processes, as far as the database can tell) take a
    storm of reservations, some with Idempotency-Keys sent twice, while holds are completed,
    cancelled, expired by the sweeper and refused as expired, and a product is restocked."""
    stores = [Store(database_url), Store(database_url)]
    for store in stores:
        await store.connect()
    shops = [Shop(store, hold_ms=120_000, publish=Published()) for store in stores]
    expirers = [Expirer(store, publish=Published()) for store in stores]
    for shop in shops:
        await shop.start()
    rng = random.Random(18)
    try:
        products = [await make_product(stores[0], stock) for stock in (40, 400, 7)]
        ids = [p.id for p in products]
        # Holds already overdue (as if made two minutes ago), for the sweeper and refusals.
        overdue = [
            await hold(stores[0], rng.choice(ids), rng.randint(1, 2), now=now_ms() - 130_000)
            for _ in range(12)
        ]

        async def reserve(n: int) -> Reservation | None:
            key = f"storm-{n % 150}" if n % 3 == 0 else None  # every key used twice
            request = HoldRequest(rng.choice(ids), rng.randint(1, 3), key)
            try:
                return (await shops[n % 2].reserve(request)).reservation
            except DomainError:
                return None

        held = [r for r in await asyncio.gather(*(reserve(n) for n in range(600))) if r]
        unique = list({r.id: r for r in held}.values())
        assert len(unique) > 50

        async def settle(n: int, reservation: Reservation) -> None:
            shop = shops[n % 2]
            try:
                if n % 3 == 0:
                    await shop.complete(reservation.id)
                elif n % 3 == 1:
                    await shop.cancel(reservation.id)
            except DomainError:
                pass

        async def late(reservation: Reservation) -> None:
            with pytest.raises(DomainError):  # too late: expired on the spot
                await shops[1].complete(reservation.id)

        await asyncio.gather(
            *(settle(n, r) for n, r in enumerate(unique)),
            *(late(r) for r in overdue[:4]),
            expirers[0].expire_overdue(batch=3),
            expirers[1].expire_overdue(batch=5),
            *(reserve(n) for n in range(600, 700)),
            shops[0].restock(ids[2], 5),
        )
        await expirers[0].expire_overdue()

        for product_id in ids:
            counted = await recount(stores[0], product_id)
            assert await stats(stores[1], product_id) == counted
            await assert_invariant(stores[0], product_id)
        totals = [await recount(stores[0], i) for i in ids]
        every = {s.product_id: s for s in await shops[0].stats()}
        assert [every[i] for i in ids] == totals
        # The console's questions: the products it shows, a page by id, the sums.
        assert await shops[1].stats(ids=set(ids)) == sorted(totals, key=lambda t: t.product_id)
        first, *rest = sorted(ids)
        assert [s.product_id for s in await shops[1].stats(after=first, limit=1)] == rest[:1]
        summed = await shops[1].stats_totals()
        for key in ("total", "available", "held", "sold", "expired", "cancelled"):
            assert getattr(summed, key) == sum(getattr(t, key) for t in totals), key
        assert summed.products == len(ids)
        # Every kind of movement happened, so each counter was exercised.
        assert all(sum(getattr(t, k) for t in totals) > 0 for k in ("held", "sold", "expired"))
        assert sum(t.cancelled for t in totals) > 0
    finally:
        for shop in shops:
            await shop.stop()
        for store in stores:
            await store.close()


async def test_the_database_refuses_books_that_do_not_balance(store: Store) -> None:
    product = await make_product(store, 5)
    await hold(store, product.id, 2)

    async def take_unrecorded(conn: Executor) -> None:
        await conn.execute(
            "UPDATE products SET available_stock = available_stock - 1 WHERE id = :id",
            {"id": product.id},
        )

    async def sell_what_is_not_held(conn: Executor) -> None:
        await conn.execute(
            "UPDATE products SET held_units = held_units - 3, sold_units = sold_units + 3 "
            "WHERE id = :id",
            {"id": product.id},
        )

    for unbalanced in (take_unrecorded, sell_what_is_not_held):
        with pytest.raises(CHECK_VIOLATIONS):
            await store.write(unbalanced)
    s = await stats(store, product.id)
    assert (s.total, s.available, s.held, s.sold) == (5, 3, 2, 0)


# -- migration 0002 on a database that already has holds ---------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def release_one(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A database as the first release left it: migration 0001 only."""
    async with migrated_up_to(request, tmp_path, 1) as store:
        yield store


async def _first_release_rows(store: Store, *, sold_off_the_books: int = 0) -> None:
    """Two products and their holds, written as release one wrote them (no counters)."""
    now = now_ms()

    async def write(conn: Executor) -> None:
        # Product 1: 20 units; 3 held, 5 sold, 4 expired, 2 cancelled (back on sale).
        # Product 2: 6 units, nothing ever reserved.
        for product_id, total, available in ((1, 20, 12 - sold_off_the_books), (2, 6, 6)):
            await conn.execute(
                "INSERT INTO products (id, name, price_cents, total_stock, available_stock, "
                "version, created_at, updated_at) VALUES (:id, 'Old', 100, :t, :a, 1, :n, :n)",
                {"id": product_id, "t": total, "a": available, "n": now},
            )
        holds = [
            ("ACTIVE", 2),
            ("ACTIVE", 1),
            ("COMPLETED", 3),
            ("COMPLETED", 2),
            ("EXPIRED", 4),
            ("CANCELLED", 2),
        ]
        for status, quantity in holds:
            active = status == "ACTIVE"
            await conn.execute(
                "INSERT INTO reservations (id, product_id, quantity, status, created_at, "
                "expires_at, completed_at, ended_at) VALUES (:id, 1, :q, :s, :n, :e, :c, :end)",
                {
                    "id": inventory.new_reservation_ids(1, now=now_ms())[0],
                    "q": quantity,
                    "s": status,
                    "n": now,
                    "e": now + 120_000,
                    "c": now if status == "COMPLETED" else None,
                    "end": None if active else now,
                },
            )

    await store.write(write)


async def test_migration_0002_counts_the_holds_already_there(release_one: Store) -> None:
    await _first_release_rows(release_one)
    applied = await migrate.migrate(release_one, up_to=2)
    assert [m.version for m in applied] == [2]
    await migrate.migrate(release_one)
    async with release_one.reader() as conn:
        one, two = await inventory.stats(conn)
    assert (one.total, one.available, one.held, one.sold, one.expired, one.cancelled) == (
        20,
        12,
        3,
        5,
        4,
        2,
    )
    assert one == await recount(release_one, 1)
    assert (two.total, two.available, two.held, two.sold) == (6, 6, 0, 0)
    # ...and the service carries on from there with the counters.
    async with release_one.reader() as conn:
        (active,) = await inventory.list_reservations(
            conn, product_id=1, status=Status.ACTIVE, limit=1
        )
    await release_one.write(lambda conn: complete_one(conn, active.id, now=now_ms()))
    assert await stats(release_one, 1) == await recount(release_one, 1)


async def test_migration_0002_refuses_books_that_do_not_balance(release_one: Store) -> None:
    # A unit gone from available_stock that no hold accounts for (release one had no
    # constraint to stop it): the migration stops, and leaves the database as it was.
    await _first_release_rows(release_one, sold_off_the_books=1)
    # (SQLite reports a CHECK that fails in ALTER TABLE as an OperationalError.)
    refused = (*CHECK_VIOLATIONS, sqlite3.OperationalError)
    with pytest.raises(refused, match=r"(?i)check constraint"):
        await migrate.migrate(release_one)
    assert next(m.version for m in await migrate.pending(release_one)) == 2
    async with release_one.reader() as conn:
        row = await conn.fetch_one("SELECT total_stock, available_stock FROM products WHERE id = 1")
    assert row is not None
    assert (row["total_stock"], row["available_stock"]) == (20, 11)


async def test_a_product_made_today_counts_from_zero(store: Store) -> None:
    product = await make_product(store, 9)
    s = await stats(store, product.id)
    assert (s.total, s.available, s.held, s.sold, s.expired, s.cancelled) == (9, 9, 0, 0, 0, 0)
    assert s == await recount(store, product.id)
    restocked = await store.write(lambda conn: inventory.restock(conn, product.id, 4, now=now_ms()))
    assert restocked.result().total_stock == 13
    assert await stats(store, product.id) == await recount(store, product.id)
