"""The waiting room (issue 17): tickets, the line, passes, admission, the lease.

The database is the truth for all of it (migrations 0006, 0013, 0017, 0018): a ticket is a row,
its place in line a column, an admission an UPDATE of the row, a pass a time on it; each
room keeps how many wait (`add_waiting`), in the transactions that change it, so that no
step counts the line. Redis only carries the news (`RoomChanged`, after commit).

- Joining is one insert (`join`), and the place is decided then, never rewritten:
  - an arrival place: the arrival time in ms times 2^20 plus 20 random bits (arrival
    order, ties in a millisecond in a random order; no counter every join would update).
    For any time after 1970 it is >= 0.
  - in a `random` room before its start, a drawn place (`drawn_place`): HMAC-SHA256 of
    "<sale start in ms>:<shopper id>" under the room's secret key (`room_key`; random,
    never shown), its first 62 bits, minus 2^62: in [-2^62, 0), below every arrival place.
    Among those who join before the start the order is a uniformly random permutation
    decided by a secret nobody outside can see or influence; leaving and joining again
    before the same start gives the same place; a new sale of the product (a new start)
    gives a new, independent order (the key alone would repeat the last sale's, which
    everyone saw once it started); and at the start nothing is written: the line is
    already in order. Later arrivals get
    arrival places, behind all of them. While the room is before its start the order is
    not shown (`order_hidden`): a position would reveal the draw early.
- `admit` is one process's step for one product (the lease holder's: `take_lease` fences
  each step): lapse the passes that ran out (and renew those out while the sale is paused
  or its start was moved later: they cannot be used then), expire the product's overdue
  holds, then, under the product's row lock, admit from the head of the line as many as
  the units available allow (`ceil(available × admit_factor / units per pass)`, less the
  passes already out, both read under that lock), or,
  when nothing is available and nothing held, close the room: every open ticket ends
  `sold_out`. A room switched `off` is closed the same way, `CLOSE_BATCH` tickets a step.
- `take_passes` is the gate, in the reservation's own transaction: a valid pass of the same
  shopper is used (→ `reserved`) or the request is refused; `give_back_passes` returns the
  passes of requests that then got no stock, in the same transaction.

Locks (PostgreSQL): a reservation takes its shoppers' ticket rows before the product's row;
the admission lapses passes (ticket rows) and expires overdue holds before it locks the
product's row, and reads the units available and counts the passes out under that lock
(so that no reservation commits between the two); its later UPDATEs of tickets touch only
`waiting` ones, which no reservation locks.
"""

from __future__ import annotations

import bisect
import enum
import functools
import hashlib
import hmac
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.domain import inventory
from server.domain.errors import NotAdmitted, ProductNotFound, QueueOff
from server.domain.executor import Executor, Row
from server.domain.model import Event, Product

MODES = ("off", "fifo", "random")
PLACE_BITS = 20
LEASE_NAME = "admitter"
# Drawn places (random rooms, before the start): the first DRAWN_BITS bits of the keyed
# hash, less 2^DRAWN_BITS: all in [-2^62, 0), below every arrival place (>= 0).
DRAWN_BITS = 62
# "Still waiting" / "still open" in an UPDATE of the tickets a subquery chose, said without
# an equality on `state`: with one, SQLite walks the whole line's index (product, state) to
# find them (1 s for 100,000 waiting) instead of the primary key's (product, shopper);
# PostgreSQL, whose READ COMMITTED re-reads a row changed meanwhile (a shopper who left),
# needs the condition there. Equal to `state = 'waiting'` by the table's CHECK.
STILL_WAITING = "state NOT IN ('admitted', 'reserved', 'sold_out', 'lapsed', 'left')"
STILL_OPEN = "state NOT IN ('reserved', 'sold_out', 'lapsed', 'left')"
# Open tickets a step closes at most in a room switched `off` (the rest: the next steps).
CLOSE_BATCH = 2000
# Shoppers per `IN (…)` list.
CHUNK = 500
# The admissions an estimated wait is taken from: the last minute's.
RATE_WINDOW_MS = 60_000


class TicketState(enum.StrEnum):
    WAITING = "waiting"
    ADMITTED = "admitted"
    RESERVED = "reserved"
    SOLD_OUT = "sold_out"
    LAPSED = "lapsed"
    LEFT = "left"


OPEN = (TicketState.WAITING, TicketState.ADMITTED)

TICKET = "product_id, shopper_id, place, state, joined_at, admitted_at, pass_expires_at, ended_at"


@dataclass(frozen=True, slots=True)
class Ticket:
    """A shopper's place in a product's waiting room. Times are ms."""

    product_id: int
    shopper_id: str
    place: int
    state: TicketState
    joined_at: int
    admitted_at: int | None = None
    pass_expires_at: int | None = None
    ended_at: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> Ticket:
        return cls(
            product_id=int(row["product_id"]),
            shopper_id=str(row["shopper_id"]),
            place=int(row["place"]),
            state=TicketState(row["state"]),
            joined_at=int(row["joined_at"]),
            admitted_at=_int(row["admitted_at"]),
            pass_expires_at=_int(row["pass_expires_at"]),
            ended_at=_int(row["ended_at"]),
        )

    def has_pass(self, now: int) -> bool:
        return (
            self.state is TicketState.ADMITTED
            and self.pass_expires_at is not None
            and self.pass_expires_at > now
        )


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class RoomChanged:
    """News of a product's room, published after commit: how many wait and hold passes,
    and whose tickets changed (`shoppers`; `everyone`: too many to name, or all of them).
    `joined`: shoppers whose tickets a join has just made waiting, at the back of the line
    or in their drawn places: that moves nobody else, and a page already holding a waiting
    ticket of theirs has nothing to learn from it (server/live/hub.py). `closed`: shoppers
    whose open ticket (waiting or admitted) a step ended `sold_out` at `closed_at` (ms),
    nothing else of it changed: a hub tells their pages so from the news alone, without
    reading the room again (a room of 15,000 that sold out was read whole by every web
    process, then told). `passed`: shoppers whose waiting ticket a step admitted at
    `passed_at` with a pass until `pass_until` (ms), told from the news alone as well (the
    first admissions of a sale waited up to a second for reads on a loop busy with its
    joins). `step`: the number of the admission step whose news it is (`Admission.number`;
    None for news of joins, leaves and passes used, which carry no counts): a room's steps
    are numbered in the order they committed, so a hub tells a step's news only if it is
    newer than any it has told of that room (server/live/hub.py), whichever process ran
    it and in whatever order Redis brings it."""

    product_id: int
    # None: not counted (a join or a leave; the next admission step counts).
    waiting: int | None
    admitted: int | None
    shoppers: frozenset[str] = frozenset()
    everyone: bool = False
    joined: frozenset[str] = frozenset()
    closed: frozenset[str] = frozenset()
    closed_at: int | None = None
    passed: frozenset[str] = frozenset()
    passed_at: int | None = None
    pass_until: int | None = None
    step: int | None = None

    def merged(self, later: RoomChanged) -> RoomChanged:
        """This news and `later` news of the same room, as one (of the newer `step`). The
        publisher merges a step's news only with other steps' (news without a step, joins
        named, would be dropped with it as not newer). Closes at two moments
        cannot be one `closed_at`: the earlier's shoppers are then named in `shoppers`
        (their tickets read again)."""
        closed, closed_at, shoppers = later.closed, later.closed_at, self.shoppers | later.shoppers
        if not closed:
            closed, closed_at = self.closed, self.closed_at
        elif self.closed and self.closed_at == later.closed_at:
            closed = self.closed | later.closed
        elif self.closed:
            shoppers |= self.closed
        passed, passed_at, pass_until = later.passed, later.passed_at, later.pass_until
        if not passed:
            passed, passed_at, pass_until = self.passed, self.passed_at, self.pass_until
        elif self.passed and self.passed_at == later.passed_at:
            passed = self.passed | later.passed
        elif self.passed:
            shoppers |= self.passed
        # Admitted and closed in one message: which came last is not said; read them.
        both = passed & closed
        if both:
            shoppers |= both
            passed, closed = passed - both, closed - both
        return RoomChanged(
            self.product_id,
            self.waiting if later.waiting is None else later.waiting,
            self.admitted if later.admitted is None else later.admitted,
            shoppers,
            self.everyone or later.everyone,
            self.joined | later.joined,
            closed,
            closed_at,
            passed,
            passed_at,
            pass_until,
            max(self.step or 0, later.step or 0) or None,
        )


