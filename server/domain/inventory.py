"""The inventory operations: the only code that writes stock or holds (docs/design.md §4).

Each write operation runs inside one short transaction that the caller opens
(`Store.write()`), makes no network call, and returns an `Outcome` whose events the
caller publishes after commit. Stock only ever moves through conditional UPDATEs evaluated
by the database (`available_stock >= :q`, `status = 'ACTIVE'`), so concurrency across
connections, processes and machines cannot oversell or restore a unit twice; Python decides
at most *what to try*, never what the stock is. Row counts come from RETURNING.

Every stock movement also moves the product's counters (`held_units`, `sold_units`,
`expired_units`, `cancelled_units`) in the same UPDATE as `available_stock`, and the
database refuses any row where `available_stock + held_units + sold_units != total_stock`
(migration 0002): promise 1 is a constraint, and the operator's stats read one row per
product however many holds there have been.

Every stock movement also writes the shop's books in the same transaction: a ledger row per
movement and the outbox events it causes (`server.domain.books.Books`: after each product
UPDATE, `books.moved(product, movements)`; before returning, `books.write(conn)` once).
A new stock-moving operation does the same; the reconciliation finds one that does not.

Plans that do not depend on the statistics (migration 0002 says why): statements that find
open holds by time say `ended_at IS NULL`, the predicate of the one index of open holds;
statements by id say `status = 'ACTIVE'`, which leaves them the primary key only. Keep it
so: a statement by id that said `ended_at IS NULL` could be planned as a scan of every open
hold whenever PostgreSQL's statistics say there are none.

The SQL is one dialect for SQLite and PostgreSQL: `:name` placeholders, RETURNING, CAST.
"""

from __future__ import annotations

import base64
import enum
import re
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from server.domain import ledger, outbox, waitingroom
from server.domain.books import Books
from server.domain.errors import (
    DomainError,
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidSchedule,
    NotAdmitted,
    ProductNotFound,
    QueueInUse,
    ReservationCancelled,
    ReservationCompleted,
    ReservationExpired,
    ReservationNotFound,
    SaleEnded,
    SaleNotStarted,
    SalePaused,
    ShopperLimitReached,
    StockCommitted,
)
from server.domain.executor import Columns, Executor, Row, in_list
from server.domain.ledger import Kind, Movement
from server.domain.model import (
    Event,
    HoldRequest,
    Outcome,
    Product,
    ProductChanged,
    Reservation,
    ReservationChanged,
    Status,
    StockChanged,
)

IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000
SWEEP_BATCH = 500

PRODUCT = (
    "id, name, price_cents, total_stock, available_stock, version, sale_starts_at, "
    "created_at, updated_at, held_units, sold_units, paused_at, sale_ends_at, max_per_shopper, "
    "queue, admit_factor"
)
# The condition that a product has no waiting room (issue 17), in its own UPDATE's WHERE.
NO_ROOM = "AND queue = 'off' "
RESERVATION = (
    "id, product_id, quantity, status, created_at, expires_at, completed_at, ended_at, "
    "idempotency_key, order_reference, cancelled_by, cancel_reason, shopper_id"
)
# What "no limit per shopper" is compared as, in SQL: more units than any product has.
NO_LIMIT = 2**62


# The alphabet of an id's time: URL-safe base64's 64 characters in ASCII order, so that ids
# made later sort after those made before (as text, byte by byte).
_IN_ORDER = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
RESERVATION_ID_CHARS = 30
RESERVATION_TIME_CHARS = 8  # the time, first; the random part (22) after it
OLD_RESERVATION_ID_CHARS = 22  # ids made before the time went first; still valid


def new_reservation_ids(count: int, *, now: int) -> list[str]:
    """`count` new hold ids, 30 characters each: 8 of `now` (milliseconds since the epoch,
    plus 2^47: 48 bits in an alphabet in ASCII order), then 128 random bits as 22 characters of
    URL-safe base64. Knowing the id is what lets someone act on the hold: the random part
    alone is what a guess must find, as it was when the id was nothing else.

    Why the time first: the id is the holds table's primary key. Random ids put each
    batch's inserts on as many different pages of its index, more of them as the table
    grows: SQLite's writer took 34 µs a hold with 32,000 holds and 45 µs with 256,000
    (in process, batches of 64), and a flat 24.6 µs with ids in time order, which land
    together at the index's end.

    One read of the OS's randomness for the whole batch, rather than one per hold."""
    # 2^47 added: the first character is never "-" (an id that looks like an option), and
    # the order holds until the year 6429.
    when = now + 2**47
    stamp = "".join(_IN_ORDER[(when >> shift) & 63] for shift in range(42, -1, -6))
    entropy = secrets.token_bytes(16 * count)
    return [
        stamp + base64.urlsafe_b64encode(entropy[i : i + 16]).rstrip(b"=").decode()
        for i in range(0, 16 * count, 16)
    ]


def is_reservation_id(text: str) -> bool:
    """Whether `text` has the shape of a hold id: 30 URL-safe characters, or 22 (an id made
    before the time went first)."""
    return (
        len(text) in (RESERVATION_ID_CHARS, OLD_RESERVATION_ID_CHARS)
        and all(c.isalnum() or c in "-_" for c in text)
        and text.isascii()
    )


# Runs of URL-safe characters as long as a hold id's random part or longer: what may be (or
# hold) a hold id in text a log line shows (a path, a query).
_ID_LIKE = re.compile(f"[A-Za-z0-9_-]{{{OLD_RESERVATION_ID_CHARS},}}")
# How many characters of a hold id's random part a log line shows.
SHOWN_ID_CHARS = 6


def id_cut(text: str) -> str:
    """A hold id (or any text that may be one) as a log line shows it: its first
    `SHOWN_ID_CHARS` characters and "..."; for a text of a hold id's length, its
    `RESERVATION_TIME_CHARS` characters of time before them (no secret, and alike for the
    holds of a moment). Knowing a hold's id is what lets someone act on it."""
    timed = len(text) == RESERVATION_ID_CHARS
    return text[: SHOWN_ID_CHARS + (RESERVATION_TIME_CHARS if timed else 0)] + "..."


def ids_cut(text: str) -> str:
    """`text` (a path, a query) with every run of `OLD_RESERVATION_ID_CHARS` or more
    URL-safe characters, which may be a hold id, cut as `id_cut` cuts one."""
    return _ID_LIKE.sub(lambda found: id_cut(found.group()), text)


# -- reserve ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """A successful reserve: the hold, and whether it was made by an earlier request."""

    reservation: Reservation
    replayed: bool = False


async def reserve(
    conn: Executor,
    requests: Sequence[HoldRequest],
    *,
    now: int,
    hold_ms: int,
    rooms: Collection[int] = (),
) -> tuple[list[Outcome[Held]], list[Event]]:
    """Hold units for each request, first come first served, in one transaction.

    Answers in the order of `requests`. Holds for one product take one conditional UPDATE
    for all of them when the stock covers them all (the common case); otherwise the
    requests that fit, in order, are granted and the rest answered `insufficient_stock`.

    Requests that share an Idempotency-Key are answered as if they had come one after
    another (issue 10, item 9): the first makes the hold or is refused; each later one is
    compared with the hold its key has *made* (earlier or in this batch): the same product
    and quantity is a replay of it, another is `idempotency_key_reused`; and if no hold was
    made, it is a request of its own. So the n-th request with a key goes in round n, each
    round seeing what the rounds before it wrote.

    A product that has too little stock for its requests first has its overdue holds
    expired, in this transaction (`_take_stock`, "lazy expiry"): a hold past its expiresAt
    never keeps a unit from a shopper, whether or not Redis, the expiry jobs or the worker
    are there to expire it. The expired holds' events are among the events returned.

    A request with a shopper, of a product with a limit per shopper (`max_per_shopper`),
    first adds its units to the shopper's allowance of the product (`_take_allowances`: a
    conditional upsert against the limit, decided by the database); those that would pass
    the limit are answered `shopper_limit_reached`, each on its own, and take no stock.
    Units counted for a request that then gets no stock are taken off again in the same
    transaction. Whether the product has a limit is read from its row under its row lock
    (`_take_all`, `_lock_product`), which `update_product` holds while it fills or deletes
    the allowance rows of a limit set or removed: no reservation races that. A product
    without a limit has no allowance rows, and its requests cost no statement more than
    anonymous ones.

    A product with a waiting room (issue 17) has its requests pass the room's gate first
    (`waitingroom.take_passes`: a valid pass of the same shopper, used in this transaction).
    Whether it has one is read from its row by the statements that take its stock
    (`queue = 'off'` in their WHERE, or under its row lock), so a product without a room
    costs no statement for the room. `rooms`: the ids of products the caller believes have
    a room (its catalog's copy), which go to the gate at once, without first trying the
    path of a product without one; the database decides either way.
    """
    outcomes: list[Outcome[Held] | None] = [None] * len(requests)
    events: list[Event] = []
    books = Books(now=now)
    swept: set[int] = set()
    rounds = _rounds(requests)
    for indexes in rounds:
        answers, changes = await _reserve_round(
            conn,
            [requests[i] for i in indexes],
            books,
            swept,
            now=now,
            hold_ms=hold_ms,
            rooms=rooms,
            # One round (no Idempotency-Key twice in the batch, the common case): nothing
            # reads the new holds before the books are written, so they go in the books'
            # statement. With more, each round must see the holds the rounds before it made.
            holds_with_books=len(rounds) == 1,
        )
        for i, outcome in zip(indexes, answers, strict=True):
            outcomes[i] = outcome
        events.extend(changes)
    await books.write(conn)
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None], events


