"""A month of past sales (bench/history.py): the loader writes balanced books, on both
databases, that the service reads as it would read its own."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest

from server.devtools import history
from server.domain import inventory, waitingroom
from server.domain.clock import now_ms
from server.domain.executor import Columns, Executor, Row, TableRows, Values
from server.domain.model import HoldRequest, Outcome, Reservation, Status
from server.domain.retention import FILE_AFTER_MS
from server.service.idempotency import Idempotency
from server.service.shop import Shop
from server.storage.database import Store
from tests.conftest import Published
from tests.pgpool import PostgresDatabases
from tests.support import assert_reconciled, cancel_one, complete_one, hold, make_product

SMALL = history.History(holds=3_000, products=30)
# The same month with five past waiting rooms of 400 tickets each.
WITH_ROOMS = dataclasses.replace(SMALL, rooms=5, tickets_per_room=400)
ENDED = {"reserved", "sold_out", "lapsed", "left"}


async def test_loaded_history_balances_and_is_all_ended(store: Store, database_url: str) -> None:
    loaded = await asyncio.to_thread(history.load, database_url, SMALL)

    async with store.reader() as conn:
        found = {s.product_id: s for s in await inventory.stats(conn)}
        (row,) = await conn.fetch_all(
            "SELECT COUNT(*) AS n, "
            "SUM(CASE WHEN status = 'ACTIVE' THEN 1 ELSE 0 END) AS active, "
            "SUM(CASE WHEN idempotency_key IS NULL THEN 0 ELSE 1 END) AS keyed, "
            "SUM(CASE WHEN created_at > :day_ago THEN 1 ELSE 0 END) AS recent, "
            "MAX(ended_at) AS last_end FROM reservations",
            {"day_ago": now_ms() - history.DAY_MS},
        )
    assert row["n"] == SMALL.holds
    assert row["active"] == 0
    # About half of the last day's holds carry a key (a seeded coin per hold); the older
    # ones' keys are freed, as the sweep of a running service leaves them.
    assert row["recent"] > 50
    assert 0.3 * row["recent"] < row["keyed"] < 0.7 * row["recent"]
    assert row["last_end"] < now_ms()
    assert sorted(found) == sorted(loaded.products)
    assert len(found) == SMALL.products
    for product_id, books in loaded.products.items():
        s = found[product_id]
        assert (s.total, s.available, s.held) == (books.total, books.available, 0)
        assert (s.sold, s.expired, s.cancelled) == (books.sold, books.expired, books.cancelled)
        assert s.available + s.held + s.sold == s.total
    assert sum(loaded.by_status.values()) == SMALL.holds
    assert loaded.keys_older_than_a_day == 0
    assert await asyncio.to_thread(history.key_backlog, database_url) == 0
    # The stock ledger starts from each product's balance as loaded, and adds up.
    await assert_reconciled(store)


def test_the_same_history_twice_is_the_same_month() -> None:
    first = history._Month(WITH_ROOMS, now=1_800_000_000_000)
    second = history._Month(WITH_ROOMS, now=1_800_000_000_000)
    assert list(first.reservation_rows()) == list(second.reservation_rows())
    assert list(first.product_rows()) == list(second.product_rows())
    assert list(first.room_rows()) == list(second.room_rows())
    assert list(first.ticket_rows()) == list(second.ticket_rows())


async def test_the_months_past_waiting_rooms_are_ended_and_counted(
    store: Store, database_url: str
) -> None:
    loaded = await asyncio.to_thread(history.load, database_url, WITH_ROOMS)
    month_starts = now_ms() - (WITH_ROOMS.days + 1) * history.DAY_MS

    async with store.reader() as conn:
        rooms = await conn.fetch_all(
            "SELECT r.product_id, r.room_key, r.waiting, p.queue, p.sale_starts_at, "
            "(SELECT COUNT(*) FROM queue_tickets t WHERE t.product_id = r.product_id "
            "AND t.state = 'waiting') AS waiting_tickets, "
            "(SELECT COUNT(*) FROM queue_tickets t WHERE t.product_id = r.product_id "
            "AND t.state = 'reserved') AS reserved, "
            "(SELECT COUNT(*) FROM reservations h WHERE h.product_id = r.product_id) AS holds "
            "FROM queue_rooms r JOIN products p ON p.id = r.product_id ORDER BY r.product_id"
        )
        tickets = await conn.fetch_all(
            "SELECT product_id, shopper_id, state, joined_at, admitted_at, pass_expires_at, "
            "ended_at, filed_at FROM queue_tickets"
        )
        queued = await conn.fetch_all("SELECT id, queue FROM products WHERE queue <> 'off'")
        # What the service reads of a room and of a returning shopper.
        assert await waitingroom.queued_products(conn) == []
        counts = [await waitingroom.room_counts(conn, r["product_id"]) for r in rooms]
        shopper = str(tickets[0]["shopper_id"])
        theirs = await waitingroom.tickets_of_shopper(conn, shopper)

    assert len(rooms) == WITH_ROOMS.rooms
    assert {r["queue"] for r in rooms} == {"fifo", "random"}
    assert sorted(q["id"] for q in queued) == [r["product_id"] for r in rooms]
    for room in rooms:
        assert len(bytes.fromhex(str(room["room_key"]))) == 32
        # The room's count is its waiting tickets (none: the sale is over).
        assert room["waiting"] == room["waiting_tickets"] == 0
        # Every reserved ticket's pass made one of the product's holds.
        assert 0 < room["reserved"] <= room["holds"]
    assert counts == [(0, 0)] * len(rooms)
    assert len(tickets) == WITH_ROOMS.rooms * WITH_ROOMS.tickets_per_room
    assert sum(loaded.tickets_by_state.values()) == len(tickets)
    assert {t["state"] for t in tickets} == ENDED
    last = now_ms() - 3_600_000
    for t in tickets:
        assert month_starts <= t["joined_at"] <= t["ended_at"] <= last
        # Filed, as the worker files a ticket some minutes after it ended (migration 0021).
        assert t["ended_at"] <= t["filed_at"] <= min(t["ended_at"] + FILE_AFTER_MS, last)
        if t["state"] in ("reserved", "lapsed"):
            assert t["joined_at"] <= t["admitted_at"] <= t["ended_at"] <= t["pass_expires_at"]
        else:
            assert t["admitted_at"] is None
            assert t["pass_expires_at"] is None
    # Shoppers come back: many have tickets of more than one past sale.
    rooms_of: dict[str, int] = {}
    for t in tickets:
        rooms_of[t["shopper_id"]] = rooms_of.get(t["shopper_id"], 0) + 1
    assert sum(1 for n in rooms_of.values() if n > 1) > len(rooms_of) // 4
    assert len(theirs) == rooms_of[shopper]
    assert all(t.state.value in ENDED for t in theirs)
    # The stock ledger still adds up, rooms or not.
    await assert_reconciled(store)


async def test_history_refuses_a_database_that_has_products(
    store: Store, database_url: str
) -> None:
    await asyncio.to_thread(history.load, database_url, history.History(holds=10, products=1))
    with pytest.raises(ValueError, match="already has products"):
        await asyncio.to_thread(history.load, database_url, history.History(holds=10))
    async with store.reader() as conn:
        (row,) = await conn.fetch_all("SELECT COUNT(*) AS n FROM reservations")
    assert row["n"] == 10


# -- plans that do not depend on the statistics (PostgreSQL) -------------------------------


@pytest.fixture
async def postgres_url(postgres: PostgresDatabases) -> AsyncIterator[str]:
    name = await postgres.database()
    yield postgres.url(name)
    postgres.release(name)


ByIdOperation = Callable[..., Awaitable[Outcome[Reservation]]]


class Explaining:
    """An Executor that asks PostgreSQL for the plan of each statement, on the same
    connection and in the same transaction, just before running it."""

    def __init__(self, conn: Executor, plans: list[tuple[str, dict[str, Any]]]) -> None:
        self._conn, self._plans = conn, plans

    async def _explain(self, sql: str, values: Values | None) -> None:
        row = await self._conn.fetch_one("EXPLAIN (FORMAT JSON) " + sql, values)
        assert row is not None
        self._plans.append((sql, json.loads(row["QUERY PLAN"])[0]["Plan"]))

    async def fetch_all(self, sql: str, values: Values | None = None) -> Sequence[Row]:
        await self._explain(sql, values)
        return await self._conn.fetch_all(sql, values)

    async def fetch_one(self, sql: str, values: Values | None = None) -> Row | None:
        await self._explain(sql, values)
        return await self._conn.fetch_one(sql, values)

    async def execute(self, sql: str, values: Values | None = None) -> int:
        await self._explain(sql, values)
        return await self._conn.execute(sql, values)

    async def insert_rows(
        self, table: str, columns: Columns, rows: Sequence[Sequence[Any]]
    ) -> None:
        await self._conn.insert_rows(table, columns, rows)  # an INSERT: no plan to check

    async def insert_many(self, parts: Sequence[TableRows]) -> None:
        await self._conn.insert_many(parts)  # INSERTs: no plan to check


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _reservation_scans(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(node type, index) of every node that finds rows of the reservations table (a bitmap
    heap scan reads the rows its bitmap index scan found: the latter is the one that
    counts)."""
    return [
        (node["Node Type"], node.get("Index Name"))
        for node in _nodes(plan)
        if (
            node.get("Relation Name") == "reservations"
            and node["Node Type"] not in ("ModifyTable", "Bitmap Heap Scan")
        )
        or (node["Node Type"] == "Bitmap Index Scan" and "reservations" in node["Index Name"])
    ]