def opens_at(product: Product, opens_ms: int) -> int | None:
    """When the product's room opens (ms): `opens_ms` before its sale starts; None when the
    sale has no start time (the room is a waitlist, open whenever the product has one)."""
    if product.sale_starts_at is None:
        return None
    return product.sale_starts_at - opens_ms


def draws(product: Product) -> bool:
    """Whether those who join the product's line before its start are put in a random
    order (a `random` room with a start time)."""
    return product.queue == "random" and product.sale_starts_at is not None


def order_hidden(product: Product, now: int) -> bool:
    """Whether positions in the product's line are not shown now: a `random` room before
    its start, whose drawn places are already in order (showing them would reveal the
    draw before the start)."""
    return draws(product) and product.sale_starts_at is not None and now < product.sale_starts_at


def drawn_place(key: bytes, starts: int, shopper_id: str) -> int:
    """The place of `shopper_id` joining a `random` room before its start `starts` (the
    product's `sale_starts_at`, ms): the first `DRAWN_BITS` bits of
    HMAC-SHA256(`key`, f"{starts}:{shopper id}"), less 2^DRAWN_BITS, so in [-2^62, 0),
    before every arrival place. For a secret key this orders any set of shoppers in a
    uniformly random permutation; the same shopper gets the same place for the same start
    (two of 100,000 share one with odds of about 1 in 10^9; the line then orders them by
    shopper id), and an independent one for another start: each sale of the product (a
    drop) has its own order, not the last one's again."""
    message = f"{starts}:{shopper_id}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> (64 - DRAWN_BITS)) - (1 << DRAWN_BITS)


def arrival_place(now: int) -> int:
    """An arrival place: `now` (ms) times 2^20 plus 20 random bits; >= 0."""
    return (now << PLACE_BITS) | secrets.randbits(PLACE_BITS)


async def room_key(conn: Executor, product_id: int, *, new: bytes | None = None) -> bytes:
    """The room's secret key (`queue_rooms.room_key`), made now (random, or `new`: tests
    fix it) if it has none, in the caller's write transaction. Never changes once made."""
    row = await conn.fetch_one(
        "SELECT room_key FROM queue_rooms WHERE product_id = :p", {"p": product_id}
    )
    if row is not None and row["room_key"]:
        return bytes.fromhex(str(row["room_key"]))
    row = await conn.fetch_one(
        "INSERT INTO queue_rooms (product_id, room_key) VALUES (:p, :key) "
        "ON CONFLICT (product_id) DO UPDATE SET "
        "room_key = COALESCE(queue_rooms.room_key, excluded.room_key) RETURNING room_key",
        {"p": product_id, "key": (new or secrets.token_bytes(32)).hex()},
    )
    assert row is not None
    return bytes.fromhex(str(row["room_key"]))


# -- shoppers: join, read, leave ------------------------------------------------------------


# A room that has closed, as `admit` closes it: the sale ended, or it is open (started, not
# paused) with nothing available and nothing held. A ticket made in it ends `sold_out` at
# once, in its insert: it is told so in the join's answer, and no admission step has to
# close it (nor every page of the room hear of it) after the sale.
_CLOSED = (
    "(sale_ends_at IS NOT NULL AND sale_ends_at <= :now) OR ((sale_starts_at IS NULL "
    "OR sale_starts_at <= :now) AND paused_at IS NULL AND available_stock <= 0 "
    "AND held_units <= 0)"
)