def _rounds(requests: Sequence[HoldRequest]) -> list[list[int]]:
    """Indexes of `requests` in rounds where no Idempotency-Key appears twice."""
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for index, request in enumerate(requests):
        key = request.idempotency_key
        n = 0
        if key is not None:
            n = seen.get(key, 0)
            seen[key] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(index)
    return rounds


async def _reserve_round(
    conn: Executor,
    requests: Sequence[HoldRequest],
    books: Books,
    swept: set[int],
    *,
    now: int,
    hold_ms: int,
    rooms: Collection[int] = (),
    holds_with_books: bool = False,
) -> tuple[list[Outcome[Held]], list[Event]]:
    """`reserve` for requests whose Idempotency-Keys are all different. `swept`: the
    products whose overdue holds this transaction has expired already. `holds_with_books`:
    the new holds' rows are written with the books (`Books.insert_first`), not at once."""
    outcomes: list[Outcome[Held] | None] = [None] * len(requests)
    fresh = await _replay_idempotent(conn, requests, outcomes, now=now)

    by_product: dict[int, list[int]] = defaultdict(list)
    for index in fresh:
        by_product[requests[index].product_id].append(index)

    events: list[Event] = []
    granted: list[int] = []
    taken: list[Product] = []  # each product as its UPDATE left it
    # Products in id order, as every transaction that changes several takes them: two such
    # transactions in opposite orders would deadlock (PostgreSQL's row locks).
    # Within a product: its shoppers' waiting-room tickets, then the product's row, then
    # their allowance rows, as every transaction that gives units back (`_restore`), sets a
    # limit (`update_product`) or admits from the line takes them.
    passed: dict[int, list[int]] = {}  # per product with a room: requests that used a pass
    for product_id, all_indexes in sorted(by_product.items()):
        identified = any(requests[i].shopper_id is not None for i in all_indexes)
        # The common case in one statement: the product has no waiting room, every request
        # fits and, when a shopper asks, the product has no limit (its row says so under its
        # lock). A product without a room costs no statement for the room (issue 17).
        # A product the caller believes has a room goes to the gate at once (which reads
        # whether it has one: a belief is never the answer).
        gate = product_id in rooms
        row = None
        if not gate:
            row = await _take_all(
                conn,
                product_id,
                sum(requests[i].quantity for i in all_indexes),
                now=now,
                unlimited=identified,
                no_room=True,
            )
        # Not taken: why? A shopper's request locks the row if the product has no room (as
        # it did for the limit before rooms: no room can open while this transaction holds
        # it, PATCH updates the row); an anonymous one reads it, and its stock UPDATEs then
        # say `queue = 'off'` (no lock before the overdue holds', which expiry takes first).
        # A product with a room (or none at all) goes through the room's gate first: the
        # shoppers' tickets before the product's row, the order every transaction takes.
        locked: Product | None = None  # locked here, no room, unchanged since
        seen: Product | None = None  # read here (not locked): no room when read
        if row is None and not gate:
            if identified:
                locked = await _lock_product(conn, product_id, no_room=True)
                gate = locked is None
            else:
                seen = await get_product(conn, product_id)
                gate = seen is None or seen.queue != "off"
        if gate:
            passes = await waitingroom.take_passes(
                conn,
                product_id,
                [(requests[i].shopper_id, requests[i].quantity) for i in all_indexes],
                now=now,
                product=seen,
            )
            seen = None
            if passes is not None:
                kept = []
                with_pass = []  # not those let through without one (`Gate.free`)
                for i, answer in zip(all_indexes, passes, strict=True):
                    if isinstance(answer, NotAdmitted):
                        outcomes[i] = Outcome(error=answer)
                    else:
                        kept.append(i)
                        if answer:
                            with_pass.append(i)
                passed[product_id] = with_pass
                all_indexes = kept
                if not all_indexes:
                    continue
            identified = any(requests[i].shopper_id is not None for i in all_indexes)
            row = await _take_all(
                conn,
                product_id,
                sum(requests[i].quantity for i in all_indexes),
                now=now,
                unlimited=identified,
            )
        indexes = all_indexes
        limited = False
        if row is not None:
            product: Product | None = Product.from_row(row)
            fits: list[bool] | DomainError = [True] * len(indexes)
        else:
            if identified:
                if locked is None:
                    locked = await _lock_product(conn, product_id)
                limited = locked is not None and locked.max_per_shopper is not None
            if limited:
                refused = await _take_allowances(
                    conn, product_id, [requests[i] for i in indexes], books, events, now=now
                )
                indexes = []
                for i, refusal in zip(all_indexes, refused, strict=True):
                    if refusal is None:
                        indexes.append(i)
                    else:
                        outcomes[i] = Outcome(error=refusal)
                if not indexes:
                    continue
            quantities = [requests[i].quantity for i in indexes]
            product, fits = await _take_stock(
                conn,
                product_id,
                quantities,
                books,
                events,
                swept,
                now=now,
                # Unchanged since it was locked, unless the allowances expired holds.
                known=seen or (None if limited else locked),
                no_room=seen is not None,
            )
        if product is None or isinstance(fits, DomainError):
            error = ProductNotFound(product_id) if product is None else fits
            assert isinstance(error, DomainError)
            for i in indexes:
                outcomes[i] = Outcome(error=error)
            if limited:
                await _give_back_allowances(conn, product_id, [requests[i] for i in indexes])
            continue
        if any(fits):
            events.append(StockChanged(product))
            taken.append(product)
        unsold = []
        for i, ok in zip(indexes, fits, strict=True):
            if ok:
                granted.append(i)
            else:
                unsold.append(requests[i])
                outcomes[i] = Outcome(
                    error=InsufficientStock(
                        product.available_stock, requests[i].quantity, product.stock_now()
                    )
                )
        if limited:
            await _give_back_allowances(conn, product_id, unsold)

    if passed:
        # A pass used by a request that then got nothing (no stock, over the limit) is
        # the shopper's again until it runs out.
        got = set(granted)
        for product_id, indexes in passed.items():
            unused = [requests[i].shopper_id for i in indexes if i not in got]
            await waitingroom.give_back_passes(conn, product_id, [s for s in unused if s])

    if granted:
        expires = now + hold_ms
        ids = new_reservation_ids(len(granted), now=now)
        holds = [(rid, requests[i]) for i, rid in zip(granted, ids, strict=True)]
        rows = await _insert_holds(conn, holds, now, expires, books if holds_with_books else None)
        made: dict[int, list[Movement]] = defaultdict(list)
        for i, reservation in zip(granted, rows, strict=True):
            outcomes[i] = Outcome(Held(reservation))
            actor = ledger.shopper(requests[i].shopper_id)
            made[reservation.product_id].append(
                Movement(Kind.HELD, reservation.quantity, actor, reservation)
            )
        for product in taken:  # each product's holds in the order they were granted
            books.moved(product, made[product.id])

    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None], events


async def _replay_idempotent(
    conn: Executor,
    requests: Sequence[HoldRequest],
    outcomes: list[Outcome[Held] | None],
    *,
    now: int,
) -> list[int]:
    """Answer requests whose Idempotency-Key made a hold already; return the others.

    No two of `requests` share a key (`reserve` puts them in rounds)."""
    keys = {r.idempotency_key for r in requests if r.idempotency_key is not None}
    if not keys:
        return list(range(len(requests)))
    names = {key: f"k{n}" for n, key in enumerate(keys)}
    rows = await conn.fetch_all(
        f"SELECT {RESERVATION} FROM reservations WHERE idempotency_key IN "
        f"({', '.join(':' + name for name in names.values())})",
        {name: key for key, name in names.items()},
    )
    existing = {str(row["idempotency_key"]): Reservation.from_row(row) for row in rows}
    stale = [r.id for r in existing.values() if r.created_at <= now - IDEMPOTENCY_WINDOW_MS]
    if stale:
        # Older than a day: the key is free again (the sweeper frees them too, in bulk).
        await _forget_keys(conn, stale)
    fresh = []
    for index, request in enumerate(requests):
        earlier = existing.get(request.idempotency_key or "")
        if earlier is None or earlier.id in stale:
            fresh.append(index)
        elif (earlier.product_id, earlier.quantity) != (request.product_id, request.quantity):
            outcomes[index] = Outcome(error=IdempotencyKeyReused())
        else:
            outcomes[index] = Outcome(Held(earlier, replayed=True))
    return fresh


async def _take_all(
    conn: Executor,
    product_id: int,
    total: int,
    *,
    now: int,
    unlimited: bool,
    no_room: bool = False,
) -> Row | None:
    """Take `total` units of the product for holds if it has them and its sale is open, and
    (`unlimited`) only if it has no limit per shopper, and (`no_room`) only if it has no
    waiting room (`queue = 'off'`); the product's row after the change, or None if nothing
    was taken. One conditional UPDATE, which takes the row's lock when it takes the units
    (and only then: a row its WHERE refuses is not locked, on PostgreSQL either)."""
    return await conn.fetch_one(
        "UPDATE products SET available_stock = available_stock - :total, "
        "held_units = held_units + :total, version = version + 1, updated_at = :now "
        "WHERE id = :id AND available_stock >= :total "
        "AND (sale_starts_at IS NULL OR sale_starts_at <= :now) "
        "AND paused_at IS NULL AND (sale_ends_at IS NULL OR sale_ends_at > :now) "
        f"{'AND max_per_shopper IS NULL ' if unlimited else ''}"
        f"{NO_ROOM if no_room else ''}RETURNING {PRODUCT}",
        {"id": product_id, "total": total, "now": now},
    )