@pytest.mark.postgres
async def test_expiry_and_holds_by_id_are_planned_right_on_stale_statistics(
    postgres_url: str,
) -> None:
    """A month of ended holds, analyzed while none was ACTIVE (as autovacuum leaves a shop
    between sales); then a sale opens thousands of holds and no ANALYZE runs. The statistics
    say there are no open holds. Before migration 0002 the expiry batch was then planned as a
    nested loop that scanned every open hold once per due hold (14 s per batch of 500), and
    completing a hold scanned the open holds instead of using the primary key.

    100,000 holds, the smaller history of the issue: below about 50,000 rows PostgreSQL may
    rightly prefer reading the whole (small) table to 500 key lookups."""
    await asyncio.to_thread(history.load, postgres_url, history.History(holds=100_000))
    store = Store(postgres_url)
    await store.connect()
    try:
        await store.write(
            lambda conn: conn.execute("ALTER TABLE reservations SET (autovacuum_enabled = false)")
        )
        product = await make_product(store, 10_000)
        now = now_ms()
        for start in (now - 130_000, now):  # 3,000 overdue, then 3,000 open for two minutes
            await store.write(
                functools.partial(
                    inventory.reserve,
                    requests=[HoldRequest(product.id, 1)] * 3_000,
                    now=start,
                    hold_ms=120_000,
                )
            )
        async with store.reader() as conn:
            estimate = await conn.fetch_one(
                "EXPLAIN (FORMAT JSON) SELECT id FROM reservations WHERE ended_at IS NULL"
            )
            open_holds = await inventory.list_reservations(
                conn, product_id=product.id, status=Status.ACTIVE, limit=1
            )
        assert estimate is not None
        # The premise: the planner believes almost nothing is open (6,000 are).
        assert json.loads(estimate["QUERY PLAN"])[0]["Plan"]["Plan Rows"] < 100

        plans: list[tuple[str, dict[str, Any]]] = []
        expired = await store.write(
            lambda conn: inventory.expire_overdue(Explaining(conn, plans), now=now_ms())
        )
        assert len(expired.result()) == inventory.SWEEP_BATCH
        hold_id = open_holds[0].id

        async def explained(operation: ByIdOperation, conn: Executor) -> Outcome[Reservation]:
            return await operation(Explaining(conn, plans), hold_id, now=now_ms())

        for operation in (complete_one, cancel_one, inventory.expire):
            await store.write(functools.partial(explained, operation))
        async with store.reader() as conn:
            listed = await inventory.list_reservations(
                Explaining(conn, plans), product_id=None, status=Status.ACTIVE, limit=200
            )
            # When a bucket's expiry job next wakes: the first open hold of its window.
            assert (
                await inventory.next_open_expiry(
                    Explaining(conn, plans), after=now, until=now + 200_000
                )
                == now + 120_000
            )
        assert len(listed) == 200

        for sql, plan in plans:
            scans = _reservation_scans(plan)
            if "FROM products" in sql or sql.startswith(
                ("UPDATE products", "INSERT INTO stock_ledger", "INSERT INTO outbox")
            ):
                continue
            assert scans, (sql, plan)
            print(sql[:50], scans)
            for node_type, index in scans:
                assert node_type != "Seq Scan", (sql, plan)
                if "ended_at IS NULL" in sql:  # open holds by time: their index, in order
                    assert index == "reservations_open_by_expiry", (sql, plan)
                    assert node_type in ("Index Scan", "Index Only Scan"), (sql, plan)
                    assert "Sort" not in {n["Node Type"] for n in _nodes(plan)}, (sql, plan)
                else:  # by id: the primary key, whatever the statistics say
                    assert index == "reservations_pkey", (sql, plan)
            assert not any(n["Node Type"] == "Nested Loop" for n in _nodes(plan)), (sql, plan)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_the_consoles_active_listing_reads_its_index_on_a_table_never_analyzed(
    postgres_url: str,
) -> None:
    """A new shop's first sale: the reservations table has never been analyzed, so
    PostgreSQL believes a handful of holds are open and plans the console's ACTIVE listing
    (every product's open holds, by time left, 200 of them) as a bitmap scan and a sort of
    every open hold: 65 ms a request at 50,000 open holds, ~190 ms at 100,000 in the history
    benchmark's empty column. Read through `Store.index_order_reader`, as the shop does, the
    open holds' index is read in order and only the rows asked for."""
    store = Store(postgres_url)
    await store.connect()
    try:
        await store.write(
            lambda conn: conn.execute("ALTER TABLE reservations SET (autovacuum_enabled = false)")
        )
        product = await make_product(store, 10_000)
        now = now_ms()
        for step in range(2):
            await store.write(
                functools.partial(
                    inventory.reserve,
                    requests=[HoldRequest(product.id, 1)] * 2_500,
                    now=now + step,
                    hold_ms=120_000,
                )
            )

        async def planned(reader: Callable[[], Any]) -> dict[str, Any]:
            plans: list[tuple[str, dict[str, Any]]] = []
            async with reader() as conn:
                listed = await inventory.list_reservations(
                    Explaining(conn, plans), product_id=None, status=Status.ACTIVE, limit=200
                )
            assert len(listed) == 200
            ((_, plan),) = plans
            return plan

        # The premise: left to its statistics, PostgreSQL sorts every open hold.
        assert "Sort" in {n["Node Type"] for n in _nodes(await planned(store.reader))}
        plan = await planned(store.index_order_reader)
        assert "Sort" not in {n["Node Type"] for n in _nodes(plan)}, plan
        ((node_type, index),) = _reservation_scans(plan)
        assert (node_type, index) in {
            ("Index Scan", "reservations_open_by_expiry"),
            ("Index Only Scan", "reservations_open_by_expiry"),
        }, plan

        # The shop lists them so: the most time left first.
        shop = Shop(store, hold_ms=120_000, publish=Published())
        listed = await shop.reservations(product_id=None, status=Status.ACTIVE, limit=200)
        assert [r.expires_at for r in listed] == [now + 1 + 120_000] * 200
        assert [r.id for r in listed] == sorted((r.id for r in listed), reverse=True)
    finally:
        await store.close()


# -- the idempotency-key sweep: bounded work per run ---------------------------------------


async def test_a_backlog_of_old_keys_is_cleared_a_bounded_amount_per_sweep(
    shop: Shop, database_url: str
) -> None:
    backlog_month = dataclasses.replace(SMALL, swept=False)
    loaded = await asyncio.to_thread(history.load, database_url, backlog_month)
    backlog = loaded.keys_older_than_a_day
    assert backlog > 1_000
    recent = await hold(shop.store, (await make_product(shop.store, 1)).id, key="made-today")
    freed: list[int] = []
    while not freed or freed[-1]:
        freed.append(await Idempotency(shop.store).forget_expired(batch=100, most=400))
    # At most 400 a sweep, until none is left; the key made today is kept.
    assert freed[:-2] == [400] * (len(freed) - 2)
    assert sum(freed) == backlog
    assert await asyncio.to_thread(history.key_backlog, database_url) == 0
    async with shop.store.reader() as conn:
        kept = await inventory.get_reservation_by_key(conn, "made-today")
    assert kept is not None
    assert kept.id == recent.id
