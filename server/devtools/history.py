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

With `rooms` (0 by default, as `bin/bench history` measures; `bin/bench queue --queue-history`
loads 30), that many of the month's sales, spread evenly over it, had a waiting room
(`queue` fifo or random, in turn) and left `tickets_per_room` ended tickets each (15,000 by
default: 30 rooms are 450,000 tickets), as the service leaves a room once its sale is over:
the `queue_rooms` row with its secret key, no ticket waiting or admitted (`waiting` 0), every
ticket ended (`reserved`, `sold_out`, `lapsed` or `left`, `ended_at` set, joined and ended
within the month) and filed (`filed_at`, as the worker files a ticket `FILE_AFTER_MS` after
it ended). A room's `reserved` tickets are no more than its product's holds (each hold
was made with a pass). The shoppers come back: every room's tickets are drawn from one pool of
shoppers five times smaller than all the tickets (at least twice a room's), so a shopper has
tickets of several past sales, as a page that connects then reads.

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
from server.domain.retention import FILE_AFTER_MS
from server.domain.waitingroom import PLACE_BITS, drawn_place
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
    "queue",
)
TICKET_COLUMNS = (
    "product_id",
    "shopper_id",
    "place",
    "state",
    "joined_at",
    "admitted_at",
    "pass_expires_at",
    "ended_at",
    "filed_at",
)
ROOM_COLUMNS = ("product_id", "room_key", "waiting", "step")
QUEUE_MODES = ("random", "fifo")  # the rooms' modes, in turn
PASS_MS = 60_000  # the passes of the past lasted the default minute (PASS_SECONDS)
EARLY_MS = 600_000  # a room's early shoppers joined in the ten minutes before its start


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
    rooms: int = 0  # past sales that had a waiting room (at most one per product)
    tickets_per_room: int = 15_000  # ended tickets each such room left

    @property
    def product_count(self) -> int:
        return self.products or max(1, self.holds // 100)

    @property
    def room_count(self) -> int:
        return min(self.rooms, self.product_count)

    @property
    def shopper_pool(self) -> int:
        """How many distinct shoppers the rooms' tickets are drawn from."""
        return max(2 * self.tickets_per_room, self.room_count * self.tickets_per_room // 5)


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
    tickets_by_state: dict[str, int] = field(default_factory=dict)  # the rooms' tickets

    def summary(self) -> dict[str, Any]:
        return {
            "holds": self.history.holds,
            "rooms": self.history.room_count,
            "tickets": sum(self.tickets_by_state.values()),
            "tickets_by_state": self.tickets_by_state,
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
        # The products whose sale had a room, spread evenly over the month, and its mode.
        rooms = history.room_count
        self.rooms = {
            1 + (i * p) // rooms + (p // rooms) // 2: QUEUE_MODES[i % len(QUEUE_MODES)]
            for i in range(rooms)
        }
        self.tickets_by_state: dict[str, int] = {}  # counted as they are written

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
                self.rooms.get(product_id, "off"),
            )

    def _room_key(self, product_id: int) -> bytes:
        return random.Random(f"{self.history.seed}:room:{product_id}").randbytes(32)

    def room_rows(self) -> Iterator[tuple[Any, ...]]:
        for product_id in self.rooms:
            admitted = min(self.history.tickets_per_room, self._admitted(product_id))
            # An admission step admits a handful at a time: a plausible count of steps.
            yield (product_id, self._room_key(product_id).hex(), 0, 1 + admitted // 5)

    def _admitted(self, product_id: int) -> int:
        """Passes a room gave: one per hold of its product, and a tenth more that lapsed."""
        holds = self.books[product_id].holds
        return holds + holds // 10

    def ticket_rows(self) -> Iterator[tuple[Any, ...]]:
        history = self.history
        rng = random.Random(history.seed + 3)
        pool = [
            "anon:" + base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=").decode()
            for _ in range(history.shopper_pool)
        ]
        counts = dict.fromkeys(("reserved", "sold_out", "lapsed", "left"), 0)
        last = self.end - 1
        for product_id, mode in self.rooms.items():
            key = self._room_key(product_id)
            starts = self.start + (product_id - 1) * self.slot
            opens = max(self.start, starts - EARLY_MS)
            # The sale lasted until its last hold ended, at most its slot.
            sold_out_at = min(starts + self.slot, last)
            n = history.tickets_per_room
            holds = self.books[product_id].holds
            reserved = min(n, holds)
            lapsed = min(n - reserved, holds // 10)
            left = min(n - reserved - lapsed, n // 30)
            shoppers = rng.sample(pool, n)
            # A third joined before the start, the rest in its first second.
            joined = sorted(
                rng.randrange(opens, starts) if i % 3 == 0 else starts + rng.randrange(0, 1_000)
                for i in range(n)
            )
            places = [
                drawn_place(key, starts, shopper)
                if mode == "random" and at < starts
                else (at << PLACE_BITS) | rng.getrandbits(PLACE_BITS)
                for shopper, at in zip(shoppers, joined, strict=True)
            ]
            # Admitted in the line's order: the first `reserved + lapsed` places, minus those
            # who left before the start.
            order = sorted(range(n), key=places.__getitem__)
            early = [i for i in order if joined[i] < starts]
            gone = set(rng.sample(early, min(left, len(early))))
            admitted = [i for i in order if i not in gone][: reserved + lapsed]
            lapsing = set(rng.sample(admitted, lapsed))
            window = max(1, min(self.slot // 2, 120_000))
            admitted_at = sorted(starts + rng.randrange(0, window) for _ in admitted)
            told: dict[int, tuple[str, int | None, int | None, int]] = {}
            for i, at in zip(admitted, admitted_at, strict=True):
                at = max(at, joined[i])
                expires = at + PASS_MS
                if i in lapsing:
                    told[i] = ("lapsed", at, expires, expires)
                else:
                    told[i] = ("reserved", at, expires, at + rng.randrange(200, 20_000))
            for i in gone:
                told[i] = ("left", None, None, rng.randrange(joined[i], starts))
            for i in range(n):
                state, admitted_ms, expires_ms, ended = told.get(
                    i, ("sold_out", None, None, max(sold_out_at, joined[i]))
                )
                counts[state] += 1
                yield (
                    product_id,
                    shoppers[i],
                    places[i],
                    state,
                    min(joined[i], last),
                    None if admitted_ms is None else min(admitted_ms, last),
                    None if expires_ms is None else min(expires_ms, last),
                    min(ended, last),
                    # Filed by the worker's retention run minutes after it ended.
                    min(ended + FILE_AFTER_MS, last),
                )
        self.tickets_by_state = counts

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
        tickets_by_state=month.tickets_by_state,
    )


def _insert(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    return f"INSERT INTO {table} ({names}) VALUES ({marks})"


def _insert_chunked(
    conn: sqlite3.Connection, table: str, columns: tuple[str, ...], rows: Iterator[Any]
) -> None:
    """`rows` into `table`, `CHUNK` rows an `executemany`."""
    sql = _insert(table, columns)
    while chunk := list(itertools.islice(rows, CHUNK)):
        conn.executemany(sql, chunk)


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
        _insert_chunked(conn, "reservations", RESERVATION_COLUMNS, month.reservation_rows())
        conn.executemany(_insert("queue_rooms", ROOM_COLUMNS), month.room_rows())
        _insert_chunked(conn, "queue_tickets", TICKET_COLUMNS, month.ticket_rows())
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
            await conn.copy_records_to_table(
                "queue_rooms", records=month.room_rows(), columns=ROOM_COLUMNS
            )
            await conn.copy_records_to_table(
                "queue_tickets", records=month.ticket_rows(), columns=TICKET_COLUMNS
            )
        # What autovacuum would have done at some quiet moment of the month.
        await conn.execute("VACUUM ANALYZE products")
        await conn.execute("VACUUM ANALYZE reservations")
        await conn.execute("VACUUM ANALYZE queue_rooms")
        await conn.execute("VACUUM ANALYZE queue_tickets")
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