async def lock_product(conn: Executor, product_id: int) -> Product | None:
    """The product's row as it is now, locked until the caller's transaction ends
    (`_lock_product`; on SQLite the transaction holds the database's write lock already):
    no other transaction can change its stock meanwhile. None when there is no such
    product. Take it after any ticket or hold rows the transaction locks (lock order:
    docs/design.md §4)."""
    return await _lock_product(conn, product_id)


async def _lock_product(
    conn: Executor, product_id: int, *, no_room: bool = False
) -> Product | None:
    """The product's row, locked for the rest of the transaction (PostgreSQL's row lock;
    on SQLite the transaction holds the database's write lock already), before any of its
    allowance rows: its limit (and its `queue`) as no other transaction can change them
    meanwhile. None when there is no such product, or (`no_room`) when it has a waiting
    room: then nothing is locked, and its shoppers' tickets may be taken first."""
    row = await conn.fetch_one(
        "UPDATE products SET max_per_shopper = max_per_shopper WHERE id = :id "
        f"{NO_ROOM if no_room else ''}RETURNING {PRODUCT}",
        {"id": product_id},
    )
    return None if row is None else Product.from_row(row)


async def _take_stock(
    conn: Executor,
    product_id: int,
    quantities: Sequence[int],
    books: Books,
    events: list[Event],
    swept: set[int],
    *,
    now: int,
    known: Product | None = None,
    no_room: bool = False,
) -> tuple[Product | None, list[bool] | DomainError]:
    """Take stock for as many of `quantities`, in order, as the product has. `known`: the
    product's row as this transaction read or locked it after an attempt to take them all
    failed (no second attempt, no second read). `no_room`: take only while the product has
    no waiting room (each UPDATE says so; a room opened meanwhile refuses them all with
    `NotAdmitted`, as the room's gate would have).

    Returns the product after the change and which quantities were granted, or the
    error that refuses them all. When they do not all fit and some of the product's units
    are held, its overdue holds are expired first (once per transaction: `swept`), into
    `books` and `events`, as the sweeper would expire them.
    """
    if known is None:
        row = await _take_all(conn, product_id, sum(quantities), now=now, unlimited=False)
        if row is not None:
            return Product.from_row(row), [True] * len(quantities)
    # Not all of them fit (or the sale is not open, or there is no such product).
    # Read what is there, choose the requests that fit, and take exactly that much with the
    # same conditional UPDATE. On SQLite nothing can change in between (the transaction holds
    # the write lock); on PostgreSQL another transaction may, so the UPDATE stays
    # conditional and the choice is retried against the new stock.
    for _ in range(5):
        product = known if known is not None else await get_product(conn, product_id)
        known = None
        if product is None:
            return None, []
        if no_room and product.queue != "off":
            return product, NotAdmitted(None)
        closed = sale_closed(product, now)
        if closed is not None:
            return product, closed
        if (
            product_id not in swept
            and product.held_units > 0
            and product.available_stock < sum(quantities)
        ):
            swept.add(product_id)
            restored = await _expire_overdue_of(conn, product_id, books, now=now)
            if restored is not None:
                product, expired_events = restored
                events.extend(expired_events)
        fits = allocate(product.available_stock, quantities)
        take = sum(q for q, ok in zip(quantities, fits, strict=True) if ok)
        if take == 0:
            return product, fits
        row = await conn.fetch_one(
            "UPDATE products SET available_stock = available_stock - :take, "
            "held_units = held_units + :take, version = version + 1, updated_at = :now "
            "WHERE id = :id AND available_stock >= :take AND paused_at IS NULL "
            "AND (sale_ends_at IS NULL OR sale_ends_at > :now) "
            f"{NO_ROOM if no_room else ''}RETURNING {PRODUCT}",
            {"id": product_id, "take": take, "now": now},
        )
        if row is not None:
            return Product.from_row(row), fits
    return product, [False] * len(quantities)


async def _expire_overdue_of(
    conn: Executor, product_id: int, books: Books, *, now: int, limit: int = SWEEP_BATCH
) -> tuple[Product, list[Event]] | None:
    """Lazy expiry: expire up to `limit` of one product's overdue holds (oldest first) in
    the caller's transaction, with the ledger rows and outbox events the sweeper would
    write (into `books`; actor `worker`: the hold ran out of time, no shopper ended it).
    Returns the product after its units came back and the events, or None if none was due.

    The same gate as every expiry (`status = 'ACTIVE' AND expires_at <= now` on each row,
    in the UPDATE), so that this, the expiry jobs and the sweeper, in any number of
    processes and at once, restore each hold's units exactly once. Locks are taken as
    every expiry takes them, the holds' rows before their product's (docs/design.md §4)."""
    due = await conn.fetch_all(
        "SELECT id FROM reservations WHERE product_id = :p AND ended_at IS NULL "
        "AND expires_at <= :now ORDER BY expires_at, id LIMIT :limit",
        {"p": product_id, "now": now, "limit": limit},
    )
    if not due:
        return None
    rows = await _expire_ids(conn, [str(row["id"]) for row in due], now=now)
    if not rows:
        return None  # another transaction expired them first
    expired = [Reservation.from_row(row) for row in rows]
    product = await _restore(
        conn, books, expired, now=now, ended=Status.EXPIRED, actor=ledger.WORKER
    )
    events: list[Event] = [StockChanged(product)]
    events.extend(ReservationChanged(r, product) for r in expired)
    return product, events


def sale_closed(product: Product, now: int) -> DomainError | None:
    """Why no hold of `product` can be made at `now` (ms), or None when its sale is open:
    `SaleEnded`, `SaleNotStarted` or `SalePaused` (`Product.sale_state`)."""
    state = product.sale_state(now)
    if state == "ended":
        assert product.sale_ends_at is not None
        return SaleEnded(product.name, product.sale_ends_at)
    if state == "scheduled":
        assert product.sale_starts_at is not None
        return SaleNotStarted(product.sale_starts_at)
    if state == "paused":
        return SalePaused(product.name)
    return None


async def _take_allowances(
    conn: Executor,
    product_id: int,
    requests: Sequence[HoldRequest],
    books: Books,
    events: list[Event],
    *,
    now: int,
) -> list[DomainError | None]:
    """Count each request's units against its shopper's allowance of the product, in order;
    per request, None (counted, or it has no shopper) or the error that refuses it
    (`ShopperLimitReached`, or `ProductNotFound`). Only for a product with a limit, whose
    row this transaction has locked (`_lock_product`).

    The database decides (README, Shoppers): one upsert adds each shopper's units in the
    batch to their row only where `units + :q <= max_per_shopper` (no limit: `NO_LIMIT`),
    read in the same statement; a row not yet there is made with the units if they fit.
    Concurrent transactions on other processes wait for the row's lock and see its new
    units. A shopper whose requests in this batch do not all fit has them tried one by
    one, first come first served; before the first of them is refused, that shopper's
    overdue holds of the product are expired in this transaction (into `books` and
    `events`), so that a hold past its time never counts against its shopper.
    """
    totals: dict[str, int] = defaultdict(int)
    for request in requests:
        if request.shopper_id is not None:
            totals[request.shopper_id] += request.quantity
    outcome: list[DomainError | None] = [None] * len(requests)
    if not totals:
        return outcome
    counted = await _add_units(conn, product_id, sorted(totals.items()))
    refusals: dict[str, DomainError] = {}
    swept: set[str] = set()
    for index, request in enumerate(requests):
        shopper = request.shopper_id
        if shopper is None or shopper in counted:
            continue
        if totals[shopper] == request.quantity and shopper not in refusals:
            fits = False  # its only request here: the upsert above just said no
        else:
            fits = bool(await _add_units(conn, product_id, [(shopper, request.quantity)]))
        if not fits and shopper not in swept:
            swept.add(shopper)
            if await _expire_overdue_of_shopper(conn, product_id, shopper, books, events, now=now):
                fits = bool(await _add_units(conn, product_id, [(shopper, request.quantity)]))
        if fits:
            refusals.pop(shopper, None)  # what it has changed
            continue
        if shopper not in refusals:
            refusals[shopper] = await limit_refusal(conn, product_id, shopper)
        outcome[index] = refusals[shopper]
    return outcome


async def _expire_overdue_of_shopper(
    conn: Executor,
    product_id: int,
    shopper_id: str,
    books: Books,
    events: list[Event],
    *,
    now: int,
) -> bool:
    """Expire a shopper's overdue holds of a product (at most `SWEEP_BATCH`), as the sweeper
    would; whether any was. Their units go back on sale and off the shopper's allowance."""
    due = await conn.fetch_all(
        "SELECT id FROM reservations WHERE shopper_id = :s AND product_id = :p "
        "AND ended_at IS NULL AND expires_at <= :now ORDER BY created_at LIMIT :limit",
        {"s": shopper_id, "p": product_id, "now": now, "limit": SWEEP_BATCH},
    )
    if not due:
        return False
    rows = await _expire_ids(conn, [str(row["id"]) for row in due], now=now)
    if not rows:
        return False
    expired = [Reservation.from_row(row) for row in rows]
    product = await _restore(
        conn, books, expired, now=now, ended=Status.EXPIRED, actor=ledger.WORKER
    )
    events.append(StockChanged(product))
    events.extend(ReservationChanged(r, product) for r in expired)
    return True