async def join(
    conn: Executor,
    product_id: int,
    shopper_id: str,
    *,
    now: int,
    key: bytes | None = None,
    starts: int | None = None,
    count: bool = True,
    arrived: int | None = None,
) -> tuple[Ticket, bool]:
    """The shopper's ticket, made now if they have none (one insert), and whether it was
    made now. A ticket that ended `left`, `sold_out` or `lapsed` (a turn not taken: the
    page says "join again") is opened again; any other is returned as it is (one ticket
    per shopper per product). Its place is decided by the insert, from the product's row
    as it is then: its `drawn_place` in a `random` room before its start (the same one
    as before, for a shopper who left and joins again before the same start), an
    `arrival_place` at the back otherwise. `key`: the room's (`room_key`; read here when
    not given). `starts`: the sale's start the caller expects (ms; a catalog's copy),
    only a guess: the insert draws only when the row's start is that one, and otherwise
    inserts nothing, reads the row's start and tries again, so a place is always drawn
    for the start the row has in the insert's transaction. In a room that has closed
    (`_CLOSED`: nothing left to sell and nothing held, or the sale ended) the ticket is
    made `sold_out` at once, as the next admission step would have ended it. A ticket
    made `waiting` adds one to the room's count of those waiting (`add_waiting`), unless
    `count` is False: then the
    caller adds them, before its transaction commits (a batch of joins adds them once per
    room, after its tickets: see `add_waiting` on lock order). `arrived`: when the join
    arrived (ms; None: `now`), the millisecond its arrival place is made of, and before a
    `random` room's start, what draws its place (as `join_opened_many`). A product whose
    row says it has no room (`queue` `off`, as the operator may switch it at any time)
    is given no ticket: the insert is guarded by it, so a room switched off after the
    caller's check (a catalog's copy) makes none. Raises ProductNotFound, QueueOff."""
    if key is None:
        key = await room_key(conn, product_id)
    arrived = now if arrived is None else min(arrived, now)
    for _ in range(3):
        row = await conn.fetch_one(
            "INSERT INTO queue_tickets "
            "(product_id, shopper_id, place, state, joined_at, ended_at) "
            "SELECT id, CAST(:s AS TEXT), CASE WHEN queue = 'random' "
            "AND sale_starts_at > CAST(:arrived AS BIGINT) "
            "THEN CAST(:drawn AS BIGINT) ELSE CAST(:arrival AS BIGINT) END, "
            f"CASE WHEN {_CLOSED} THEN 'sold_out' ELSE 'waiting' END, CAST(:now AS BIGINT), "
            f"CASE WHEN {_CLOSED} THEN CAST(:now AS BIGINT) END "
            "FROM products WHERE id = :p AND queue <> 'off' AND (queue <> 'random' "
            "OR sale_starts_at IS NULL OR sale_starts_at <= CAST(:arrived AS BIGINT) "
            "OR sale_starts_at = CAST(:starts AS BIGINT)) "
            "ON CONFLICT (product_id, shopper_id) DO UPDATE SET state = excluded.state, "
            "place = excluded.place, joined_at = excluded.joined_at, admitted_at = NULL, "
            "pass_expires_at = NULL, ended_at = excluded.ended_at "
            "WHERE queue_tickets.state IN ('left', 'sold_out', 'lapsed') "
            f"RETURNING {TICKET}",
            {
                "p": product_id,
                "s": shopper_id,
                "drawn": drawn_place(key, starts if starts is not None else -1, shopper_id),
                "starts": starts if starts is not None else -1,
                "arrival": arrival_place(arrived),
                "arrived": arrived,
                "now": now,
            },
        )
        if row is not None:
            ticket = Ticket.from_row(row)
            if count and ticket.state is TicketState.WAITING:
                await add_waiting(conn, product_id, 1)
            return ticket, True
        product = await conn.fetch_one(
            "SELECT queue, sale_starts_at FROM products WHERE id = :p", {"p": product_id}
        )
        if product is None:
            raise ProductNotFound(product_id)
        if product["queue"] == "off":
            raise QueueOff(product_id)
        actual = product["sale_starts_at"]
        drawing = product["queue"] == "random" and actual is not None and actual > arrived
        if not drawing or actual == starts:
            break
        starts = int(actual)  # drawn for another start: nothing was inserted, again
    existing = await get_ticket(conn, product_id, shopper_id)
    if existing is None:  # no product's row to select from
        raise ProductNotFound(product_id)
    return existing, False


@dataclass(frozen=True, slots=True)
class Opening:
    """What a join's new ticket takes from its product's row, read once for a batch of
    joins in their write transaction (`opening`): the room's `queue` mode (`off`: there is
    no room, whatever the caller's copy of the product said), the start a `random` room
    draws places for (None: it does not draw now) and whether the room has closed
    (`_CLOSED`).
    `random_starts`: a `random` room's start (ms; None: not `random`, or no start),
    whether or not it has passed: a join that arrived before it draws its place for it
    though its batch reached the database after it (`join_opened_many`)."""

    product_id: int
    queue: str
    draws_for: int | None
    closed: bool
    random_starts: int | None = None


async def opening(conn: Executor, product_id: int, *, now: int) -> Opening | None:
    """The product's `Opening` now (`now`: ms); None when there is no such product."""
    row = await conn.fetch_one(
        f"SELECT queue, sale_starts_at, CASE WHEN {_CLOSED} THEN 1 ELSE 0 END AS closed "
        "FROM products WHERE id = :p",
        {"p": product_id, "now": now},
    )
    if row is None:
        return None
    starts = row["sale_starts_at"]
    random_starts = int(starts) if row["queue"] == "random" and starts is not None else None
    draws = random_starts is not None and random_starts > now
    return Opening(
        product_id,
        str(row["queue"]),
        random_starts if draws else None,
        bool(row["closed"]),
        random_starts,
    )


# The largest `join_opened_many` statement, in joins; each statement takes a power of two
# of them up to this, so a database that prepares statements (PostgreSQL) sees at most nine
# texts, whatever the batches' sizes.
JOIN_ROWS = 256


@functools.lru_cache(maxsize=16)
def _join_opened_many_sql(count: int) -> str:
    """`join_opened_many`'s insert for `count` shoppers: their ids and places as a VALUES list
    (`:s0, :d0, :s1, :d1, …`; a VALUES list's columns are `column1`, `column2` on both
    databases), returning the shoppers whose tickets it made."""
    rows = ", ".join(f"(CAST(:s{n} AS TEXT), CAST(:d{n} AS BIGINT))" for n in range(count))
    return (
        "INSERT INTO queue_tickets (product_id, shopper_id, place, state, joined_at, ended_at) "
        "SELECT products.id, joins.column1, joins.column2, CAST(:state AS TEXT), "
        "CAST(:now AS BIGINT), CAST(:ended AS BIGINT) "
        f"FROM products, (VALUES {rows}) AS joins WHERE products.id = :p AND queue <> 'off' "
        f"AND (CASE WHEN {_CLOSED} THEN 'sold_out' ELSE 'waiting' END) = CAST(:state AS TEXT) "
        "AND (CASE WHEN queue = 'random' AND sale_starts_at IS NOT NULL THEN sale_starts_at "
        "ELSE -1 END) = CAST(:random_starts AS BIGINT) "
        "ON CONFLICT (product_id, shopper_id) DO UPDATE SET state = excluded.state, "
        "place = excluded.place, joined_at = excluded.joined_at, admitted_at = NULL, "
        "pass_expires_at = NULL, ended_at = excluded.ended_at "
        "WHERE queue_tickets.state IN ('left', 'sold_out', 'lapsed') "
        "RETURNING queue_tickets.shopper_id"
    )


