"""The waiting room's use cases (issue 17): shoppers join, read and leave their tickets
(`WaitingRoom`), and one process at a time admits them (`Admitter`).

Everything a ticket is lives in the database (server/domain/waitingroom.py); news of a
room goes out after commit as `RoomChanged` (through the publisher, to every web process's
hub), and is only news: a page that misses it reads its ticket again (`GET`, with ETag).

Every web process and the worker run an `Admitter`. Only the holder of the lease in the
database admits; the others look every tick whether it has lapsed (its holder died, or
stalled) and take it over. The holder steps every room on every tick, and at once when
nudged: a stock change of a product with a room (units back from an expiry, a cancel, a
restock; the last unit sold), a join, a leave.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from server.domain import inventory, waitingroom
from server.domain.clock import now_ms
from server.domain.errors import NotAdmitted, NoTicket, ProductNotFound, QueueNotOpen, QueueOff
from server.domain.executor import Executor
from server.domain.model import Outcome, Product
from server.domain.waitingroom import Admission, Lineup, RoomChanged, RoomStats, Ticket
from server.infra.singleflight import SingleFlight
from server.service.batching import GroupCommit
from server.service.catalog import Catalog
from server.service.transactions import Transactions
from server.storage.database import Store
from server.storage.errors import StorageError
from server.wire.schemas import ticket_view

logger = logging.getLogger(__name__)

# Where news of rooms goes: the publisher's `publish` (it takes these beside the stock
# events). Called after commit; it must not wait.
RoomSink = Callable[[Sequence[RoomChanged]], None]
# How stale a process's copy of a line may be when it answers a position (s): positions
# change as the head of the line is admitted; a page is told at most about once a second.
LINE_SECONDS = 1.0
# ...and once news says it moved (someone admitted, lapsed, sold out).
MOVED_SECONDS = 0.2
# How old a room's counts (how many wait, how many hold a pass) may be when a page that
# polls (GET /api/queues) is answered them (s): each process reads a room's at most this
# often, however many pages poll (15,000 pages polling every 3 s are 5,000 requests a
# second, and one read of two rows a second per room). The socket's `queue` frames come
# at most every QUEUE_FRAME_SECONDS (3 s), so a polling page is no further behind.
COUNTS_SECONDS = 1.0
# ...and a room found empty (nobody waiting, no pass out: a sale over, or a line not begun),
# until news says it changed (a join anywhere: `counts_changed`), or this long without news
# (Redis down: no news comes). A shop keeps every past sale's room: asked for every room,
# each process read each of them every second, however old (GET /api/queues).
EMPTY_COUNTS_SECONDS = 30.0
# How many rooms' counts one process reads at a time (each a connection of the pool).
COUNTS_READS = 4
# The least time between two admission rounds when nudges keep coming (a storm of stock
# changes): each round is a transaction per room; more of them admits no sooner.
MIN_ROUND_SECONDS = 0.02
# Joins per transaction at most, when they come faster than transactions commit.
JOIN_BATCH = 256
# How long after a sale's start its room's first round runs (s): just past it, by the wall
# clock `sale_state` reads.
START_LAG_S = 0.002


@dataclass(frozen=True, slots=True)
class RoomCounts:
    """A product's room as read at `at` (ms since the epoch): how many tickets wait in it
    and how many hold a pass, what its `queue` frames carry."""

    product_id: int
    waiting: int
    admitted: int
    at: int


@dataclass(frozen=True, slots=True)
class TicketAnswer:
    """A ticket as the API answers it: its view, whether this request made it, and the
    ticket itself."""

    view: dict[str, Any]
    created: bool = False
    ticket: Ticket | None = None


class WaitingRoom:
    """A web process's side of the rooms: a shopper's ticket, the gate's early refusal, and
    the lines as last read (at most `LINE_SECONDS` old), shared by every request and socket
    of the process. `opens_ms`: how long before a sale's start its room opens; `nudge`: the
    process's admitter's, told of joins and leaves."""

    def __init__(
        self,
        store: Store,
        *,
        publish: RoomSink,
        opens_ms: int,
        catalog: Catalog | None = None,
        nudge: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self._publish = publish
        self._opens_ms = opens_ms
        self._catalog = catalog
        self._nudge = nudge
        self._lines: dict[int, Lineup] = {}
        # A join: its product, its shopper, and when it arrived (ms: its place in `fifo`).
        self._joins: GroupCommit[tuple[int, str, int], tuple[Ticket, bool]] = GroupCommit(
            self._join_batch, max_batch=JOIN_BATCH, name="queue-joins"
        )
        self._moved: dict[int, int] = {}  # product → when news last said its line moved
        self._any_rooms = True
        self._rooms_checked_at = -1e9
        self._reading: SingleFlight[int, Lineup] = SingleFlight(self._read_line, name="queue-line")
        # Rooms' counts as last read (`counts`): one entry per product with a room, no more
        # (only products the catalog has with a queue are read).
        self._counts: dict[int, RoomCounts] = {}
        self._read_counts_once: SingleFlight[int, RoomCounts] = SingleFlight(
            self._read_counts, name="queue-counts"
        )
        # When news last said a room changed (ms), for the rooms the catalog has.
        self._counts_news: dict[int, int] = {}
        self._counts_reads = asyncio.Semaphore(COUNTS_READS)
        # The rooms someone is in, as last read (`listed`): when, and the product ids.
        self._occupied: tuple[int, tuple[int, ...]] = (-1, ())
        self._read_occupied_once: SingleFlight[None, tuple[int, ...]] = SingleFlight(
            self._read_occupied, name="queue-rooms"
        )
        # Rooms' secret keys as read (a key never changes once made): a join batch reads
        # a room's once per process. Each sale still gets its own order: a place is drawn
        # for the start the product's row has (`waitingroom.drawn_place`).
        self._keys: dict[int, bytes] = {}

    async def product(self, product_id: int) -> Product:
        """The product, from the catalog when it has it. Raises ProductNotFound."""
        product = self._catalog.get(product_id) if self._catalog is not None else None
        if product is None:
            async with self.store.reader() as conn:
                product = await inventory.get_product(conn, product_id)
        if product is None:
            raise ProductNotFound(product_id)
        return product

    def any_rooms(self) -> bool:
        """Whether any product this process knows of has a room (a socket's connect asks
        for its shopper's tickets only then). Without a catalog: assume so."""
        if self._catalog is None:
            return True
        now = time.monotonic()
        if now - self._rooms_checked_at > 1.0:
            self._rooms_checked_at = now
            self._any_rooms = any(p.queue != "off" for p in self._catalog.all())
        return self._any_rooms

    def opens_at(self, product: Product) -> int | None:
        return waitingroom.opens_at(product, self._opens_ms)

    async def join(self, product_id: int, shopper_id: str, *, view: bool = True) -> TicketAnswer:
        """The shopper's ticket, made now if they have none (one insert). `view`: False when
        the caller makes the view itself (a join over a socket: the hub tells its frame),
        and the answer's is empty. Raises ProductNotFound, QueueOff (the product has no
        room), QueueNotOpen (before QUEUE_OPENS_SECONDS ahead of the sale's start)."""
        product = await self.product(product_id)
        ticket, created = await self.join_soon(product, shopper_id)
        return TicketAnswer(await self.view(ticket, product) if view else {}, created, ticket)

    def cached_product(self, product_id: int) -> Product | None:
        """The product as the process's catalog has it (None: not there, or no catalog)."""
        return self._catalog.get(product_id) if self._catalog is not None else None

    def join_soon(self, product: Product, shopper_id: str) -> asyncio.Future[tuple[Ticket, bool]]:
        """`join` for a caller that is not a coroutine (a socket's join, taken in its
        protocol): the future of the ticket and whether this join made it, set when its
        batch has committed (or of its error: ProductNotFound, QueueOff when the product's
        row says the room is `off` though `product`, a copy, did not, StorageError); the admitter
        is nudged then as `join` does. Raises QueueOff, QueueNotOpen at once."""
        if product.queue == "off":
            raise QueueOff(product.id)
        opens = self.opens_at(product)
        if opens is not None and now_ms() < opens:
            raise QueueNotOpen(opens)
        joined = self._joins.submit_nowait((product.id, shopper_id, now_ms()))
        if self._nudge is not None:
            joined.add_done_callback(functools.partial(self._nudge_if_waiting, product))
        return joined

    def _nudge_if_waiting(
        self, product: Product, joined: asyncio.Future[tuple[Ticket, bool]]
    ) -> None:
        """A join's batch is done: a new waiting ticket in a sale that is open may be
        admitted now (before the start nobody is: no hurry)."""
        if joined.cancelled() or joined.exception() is not None or self._nudge is None:
            return
        ticket, created = joined.result()
        waiting = created and ticket.state is waitingroom.TicketState.WAITING
        if waiting and product.sale_state(now_ms()) == "open":
            self._nudge(product.id)

    async def start(self) -> None:
        self._joins.start()

    async def stop(self) -> None:
        await self._joins.stop()

    async def _join_batch(
        self, joins: Sequence[tuple[int, str, int]]
    ) -> list[tuple[Ticket, bool] | BaseException]:
        """Joins that came together, in one transaction (a storm of joins at a sale's
        start): one insert per room (`join_opened_many`), rooms in product id order and
        each room's shoppers in shopper id order (below: why); news of the new waiting
        tickets, one per room, after commit. An answer per join, in `joins`' order. The
        joins of a product that is gone fail together, and alone (ProductNotFound); so do
        those of a room the product's row says is `off` (QueueOff: switched off since the
        caller's catalog said otherwise). Each arrival place is made of the millisecond its
        join arrived (`join_soon`), not the batch's, in the statement and in a join decided
        one by one alike: `fifo` is arrival order, and a batch's joins arrived while the
        batch before it was in the database."""

        async def insert_all(conn: Executor) -> list[tuple[Ticket, bool] | BaseException]:
            now = now_ms()
            answers: dict[int, tuple[Ticket, bool] | BaseException] = {}
            # Each room's joins together: its row read once, in this transaction
            # (`opening`), and its tickets made by one statement (`join_opened_many`).
            by_room: dict[int, list[int]] = {}
            for n, (p, _, _) in enumerate(joins):
                by_room.setdefault(p, []).append(n)
            joined: dict[int, int] = {}
            # Rooms in product id order (and, in `join_opened_many`, shoppers in id order):
            # every batch takes the ticket rows in one order, so two processes' batches
            # naming the same shoppers wait for one another, never each for the other (a
            # deadlock PostgreSQL breaks only after deadlock_timeout, a second).
            for p, indices in sorted(by_room.items()):
                key = self._keys.get(p)
                if key is None:
                    key = self._keys[p] = await waitingroom.room_key(conn, p)
                room = await waitingroom.opening(conn, p, now=now)
                try:
                    if room is None:
                        raise ProductNotFound(p)
                    made = await waitingroom.join_opened_many(
                        conn,
                        room,
                        [joins[n][1] for n in indices],
                        now=now,
                        key=key,
                        arrived=[joins[n][2] for n in indices],
                    )
                except (ProductNotFound, QueueOff) as exc:
                    for n in indices:
                        answers[n] = exc
                    continue
                for n, answer in zip(indices, made, strict=True):
                    answers[n] = answer
                    if isinstance(answer, QueueOff):
                        continue
                    ticket, created = answer
                    if created and ticket.state is waitingroom.TicketState.WAITING:
                        joined[p] = joined.get(p, 0) + 1
            # The rooms' counts once per room, after every ticket (lock order: see
            # `waitingroom.add_waiting`).
            for p, n in sorted(joined.items()):
                await waitingroom.add_waiting(conn, p, n)
            # Every join is in one room, and each room's loop answered all of its joins.
            return [answers[n] for n in range(len(joins))]

        results = await self.store.write(insert_all)
        made: dict[int, set[str]] = {}
        for result in results:
            if isinstance(result, BaseException):
                continue
            ticket, created = result
            # A ticket made `sold_out` (the room had closed) moves nobody and its page was
            # told in the answer: no news.
            if created and ticket.state is waitingroom.TicketState.WAITING:
                made.setdefault(ticket.product_id, set()).add(ticket.shopper_id)
        if made:
            self._publish(
                [
                    RoomChanged(pid, None, None, joined=frozenset(names))
                    for pid, names in made.items()
                ]
            )
        return list(results)

    async def ticket(self, product_id: int, shopper_id: str | None) -> dict[str, Any]:
        """The shopper's ticket's view. Raises ProductNotFound, NoTicket."""
        product = await self.product(product_id)
        ticket = None
        if shopper_id is not None:
            async with self.store.reader() as conn:
                ticket = await waitingroom.get_ticket(conn, product_id, shopper_id)
        if ticket is None:
            raise NoTicket(product_id)
        return await self.view(ticket, product)

    async def leave(self, product_id: int, shopper_id: str | None) -> None:
        """Leave the line (an ended ticket stays as it is). Raises ProductNotFound,
        NoTicket."""
        await self.product(product_id)
        if shopper_id is None:
            raise NoTicket(product_id)
        # Leaves are not rate limited (a leave that changes something follows a join, which
        # is): one that would change nothing (no ticket, or one that has ended) is answered
        # from a read, with no write, no news and no nudge of the admitter. Each was a write
        # transaction, a message to every web process and an admission round at once, for
        # anyone with a cookie, as often as they liked.
        async with self.store.reader() as conn:
            ticket = await waitingroom.get_ticket(conn, product_id, shopper_id)
        if ticket is None:
            raise NoTicket(product_id)
        if ticket.state not in waitingroom.OPEN:
            return
        now = now_ms()
        ticket = await self.store.write(
            lambda conn: waitingroom.leave(conn, product_id, shopper_id, now=now)
        )
        if ticket is None:
            raise NoTicket(product_id)
        if ticket.state is not waitingroom.TicketState.LEFT or ticket.ended_at != now:
            return  # it ended meanwhile (admitted and reserved, sold out): not by this leave
        self._publish([RoomChanged(product_id, None, None, frozenset({shopper_id}))])
        if self._nudge is not None:
            self._nudge(product_id)

    def used(self, shoppers: dict[int, set[str]]) -> None:
        """News: these shoppers (per product) used their passes in a reservation."""
        self._publish(
            [RoomChanged(pid, None, None, frozenset(names)) for pid, names in shoppers.items()]
        )

    async def check_pass(self, product: Product, shopper_id: str | None, quantity: int = 1) -> None:
        """The gate's early refusal, before a reservation queues for a batch: while the
        product's room is active (`waitingroom.gated`: it has a start time, or someone is in
        its line), a reservation needs the shopper's valid pass, for at most the units a
        pass allows; raises NotAdmitted with their position otherwise. Only reads, so that a
        storm of requests without passes never reaches the write lock: the pass is used in
        the reservation's own transaction (`waitingroom.take_passes`), which decides."""
        if product.queue == "off":
            return
        async with self.store.reader() as conn:
            ticket = None
            if shopper_id is not None:
                ticket = await waitingroom.get_ticket(conn, product.id, shopper_id)
            now = now_ms()
            passed = ticket is not None and ticket.has_pass(now)
            waitlist = product.sale_starts_at is None
            if not passed and waitlist:
                gate = await waitingroom.gated(conn, product.id)
                if gate is None or gate.free >= quantity:
                    # A waitlist nobody waits in (units beyond the admitted passes' are
                    # anyone's): its transaction decides, first come, first served.
                    return
        per_pass = waitingroom.units_per_pass(product)
        if passed:
            if quantity > per_pass:
                raise NotAdmitted(None, waitingroom.TicketState.ADMITTED.value, units=per_pass)
            return
        if ticket is None:
            raise NotAdmitted(None)
        if ticket.state is waitingroom.TicketState.ADMITTED:
            raise NotAdmitted(None, waitingroom.TicketState.LAPSED.value)
        if ticket.state is not waitingroom.TicketState.WAITING:
            raise NotAdmitted(None, ticket.state.value)
        view = await self.view(ticket, product)
        raise NotAdmitted(view["position"], ticket.state.value)

    async def view(self, ticket: Ticket, product: Product | None = None) -> dict[str, Any]:
        """`ticket`'s view (a `TicketOut`), placed in the process's copy of its line."""
        if product is None:
            product = await self.product(ticket.product_id)
        return ticket_view(ticket, product, await self.line(ticket.product_id), now=now_ms())

    async def line(self, product_id: int, *, max_age: float = LINE_SECONDS) -> Lineup:
        """The product's line as last read, read again when older than `max_age` seconds;
        one read at a time per product, whoever asks."""
        line = self.fresh_line(product_id, max_age=max_age)
        if line is not None:
            return line
        return await self._reading(product_id)

    def fresh_line(self, product_id: int, *, max_age: float = LINE_SECONDS) -> Lineup | None:
        """The product's line as last read, if `line` would answer with it now (not older
        than `max_age` seconds, or MOVED_SECONDS once news said it moved); else None."""
        line = self._lines.get(product_id)
        if line is not None:
            if self._moved.get(product_id, 0) >= line.at:
                max_age = min(max_age, MOVED_SECONDS)
            if now_ms() - line.at < max_age * 1000:
                return line
        return None

    async def _read_line(self, product_id: int) -> Lineup:
        async with self.store.reader() as conn:
            line = await waitingroom.lineup(
                conn, product_id, now=now_ms(), concat=self.store.is_sqlite
            )
        self._lines[product_id] = line
        return line

    def moved(self, product_id: int) -> None:
        """News that the product's line moved (an admission step): positions are read
        again sooner (`MOVED_SECONDS`), not at once: a line that moves with every join of a
        storm would otherwise be read whole for every join."""
        self._moved[product_id] = now_ms()

    def cached_line(self, product_id: int) -> Lineup | None:
        return self._lines.get(product_id)

    def counts_changed(self, product_id: int) -> None:
        """News of the product's room (a join, a leave, an admission step), from any
        process: a room last found empty is read again at the next ask (`counts`)."""
        self._counts_news[product_id] = now_ms()

    async def counts(self, product_ids: Collection[int] | None = None) -> list[RoomCounts]:
        """The counts of the rooms of `product_ids` (None: of every product), by product id:
        those the catalog has with a queue (`fifo` or `random`, open or not yet); other ids
        are left out. Each room's are read at most once every COUNTS_SECONDS by this process,
        one read at a time per room and COUNTS_READS rooms at a time, whoever asks
        (`waitingroom.room_counts`: one row, and the index of those holding a pass), or taken
        from its line when that was read since (`line`); a room found empty is read again
        only after news of it (`counts_changed`) or EMPTY_COUNTS_SECONDS. Raises StorageError
        when a read fails."""
        if self._catalog is None:
            return []
        if product_ids is None:
            products = self._catalog.all()
        else:
            found = (self._catalog.get(i) for i in sorted(product_ids))
            products = [p for p in found if p is not None]
        rooms = [p.id for p in products if p.queue != "off"]
        now = now_ms()
        fresh: dict[int, RoomCounts] = {}
        stale: list[int] = []
        for product_id in rooms:
            known = self._counts.get(product_id)
            line = self._lines.get(product_id)
            if line is not None and (known is None or line.at > known.at):
                known = RoomCounts(product_id, line.waiting, line.admitted, line.at)
            if known is not None and (
                now - known.at < COUNTS_SECONDS * 1000
                or (
                    known.waiting == known.admitted == 0
                    and now - known.at < EMPTY_COUNTS_SECONDS * 1000
                    and self._counts_news.get(product_id, -1) < known.at
                )
            ):
                fresh[product_id] = known
            else:
                stale.append(product_id)
        if stale:
            read = await asyncio.gather(*(self._read_counts_once(i) for i in stale))
            fresh.update((c.product_id, c) for c in read)
        return [fresh[i] for i in rooms]

    async def listed(self) -> list[int]:
        """The rooms a list of them without ids names (`GET /api/queues`), by product id:
        those someone is in (a ticket waiting or holding a pass) whose product the catalog
        has with a room (`fifo` or `random`) and whose sale has not ended. A room whose sale
        ended, or whose tickets have all ended, or that nobody has joined yet, is left out
        (its counts are 0 and 0; ask for it by id). What the rooms are is read at most once
        every COUNTS_SECONDS by this process, one read at a time, whoever asks: a skip scan
        of the open tickets' index (`waitingroom.queued_products`), one seek per room someone
        is in, however many past sales had one. Raises StorageError when the read fails."""
        if self._catalog is None:
            return []
        at, occupied = self._occupied
        now = now_ms()
        if now - at >= COUNTS_SECONDS * 1000:
            occupied = await self._read_occupied_once(None)
        listed = []
        for product_id in occupied:
            product = self._catalog.get(product_id)
            if product is None or product.queue == "off":
                continue
            if product.sale_ends_at is not None and product.sale_ends_at <= now:
                continue
            listed.append(product_id)
        return listed

    async def _read_occupied(self, _: None) -> tuple[int, ...]:
        async with self.store.reader() as conn:
            at = now_ms()
            occupied = tuple(await waitingroom.queued_products(conn))
        self._occupied = (at, occupied)
        return occupied

    async def _read_counts(self, product_id: int) -> RoomCounts:
        async with self._counts_reads, self.store.reader() as conn:
            at = now_ms()
            waiting, admitted = await waitingroom.room_counts(conn, product_id)
        counts = RoomCounts(product_id, waiting, admitted, at)
        self._counts[product_id] = counts
        return counts

    async def tickets_of(self, product_id: int, shopper_ids: Sequence[str]) -> list[Ticket]:
        async with self.store.reader() as conn:
            return await waitingroom.tickets_of(conn, product_id, shopper_ids)

    async def tickets_of_room(self, product_id: int) -> list[Ticket]:
        async with self.store.reader() as conn:
            return await waitingroom.tickets_of_room(conn, product_id)

    async def tickets_of_shopper(self, shopper_id: str) -> list[Ticket]:
        async with self.store.reader() as conn:
            return await waitingroom.tickets_of_shopper(conn, shopper_id)

    async def stats(self, product_id: int) -> tuple[Product, RoomStats]:
        """The console's figures of the product's room. Raises ProductNotFound."""
        async with self.store.reader() as conn:
            product = await inventory.get_product(conn, product_id)
            if product is None:
                raise ProductNotFound(product_id)
            return product, await waitingroom.room_stats(conn, product_id, now=now_ms())


def new_holder() -> str:
    """A name for this process's admitter: host, pid and a random part (a pid can come
    again after a restart)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


class Admitter:
    """Admits shoppers from the rooms' lines, in whichever one process holds the lease.

    `transactions`: where its steps run, so that holds it expires on the way reach the
    process's catalog and the publisher as any change does; `publish`: where news of
    rooms goes. `pass_ms`: how long a pass lasts; `tick_ms`: how often it looks even when
    not nudged; `lease_ms`: how long its lease lasts unrenewed (how long the rooms wait
    when it dies)."""

    def __init__(
        self,
        store: Store,
        *,
        transactions: Transactions,
        publish: RoomSink,
        pass_ms: int,
        tick_ms: int,
        lease_ms: int,
        holder: str | None = None,
    ) -> None:
        self.store = store
        self.holder = holder or new_holder()
        self._transactions = transactions
        self._publish = publish
        self._pass_ms = pass_ms
        self._tick_s = tick_ms / 1000
        self._lease_ms = lease_ms
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle: dict[int, float] = {}  # product → when a step last found nothing to do
        self._counts: dict[int, tuple[int | None, int | None]] = {}  # as last published
        self.leading = False
        self.steps = 0
        # This process's own listener to its news (a web process's hub), told right after
        # the news is published: the pages it holds learn of an admission or a close
        # without waiting for the news to come back from Redis.
        self.local: RoomSink | None = None
        # The soonest sale start (ms) among the rooms the last round stepped, if ahead: the
        # next round runs then, not up to a tick later (`_run`).
        self.next_start: int | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-admitter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def nudge(self, product_id: int | None = None) -> None:
        """Something changed that may let the line move: step at once."""
        if product_id is not None:
            self._idle.pop(product_id, None)
        self._wake.set()

    def _wait_s(self) -> float:
        """How long to wait for a nudge before the next round: a tick, or less when a
        room's sale starts sooner, so that the first admissions come at the start itself.
        They are what the first second waits for: a round a tick late meets the start's
        storm of joins and requests, and each of its turns of the loop waits behind them
        (the waiting room's bench: the first admission 0.1 to 2.1 s after the start)."""
        if self.next_start is None:
            return self._tick_s
        until = (self.next_start - now_ms()) / 1000
        return self._tick_s if until < 0 else min(self._tick_s, until + START_LAG_S)

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._wait_s()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            started = time.monotonic()
            try:
                await self.step_all()
            except asyncio.CancelledError:
                raise
            except StorageError as exc:
                logger.warning("waiting room: an admission step failed (%s); next tick", exc)
            except Exception:
                logger.exception("waiting room: an admission step failed")
            rest = MIN_ROUND_SECONDS - (time.monotonic() - started)
            if rest > 0 and self._wake.is_set():
                await asyncio.sleep(rest)

    async def step_all(self) -> list[Admission]:
        """One step of every room, if this process holds (or can take) the lease."""
        now = now_ms()
        async with self.store.reader() as conn:
            holder = await waitingroom.lease_holder(conn, now=now)
            products = await waitingroom.queued_products(conn)
        if holder is not None and holder != self.holder:
            self.leading = False
            return []
        steps: list[Admission] = []
        clock = time.monotonic()
        self.next_start = None
        # Only rooms with someone in them are listed (`queued_products`); one whose line
        # has just emptied is looked at less often, but often enough to keep the lease
        # (renewed by every step) from lapsing between two looks. With nobody in any room,
        # the lease lapses, and the first process to find someone in a room takes it.
        idle_gap = min(1.0, self._lease_ms / 2000)
        for product_id in products:
            idle_since = self._idle.get(product_id)
            if idle_since is not None and clock - idle_since < idle_gap:
                continue
            step = await self.step(product_id)
            if not step.leased:
                self.leading = False
                return steps
            steps.append(step)
            starts = step.product.sale_starts_at if step.product is not None else None
            if starts is not None and starts > now:
                self.next_start = (
                    starts if self.next_start is None else min(self.next_start, starts)
                )
            if step.waiting == 0 and step.passes == 0 and not step.changed:
                self._idle[product_id] = clock
            else:
                self._idle.pop(product_id, None)
        if products:
            self.leading = True
        return steps

    async def step(self, product_id: int) -> Admission:
        """One admission step of one room, in its own transaction; its news published."""

        async def operation(conn: Executor, now: int) -> Outcome[Admission]:
            step = await waitingroom.admit(
                conn,
                product_id,
                now=now,
                pass_ms=self._pass_ms,
                holder=self.holder,
                lease_ms=self._lease_ms,
            )
            return Outcome(step, events=list(step.events))

        asked = now_ms()
        outcome = await self._transactions.run(operation)
        step = outcome.result()
        self.steps += 1
        done = now_ms()
        news = step.news()
        if news is not None and step.leased:
            counts = (news.waiting, news.admitted)
            # Only news: a step that changed nothing and counted the same is not sent.
            if step.changed or self._counts.get(product_id) != counts:
                self._counts[product_id] = counts
                self._publish([news])
                if self.local is not None:
                    # Told here at once, not a round trip later: on a loop busy with a
                    # sale's joins, the news took 0.4 s to come back from Redis to the
                    # very process that closed the room (the waiting room's bench, one web
                    # process). It comes back all the same, and is told again to nobody:
                    # the pages' copies have changed already.
                    self.local([news])
        if step.admitted or step.closed:
            logger.info(
                "waiting room of product %d: %d admitted, %d lapsed, %d sold out; %d waiting "
                "(the step %d ms, its news out %d ms after it was asked for)",
                product_id,
                len(step.admitted),
                len(step.lapsed),
                len(step.closed),
                step.waiting,
                done - asked,
                now_ms() - asked,
            )
        return step