async def _add_units(conn: Executor, product_id: int, units: Sequence[tuple[str, int]]) -> set[str]:
    """Add `units` (shopper id, units; by shopper id, each shopper once) to the shoppers'
    allowance rows of the product where the product's limit allows; the shoppers counted."""
    values: dict[str, object] = {"p": product_id, "none": NO_LIMIT}
    rows_sql = []
    for n, (shopper, quantity) in enumerate(units):
        rows_sql.append(f"(CAST(:s{n} AS TEXT), CAST(:q{n} AS BIGINT))")
        values[f"s{n}"] = shopper
        values[f"q{n}"] = quantity
    limit = (
        "(SELECT COALESCE(CAST(max_per_shopper AS BIGINT), CAST(:none AS BIGINT)) "
        "FROM products WHERE id = :p)"
    )
    rows = await conn.fetch_all(
        "INSERT INTO shopper_allowances (shopper_id, product_id, units) "
        "SELECT v.column1, CAST(:p AS INTEGER), v.column2 "
        f"FROM (VALUES {', '.join(rows_sql)}) AS v WHERE v.column2 <= {limit} "
        "ON CONFLICT (shopper_id, product_id) DO UPDATE "
        "SET units = shopper_allowances.units + excluded.units "
        f"WHERE shopper_allowances.units + excluded.units <= {limit} "
        "RETURNING shopper_id",
        values,
    )
    return {str(row["shopper_id"]) for row in rows}


async def limit_refusal(conn: Executor, product_id: int, shopper_id: str) -> DomainError:
    """Why a shopper's units did not fit: the limit and what they have (for the message)."""
    row = await conn.fetch_one(
        "SELECT p.max_per_shopper, a.units FROM products p LEFT JOIN shopper_allowances a "
        "ON a.shopper_id = :s AND a.product_id = p.id WHERE p.id = :p",
        {"p": product_id, "s": shopper_id},
    )
    if row is None:
        return ProductNotFound(product_id)
    limit, units = row["max_per_shopper"], row["units"]
    return ShopperLimitReached(
        NO_LIMIT if limit is None else int(limit), 0 if units is None else int(units)
    )


async def _give_back_allowances(
    conn: Executor, product_id: int, holds: Iterable[HoldRequest | Reservation]
) -> None:
    """Take the units of `holds` (of one product) that have a shopper off their shoppers'
    allowance rows: a hold that ended unsold (cancelled, expired), or a request counted
    that got no stock. One statement for all of them, and one to remove the rows left at
    0."""
    units: dict[str, int] = defaultdict(int)
    for hold in holds:
        if hold.shopper_id is not None:
            units[hold.shopper_id] += hold.quantity
    if not units:
        return
    values: dict[str, object] = {"p": product_id}
    cases, names = [], []
    for n, (shopper, quantity) in enumerate(sorted(units.items())):
        cases.append(f"WHEN :s{n} THEN CAST(:q{n} AS BIGINT)")
        names.append(f":s{n}")
        values[f"s{n}"] = shopper
        values[f"q{n}"] = quantity
    await conn.execute(
        f"UPDATE shopper_allowances SET units = units - CASE shopper_id {' '.join(cases)} "
        f"ELSE 0 END WHERE product_id = :p AND shopper_id IN ({', '.join(names)})",
        values,
    )
    # A shopper left with none of the product needs no row: the table holds only shoppers
    # with units in ACTIVE or COMPLETED holds, however many anonymous visitors came and went.
    await conn.execute(
        f"DELETE FROM shopper_allowances WHERE product_id = :p AND shopper_id IN "
        f"({', '.join(names)}) AND units = 0",
        {k: v for k, v in values.items() if not k.startswith("q")},
    )


def allocate(available: int, quantities: Iterable[int]) -> list[bool]:
    """First come, first served: each request that still fits is granted."""
    fits = []
    for quantity in quantities:
        ok = quantity <= available
        if ok:
            available -= quantity
        fits.append(ok)
    return fits


_HOLD_COLUMNS: Columns = (
    ("id", "TEXT"),
    ("product_id", "INTEGER"),
    ("quantity", "INTEGER"),
    ("status", "TEXT"),
    ("created_at", "BIGINT"),
    ("expires_at", "BIGINT"),
    ("idempotency_key", "TEXT"),
    ("shopper_id", "TEXT"),
)


async def _insert_holds(
    conn: Executor,
    holds: Sequence[tuple[str, HoldRequest]],
    now: int,
    expires: int,
    books: Books | None = None,
) -> list[Reservation]:
    """INSERT the new holds (`Executor.insert_rows`: on PostgreSQL one JSON text of
    them, the same statement for any number of holds), or hand their rows to `books`, to go in
    the books' statement (`Books.insert_first`): only when nothing in the transaction reads
    them before the books are written."""
    rows = (
        "reservations",
        _HOLD_COLUMNS,
        [
            (rid, r.product_id, r.quantity, "ACTIVE", now, expires, r.idempotency_key, r.shopper_id)
            for rid, r in holds
        ],
    )
    if books is not None:
        books.insert_first(rows)
    else:
        await conn.insert_rows(*rows)
    return [
        Reservation(
            id=reservation_id,
            product_id=request.product_id,
            quantity=request.quantity,
            status=Status.ACTIVE,
            created_at=now,
            expires_at=expires,
            completed_at=None,
            ended_at=None,
            shopper_id=request.shopper_id,
        )
        for reservation_id, request in holds
    ]


# -- complete, cancel, expire ------------------------------------------------------------


class _Anyone:
    """The caller of an operation on a hold that may act on any hold (the shop's backend,
    the worker): `ANYONE`."""


ANYONE = _Anyone()
# Who asks to act on a hold: a shopper's id, None (a caller that named no shopper: only
# holds without a shopper), or ANYONE.
Caller = str | None | _Anyone


def may_see(caller: Caller, reservation: Reservation) -> bool:
    """Whether `caller` may see and act on `reservation` (`Reservation.visible_to`)."""
    return isinstance(caller, _Anyone) or reservation.visible_to(caller)


def _owned_by(caller: Caller) -> str:
    """The condition that leaves a hold alone unless `caller` may act on it."""
    if isinstance(caller, _Anyone):
        return ""
    if caller is None:
        return "AND shopper_id IS NULL "
    return "AND (shopper_id IS NULL OR shopper_id = :caller) "


def _owner(caller: Caller) -> dict[str, object]:
    return {"caller": caller} if isinstance(caller, str) else {}


@dataclass(frozen=True, slots=True)
class Completing:
    """A request to buy a hold (`complete_many`): `actor` as the ledger says who
    (`shop` for the shop's backend), the shop's `order_reference` if it gave one, and
    `caller`: the shopper asking (a hold of another shopper is `ReservationNotFound`), or
    ANYONE (the shop's backend)."""

    reservation_id: str
    actor: str = ledger.SHOPPER
    order_reference: str | None = None
    caller: Caller = ANYONE


@dataclass(frozen=True, slots=True)
class Cancelling:
    """A request to give a hold's units back (`cancel_many`): `actor` the shopper
    (`shopper…`) or the operator (`operator`), `reason` the operator's words for the
    shopper, `caller` as for `Completing` (the operator: ANYONE)."""

    reservation_id: str
    actor: str = ledger.SHOPPER
    reason: str | None = None
    caller: Caller = ANYONE


def _caller_key(caller: Caller) -> tuple[int, str | None]:
    """`caller` as a key that groups the requests one UPDATE can serve."""
    return (0, None) if isinstance(caller, _Anyone) else (1, caller)


# How a batch ends its holds (`_end_many`): the SET of the holds' UPDATE and its values
# (`:now` is given), for one group of requests that one UPDATE serves (one caller).
Ending = tuple[str, dict[str, object]]