def _powers_of_two(count: int, largest: int) -> list[int]:
    """`count` as a sum of powers of two, none over `largest` (itself one), largest first."""
    sizes = [largest] * (count // largest)
    rest = count % largest
    bit = largest
    while rest:
        if rest & bit:
            sizes.append(bit)
            rest -= bit
        bit >>= 1
    return sizes


async def join_opened_many(
    conn: Executor,
    room: Opening,
    shopper_ids: Sequence[str],
    *,
    now: int,
    key: bytes,
    arrived: Sequence[int] | None = None,
) -> list[tuple[Ticket, bool] | QueueOff]:
    """`join` for shoppers of one room, in a batch of joins that read the product's
    `Opening` in the same transaction: each new ticket is decided here from it (its place:
    `drawn_place` for the start it draws for, or an `arrival_place`; `sold_out` at once in
    a room that has closed) and inserted without being read back (the read-back,
    RETURNING every column, was about a third of a join's insert on SQLite), by one
    statement per power of two of the shoppers (`JOIN_ROWS` at most), guarded by the same
    conditions on the product's row, so what it made is what the `Opening` said. A
    result for each of `shopper_ids`, in its order: the ticket and whether this made it,
    or QueueOff for a join the product's row refused because the room is `off`. A shopper
    named twice is joined once: the second gets the same ticket, not made by it. A shopper
    whose ticket the statement did not make (one open already; on PostgreSQL, the product's
    row changed since `opening` read it: a room switched `off` among them) is `join`ed as
    before, one by one, which reads the ticket back, with the same arrival millisecond.
    `key`: the room's (`room_key`). `arrived`: when each join arrived (ms, one per
    `shopper_ids`; None: `now`), the millisecond its arrival place is made of (a shopper
    named twice: the first), since `fifo` is arrival order and a batch's joins arrived
    while the batch before it was in the database, tens of ms apart in a storm.

    Why: in a sale's first second the SQLite writer ran a join batch's 256 inserts one by
    one, and between two statements its thread waits for the GIL from the busy event loop
    (up to the switch interval, 0.2 ms), with the write lock held: ~50 ms a batch, a
    ceiling of about 5,000 joins a second in one process, and with two processes each
    waiting for the other's lock. One statement waits once. Does not count the tickets in
    `add_waiting` (the caller does, once per room). Raises ProductNotFound, and QueueOff
    when the `Opening` says the room is `off` (every join of it refused, none made)."""
    if room.queue == "off":
        raise QueueOff(room.product_id)
    if arrived is None:
        arrived = [now] * len(shopper_ids)
    first_arrived: dict[str, int] = {}
    for shopper_id, at in zip(shopper_ids, arrived, strict=True):
        first_arrived.setdefault(shopper_id, min(at, now))
    unique = list(first_arrived)
    state = TicketState.SOLD_OUT if room.closed else TicketState.WAITING
    ended = now if room.closed else None
    # A `random` room's place is drawn for a join that arrived before its start, though
    # its batch came after it (README: everyone who joined before the start is in a
    # random order); an arrival place otherwise.
    starts = room.random_starts
    places = [
        drawn_place(key, starts, s)
        if starts is not None and first_arrived[s] < starts
        else arrival_place(first_arrived[s])
        for s in unique
    ]
    fixed = {
        "p": room.product_id,
        "state": state.value,
        "now": now,
        "ended": ended,
        "random_starts": starts if starts is not None else -1,
    }
    place_of = dict(zip(unique, places, strict=True))
    # The rows in shopper id order, whatever the order asked: two processes' statements
    # naming the same shoppers then take their rows in one order (on PostgreSQL each waits
    # for the other's, never each for a row the other holds: a deadlock).
    in_order = sorted(unique)
    made: set[str] = set()
    at = 0
    for size in _powers_of_two(len(unique), JOIN_ROWS):
        values = dict(fixed)
        for n in range(size):
            values[f"s{n}"] = in_order[at + n]
            values[f"d{n}"] = place_of[in_order[at + n]]
        rows = await conn.fetch_all(_join_opened_many_sql(size), values)
        made.update(str(row["shopper_id"]) for row in rows)
        at += size
    tickets: dict[str, tuple[Ticket, bool] | QueueOff] = {}
    for shopper_id, place in zip(unique, places, strict=True):
        if shopper_id in made:
            ticket = Ticket(room.product_id, shopper_id, place, state, now, ended_at=ended)
            tickets[shopper_id] = (ticket, True)
            continue
        try:
            tickets[shopper_id] = await join(
                conn,
                room.product_id,
                shopper_id,
                now=now,
                key=key,
                starts=room.random_starts,
                count=False,
                arrived=first_arrived[shopper_id],
            )
        except QueueOff as exc:
            tickets[shopper_id] = exc
    answers: list[tuple[Ticket, bool] | QueueOff] = []
    told: set[str] = set()
    for shopper_id in shopper_ids:
        answer = tickets[shopper_id]
        if isinstance(answer, QueueOff):
            answers.append(answer)
            continue
        ticket, created = answer
        answers.append((ticket, created and shopper_id not in told))
        told.add(shopper_id)
    return answers


async def get_ticket(conn: Executor, product_id: int, shopper_id: str) -> Ticket | None:
    row = await conn.fetch_one(
        f"SELECT {TICKET} FROM queue_tickets WHERE product_id = :p AND shopper_id = :s",
        {"p": product_id, "s": shopper_id},
    )
    return None if row is None else Ticket.from_row(row)


# A shopper's tickets, open ones first, then the latest joined (`tickets_of_shopper`).
TICKETS_OF_SHOPPER = (
    f"SELECT {TICKET} FROM (SELECT {TICKET} FROM queue_tickets "
    "WHERE shopper_id = :s AND filed_at IS NULL "
    f"UNION ALL SELECT {TICKET} FROM queue_tickets "
    "WHERE shopper_id = :s AND filed_at IS NOT NULL) AS theirs "
    "ORDER BY CASE WHEN state IN ('waiting', 'admitted') THEN 0 ELSE 1 END, "
    "joined_at DESC LIMIT :limit"
)


async def tickets_of_shopper(conn: Executor, shopper_id: str, *, limit: int = 100) -> list[Ticket]:
    """A shopper's tickets (one per product), at most `limit`, open ones first, then the
    latest joined. Two index seeks: the live tickets' and the filed ones' (migration 0021:
    a sale's joins write only the small live index; `retention.file_tickets` moves ended
    ones to the filed index later). Every ticket is in exactly one of the two."""
    rows = await conn.fetch_all(TICKETS_OF_SHOPPER, {"s": shopper_id, "limit": limit})
    return [Ticket.from_row(row) for row in rows]


async def tickets_of(conn: Executor, product_id: int, shopper_ids: Sequence[str]) -> list[Ticket]:
    """The tickets of `shopper_ids` for one product (those who have one)."""
    found: list[Ticket] = []
    for start in range(0, len(shopper_ids), CHUNK):
        chunk = shopper_ids[start : start + CHUNK]
        names = {f"s{n}": s for n, s in enumerate(chunk)}
        rows = await conn.fetch_all(
            f"SELECT {TICKET} FROM queue_tickets WHERE product_id = :p "
            f"AND shopper_id IN ({', '.join(':' + n for n in names)})",
            {"p": product_id, **names},
        )
        found.extend(Ticket.from_row(row) for row in rows)
    return found


async def tickets_of_room(conn: Executor, product_id: int) -> list[Ticket]:
    """Every ticket of the product's room (one per shopper who ever joined it; ended ones
    until retention takes them), in one statement: for news of the whole room (it closed),
    where naming each page's shopper would take a statement per `CHUNK` of them."""
    rows = await conn.fetch_all(
        f"SELECT {TICKET} FROM queue_tickets WHERE product_id = :p", {"p": product_id}
    )
    return [Ticket.from_row(row) for row in rows]


async def leave(conn: Executor, product_id: int, shopper_id: str, *, now: int) -> Ticket | None:
    """Leave the line: a waiting or admitted ticket ends `left` (an unused pass goes to the
    next in line; a waiting one is taken off the room's count, `add_waiting`). Returns the
    ticket as it is now; None when the shopper has none."""
    row = await conn.fetch_one(
        "UPDATE queue_tickets SET state = 'left', ended_at = :now "
        "WHERE product_id = :p AND shopper_id = :s AND state IN ('waiting', 'admitted') "
        f"RETURNING {TICKET}",
        {"p": product_id, "s": shopper_id, "now": now},
    )
    if row is not None:
        ticket = Ticket.from_row(row)
        if was_waiting(ticket):
            await add_waiting(conn, product_id, -1)
        return ticket
    return await get_ticket(conn, product_id, shopper_id)


def was_waiting(ticket: Ticket) -> bool:
    """Whether `ticket`, which has just ended (left, sold out), was waiting rather than
    admitted: a waiting ticket was never admitted (`admitted_at` is NULL: a join, and a
    join again, set it NULL; only an admission sets it, along with `admitted`)."""
    return ticket.admitted_at is None


async def add_waiting(conn: Executor, product_id: int, delta: int) -> None:
    """Add `delta` to the room's count of those waiting (`queue_rooms.waiting`, migration
    0017), in the caller's transaction: every change of a ticket to or from `waiting` does,
    so the count equals `COUNT(*)` of the waiting tickets at every commit. On PostgreSQL it
    locks the room's row until commit: callers add after their ticket rows (the admission
    does too), never before, so that the two never wait for each other in turn."""
    if delta == 0:
        return
    await conn.execute(
        "INSERT INTO queue_rooms (product_id, waiting) VALUES (:p, :d) "
        "ON CONFLICT (product_id) DO UPDATE SET waiting = queue_rooms.waiting + excluded.waiting",
        {"p": product_id, "d": delta},
    )


async def waiting_count(conn: Executor, product_id: int) -> int:
    """How many wait in the product's room, from its count (`add_waiting`): one row read,
    however long the line."""
    row = await conn.fetch_one(
        "SELECT waiting FROM queue_rooms WHERE product_id = :p", {"p": product_id}
    )
    return 0 if row is None else int(row["waiting"])


async def room_counts(conn: Executor, product_id: int) -> tuple[int, int]:
    """The product's room now: (how many wait, how many hold a pass), the figures of its
    `queue` frames (`Admission.waiting`, `Admission.passes`). One statement, so both are of
    one snapshot (on PostgreSQL a statement's, outside a transaction; two statements saw an
    admission step between them: its tickets counted both waiting and admitted): one row
    and the index of open tickets (as many admitted as the units allow), however long the
    line."""
    row = await conn.fetch_one(
        "SELECT (SELECT waiting FROM queue_rooms WHERE product_id = :p) AS waiting, "
        "(SELECT COUNT(*) FROM queue_tickets WHERE product_id = :p AND state = :state) "
        "AS admitted",
        {"p": product_id, "state": TicketState.ADMITTED.value},
    )
    assert row is not None
    waiting = row["waiting"]
    return 0 if waiting is None else int(waiting), int(row["admitted"])


# -- the line -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lineup:
    """A product's line as read at `at` (ms): the places of those waiting, in order; how
    many hold a pass; the admissions of the last `RATE_WINDOW_MS` and when the first of
    them was."""

    product_id: int
    at: int
    places: tuple[int, ...]
    admitted: int
    recent_admissions: int = 0
    first_recent_admission: int | None = None

    @property
    def waiting(self) -> int:
        return len(self.places)

    def ahead_of(self, place: int) -> int:
        """How many wait ahead of `place`."""
        return bisect.bisect_left(self.places, place)

    def admissions_per_second(self) -> float | None:
        """The recent admission rate, None when nobody was admitted in the window."""
        if not self.recent_admissions or self.first_recent_admission is None:
            return None
        span_ms = max(self.at - self.first_recent_admission, 5_000)
        return self.recent_admissions * 1000 / span_ms


async def lineup(conn: Executor, product_id: int, *, now: int, concat: bool = False) -> Lineup:
    """The product's line now: one ordered scan of the index of those waiting, and counts.
    `concat` (SQLite only: `group_concat`): the places come as one text, a row where there
    were as many rows as people waiting. Each row is a step of sqlite3 with the GIL let go
    and taken back, and a row object: with 15,000 waiting a read took 38-44 ms of a web
    process, 10-14 ms as one text (in process; the waiting room's bench reads its line every
    0.2-1 s of a sale, beside its joins)."""
    if concat:
        row = await conn.fetch_one(
            "SELECT group_concat(place) AS places FROM queue_tickets "
            "WHERE product_id = :p AND state = 'waiting'",
            {"p": product_id},
        )
        text = None if row is None else row["places"]
        # Sorted here: group_concat's order is not promised (on an ordered list, one pass).
        places = tuple(sorted(map(int, text.split(",")))) if text else ()
    else:
        rows = await conn.fetch_all(
            "SELECT place FROM queue_tickets WHERE product_id = :p AND state = 'waiting' "
            "ORDER BY place",
            {"p": product_id},
        )
        places = tuple(int(row["place"]) for row in rows)
    admitted = await _count(conn, product_id, TicketState.ADMITTED)
    recent = await conn.fetch_one(
        "SELECT COUNT(*) AS n, MIN(admitted_at) AS first FROM queue_tickets "
        "WHERE product_id = :p AND admitted_at IS NOT NULL AND admitted_at >= :since",
        {"p": product_id, "since": now - RATE_WINDOW_MS},
    )
    return Lineup(
        product_id=product_id,
        at=now,
        places=places,
        admitted=admitted,
        recent_admissions=0 if recent is None else int(recent["n"]),
        first_recent_admission=None if recent is None else _int(recent["first"]),
    )


async def open_tickets(conn: Executor, product_id: int) -> int:
    """How many tickets of the product are waiting or admitted."""
    row = await conn.fetch_one(
        "SELECT COUNT(*) AS n FROM queue_tickets WHERE product_id = :p "
        "AND state IN ('waiting', 'admitted')",
        {"p": product_id},
    )
    return 0 if row is None else int(row["n"])


async def _count(conn: Executor, product_id: int, state: TicketState) -> int:
    row = await conn.fetch_one(
        "SELECT COUNT(*) AS n FROM queue_tickets WHERE product_id = :p AND state = :state",
        {"p": product_id, "state": state.value},
    )
    return 0 if row is None else int(row["n"])


async def position(conn: Executor, ticket: Ticket) -> int | None:
    """A waiting ticket's place in line (1 = next), counted now; None for any other."""
    if ticket.state is not TicketState.WAITING:
        return None
    row = await conn.fetch_one(
        "SELECT COUNT(*) AS n FROM queue_tickets WHERE product_id = :p AND state = 'waiting' "
        "AND place < :place",
        {"p": ticket.product_id, "place": ticket.place},
    )
    return 1 + (0 if row is None else int(row["n"]))


# -- the gate, in the reservation's transaction ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Gate:
    """A product's room in front of its reservations: the units a pass lets its shopper take
    (`units_per_pass`), and the units requests without a pass may still take (`free`: a
    waitlist nobody waits in, with more units available than its admitted passes may
    take; 0 otherwise)."""

    per_pass: int
    free: int = 0


async def gated(conn: Executor, product_id: int, product: Product | None = None) -> Gate | None:
    """Whether reservations of the product need a pass now: None when not. They do when it
    has a room, and either its sale has a start time (the room is in front of the whole
    sale) or it is a waitlist (no start time) with someone in it: while anyone waits, units
    go to those waiting first; while only admitted shoppers are in it, the units beyond
    what their passes may take are anyone's (`Gate.free`). `product`: its row as this
    transaction has just read it (else it is read here)."""
    if product is None or product.id != product_id:
        read = await conn.fetch_one(
            "SELECT queue, sale_starts_at, max_per_shopper FROM products WHERE id = :p",
            {"p": product_id},
        )
        if read is None:
            return None
        queue, starts, limit = read["queue"], read["sale_starts_at"], read["max_per_shopper"]
    else:
        queue, starts, limit = product.queue, product.sale_starts_at, product.max_per_shopper
    if queue == "off":
        return None
    per_pass = int(limit or 1)
    if starts is not None:
        return Gate(per_pass)
    # The units, whether anyone waits and the passes out, in one statement: on PostgreSQL
    # (READ COMMITTED) each statement sees the commits made before it, and pass holders'
    # reservations committed between a read of the units (`product`, or a statement of its
    # own) and the count of passes counted as passes fewer out but not as units fewer:
    # `Gate.free` too large by as many, walk-ins taking what the passes were promised
    # and the pass holders refused `insufficient_stock` after (the attacker's review,
    # 12-02). Not a lock: `take_passes` locks tickets after this, before the product.
    row = await conn.fetch_one(
        "SELECT available_stock, CASE WHEN EXISTS (SELECT 1 FROM queue_tickets "
        "WHERE product_id = :p AND state = 'waiting') THEN 1 ELSE 0 END AS waiting, "
        "(SELECT COUNT(*) FROM queue_tickets WHERE product_id = :p AND state = 'admitted') "
        "AS admitted FROM products WHERE id = :p",
        {"p": product_id},
    )
    if row is None:
        return None
    if int(row["waiting"]):
        return Gate(per_pass)
    admitted = int(row["admitted"])
    if admitted == 0:
        return None
    return Gate(per_pass, max(int(row["available_stock"]) - admitted * per_pass, 0))


async def take_passes(
    conn: Executor,
    product_id: int,
    wanted_by: Sequence[tuple[str | None, int]],
    *,
    now: int,
    product: Product | None = None,
) -> list[NotAdmitted | bool] | None:
    """The gate: None when the product needs no pass now (`gated`, from `product` when the
    transaction has just read it); otherwise, per request (its shopper and the units it
    asks for), True when it had a valid pass, which it has now used (`reserved`), False
    when it may go on without one (`Gate.free` units, first come first served), or why it
    is refused. A shopper's pass is good for one reservation of at most `units_per_pass`
    units: a second request of theirs in the same batch has none, and a request for more
    is refused with the pass left unused (the others admitted with it were admitted for
    those units)."""
    gate = await gated(conn, product_id, product)
    if gate is None:
        return None
    per_pass = gate.per_pass
    wanted = sorted({s for s, units in wanted_by if s is not None and units <= per_pass})
    used: set[str] = set()
    for start in range(0, len(wanted), CHUNK):
        names = {f"s{n}": s for n, s in enumerate(wanted[start : start + CHUNK])}
        rows = await conn.fetch_all(
            "UPDATE queue_tickets SET state = 'reserved', ended_at = :now "
            f"WHERE product_id = :p AND shopper_id IN ({', '.join(':' + n for n in names)}) "
            "AND state = 'admitted' AND pass_expires_at > :now RETURNING shopper_id",
            {"p": product_id, "now": now, **names},
        )
        used.update(str(row["shopper_id"]) for row in rows)
    free = gate.free
    answers: list[NotAdmitted | bool] = []
    for shopper, units in wanted_by:
        if shopper is not None and shopper in used and units <= per_pass:
            used.discard(shopper)
            answers.append(True)
            continue
        ticket = None if shopper is None else await get_ticket(conn, product_id, shopper)
        if ticket is not None and ticket.has_pass(now) and units > per_pass:
            answers.append(NotAdmitted(None, TicketState.ADMITTED.value, units=per_pass))
        elif units <= free:
            free -= units
            answers.append(False)
        else:
            answers.append(await refusal(conn, product_id, shopper, now=now))
    return answers


async def give_back_passes(conn: Executor, product_id: int, shopper_ids: Sequence[str]) -> None:
    """Passes used in this transaction by requests that then got nothing (no stock, over
    the limit): admitted again, until the pass's own expiry."""
    wanted = sorted(set(shopper_ids))
    for start in range(0, len(wanted), CHUNK):
        names = {f"s{n}": s for n, s in enumerate(wanted[start : start + CHUNK])}
        await conn.execute(
            "UPDATE queue_tickets SET state = 'admitted', ended_at = NULL "
            f"WHERE product_id = :p AND shopper_id IN ({', '.join(':' + n for n in names)}) "
            "AND state = 'reserved'",
            {"p": product_id, **names},
        )


async def refusal(
    conn: Executor, product_id: int, shopper_id: str | None, *, now: int
) -> NotAdmitted:
    """Why a request without a valid pass is refused: its shopper's position, when waiting
    in a line whose order is shown (`order_hidden`), else the ticket's state. `now`: ms."""
    ticket = None if shopper_id is None else await get_ticket(conn, product_id, shopper_id)
    if ticket is None:
        return NotAdmitted(None)
    if ticket.state is TicketState.ADMITTED:
        return NotAdmitted(None, TicketState.LAPSED.value)  # a pass that has run out
    if ticket.state is not TicketState.WAITING:
        return NotAdmitted(None, ticket.state.value)
    product = await inventory.get_product(conn, product_id)
    if product is not None and order_hidden(product, now):
        return NotAdmitted(None, TicketState.WAITING.value)
    return NotAdmitted(await position(conn, ticket), TicketState.WAITING.value)


# -- the lease: one admitter at a time ------------------------------------------------------


async def take_lease(conn: Executor, holder: str, *, now: int, lease_ms: int) -> bool:
    """Take or renew the admitter's lease for `holder` until `now + lease_ms`; False when
    another process holds it. The first statement of every admission's transaction: on
    PostgreSQL the row stays locked until commit, so no other process can take the lease
    over while a step it fences is under way."""
    values = {"name": LEASE_NAME, "holder": holder, "now": now, "until": now + lease_ms}
    row = await conn.fetch_one(
        "UPDATE queue_leases SET holder = :holder, expires_at = :until "
        "WHERE name = :name AND (holder = :holder OR expires_at <= :now) RETURNING holder",
        values,
    )
    if row is not None:
        return True
    row = await conn.fetch_one(
        "INSERT INTO queue_leases (name, holder, expires_at) VALUES (:name, :holder, :until) "
        "ON CONFLICT (name) DO NOTHING RETURNING holder",
        {k: v for k, v in values.items() if k != "now"},
    )
    return row is not None


async def lease_holder(conn: Executor, *, now: int) -> str | None:
    """Who holds the admitter's lease now, if anyone."""
    row = await conn.fetch_one(
        "SELECT holder FROM queue_leases WHERE name = :name AND expires_at > :now",
        {"name": LEASE_NAME, "now": now},
    )
    return None if row is None else str(row["holder"])


# -- admission ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Closed:
    """The tickets a step ended `sold_out`: their shoppers, the moment (ms; None when it
    closed none) and how many of them were waiting (the others held passes). Only what
    the step's news and the room's count need: a room that sells out closes every ticket
    in it at once (15,000 in the waiting room's bench), and reading each back whole, as a
    `Ticket`, was about half of that step's time in the writer (in process, 12,000 tickets
    on SQLite: 85-147 ms of its CPU, 40-42 ms for the names alone)."""

    shoppers: tuple[str, ...] = ()
    at: int | None = None
    waiting: int = 0

    def __len__(self) -> int:
        return len(self.shoppers)


@dataclass(slots=True)
class Admission:
    """What one admission step did to a product's room, and the room after it."""

    product: Product | None = None
    admitted: list[Ticket] = field(default_factory=list)
    lapsed: list[Ticket] = field(default_factory=list)
    # Passes renewed because the sale is closed (paused, or not started again).
    renewed: list[Ticket] = field(default_factory=list)
    closed: Closed = field(default_factory=Closed)
    waiting: int = 0
    passes: int = 0
    # Stock events of holds this step expired (published after commit like any).
    events: list[Event] = field(default_factory=list)
    # False: another process holds the lease; nothing was done.
    leased: bool = True
    # The step's number in its room (`queue_rooms.step`): its news carries it.
    number: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.admitted or self.lapsed or self.renewed or self.closed or self.events)

    def news(self) -> RoomChanged | None:
        """The step's news: whom it admitted, lapsed or renewed by name (their tickets are
        read again), whom it closed by name with the moment (`closed_at`: their tickets
        are known from it), and the room's counts."""
        if self.product is None:
            return None
        shoppers = frozenset(t.shopper_id for t in (*self.lapsed, *self.renewed))
        closed = frozenset(self.closed.shoppers)
        first = self.admitted[0] if self.admitted else None
        return RoomChanged(
            self.product.id,
            self.waiting,
            self.passes,
            shoppers=shoppers,
            closed=closed,
            closed_at=self.closed.at,
            passed=frozenset(t.shopper_id for t in self.admitted),
            passed_at=None if first is None else first.admitted_at,
            pass_until=None if first is None else first.pass_expires_at,
            step=self.number,
        )


