"""Helpers shared by the tests: making data, checking the stock invariant, waiting with a
deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest

from server.api.app import create_app
from server.domain import inventory, ledger, outbox
from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.domain.inventory import Caller, Stats
from server.domain.model import HoldRequest, Outcome, Product, Reservation
from server.infra.settings import Settings
from server.service.ledger import Ledger
from server.storage import migrate
from server.storage.database import Store, sqlite_path
from tests.pgpool import PostgresDatabases

T = TypeVar("T")


def product_name() -> str:
    return f"Test product {secrets.token_hex(4)}"


# What `product_in_memory` changes: one unit of one, on sale, in a `fifo` room.
_IN_MEMORY = Product(
    id=1,
    name="Drop",
    price_cents=100,
    total_stock=1,
    available_stock=1,
    version=1,
    sale_starts_at=None,
    created_at=0,
    updated_at=0,
    queue="fifo",
)


def product_in_memory(**fields: Any) -> Product:
    """A `Product` made in memory, nothing stored (for the hub, the catalog and the room's
    pure functions): product 1, "Drop" at 1.00, one unit of one, on sale since always, in a
    `fifo` room, created and updated at 0; `fields` (Product's own) say what differs."""
    return replace(_IN_MEMORY, **fields)


async def make_product(
    store: Store, stock: int, *, price_cents: int = 1999, sale_starts_at: int | None = None
) -> Product:
    outcome = await store.write(
        lambda conn: inventory.create_product(
            conn,
            name=product_name(),
            price_cents=price_cents,
            stock=stock,
            sale_starts_at=sale_starts_at,
            now=now_ms(),
        )
    )
    return outcome.result()


async def hold(
    store: Store,
    product_id: int,
    quantity: int = 1,
    *,
    now: int | None = None,
    hold_ms: int = 120_000,
    key: str | None = None,
) -> Reservation:
    """Make one hold directly, at a chosen time (to make holds that are already overdue)."""
    outcomes, _ = await store.write(
        lambda conn: inventory.reserve(
            conn,
            [HoldRequest(product_id, quantity, key)],
            now=now_ms() if now is None else now,
            hold_ms=hold_ms,
        )
    )
    return outcomes[0].result().reservation


async def stats(store: Store, product_id: int) -> Stats:
    async with store.reader() as conn:
        (found,) = await inventory.stats(conn, product_id)
    return found


async def assert_invariant(store: Store, product_id: int) -> Stats:
    """available + held + sold == total, available >= 0 (docs/design.md §1, promise 1)."""
    s = await stats(store, product_id)
    assert s.available >= 0, s
    assert s.available + s.held + s.sold == s.total, s
    return s


async def recount(store: Store, product_id: int) -> Stats:
    """The product's units by state counted from its holds, one by one: what the operator's
    stats were before the per-product counters, and what the counters must always equal.
    Revenue is counted at the product's current price: right while no test changes it."""
    async with store.reader() as conn:
        row = await conn.fetch_one(
            "SELECT p.total_stock AS total, p.available_stock AS available, "
            "COALESCE(SUM(CASE WHEN r.status = 'ACTIVE' THEN r.quantity END), 0) AS held, "
            "COALESCE(SUM(CASE WHEN r.status = 'COMPLETED' THEN r.quantity END), 0) AS sold, "
            "COALESCE(SUM(CASE WHEN r.status = 'EXPIRED' THEN r.quantity END), 0) AS expired, "
            "COALESCE(SUM(CASE WHEN r.status = 'CANCELLED' THEN r.quantity END), 0) "
            "AS cancelled, "
            "COALESCE(SUM(CASE WHEN r.status = 'COMPLETED' THEN r.quantity END), 0) "
            "* p.price_cents AS revenue_cents "
            "FROM products p LEFT JOIN reservations r ON r.product_id = p.id "
            "WHERE p.id = :id GROUP BY p.id, p.total_stock, p.available_stock, p.price_cents",
            {"id": product_id},
        )
    assert row is not None, f"no product {product_id}"
    return Stats(
        product_id=product_id,
        **{
            k: int(row[k])
            for k in ("total", "available", "held", "sold", "expired", "cancelled", "revenue_cents")
        },
    )


async def reservation(store: Store, reservation_id: str) -> Reservation:
    async with store.reader() as conn:
        found = await inventory.get_reservation(conn, reservation_id)
    assert found is not None
    return found


async def eventually(
    check: Callable[[], Awaitable[T]], *, within: float = 10.0, what: str = "condition"
) -> T:
    """Re-check an observable condition until it holds, failing after `within` seconds.

    For state that has no event to wait on (a row written by another process). The value
    returned by `check` must be truthy to count as done; it is returned.
    """
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def write_lock_held_elsewhere(database_url: str, product_id: int) -> AsyncIterator[None]:
    """A long write transaction from outside the service (another process, in real life),
    until the block ends: on SQLite the file's write lock (`BEGIN IMMEDIATE`), on
    PostgreSQL the product's row."""
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(database_url), timeout=10, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
        finally:
            conn.rollback()
            conn.close()
        return
    pg = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        transaction = pg.transaction()
        await transaction.start()
        await pg.fetch("SELECT id FROM products WHERE id = $1 FOR UPDATE", product_id)
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await pg.close()


async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process, started as uvicorn would start it, and a client for it."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://shop.test"
        ) as client,
    ):
        yield client