async def _end_many(
    conn: Executor,
    requests: Sequence[Completing | Cancelling],
    *,
    now: int,
    ends_as: Status,
    group: Callable[[Completing | Cancelling], tuple[object, Ending]],
    move: Callable[[Executor, Books, list[Reservation], list[str]], Awaitable[Product]],
) -> tuple[list[Outcome[Reservation]], list[Event]]:
    """End a batch of holds in one transaction (complete or cancel: `ends_as`), each
    request answered as it would be on its own, in the order of `requests`.

    Locks are taken as the sweeper takes them (`expire_overdue`): product by product in id
    order, the product's holds, then the product's row, so that no two writers wait on
    each other in a cycle. First one read of which product each hold is of; then for each
    product: one UPDATE of its holds per group of requests (`group`: the requests one
    UPDATE serves, and its SQL: one for a batch of the same caller's, or of the shop's,
    calls), a read of each hold the UPDATE left alone (a retry; a hold in another state; an
    overdue one, expired now, units back, and answered `ReservationExpired`), then `move`:
    the product's UPDATE for the ended holds (with the actor of each) and its books. The
    ledger rows and the outbox events of the whole batch go in one INSERT each.
    """
    listed, names = in_list("r", dict.fromkeys(r.reservation_id for r in requests))
    found = await conn.fetch_all(
        f"SELECT id, product_id FROM reservations WHERE id IN ({listed})", names
    )
    product_of = {str(row["id"]): int(row["product_id"]) for row in found}
    outcomes: dict[int, Outcome[Reservation]] = {}
    by_product: dict[int, list[int]] = defaultdict(list)
    for n, request in enumerate(requests):
        product_id = product_of.get(request.reservation_id)
        if product_id is None:
            outcomes[n] = Outcome(error=ReservationNotFound(request.reservation_id))
        else:
            by_product[product_id].append(n)
    events: list[Event] = []
    books = Books(now=now)
    for product_id in sorted(by_product):
        groups: dict[object, tuple[Ending, Caller, list[str]]] = {}
        for n in by_product[product_id]:
            request = requests[n]
            key, ending = group(request)
            groups.setdefault(key, (ending, request.caller, []))[2].append(request.reservation_id)
        # hold id → the group whose UPDATE ended it, and the hold. Only a request of that
        # group is answered with the change: an earlier request for the hold from a caller
        # who may not act on it (another shopper) is not, and is not the ledger's actor.
        ended: dict[str, tuple[object, Reservation]] = {}
        for key, ((assignments, values), caller, group_ids) in groups.items():
            changed = await _end_holds(
                conn,
                group_ids,
                assignments=assignments,
                values={**values, "now": now},
                caller=caller,
            )
            ended |= {hold_id: (key, hold) for hold_id, hold in changed.items()}
        done: list[int] = []
        overdue: dict[str, str] = {}  # hold id → the actor of the first request for it
        for n in by_product[product_id]:
            request = requests[n]
            change = ended.get(request.reservation_id)
            if change is not None and change[0] == group(request)[0]:
                # the first request for it of the group that ended it: its change
                del ended[request.reservation_id]
                done.append(n)
                outcomes[n] = Outcome(change[1])
                continue
            current = await get_reservation(conn, request.reservation_id)
            if current is None or not may_see(request.caller, current):
                outcomes[n] = Outcome(error=ReservationNotFound(request.reservation_id))
            elif current.status is ends_as:  # already: answered with the hold, unchanged
                outcomes[n] = Outcome(current)
            elif current.status is Status.COMPLETED:
                outcomes[n] = Outcome(error=ReservationCompleted())
            elif current.status is Status.CANCELLED:
                outcomes[n] = Outcome(error=ReservationCancelled())
            else:  # EXPIRED, or ACTIVE and due (no job has run yet): expired now
                if current.status is Status.ACTIVE:
                    overdue.setdefault(current.id, request.actor)
                outcomes[n] = Outcome(error=ReservationExpired())
        if overdue:
            rows = await _expire_ids(conn, list(overdue), now=now)
            if rows:  # none: another transaction expired them first
                holds = [Reservation.from_row(row) for row in rows]
                product = await _restore(
                    conn,
                    books,
                    holds,
                    now=now,
                    ended=Status.EXPIRED,
                    actor=[overdue[h.id] for h in holds],
                )
                events.append(StockChanged(product))
                events.extend(ReservationChanged(h, product) for h in holds)
        if done:
            holds = [outcomes[n].result() for n in done]
            product = await move(conn, books, holds, [requests[n].actor for n in done])
            events.append(StockChanged(product))
            events.extend(ReservationChanged(h, product) for h in holds)
    await books.write(conn)
    return [outcomes[n] for n in range(len(requests))], events


async def _end_holds(
    conn: Executor,
    ids: Sequence[str],
    *,
    assignments: str,
    values: dict[str, object],
    caller: Caller,
) -> dict[str, Reservation]:
    """Those of `ids` that are ACTIVE and not yet due and that `caller` may act on, ended
    with `assignments` (SQL, its `:name`s in `values`, `:now` the transaction's time), in
    one UPDATE by primary key; the holds as they are now, by id. Each row changes only if
    it is still ACTIVE when the UPDATE reaches it, so a hold ends once however many ask."""
    listed, names = in_list("i", dict.fromkeys(ids))
    rows = await conn.fetch_all(
        f"UPDATE reservations SET {assignments} "
        f"WHERE id IN ({listed}) AND status = 'ACTIVE' AND expires_at > :now "
        f"{_owned_by(caller)}RETURNING {RESERVATION}",
        {**values, **_owner(caller), **names},
    )
    return {str(row["id"]): Reservation.from_row(row) for row in rows}


async def complete_many(
    conn: Executor, requests: Sequence[Completing], *, now: int
) -> tuple[list[Outcome[Reservation]], list[Event]]:
    """Buy holds, in one transaction: each ACTIVE and not yet due hold → COMPLETED.

    Answers in the order of `requests`. Completing a COMPLETED hold returns it unchanged
    (its first `order_reference` kept); an overdue one is expired on the spot and answered
    `ReservationExpired`; a CANCELLED one `ReservationCancelled`; one that does not exist,
    or that the request's caller may not act on, `ReservationNotFound`. Held units become
    sold ones in one UPDATE per product: a new version, a stock event, so that every page
    learns they will not come back. Statements and lock order: `_end_many`."""

    def group(request: Completing | Cancelling) -> tuple[object, Ending]:
        assert isinstance(request, Completing)
        return (_caller_key(request.caller), request.order_reference), (
            "status = 'COMPLETED', completed_at = :now, ended_at = :now, order_reference = :ref",
            {"ref": request.order_reference},
        )

    return await _end_many(
        conn, requests, now=now, ends_as=Status.COMPLETED, group=group, move=_sell
    )


async def _sell(
    conn: Executor, books: Books, holds: list[Reservation], actors: list[str]
) -> Product:
    """The units of `holds` (completed, all of one product) from held to sold, in one
    UPDATE of the product (its revenue too), and in the books as `actors`' (one a hold)."""
    quantity = sum(r.quantity for r in holds)
    sold = await conn.fetch_one(
        "UPDATE products SET held_units = held_units - :q, sold_units = sold_units + :q, "
        "revenue_cents = revenue_cents + :q * price_cents, "
        "version = version + 1, updated_at = :now "
        f"WHERE id = :id RETURNING {PRODUCT}",
        {"id": holds[0].product_id, "q": quantity, "now": books.now},
    )
    assert sold is not None, "a hold's product cannot disappear"
    product = Product.from_row(sold)
    books.moved(
        product,
        [Movement(Kind.COMPLETED, r.quantity, a, r) for r, a in zip(holds, actors, strict=True)],
    )
    return product


def _cancelled_by(actor: str) -> str:
    """Who cancelled, as the hold keeps it (`cancelled_by`): `shopper` or `operator`."""
    return ledger.OPERATOR if actor == ledger.OPERATOR else ledger.SHOPPER


async def cancel_many(
    conn: Executor, requests: Sequence[Cancelling], *, now: int
) -> tuple[list[Outcome[Reservation]], list[Event]]:
    """Give holds' units back, in one transaction: each ACTIVE and not yet due hold →
    CANCELLED, its units back on sale (and off its shopper's allowance: `_restore`).
    Cancelling twice returns it.

    Answers in the order of `requests`; the refusals as `complete_many`'s
    (`ReservationCompleted` for a bought hold). Who cancelled is kept on the hold as
    `cancelled_by` (`shopper` or `operator`, so that the shopper's page can say who did),
    with the operator's `reason` as `cancel_reason`. Statements and lock order:
    `_end_many`."""

    def group(request: Completing | Cancelling) -> tuple[object, Ending]:
        assert isinstance(request, Cancelling)
        by = _cancelled_by(request.actor)
        return (_caller_key(request.caller), by, request.reason), (
            "status = 'CANCELLED', ended_at = :now, cancelled_by = :by, cancel_reason = :reason",
            {"by": by, "reason": request.reason},
        )

    async def give_back(
        conn: Executor, books: Books, holds: list[Reservation], actors: list[str]
    ) -> Product:
        return await _restore(
            conn, books, holds, now=books.now, ended=Status.CANCELLED, actor=actors
        )

    return await _end_many(
        conn, requests, now=now, ends_as=Status.CANCELLED, group=group, move=give_back
    )


async def expire(
    conn: Executor, reservation_id: str, *, now: int, actor: str = ledger.WORKER
) -> Outcome[Reservation]:
    """ACTIVE and overdue → EXPIRED, units back. A second run changes nothing. `actor`:
    whose transaction expired it (the worker, or a request that came too late)."""
    rows = await conn.fetch_all(
        "UPDATE reservations SET status = 'EXPIRED', ended_at = :now "
        "WHERE id = :id AND status = 'ACTIVE' AND expires_at <= :now "
        f"RETURNING {RESERVATION}",
        {"id": reservation_id, "now": now},
    )
    outcome = await _restore_expired(conn, rows, now=now, actor=actor)
    return Outcome(outcome.value[0] if outcome.value else None, events=outcome.events)


async def expire_overdue(
    conn: Executor, *, now: int, limit: int = SWEEP_BATCH, actor: str = ledger.WORKER
) -> Outcome[list[Reservation]]:
    """Expire up to `limit` overdue ACTIVE holds, oldest first, and restore their units.

    The ids of the overdue holds come from the index of open holds (in its order, so the
    LIMIT stops the scan); then, product by product in id order, a primary-key UPDATE of
    exactly those ids and the UPDATE of their product. (One statement with the ids in a
    subquery was planned by PostgreSQL, on statistics that saw no open hold, as a nested
    loop running the subquery once per open hold: 14 s for a batch of 500.) Product by
    product, because a reservation that expires a product's overdue holds lazily
    (`reserve`) may hold the row of a product with a lower id: locks are taken in one
    order by every transaction (a product's holds, then the product; products by id), so
    none waits in a cycle. Safe to run concurrently with itself, with the lazy expiry and
    with complete/cancel: each row changes only if it is still ACTIVE when the UPDATE
    reaches it.
    """
    due = await conn.fetch_all(
        "SELECT id, product_id FROM reservations WHERE ended_at IS NULL "
        "AND expires_at <= :now ORDER BY expires_at, id LIMIT :limit",
        {"now": now, "limit": limit},
    )
    if not due:
        return Outcome([], events=[])
    by_product: dict[int, list[str]] = defaultdict(list)
    for row in due:
        by_product[int(row["product_id"])].append(str(row["id"]))
    expired: list[Reservation] = []
    events: list[Event] = []
    books = Books(now=now)
    for product_id in sorted(by_product):
        rows = await _expire_ids(conn, by_product[product_id], now=now)
        if not rows:
            continue  # another transaction expired them first
        holds = [Reservation.from_row(row) for row in rows]
        product = await _restore(conn, books, holds, now=now, ended=Status.EXPIRED, actor=actor)
        events.append(StockChanged(product))
        events.extend(ReservationChanged(r, product) for r in holds)
        expired.extend(holds)
    await books.write(conn)
    return Outcome(expired, events=events)