def units_per_pass(product: Product) -> int:
    """The units a pass lets its shopper take: the limit per shopper; one without one."""
    return product.max_per_shopper or 1


def passes_for(product: Product) -> int:
    """How many passes may be out for the units available now: the units available times
    `admit_factor`, divided by the units a pass may take, rounded up (a unit that fewer
    than a pass's worth are left of still goes to someone)."""
    if product.available_stock <= 0:
        return 0
    exact = product.available_stock * product.admit_factor / units_per_pass(product)
    # Rounded to 9 places first: 100 × 1.1 is 110.00000000000001 in binary floating point,
    # which rounded up would admit one more than the operator asked for.
    return math.ceil(round(exact, 9))


async def admit(
    conn: Executor,
    product_id: int,
    *,
    now: int,
    pass_ms: int,
    holder: str,
    lease_ms: int,
) -> Admission:
    """One admission step for one product, in the caller's write transaction, fenced by
    the lease (`take_lease`: when another process holds it, nothing is done and
    `leased` is False). Nothing is drawn at the start: a random room's line is in order
    from the joins (`drawn_place`). A room switched `off` with tickets still open is
    closed, `CLOSE_BATCH` of them a step (their shoppers reserve without a pass now)."""
    if not await take_lease(conn, holder, now=now, lease_ms=lease_ms):
        return Admission(leased=False)
    product = await inventory.get_product(conn, product_id)
    if product is None:
        return Admission(product=product)
    step = Admission(product=product)
    if product.queue == "off":
        step.closed = await _close(conn, product_id, now=now, limit=CLOSE_BATCH)
        return await _counted(conn, step)
    step.lapsed = await _tickets_where(
        conn,
        "UPDATE queue_tickets SET state = 'lapsed', ended_at = :now WHERE product_id = :p "
        "AND state = 'admitted' AND pass_expires_at <= :now",
        {"p": product_id, "now": now},
    )
    state = product.sale_state(now)
    if state in ("scheduled", "paused"):
        # The sale is closed again (paused, or its start moved later) while passes are
        # out: they cannot be used meanwhile, so their time does not run; each step renews
        # them to a full pass (at most once a second each). They are news, for the pages'
        # countdowns.
        step.renewed = await _tickets_where(
            conn,
            "UPDATE queue_tickets SET pass_expires_at = :until WHERE product_id = :p "
            "AND state = 'admitted' AND pass_expires_at > :now "
            "AND pass_expires_at < :stale",
            {"p": product_id, "now": now, "until": now + pass_ms, "stale": now + pass_ms - 1000},
        )
    if state == "ended":
        step.closed = await _close(conn, product_id, now=now)
    elif state == "open":
        if product.held_units > 0:
            restored = await inventory.expire_overdue_of_product(conn, product_id, now=now)
            if restored is not None:
                product, step.events = restored
                step.product = product
        if product.available_stock <= 0 and product.held_units <= 0:
            step.closed = await _close(conn, product_id, now=now)
        else:
            step.admitted = await _admit_head(conn, step, now=now, pass_ms=pass_ms)
    return await _counted(conn, step)


