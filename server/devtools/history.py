"""A month of past sales, loaded in bulk: what a shop that has run for a while has in its
tables, for the benchmark (`bin/bench history`) and for tests (a few thousand holds).

`load(database_url, History(holds=1_000_000))` writes products sold one after another over
`days` days (each sale a slot of `days / products`), and `holds` ended holds spread over
those sales, COMPLETED, EXPIRED or CANCELLED, half of them made with an Idempotency-Key. As a
running service would have left them (`History.swept`, the default), the keys of holds older
than the idempotency window (a day) are already freed, as the worker's sweep frees them while
they age; `swept=False` loads every key, a backlog the sweep meets at once (a worker that was
down for days). The stock books balance, as the service would have left them: no hold
is ACTIVE, so every product's `total_stock == available_stock + sold units`, expired and
cancelled units having gone back on sale, and its counters (`held_units`, `sold_units`,
`expired_units`, `cancelled_units`) say so. The data is a function of `History` alone (a
seeded generator), so two runs load the same month.

The rows go straight into the tables the migrations made, as fast as each database takes
them: one `executemany` transaction on SQLite, one COPY on PostgreSQL (a million holds in
about half a minute), then PostgreSQL's `VACUUM ANALYZE`, as autovacuum would have run at
some point during the month, when no hold was ACTIVE: the planner's statistics then say
that none is, which is what a month-old shop's are likely to say at the start of a sale.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import sqlite3
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from server.domain.clock import now_ms
from server.storage.database import sqlite_path

DAY_MS = 86_400_000
HOLD_MS = 120_000  # the holds of the past lasted the default two minutes
CHUNK = 50_000  # rows per executemany on SQLite

# Shares of the ended holds, by how they ended (a flash sale lets many holds lapse).
STATUSES = ("COMPLETED", "EXPIRED", "CANCELLED")
STATUS_WEIGHTS = (30, 50, 20)
QUANTITIES = (1, 2, 3)
QUANTITY_WEIGHTS = (70, 20, 10)

RESERVATION_COLUMNS = (
    "id",
    "product_id",
    "quantity",
    "status",
    "created_at",
    "expires_at",
    "completed_at",
    "ended_at",
    "idempotency_key",
)
PRODUCT_COLUMNS = (
    "id",
    "name",
    "price_cents",
    "total_stock",
    "available_stock",
    "version",
    "sale_starts_at",
    "created_at",
    "updated_at",
    "held_units",
    "sold_units",
    "expired_units",
    "cancelled_units",
)


@dataclass(frozen=True)
class History:
    """What to load: `holds` ended holds over `products` products and `days` days."""

    holds: int
    products: int = 0  # 0: one product per 100 holds (10,000 for a million)
    days: int = 30
    keyed_share: float = 0.5  # of the holds made with an Idempotency-Key
    seed: int = 18
    # The keys of holds older than a day already freed, as the worker's sweep leaves a
    # running service's; False: every key loaded, for the sweep to clear (a backlog).
    swept: bool = True

    @property
    def product_count(self) -> int:
        return self.products or max(1, self.holds // 100)


@dataclass
class ProductBooks:
    """One past product's units, by what became of them (units of stock)."""

    total: int = 0
    available: int = 0
    sold: int = 0
    expired: int = 0
    cancelled: int = 0
    holds: int = 0
    restores: int = 0  # holds whose units went back on sale (expired or cancelled)


@dataclass
class Loaded:
    """What `load` wrote, and how long it took (seconds)."""

    history: History
    products: dict[int, ProductBooks]
    keys_older_than_a_day: int
    seconds: float
    by_status: dict[str, int] = field(default_factory=dict)  # holds per status

    def summary(self) -> dict[str, Any]:
        return {
            "holds": self.history.holds,
            "products": len(self.products),
            "days": self.history.days,
            "keyed_holds": round(self.history.holds * self.history.keyed_share),
            "keys_older_than_a_day": self.keys_older_than_a_day,
            "by_status": self.by_status,
            "load_seconds": round(self.seconds, 1),
        }