async def _expire_ids(conn: Executor, reservation_ids: Sequence[str], *, now: int) -> list[Row]:
    """ACTIVE and overdue → EXPIRED for those of `reservation_ids` that still are; their
    rows as they now are."""
    listed, names = in_list("r", reservation_ids)
    return list(
        await conn.fetch_all(
            "UPDATE reservations SET status = 'EXPIRED', ended_at = :now "
            f"WHERE id IN ({listed}) "
            "AND status = 'ACTIVE' AND expires_at <= :now "
            f"RETURNING {RESERVATION}",
            {"now": now, **names},
        )
    )


async def _restore_expired(
    conn: Executor, rows: Sequence[Row], *, now: int, actor: str
) -> Outcome[list[Reservation]]:
    expired = [Reservation.from_row(row) for row in rows]
    by_product: dict[int, list[Reservation]] = defaultdict(list)
    for reservation in expired:
        by_product[reservation.product_id].append(reservation)
    events: list[Event] = []
    products = {}
    books = Books(now=now)
    for product_id in sorted(by_product):  # a fixed order, so two sweepers cannot deadlock
        product = await _restore(
            conn, books, by_product[product_id], now=now, ended=Status.EXPIRED, actor=actor
        )
        products[product_id] = product
        events.append(StockChanged(product))
    await books.write(conn)
    events.extend(ReservationChanged(r, products[r.product_id]) for r in expired)
    return Outcome(expired, events=events)


_ENDED = {
    Status.EXPIRED: ("expired_units", Kind.EXPIRED),
    Status.CANCELLED: ("cancelled_units", Kind.CANCELLED),
}


async def _restore(
    conn: Executor,
    books: Books,
    holds: Sequence[Reservation],
    *,
    now: int,
    ended: Status,
    actor: str | Sequence[str],
) -> Product:
    """Units of `holds` (all of one product) that ended unsold (`ended`: EXPIRED or
    CANCELLED) back on sale, in one UPDATE, and in the books as `actor`'s (one for all, or
    each hold's); and, if the product has a
    limit per shopper, off their shoppers' allowances (issue 16), after the product's row,
    the order `reserve` and `update_product` take them in. Every way a hold ends unsold
    comes here: cancel, the expiry job, the sweeper, and a request that finds its hold
    overdue."""
    counter, kind = _ENDED[ended]
    quantity = sum(r.quantity for r in holds)
    row = await conn.fetch_one(
        "UPDATE products SET available_stock = available_stock + :q, "
        f"held_units = held_units - :q, {counter} = {counter} + :q, "
        "version = version + 1, updated_at = :now "
        f"WHERE id = :id RETURNING {PRODUCT}",
        {"id": holds[0].product_id, "q": quantity, "now": now},
    )
    assert row is not None, "a hold's product cannot disappear"
    product = Product.from_row(row)
    if product.max_per_shopper is not None:
        await _give_back_allowances(conn, product.id, holds)
    actors = [actor] * len(holds) if isinstance(actor, str) else actor
    books.moved(
        product,
        [Movement(kind, r.quantity, a, r) for r, a in zip(holds, actors, strict=True)],
    )
    return product


async def forget_old_idempotency_keys(conn: Executor, *, now: int, limit: int = SWEEP_BATCH) -> int:
    """Free the keys of holds older than a day, so that a client may use them again."""
    rows = await conn.fetch_all(
        "SELECT id FROM reservations WHERE idempotency_key IS NOT NULL "
        "AND created_at <= :cutoff ORDER BY created_at LIMIT :limit",
        {"cutoff": now - IDEMPOTENCY_WINDOW_MS, "limit": limit},
    )
    await _forget_keys(conn, [str(row["id"]) for row in rows])
    return len(rows)


async def _forget_keys(conn: Executor, reservation_ids: Sequence[str]) -> None:
    if not reservation_ids:
        return
    listed, names = in_list("r", reservation_ids)
    await conn.execute(
        f"UPDATE reservations SET idempotency_key = NULL WHERE id IN ({listed})", names
    )


# -- operator actions --------------------------------------------------------------------


async def create_product(
    conn: Executor,
    *,
    name: str,
    price_cents: int,
    stock: int,
    sale_starts_at: int | None,
    now: int,
    max_per_shopper: int | None = None,
    queue: str = "off",
    admit_factor: float = 1.0,
    actor: str = ledger.OPERATOR,
) -> Outcome[Product]:
    # The id is chosen inside the INSERT, since SQLite and PostgreSQL spell auto-increment
    # differently. Two concurrent creations on PostgreSQL can pick the same id; the primary
    # key refuses one, and the caller retries it.
    row = await conn.fetch_one(
        "INSERT INTO products (id, name, price_cents, total_stock, available_stock, version, "
        "sale_starts_at, created_at, updated_at, max_per_shopper, queue, admit_factor) "
        "SELECT COALESCE(MAX(id), 0) + 1, CAST(:name AS TEXT), CAST(:price AS BIGINT), "
        "CAST(:stock AS BIGINT), CAST(:stock AS BIGINT), 1, CAST(:starts AS BIGINT), "
        "CAST(:now AS BIGINT), CAST(:now AS BIGINT), CAST(:limit AS INTEGER), "
        "CAST(:queue AS TEXT), CAST(:factor AS DOUBLE PRECISION) FROM products "
        f"RETURNING {PRODUCT}",
        {
            "queue": queue,
            "factor": admit_factor,
            "limit": max_per_shopper,
            "name": name,
            "price": price_cents,
            "stock": stock,
            "starts": sale_starts_at,
            "now": now,
        },
    )
    assert row is not None
    product = Product.from_row(row)
    books = Books(now=now)
    books.moved(product, [Movement(Kind.CREATED, stock, actor)])
    await books.write(conn)
    return Outcome(product, events=[ProductChanged(product), StockChanged(product)])


async def restock(
    conn: Executor, product_id: int, quantity: int, *, now: int, actor: str = ledger.OPERATOR
) -> Outcome[Product]:
    row = await conn.fetch_one(
        "UPDATE products SET total_stock = total_stock + :q, "
        "available_stock = available_stock + :q, version = version + 1, updated_at = :now "
        f"WHERE id = :id RETURNING {PRODUCT}",
        {"id": product_id, "q": quantity, "now": now},
    )
    if row is None:
        return Outcome(error=ProductNotFound(product_id))
    product = Product.from_row(row)
    books = Books(now=now)
    books.moved(product, [Movement(Kind.RESTOCKED, quantity, actor)])
    await books.write(conn)
    return Outcome(product, events=[ProductChanged(product), StockChanged(product)])


async def reduce_stock(
    conn: Executor, product_id: int, quantity: int, *, now: int, actor: str = ledger.OPERATOR
) -> Outcome[Product]:
    """Take `quantity` units away from the product's stock: out of its available units and
    its total, never out of held or sold ones (issue 13, item 11). One conditional UPDATE
    (`available_stock >= :q`), so a hold made at the same moment cannot be undercut.

    Raises nothing; the outcome's error is `ProductNotFound`, or `StockCommitted` (with the
    stock as it stands) when fewer than `quantity` units are neither held nor sold."""
    row = await conn.fetch_one(
        "UPDATE products SET total_stock = total_stock - :q, "
        "available_stock = available_stock - :q, version = version + 1, updated_at = :now "
        f"WHERE id = :id AND available_stock >= :q RETURNING {PRODUCT}",
        {"id": product_id, "q": quantity, "now": now},
    )
    if row is None:
        current = await get_product(conn, product_id)
        if current is None:
            return Outcome(error=ProductNotFound(product_id))
        return Outcome(error=StockCommitted(quantity, current.stock_now(), current.sold_units))
    product = Product.from_row(row)
    books = Books(now=now)
    books.moved(product, [Movement(Kind.REDUCED, quantity, actor)])
    await books.write(conn)
    return Outcome(product, events=[ProductChanged(product), StockChanged(product)])


class Unset(enum.Enum):
    """A field of `ProductChanges` the operator did not send."""

    UNSET = "unset"


UNSET = Unset.UNSET


@dataclass(frozen=True, slots=True)
class ProductChanges:
    """An operator's edit of a product; a field left `UNSET` stays as it is. Times are ms
    (None: no start, or no end); `paused` pauses or resumes reservations."""

    name: str | Unset = UNSET
    price_cents: int | Unset = UNSET
    sale_starts_at: int | Unset | None = UNSET
    sale_ends_at: int | Unset | None = UNSET
    paused: bool | Unset = UNSET

    def sent(self) -> list[str]:
        """The fields changed, as the API names them."""
        names = {
            "name": self.name,
            "price": self.price_cents,
            "saleStartsAt": self.sale_starts_at,
            "saleEndsAt": self.sale_ends_at,
            "paused": self.paused,
            "maxPerShopper": self.max_per_shopper,
            "queue": self.queue,
            "admitFactor": self.admit_factor,
        }
        return [name for name, value in names.items() if value is not UNSET]

    # Units one shopper may have in ACTIVE and COMPLETED holds (None: no limit; issue 16).
    # Lowered below what a shopper has, it takes nothing from them: it stops new holds.
    max_per_shopper: int | Unset | None = UNSET
    # The waiting room (issue 17): `off`, `fifo` or `random`, and passes per unit.
    queue: str | Unset = UNSET
    admit_factor: float | Unset = UNSET