async def _admit_head(conn: Executor, step: Admission, *, now: int, pass_ms: int) -> list[Ticket]:
    """Admit from the head of the line as many as the units available allow, less the
    passes out, both read under the product's row lock (`inventory.lock_product`), so that
    they are of one moment: a reservation uses its pass (its ticket `reserved`) and takes
    its units in one transaction, but on PostgreSQL (READ COMMITTED) each statement sees
    the commits made before it, and a batch of 83 reservations that committed between a
    read of the product and the count of the passes was counted as 83 passes fewer out but
    not as 83 units fewer available: 83 shoppers too many admitted for 100 units (a bench
    run, 2026-12-02). Locked, the row cannot change until the step commits, and a
    reservation whose pass is used but not yet committed waits for it with its pass still
    counted out. Taken after the step lapsed passes and expired holds (tickets and holds
    before the product, the order every transaction takes them in), and before it changes
    only `waiting` tickets, which no reservation locks. (Closing the room takes no lock:
    it ends `admitted` tickets too, which a reservation waiting for the product may hold.)
    On SQLite the write lock is already held."""
    assert step.product is not None
    product = await inventory.lock_product(conn, step.product.id)
    if product is None:
        return []
    step.product = product
    out = await _count(conn, product.id, TicketState.ADMITTED)
    room = passes_for(product) - out
    if room <= 0:
        return []
    return await _tickets_where(
        conn,
        "UPDATE queue_tickets SET state = 'admitted', admitted_at = :now, "
        "pass_expires_at = :until WHERE product_id = :p "
        "AND shopper_id IN (SELECT shopper_id FROM queue_tickets "
        "WHERE product_id = :p AND state = 'waiting' "
        f"ORDER BY place, shopper_id LIMIT :n) AND {STILL_WAITING}",
        {"p": product.id, "now": now, "until": now + pass_ms, "n": room},
    )