class _Month:
    """The generated month: a skeleton of every hold (time, product, status, quantity) in
    compact arrays, the product books derived from it, then the full rows on demand."""

    def __init__(self, history: History, now: int) -> None:
        self.history = history
        rng = random.Random(history.seed)
        n, p = history.holds, history.product_count
        # Everything ended at least an hour ago.
        self.end = now - 3_600_000
        self.start = self.end - history.days * DAY_MS
        span = self.end - self.start
        created = sorted(rng.randrange(self.start, self.end) for _ in range(n))
        self.created = array("q", created)
        # Products go on sale one after another; a hold belongs to the sale of its time.
        self.product = array("l", (1 + min(p - 1, (t - self.start) * p // span) for t in created))
        status_of = rng.choices(range(len(STATUSES)), STATUS_WEIGHTS, k=n)
        self.status = array("b", status_of)
        self.quantity = array("b", rng.choices(QUANTITIES, QUANTITY_WEIGHTS, k=n))
        self.books = {i: ProductBooks() for i in range(1, p + 1)}
        for product_id, status, quantity in zip(
            self.product, self.status, self.quantity, strict=True
        ):
            books = self.books[product_id]
            books.holds += 1
            if status == 0:
                books.sold += quantity
            elif status == 1:
                books.expired += quantity
                books.restores += 1
            else:
                books.cancelled += quantity
                books.restores += 1
        for books in self.books.values():
            # Most sales sold out; the rest left a few units on sale.
            books.available = 0 if rng.random() < 0.6 else rng.randint(1, 50)
            books.total = books.sold + books.available
        self.slot = span // p
        self.key_cutoff = now - DAY_MS
        self.key_backlog = 0  # keyed holds older than a day, counted as they are written

    def product_rows(self) -> Iterator[tuple[Any, ...]]:
        rng = random.Random(self.history.seed + 1)
        for product_id, books in self.books.items():
            sale_starts = self.start + (product_id - 1) * self.slot
            yield (
                product_id,
                f"Past sale item {product_id}",
                rng.randrange(500, 50_000),
                books.total,
                books.available,
                1 + books.holds + books.restores,  # made, then one change per hold and restore
                sale_starts,
                sale_starts - DAY_MS,
                sale_starts + self.slot,
                0,  # nothing is held: every hold has ended
                books.sold,
                books.expired,
                books.cancelled,
            )

    def reservation_rows(self) -> Iterator[tuple[Any, ...]]:
        rng = random.Random(self.history.seed + 2)
        keyed = self.history.keyed_share
        for i in range(self.history.holds):
            created = self.created[i]
            expires = created + HOLD_MS
            status = self.status[i]
            completed = None
            if status == 0:
                completed = ended = created + rng.randrange(5_000, HOLD_MS - 1_000)
            elif status == 1:
                ended = expires + rng.randrange(0, 200)
            else:
                ended = created + rng.randrange(1_000, HOLD_MS - 1_000)
            key = rng.randbytes(16).hex() if rng.random() < keyed else None
            if key is not None and created <= self.key_cutoff:
                if self.history.swept:
                    key = None  # the sweep freed it a day after the hold was made
                else:
                    self.key_backlog += 1
            yield (
                base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode(),
                self.product[i],
                self.quantity[i],
                STATUSES[status],
                created,
                expires,
                completed,
                ended,
                key,
            )


def load(database_url: str, history: History) -> Loaded:
    """Write `history` into an empty, migrated database (SQLite file or PostgreSQL URL).

    Raises `ValueError` if the database already has products or holds: the books would no
    longer balance."""
    started = time.monotonic()
    now = now_ms()
    month = _Month(history, now)
    if database_url.startswith("sqlite"):
        _load_sqlite(database_url, month)
    else:
        asyncio.run(_load_postgres(database_url, month))
    by_status = {s: 0 for s in STATUSES}
    for status in month.status:
        by_status[STATUSES[status]] += 1
    return Loaded(
        history=history,
        products=month.books,
        keys_older_than_a_day=month.key_backlog,
        seconds=time.monotonic() - started,
        by_status=by_status,
    )


def _insert(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({marks})"


# The stock ledger's proved balance of each product as loaded (migration 0005 does the same
# for products that predate the ledger): the month's movements themselves are not loaded,
# so the reconciliation starts from here, as it would after the worker's last check.
PROVED_BALANCES = (
    "INSERT INTO ledger_balances (product_id, version, available, held, sold, total, "
    "checked_at) SELECT id, version, available_stock, held_units, sold_units, total_stock, "
    "updated_at FROM products"
)


def _load_sqlite(database_url: str, month: _Month) -> None:
    conn = sqlite3.connect(sqlite_path(database_url), isolation_level=None)
    try:
        # The loader's own connection: no crash safety needed while loading (a failed load
        # is thrown away), and a big page cache for the random primary keys.
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1000000")
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT EXISTS (SELECT 1 FROM products)").fetchone()[0]:
            raise ValueError("the database already has products; history needs an empty one")
        conn.executemany(_insert("products", PRODUCT_COLUMNS), month.product_rows())
        conn.execute(PROVED_BALANCES)
        rows = month.reservation_rows()
        sql = _insert("reservations", RESERVATION_COLUMNS)
        while True:
            chunk = list(itertools.islice(rows, CHUNK))
            if not chunk:
                break
            conn.executemany(sql, chunk)
        conn.execute("COMMIT")
        # Into the main file now, not at some later commit of the service's.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def _load_postgres(database_url: str, month: _Month) -> None:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async with conn.transaction():
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM products)"):
                raise ValueError("the database already has products; history needs an empty one")
            await conn.copy_records_to_table(
                "products", records=month.product_rows(), columns=PRODUCT_COLUMNS
            )
            await conn.execute(PROVED_BALANCES)
            await conn.copy_records_to_table(
                "reservations", records=month.reservation_rows(), columns=RESERVATION_COLUMNS
            )
        # What autovacuum would have done at some quiet moment of the month.
        await conn.execute("VACUUM ANALYZE products")
        await conn.execute("VACUUM ANALYZE reservations")
    finally:
        await conn.close()


async def _key_backlog(database_url: str) -> int:
    sql = (
        "SELECT COUNT(*) FROM reservations WHERE idempotency_key IS NOT NULL "
        f"AND created_at <= {now_ms() - DAY_MS}"
    )
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(sqlite_path(database_url), timeout=30)
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()
    pg = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return int(await pg.fetchval(sql))
    finally:
        await pg.close()


def key_backlog(database_url: str) -> int:
    """Idempotency keys older than a day that the sweep has not cleared yet (0 after a
    `swept` load)."""
    return asyncio.run(_key_backlog(database_url))