async def update_product(
    conn: Executor,
    product_id: int,
    changes: ProductChanges,
    *,
    now: int,
    actor: str = ledger.OPERATOR,
) -> Outcome[Product]:
    """Edit a product's name, price, schedule, or pause it (issue 13, item 11). No stock
    moves, so no ledger row; the version goes up all the same, so that every page and every
    process's catalog (which keep the highest version) take the new product.

    Outcome errors: `ProductNotFound`; `InvalidSchedule` when the sale would end before it
    starts; `QueueInUse` when `queue` changes to `fifo` or `random` while tickets are open
    (waiting or admitted) in the room, or when a `random` room without a start (a waitlist,
    in arrival order) is given one in the future (its joins would be drawn, ahead).
    Switched `off`, the room's open tickets are closed by the admitter's next steps
    (`waitingroom.admit`). Pausing a paused product keeps when
    it was first paused. The shop hears of it as `product.updated` (in the outbox, in the
    same transaction)."""
    for _ in range(5):
        current = await get_product(conn, product_id)
        if current is None:
            return Outcome(error=ProductNotFound(product_id))
        starts = (
            current.sale_starts_at if changes.sale_starts_at is UNSET else changes.sale_starts_at
        )
        ends = current.sale_ends_at if changes.sale_ends_at is UNSET else changes.sale_ends_at
        if isinstance(starts, int) and isinstance(ends, int) and ends <= starts:
            return Outcome(error=InvalidSchedule(starts, ends))
        if changes.queue not in (UNSET, "off", current.queue):
            assert isinstance(changes.queue, str)
            # Places were given at the joins under the current order (a random room's
            # drawn places, or arrival places): no switch while anyone is in line.
            if people := await waitingroom.open_tickets(conn, product_id):
                return Outcome(error=QueueInUse(current.queue, changes.queue, people))
        elif (
            current.queue == "random"
            and changes.queue in (UNSET, "random")
            and current.sale_starts_at is None
            and isinstance(starts, int)
            and now < starts
            # The same switch made with the start: a waitlist (arrival order) given a start
            # would put whoever joins from now (a drawn place, below every arrival place)
            # ahead of everyone already in line. (A started sale postponed does so on
            # purpose, README "Waiting room": those who join before the new start are drawn.)
            and (people := await waitingroom.open_tickets(conn, product_id))
        ):
            return Outcome(error=QueueInUse(current.queue, "random", people, postponed=True))
        sets = ["version = version + 1", "updated_at = :now"]
        values: dict[str, object] = {"id": product_id, "now": now, "version": current.version}
        if changes.name is not UNSET:
            sets.append("name = :name")
            values["name"] = changes.name
        if changes.price_cents is not UNSET:
            sets.append("price_cents = :price")
            values["price"] = changes.price_cents
        if changes.sale_starts_at is not UNSET:
            sets.append("sale_starts_at = :starts")
            values["starts"] = starts
        if changes.sale_ends_at is not UNSET:
            sets.append("sale_ends_at = :ends")
            values["ends"] = ends
        if changes.paused is True:
            sets.append("paused_at = COALESCE(paused_at, :now)")
        elif changes.paused is False:
            sets.append("paused_at = NULL")
        if changes.max_per_shopper is not UNSET:
            sets.append("max_per_shopper = :limit")
            values["limit"] = changes.max_per_shopper
        if changes.queue is not UNSET:
            sets.append("queue = :queue")
            values["queue"] = changes.queue
        if changes.admit_factor is not UNSET:
            sets.append("admit_factor = :factor")
            values["factor"] = changes.admit_factor
        # Guarded by the version read above: the schedule was checked against that row.
        row = await conn.fetch_one(
            f"UPDATE products SET {', '.join(sets)} WHERE id = :id AND version = :version "
            f"RETURNING {PRODUCT}",
            values,
        )
        if row is not None:
            product = Product.from_row(row)
            if (current.max_per_shopper is None) != (product.max_per_shopper is None):
                await _count_allowances(conn, product)
            await outbox.insert(conn, [outbox.product_updated(product, changes.sent(), actor, now)])
            return Outcome(product, events=[ProductChanged(product)])
    raise RuntimeError(f"product {product_id} kept changing while it was being edited")


async def _count_allowances(conn: Executor, product: Product) -> None:
    """A limit set on a product that had none: its shoppers' allowance rows, filled from
    their units in its ACTIVE and COMPLETED holds; a limit removed: its rows deleted.

    Runs in the transaction that changed the limit, after its UPDATE of the product's row,
    whose lock every reservation, cancel and expiry of the product takes before its
    allowance rows (PostgreSQL; SQLite has one writer at a time): one that came first has
    committed, and its holds are counted here; one that comes later reads the new limit."""
    await conn.execute("DELETE FROM shopper_allowances WHERE product_id = :p", {"p": product.id})
    if product.max_per_shopper is None:
        return
    await conn.execute(
        "INSERT INTO shopper_allowances (shopper_id, product_id, units) "
        "SELECT shopper_id, product_id, SUM(quantity) FROM reservations "
        "WHERE product_id = :p AND shopper_id IS NOT NULL "
        "AND status IN ('ACTIVE', 'COMPLETED') GROUP BY shopper_id, product_id",
        {"p": product.id},
    )


# -- reads -------------------------------------------------------------------------------


async def get_product(conn: Executor, product_id: int) -> Product | None:
    row = await conn.fetch_one(f"SELECT {PRODUCT} FROM products WHERE id = :id", {"id": product_id})
    return None if row is None else Product.from_row(row)


async def earliest_open_expiry(conn: Executor, product_id: int) -> int | None:
    """The earliest `expires_at` (ms) among the product's open holds, None if it has none.

    One probe of the index of a product's open holds (migration 0003)."""
    row = await conn.fetch_one(
        "SELECT MIN(expires_at) AS due FROM reservations "
        "WHERE product_id = :p AND ended_at IS NULL",
        {"p": product_id},
    )
    return None if row is None or row["due"] is None else int(row["due"])


async def next_open_expiry(conn: Executor, *, after: int, until: int) -> int | None:
    """The earliest `expires_at` (ms) of an open hold due in (`after`, `until`], None if
    there is none: when the expiry job of that window must next wake
    (`server.service.expiry.Expirer.expire_window`).

    The first entry after `after` of the index of open holds by expiry (migration 0002),
    which the million ended holds of a month's history are not in. Asked in the index's
    own order with a LIMIT, as `expire_overdue` asks: written as MIN(), PostgreSQL on stale
    statistics aggregated a scan of the index of a product's open holds instead
    (tests/test_history.py checks the plan on stale ones)."""
    row = await conn.fetch_one(
        "SELECT expires_at FROM reservations "
        "WHERE ended_at IS NULL AND expires_at > :after AND expires_at <= :until "
        "ORDER BY expires_at, id LIMIT 1",
        {"after": after, "until": until},
    )
    return None if row is None else int(row["expires_at"])


async def list_products(conn: Executor) -> list[Product]:
    rows = await conn.fetch_all(f"SELECT {PRODUCT} FROM products ORDER BY id")
    return [Product.from_row(row) for row in rows]


async def product_versions(conn: Executor) -> dict[int, int]:
    """Every product's version, `{product id: version}`: what the catalog's periodic reload
    compares with its own, to read whole only the rows that differ. On a month of history
    (10,000 products) building every row as a `Product` took ~90 ms of the web's event loop
    every 5 s, in one piece (`Catalog.reload`)."""
    rows = await conn.fetch_all("SELECT id, version FROM products")
    return {int(row["id"]): int(row["version"]) for row in rows}


# How many ids one `get_products` statement names.
PRODUCTS_CHUNK = 500


async def get_products(conn: Executor, product_ids: Sequence[int]) -> list[Product]:
    """The products among `product_ids` that exist, by id (in statements of PRODUCTS_CHUNK
    ids)."""
    ordered = sorted(set(product_ids))
    products: list[Product] = []
    for at in range(0, len(ordered), PRODUCTS_CHUNK):
        listed, names = in_list("p", ordered[at : at + PRODUCTS_CHUNK])
        rows = await conn.fetch_all(
            f"SELECT {PRODUCT} FROM products WHERE id IN ({listed}) ORDER BY id", names
        )
        products.extend(Product.from_row(row) for row in rows)
    return products


async def get_reservation(conn: Executor, reservation_id: str) -> Reservation | None:
    row = await conn.fetch_one(
        f"SELECT {RESERVATION} FROM reservations WHERE id = :id", {"id": reservation_id}
    )
    return None if row is None else Reservation.from_row(row)


async def get_reservations(conn: Executor, reservation_ids: Sequence[str]) -> list[Reservation]:
    if not reservation_ids:
        return []
    listed, names = in_list("r", reservation_ids)
    rows = await conn.fetch_all(
        f"SELECT {RESERVATION} FROM reservations WHERE id IN ({listed})", names
    )
    return [Reservation.from_row(row) for row in rows]


# How many of a shopper's newest holds a listing by status looks among.
STATUS_WALK = 1_000