async def _counted(conn: Executor, step: Admission) -> Admission:
    """`step` with the room's figures after it: those it admitted or closed while waiting
    taken off the room's count (as `add_waiting` does, after every ticket it changed), how
    many wait (that count: one row), the step's number (`queue_rooms.step`, one more than
    the room's last step's, whichever process ran that) and how many passes are out
    (counted: as many as the units available allow at most, whatever the line's length)."""
    assert step.product is not None
    product_id = step.product.id
    left = len(step.admitted) + step.closed.waiting
    # The room's count less those, and the step's number (migration 0018), in one upsert
    # (its row is locked after every ticket the step changed: see `add_waiting`).
    row = await conn.fetch_one(
        "INSERT INTO queue_rooms (product_id, waiting, step) VALUES (:p, :d, 1) "
        "ON CONFLICT (product_id) DO UPDATE SET "
        "waiting = queue_rooms.waiting + excluded.waiting, step = queue_rooms.step + 1 "
        "RETURNING waiting, step",
        {"p": product_id, "d": -left},
    )
    assert row is not None
    step.waiting, step.number = int(row["waiting"]), int(row["step"])
    step.passes = await _count(conn, product_id, TicketState.ADMITTED)
    return step


async def _close(conn: Executor, product_id: int, *, now: int, limit: int | None = None) -> Closed:
    """Nothing left to sell, the sale ended, or the room was switched off: every open
    ticket ends `sold_out` (at most `limit` of them, head of the line first). A ticket was
    waiting if it was never admitted (`was_waiting`: `admitted_at` NULL)."""
    returning = "RETURNING shopper_id, admitted_at"
    if limit is None:
        rows = await conn.fetch_all(
            "UPDATE queue_tickets SET state = 'sold_out', ended_at = :now "
            f"WHERE product_id = :p AND state IN ('waiting', 'admitted') {returning}",
            {"p": product_id, "now": now},
        )
    else:
        rows = await conn.fetch_all(
            "UPDATE queue_tickets SET state = 'sold_out', ended_at = :now "
            "WHERE product_id = :p AND shopper_id IN (SELECT shopper_id FROM queue_tickets "
            "WHERE product_id = :p AND state IN ('waiting', 'admitted') "
            f"ORDER BY place, shopper_id LIMIT :n) AND {STILL_OPEN} {returning}",
            {"p": product_id, "now": now, "n": limit},
        )
    if not rows:
        return Closed()
    return Closed(
        tuple(str(row["shopper_id"]) for row in rows),
        now,
        sum(1 for row in rows if row["admitted_at"] is None),
    )