async def assert_reconciled(store: Store) -> None:
    """Every product's stock ledger adds up to its units and its open holds (issue 12)."""
    result = await Ledger(store).reconcile()
    assert result.ok, {p.product_id: p.problems for p in result.unreconciled}


async def outbox_bodies(
    store: Store, *, product_id: int | None = None, event_type: str | None = None
) -> list[dict[str, Any]]:
    """The outbox's events (of one product, or of one type), in order per product, each as
    the body its webhook sends (`outbox.StoredEvent.body`, as a delivery's), parsed."""
    where: list[str] = []
    values: dict[str, object] = {}
    if product_id is not None:
        where.append("o.product_id = :p")
        values["p"] = product_id
    if event_type is not None:
        where.append("o.type = :t")
        values["t"] = event_type
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    async with store.reader() as conn:
        rows = await conn.fetch_all(
            f"SELECT {outbox.STORED_COLUMNS} FROM outbox o {outbox.LEDGER_JOIN} "
            f"{clause}ORDER BY o.product_id, o.version, o.seq",
            values,
        )
    return [json.loads(outbox.StoredEvent.from_row(r).body()) for r in rows]


# One hold's completion or cancellation, through the batch operations the service uses.


async def complete_one(
    conn: Executor,
    reservation_id: str,
    *,
    now: int,
    actor: str = ledger.SHOPPER,
    order_reference: str | None = None,
    caller: Caller = inventory.ANYONE,
) -> Outcome[Reservation]:
    """One hold's `complete_many`: ACTIVE and not yet due → COMPLETED, with its events."""
    outcomes, events = await inventory.complete_many(
        conn, [inventory.Completing(reservation_id, actor, order_reference, caller)], now=now
    )
    return Outcome(outcomes[0].value, error=outcomes[0].error, events=events)


async def cancel_one(
    conn: Executor,
    reservation_id: str,
    *,
    now: int,
    actor: str = ledger.SHOPPER,
    reason: str | None = None,
    caller: Caller = inventory.ANYONE,
) -> Outcome[Reservation]:
    """One hold's `cancel_many`: ACTIVE and not yet due → CANCELLED, units back (and the
    shopper's allowance), with its events."""
    outcomes, events = await inventory.cancel_many(
        conn, [inventory.Cancelling(reservation_id, actor, reason, caller)], now=now
    )
    return Outcome(outcomes[0].value, error=outcomes[0].error, events=events)


@asynccontextmanager
async def migrated_up_to(
    request: pytest.FixtureRequest, tmp_path: Path, version: int
) -> AsyncIterator[Store]:
    """A database as the release whose last migration was `version` left it, for a test of
    a later migration on the rows that release wrote: a SQLite file in `tmp_path`, or (for
    a test parametrized `postgres`, `request.param`) a PostgreSQL database of its own."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / f'up-to-{version}.db'}"
        name = None
    else:
        postgres: PostgresDatabases = request.getfixturevalue("postgres")
        name = postgres.name(f"_up_to_{version}")
        await postgres._admin(f'CREATE DATABASE "{name}"')
        url = postgres.url(name)
    store = Store(url)
    await store.connect()
    try:
        await migrate.migrate(store, up_to=version)
        yield store
    finally:
        await store.close()
        if name is not None:
            postgres.drop(name)