async def list_shopper_reservations(
    conn: Executor,
    shopper_id: str,
    *,
    status: Status | None,
    limit: int,
    walk: int = STATUS_WALK,
) -> list[Reservation]:
    """Up to `limit` of a shopper's holds, newest first (their index, however many holds
    other shoppers have); only those in `status` when given, among the shopper's `walk`
    newest holds (an overdue ACTIVE hold is listed as ACTIVE here: the view shows it
    EXPIRED). The walk is bounded: the index has no status, so `status=ACTIVE` of a shopper
    with 30,000 ended holds and none active read all 30,000 (51-102 ms of a reader on a loaded
    machine, every request), and a client can make that many holds by holding and cancelling."""
    values: dict[str, object] = {"s": shopper_id, "limit": limit}
    if status is None:
        rows = await conn.fetch_all(
            f"SELECT {RESERVATION} FROM reservations WHERE shopper_id = :s "
            "ORDER BY created_at DESC, id LIMIT :limit",
            values,
        )
    else:
        values.update(status=status.value, walk=walk)
        # The walk orders by the index alone (shopper_id, created_at): a tiebreak on id
        # here would sort all of the shopper's holds to find the newest `walk`. Holds made
        # in the same millisecond at the walk's edge may fall either side of it.
        rows = await conn.fetch_all(
            f"SELECT {RESERVATION} FROM (SELECT {RESERVATION} FROM reservations "
            "WHERE shopper_id = :s ORDER BY created_at DESC LIMIT :walk) AS newest "
            "WHERE status = :status ORDER BY created_at DESC, id LIMIT :limit",
            values,
        )
    return [Reservation.from_row(row) for row in rows]


async def shopper_units(conn: Executor, shopper_id: str) -> dict[int, int]:
    """A shopper's units per product, in ACTIVE and COMPLETED holds; products with none
    left out. Of a product with a limit, its allowance row (what the limit is checked
    against); of the others, counted from the shopper's holds (their index: as many rows
    as this shopper has holds, whatever other shoppers have)."""
    rows = await conn.fetch_all(
        "SELECT product_id, SUM(quantity) AS units FROM reservations "
        "WHERE shopper_id = :s AND status IN ('ACTIVE', 'COMPLETED') GROUP BY product_id",
        {"s": shopper_id},
    )
    units = {int(row["product_id"]): int(row["units"]) for row in rows}
    for row in await conn.fetch_all(
        "SELECT product_id, units FROM shopper_allowances WHERE shopper_id = :s",
        {"s": shopper_id},
    ):
        units[int(row["product_id"])] = int(row["units"])
    return {product_id: n for product_id, n in units.items() if n > 0}


async def shopper_units_held(
    conn: Executor, shopper_id: str, *, now: int, since: int, recent: int
) -> dict[int, int]:
    """A shopper's units per product in ACTIVE and COMPLETED holds at `now`, an overdue hold
    (ACTIVE past `expires_at`, not yet expired by the worker, the sweeper or a request)
    counting for nothing: the shopper's next reservation expires it first. Products with
    none left out.

    Of a product with an allowance row (a `max_per_shopper`), the row less the overdue holds
    (from the product's index of open holds): exact, whatever the shopper's history. Of any
    other, the live holds among the shopper's holds made at or after `since` (ms: the
    caller gives now less the hold time, so every hold that can still be ACTIVE) and their
    `recent` newest ones: a bounded read of the shopper's index, where every hold they ever
    made was read (30,000 of one shopper's holds: ~30 ms); older COMPLETED holds are left
    out. One statement, so one snapshot on both databases."""
    rows = await conn.fetch_all(
        "SELECT product_id, SUM(units) AS units FROM ("
        " SELECT a.product_id, a.units - COALESCE(("
        "  SELECT SUM(o.quantity) FROM reservations o WHERE o.product_id = a.product_id"
        "  AND o.shopper_id = a.shopper_id AND o.ended_at IS NULL AND o.expires_at <= :now"
        " ), 0) AS units FROM shopper_allowances a WHERE a.shopper_id = :s"
        " UNION ALL"
        " SELECT r.product_id, r.quantity AS units FROM ("
        "  SELECT id, product_id, quantity, status, expires_at FROM reservations"
        "  WHERE shopper_id = :s AND created_at >= :since"
        "  UNION"
        "  SELECT id, product_id, quantity, status, expires_at FROM ("
        "   SELECT id, product_id, quantity, status, expires_at FROM reservations"
        "   WHERE shopper_id = :s ORDER BY created_at DESC LIMIT :recent"
        "  ) AS newest"
        " ) AS r"
        " WHERE (r.status = 'COMPLETED' OR (r.status = 'ACTIVE' AND r.expires_at > :now))"
        " AND NOT EXISTS (SELECT 1 FROM shopper_allowances w"
        "  WHERE w.shopper_id = :s AND w.product_id = r.product_id)"
        ") AS held GROUP BY product_id",
        {"s": shopper_id, "now": now, "since": since, "recent": recent},
    )
    return {int(row["product_id"]): int(row["units"]) for row in rows if int(row["units"]) > 0}


async def get_reservation_by_key(conn: Executor, key: str) -> Reservation | None:
    row = await conn.fetch_one(
        f"SELECT {RESERVATION} FROM reservations WHERE idempotency_key = :key", {"key": key}
    )
    return None if row is None else Reservation.from_row(row)


async def list_reservations(
    conn: Executor, *, product_id: int | None, status: Status | None, limit: int
) -> list[Reservation]:
    """Up to `limit` holds, newest first; ACTIVE ones with the most time left first (the
    same order while HOLD_SECONDS stays the same).

    ACTIVE holds come from the index of open holds, backwards: as many rows as asked for
    (of one product: at most every open hold), whatever the history or the statistics.
    (Ordered by creation time instead, on SQLite a scan of every hold ever made, and on
    PostgreSQL with stale statistics a sort of every open hold.) Other holds of one product
    come from its own index, newest first; of every product, from the index by time.
    """
    values: dict[str, object] = {"limit": limit}
    where = []
    if product_id is not None:
        where.append("product_id = :product_id")
        values["product_id"] = product_id
    if status is Status.ACTIVE:
        where.append("ended_at IS NULL")
        order = "expires_at DESC, id DESC"
    else:
        order = "created_at DESC, id"
        if status is not None:
            where.append("status = :status")
            values["status"] = status.value
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    rows = await conn.fetch_all(
        f"SELECT {RESERVATION} FROM reservations {clause}ORDER BY {order} LIMIT :limit",
        values,
    )
    return [Reservation.from_row(row) for row in rows]


@dataclass(frozen=True, slots=True)
class Stats:
    """A product's units by state (units of stock): `available + held + sold == total`
    always (a CHECK on the row); `expired` and `cancelled` count units that went back on
    sale, so they are not part of that sum."""

    product_id: int
    total: int
    available: int
    held: int
    sold: int
    expired: int
    cancelled: int
    # What the sold units brought in, in cents, each at the price it sold at (migration 0008).
    revenue_cents: int = 0


async def stats(
    conn: Executor,
    product_id: int | None = None,
    *,
    ids: Collection[int] | None = None,
    after: int = 0,
    limit: int | None = None,
) -> list[Stats]:
    """Units per state by id, ascending: of one product (`product_id`), of some (`ids`), or
    of those with ids above `after`, at most `limit` of them (every one when None). The
    counters on the products' rows, kept by every stock change in its own transaction: one
    row read per product answered, from the primary key, however many holds there have been
    and however many products there are."""
    where: list[str] = []
    values: dict[str, object] = {}
    if product_id is not None:
        where.append("id = :id")
        values["id"] = product_id
    if ids is not None:
        if not ids:
            return []
        # Numbers only (ints), so written into the statement: one plan per list length is
        # no better, and the list is at most MAX_PRODUCT_IDS long.
        where.append(f"id IN ({', '.join(str(int(i)) for i in sorted(ids))})")
    if after:
        where.append("id > :after")
        values["after"] = after
    clause = f"WHERE {' AND '.join(where)} " if where else ""
    page = ""
    if limit is not None:
        page = " LIMIT :limit"
        values["limit"] = limit
    rows = await conn.fetch_all(
        "SELECT id, total_stock, available_stock, held_units, sold_units, expired_units, "
        f"cancelled_units, revenue_cents FROM products {clause}ORDER BY id{page}",
        values,
    )
    return [
        Stats(
            product_id=int(row["id"]),
            total=int(row["total_stock"]),
            available=int(row["available_stock"]),
            held=int(row["held_units"]),
            sold=int(row["sold_units"]),
            expired=int(row["expired_units"]),
            cancelled=int(row["cancelled_units"]),
            revenue_cents=int(row["revenue_cents"]),
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class StatsTotals:
    """Every product's counters added up (units of stock; `products`: how many)."""

    products: int
    total: int
    available: int
    held: int
    sold: int
    expired: int
    cancelled: int


async def stats_totals(conn: Executor) -> StatsTotals:
    """The counters of every product added up: one pass over the products' rows (not the
    holds), so its cost grows with the number of products only."""
    row = await conn.fetch_one(
        "SELECT COUNT(*) AS products, COALESCE(SUM(total_stock), 0) AS total, "
        "COALESCE(SUM(available_stock), 0) AS available, COALESCE(SUM(held_units), 0) AS held, "
        "COALESCE(SUM(sold_units), 0) AS sold, COALESCE(SUM(expired_units), 0) AS expired, "
        "COALESCE(SUM(cancelled_units), 0) AS cancelled FROM products",
        {},
    )
    assert row is not None
    return StatsTotals(
        products=int(row["products"]),
        total=int(row["total"]),
        available=int(row["available"]),
        held=int(row["held"]),
        sold=int(row["sold"]),
        expired=int(row["expired"]),
        cancelled=int(row["cancelled"]),
    )


async def expire_overdue_of_product(
    conn: Executor, product_id: int, *, now: int
) -> tuple[Product, list[Event]] | None:
    """Expire one product's overdue holds now (up to `SWEEP_BATCH`), as the sweeper would,
    with their books: the waiting room's admission does this first, so that a hold past its
    time hands its units to the next in line whether or not the worker has run. Returns the
    product after its units came back and the events, or None if none was due."""
    books = Books(now=now)
    restored = await _expire_overdue_of(conn, product_id, books, now=now)
    await books.write(conn)
    return restored