async def _tickets_where(conn: Executor, update: str, values: dict[str, object]) -> list[Ticket]:
    rows = await conn.fetch_all(f"{update} RETURNING {TICKET}", values)
    return [Ticket.from_row(row) for row in rows]


async def queued_products(conn: Executor) -> list[int]:
    """The products whose room has someone in it (a ticket waiting or admitted), by id: the
    only rooms an admission step can change (lapse, renew, admit, close all act on open
    tickets; a room switched `off` with open tickets is among them, to be closed). A
    skip scan of the index of open tickets (migration 0013: `queue_tickets_open`): one
    seek per room someone is in, however many rooms have ended or tickets wait in each."""
    rows = await conn.fetch_all(
        "WITH RECURSIVE rooms (id) AS ("
        "SELECT MIN(product_id) FROM queue_tickets WHERE state IN ('waiting', 'admitted') "
        "UNION ALL SELECT (SELECT MIN(t.product_id) FROM queue_tickets t "
        "WHERE t.state IN ('waiting', 'admitted') AND t.product_id > rooms.id) "
        "FROM rooms WHERE rooms.id IS NOT NULL"
        ") SELECT id FROM rooms WHERE id IS NOT NULL"
    )
    return [int(row["id"]) for row in rows]


# -- the console's figures ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomStats:
    """A room's tickets by state and its admissions in the last minute."""

    product_id: int
    by_state: dict[str, int]
    admitted_last_minute: int


async def room_stats(conn: Executor, product_id: int, *, now: int) -> RoomStats:
    rows = await conn.fetch_all(
        "SELECT state, COUNT(*) AS n FROM queue_tickets WHERE product_id = :p GROUP BY state",
        {"p": product_id},
    )
    by_state = {state.value: 0 for state in TicketState}
    by_state.update({str(row["state"]): int(row["n"]) for row in rows})
    recent = await conn.fetch_one(
        "SELECT COUNT(*) AS n FROM queue_tickets WHERE product_id = :p "
        "AND admitted_at IS NOT NULL AND admitted_at >= :since",
        {"p": product_id, "since": now - RATE_WINDOW_MS},
    )
    return RoomStats(
        product_id=product_id,
        by_state=by_state,
        admitted_last_minute=0 if recent is None else int(recent["n"]),
    )
