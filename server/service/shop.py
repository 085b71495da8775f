"""The web shop: the use cases of a web process, for shoppers and operators.

Each write is a transaction around a domain operation (`server.domain.inventory`), then its
side effects after commit (`Transactions`: the promises and the catalog see the new state,
then it is published; expiry jobs through the `ExpiryScheduler`). Reservations are
group-committed (`GroupCommit`), and refused at once, without a write lock, when the units
left are already promised (`Promises`). Idempotency-Keys: `Idempotency`. The worker's side
of the same operations is `server.service.expiry.Expirer`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

from server.domain import inventory, ledger
from server.domain.clock import now_ms
from server.domain.errors import (
    InsufficientStock,
    NotAdmitted,
    ProductNotFound,
    ReservationNotFound,
)
from server.domain.executor import Executor
from server.domain.inventory import Caller, Held, ProductChanges, Stats, StatsTotals
from server.domain.model import (
    Event,
    HoldRequest,
    Outcome,
    Product,
    Reservation,
    ReservationChanged,
    Status,
)
from server.infra.metrics import HOLDS_EXPIRED
from server.service.batching import GroupCommit, Patience
from server.service.catalog import Catalog
from server.service.expiry import ExpiryScheduler
from server.service.idempotency import Idempotency
from server.service.overdue import OverdueHolds
from server.service.promises import Promise, Promises
from server.service.transactions import EventSink, Transactions
from server.service.waitingroom import WaitingRoom
from server.storage.database import Store
from server.storage.errors import NotAttempted, UniqueViolation

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256
# How many times a request refused only if the waiting keyed requests take their units waits
# for their batch before it goes to the database (each wait: one batch's time, a few ms).
KEYED_WAITS = 3
# Of a product without `maxPerShopper`, how many of a shopper's newest holds `GET /api/me`
# counts units from (besides every hold that can still be ACTIVE): README, the API table.
RECENT_HOLDS_COUNTED = 200
BY_REFUSAL = HOLDS_EXPIRED.labels("refusal")
BY_RESERVATION = HOLDS_EXPIRED.labels("reservation")


@dataclass(frozen=True, slots=True)
class Waiting:
    """A reservation request on its way to the database, and the units promised to it."""

    request: HoldRequest
    promise: Promise


class Shop:
    """The web process's shop, over `store`.

    `reserve` is group-committed (server/service/batching.py) and refuses at once what the
    units already promised to waiting requests leave no room for (server/service/promises.py).
    Every other operation is one transaction (`Transactions`); the events it caused go to the
    promises, the catalog and `publish` after commit. `hold_ms`: how long a hold lasts (ms).
    `scheduler`: enqueues the expiry jobs of new holds (None: the sweeper expires them).
    `catalog`: this process's view of the products (None: reads go to the database).
    `deadline_ms`: how long a reservation may wait for the database on others' account:
    behind batches of other products, or for the keyed batch of its product to be formed
    (the time a batch of its own product spends in the database, a lock wait included, is
    the database's, bounded by its busy timeout, and not counted). Past it, it is answered
    `NotAttempted` with nothing done, when its batch is formed or a keyed wait ends (the
    app gives DB_BUSY_TIMEOUT_MS; None: no deadline). Whatever the deadline, a request
    that waited for a batch of its product the database found busy is
    answered `NotAttempted` at once, never tried: `ReserveDeadline`.
    """

    def __init__(
        self,
        store: Store,
        *,
        hold_ms: int,
        publish: EventSink,
        scheduler: ExpiryScheduler | None = None,
        catalog: Catalog | None = None,
        deadline_ms: int | None = None,
    ) -> None:
        self.store = store
        self._deadline_s = None if deadline_ms is None else deadline_ms / 1000
        self.catalog = catalog
        # The waiting room's early refusal (issue 17), set by the app once it has one.
        self.room: WaitingRoom | None = None
        self._hold_ms = hold_ms
        self._scheduler = scheduler
        self.promises = Promises()
        self._idempotency = Idempotency(store)
        self._overdue = OverdueHolds(store)
        watchers: list[Callable[[Product], object]] = [self.promises.observe]
        if catalog is not None:
            watchers.append(catalog.apply)
        self._transactions = Transactions(store, publish, watchers)
        self._holds: GroupCommit[Waiting, Held] = GroupCommit(
            self._reserve_batch,
            max_batch=MAX_BATCH,
            name="reserve-batches",
            key=lambda waiting: waiting.request.product_id,
        )
        # Completes and cancels are group-committed too, each kind in its own transactions
        # (holds, then products in id order, as every writer takes them).
        self._completes: GroupCommit[inventory.Completing, Reservation] = GroupCommit(
            self._complete_batch,
            max_batch=MAX_BATCH,
            name="complete-batches",
        )
        self._cancels: GroupCommit[inventory.Cancelling, Reservation] = GroupCommit(
            self._cancel_batch,
            max_batch=MAX_BATCH,
            name="cancel-batches",
        )

    async def start(self) -> None:
        self._holds.start()
        self._completes.start()
        self._cancels.start()

    async def stop(self) -> None:
        await self._holds.stop()
        await self._completes.stop()
        await self._cancels.stop()

    @property
    def reserve_backlog(self) -> int:
        return self._holds.backlog

    # -- shoppers ------------------------------------------------------------------------

    async def reserve(self, request: HoldRequest) -> Held:
        """Hold `request.quantity` units for the shop's hold time (`hold_ms`), or replay the
        hold its Idempotency-Key made.

        Raises ProductNotFound, SaleNotStarted, SalePaused, SaleEnded, InsufficientStock
        (with the units left), IdempotencyKeyReused (the key made a hold with another
        body); storage's Busy or Unavailable; `NotAttempted` (a Busy), with nothing done,
        when it waited `deadline_ms` on others' account before it reached the database, or
        waited for a batch of its product that the database refused (`ReserveDeadline`)."""
        deadline = ReserveDeadline(self._holds, request.product_id, self._deadline_s)
        product = self.catalog.get(request.product_id) if self.catalog else None
        if product is None:
            product = await self.product(request.product_id)
        if product is None:
            raise ProductNotFound(request.product_id)
        now = now_ms()
        closed = inventory.sale_closed(product, now)
        if closed is not None:
            raise closed
        if self.room is not None and product.queue != "off":
            try:
                await self.room.check_pass(product, request.shopper_id, request.quantity)
            except NotAdmitted:
                # A retry of a request that used its pass is answered with its hold.
                replay = await self.replay(request)
                if replay is not None:
                    return replay
                raise
        limit = product.max_per_shopper
        if (
            limit is not None
            and request.quantity > limit
            and request.shopper_id is not None
            and not self.promises.waiting(request.idempotency_key)
        ):
            # The database refuses it whatever the shopper has: say so now, without a place
            # in a batch (a shopper flooding requests for more than the limit, A2).
            replay = await self.replay(request)
            if replay is not None:
                return replay
            async with self.store.reader() as conn:
                raise await inventory.limit_refusal(conn, product.id, request.shopper_id)
        replay = await self._refuse_if_certain(product, request, now, deadline)
        if replay is not None:
            return replay
        promise = self.promises.make(request)
        try:
            return await self._holds.submit(Waiting(request, promise), check=deadline)
        except Exception:
            self.promises.settle(promise)  # its batch did, unless it never reached one
            raise

    async def _refuse_if_certain(
        self, product: Product, request: HoldRequest, now: int, deadline: ReserveDeadline
    ) -> Held | None:
        """Raise InsufficientStock (with the units left) if the database is certain to refuse
        `request` (a figure of its product, at `now`, ms), given the units promised to the
        requests waiting; return the hold its key made if it has one (a retry), else None:
        it goes to the database.

        A copy of a request that is waiting joins it (it can only be that hold); any other is
        refused now if the units its process knows of are all spoken for: in a storm the
        first hundred requests promise the last hundred units, and the thousands behind them
        are answered at once, not after a queue of batches. When they are spoken for only if
        the waiting requests with a key are not retries of holds already made (which take
        nothing), it waits for those requests' batch and looks again at the catalog's figure
        (server/service/promises.py; without a catalog, the database's); after `KEYED_WAITS`
        such waits it goes to the database. Raises what `Store.reader` raises, and
        `NotAttempted` when a wait ends past `deadline`, or a batch of its product the
        database found busy came back meanwhile: its own try would most likely wait out the
        same lock, and every request waiting would have gone
        at once."""
        for waits in range(KEYED_WAITS + 1):
            if self.promises.waiting(request.idempotency_key):
                return None
            if self.promises.left(product, keys_new=True) >= request.quantity:
                return None
            left = self.promises.left(product)
            if left < request.quantity and self._overdue.may_have(product, now):
                # Some of the units counted as held may be in holds past their expiresAt,
                # which the database gives back to this request (lazy expiry): ask it.
                look = await self._overdue.look(product.id)
                if look.product is not None:
                    self._transactions.observe(look.product)
                    product = look.product
                    left = self.promises.left(product)
                if look.overdue(now_ms()):
                    return None
            if left < request.quantity:
                # A retried request with a key may have been served already.
                replay = await self.replay(request)
                if replay is not None:
                    return replay
                raise InsufficientStock(max(left, 0), request.quantity, product.stock_now())
            if waits == KEYED_WAITS:
                break  # the database decides
            # Refused only if the keyed promises all take their units: wait for their batch.
            # No timer of its own (costly in a storm): the deadline is looked at as each
            # wait ends.
            await self.promises.keyed_settled(product.id)
            refusal = deadline.refusal()
            if refusal is not None:
                raise refusal
            fresh = await self.product(product.id)
            if fresh is None:
                raise ProductNotFound(product.id)
            product, now = fresh, now_ms()
        return None

    async def replay(self, request: HoldRequest) -> Held | None:
        """The hold `request`'s Idempotency-Key made within the idempotency window, if any.

        Raises IdempotencyKeyReused if that hold is for another product or quantity."""
        return await self._idempotency.replay(request)

    def _has_room(self, product_id: int) -> bool:
        """Whether the catalog's copy of the product has a waiting room (a hint only)."""
        product = self.catalog.get(product_id) if self.catalog else None
        return product is not None and product.queue != "off"

    async def _reserve_batch(self, batch: Sequence[Waiting]) -> list[Held | BaseException]:
        requests = [waiting.request for waiting in batch]
        promises = [waiting.promise for waiting in batch]
        for promise in promises:
            self.promises.send(promise)
        # Products with a waiting room as the catalog knows them: straight to the gate.
        rooms = {r.product_id for r in requests if self._has_room(r.product_id)}
        try:
            for attempt in range(3):
                try:
                    outcomes, events = await self.store.write(
                        lambda conn: inventory.reserve(
                            conn, requests, now=now_ms(), hold_ms=self._hold_ms, rooms=rooms
                        )
                    )
                    break
                except UniqueViolation:
                    # Another process made a hold with one of these keys after we looked
                    # (PostgreSQL only). Try again: this time we will find it.
                    if attempt == 2:
                        raise
            # The catalog takes what the batch did, and its promises are released, with no
            # wait in between (server/service/promises.py).
            self._transactions.committed(events)
            self._tell_rooms(requests, outcomes)
            lazily = _expired(events)
            if lazily:  # overdue holds whose units this batch took back (lazy expiry)
                BY_RESERVATION.inc(lazily)
        finally:
            for promise in promises:
                self.promises.settle(promise)
        if self._scheduler is not None:
            self._scheduler.schedule(
                o.value.reservation.expires_at
                for o in outcomes
                if o.value is not None and not o.value.replayed
            )
        return [o.value if o.value is not None else _error(o) for o in outcomes]

    def _tell_rooms(
        self, requests: Sequence[HoldRequest], outcomes: Sequence[Outcome[Held]]
    ) -> None:
        """The tickets whose passes a batch used are `reserved` now: news for their rooms."""
        if self.room is None or self.catalog is None:
            return
        used: dict[int, set[str]] = {}
        for request, outcome in zip(requests, outcomes, strict=True):
            if outcome.value is None or outcome.value.replayed or request.shopper_id is None:
                continue
            product = self.catalog.get(request.product_id)
            if product is not None and product.queue != "off":
                used.setdefault(request.product_id, set()).add(request.shopper_id)
        if used:
            self.room.used(used)

    @property
    def transactions(self) -> Transactions:
        """Where this process's writes run (the admitter's steps run here too)."""
        return self._transactions

    async def reservation(
        self, reservation_id: str, caller: Caller = inventory.ANYONE
    ) -> Reservation | None:
        """The hold, if it exists and `caller` may see it (a shopper's id; None for a
        caller that named none; ANYONE)."""
        if not inventory.is_reservation_id(reservation_id):
            return None
        async with self.store.reader() as conn:
            found = await inventory.get_reservation(conn, reservation_id)
        return found if found is not None and inventory.may_see(caller, found) else None

    async def reservations_by_id(
        self, reservation_ids: Sequence[str], caller: Caller = inventory.ANYONE
    ) -> list[Reservation]:
        """Those of the holds that exist and `caller` may see."""
        wanted = [i for i in reservation_ids if inventory.is_reservation_id(i)]
        async with self.store.reader() as conn:
            found = await inventory.get_reservations(conn, wanted)
        return [r for r in found if inventory.may_see(caller, r)]

    async def shopper_reservations(
        self, shopper_id: str, *, status: Status | None, limit: int
    ) -> list[Reservation]:
        """A shopper's own holds, newest first, at most `limit`."""
        async with self.store.reader() as conn:
            return await inventory.list_shopper_reservations(
                conn, shopper_id, status=status, limit=limit
            )

    async def shopper_units(self, shopper_id: str) -> dict[int, int]:
        """A shopper's units per product in ACTIVE and COMPLETED holds (what counts
        against `maxPerShopper`); an overdue hold not yet expired counts for nothing. Of a
        product without a limit, from the holds made within the hold time (all that can
        be ACTIVE) and the shopper's `RECENT_HOLDS_COUNTED` newest: a bounded read."""
        now = now_ms()
        async with self.store.reader() as conn:
            return await inventory.shopper_units_held(
                conn,
                shopper_id,
                now=now,
                since=now - self._hold_ms,
                recent=RECENT_HOLDS_COUNTED,
            )

    async def complete(
        self,
        reservation_id: str,
        *,
        actor: str = ledger.SHOPPER,
        order_reference: str | None = None,
        caller: Caller = inventory.ANYONE,
    ) -> Reservation:
        """Buy a hold (idempotent), as `actor` (the ledger's: `shop` for the shop's backend),
        with the shop's `order_reference` if it gave one; `caller`: the shopper asking (a
        hold of another shopper is not found), ANYONE for the shop's backend. Raises
        `ReservationNotFound`, `ReservationExpired` (an overdue hold is expired on the
        spot), `ReservationCancelled`; storage's Busy or Unavailable.

        Group-committed: the completes that arrive while a batch is in its transaction go
        together in the next (`inventory.complete_many`)."""
        if not inventory.is_reservation_id(reservation_id):
            raise ReservationNotFound(reservation_id)
        return await self._completes.submit(
            inventory.Completing(reservation_id, actor, order_reference, caller)
        )

    async def cancel(
        self,
        reservation_id: str,
        *,
        actor: str = ledger.SHOPPER,
        reason: str | None = None,
        caller: Caller = inventory.ANYONE,
    ) -> Reservation:
        """Give a hold's units back (idempotent), as `actor` (`operator` when the shop
        cancels it, with its `reason` for the shopper), and the shopper's allowance;
        `caller` as for `complete`. Raises `ReservationNotFound`, `ReservationExpired`,
        `ReservationCompleted`; storage's Busy or Unavailable. Group-committed like
        `complete` (`inventory.cancel_many`)."""
        if not inventory.is_reservation_id(reservation_id):
            raise ReservationNotFound(reservation_id)
        return await self._cancels.submit(
            inventory.Cancelling(reservation_id, actor, reason, caller)
        )

    async def _complete_batch(
        self, batch: Sequence[inventory.Completing]
    ) -> list[Reservation | BaseException]:
        return await self._end_batch(
            lambda conn, now: inventory.complete_many(conn, batch, now=now)
        )

    async def _cancel_batch(
        self, batch: Sequence[inventory.Cancelling]
    ) -> list[Reservation | BaseException]:
        return await self._end_batch(lambda conn, now: inventory.cancel_many(conn, batch, now=now))

    async def _end_batch(
        self,
        end: Callable[[Executor, int], Awaitable[tuple[list[Outcome[Reservation]], list[Event]]]],
    ) -> list[Reservation | BaseException]:
        """One transaction for a batch of completes or of cancels (`end`, given the
        transaction's time); each request's hold, or its domain error to raise."""

        async def operation(conn: Executor, now: int) -> Outcome[list[Outcome[Reservation]]]:
            outcomes, events = await end(conn, now)
            return Outcome(outcomes, events=events)

        done = await self._transactions.run(operation)
        expired = _expired(done.events)  # came after expiresAt: expired on the spot
        if expired:
            BY_REFUSAL.inc(expired)
        results: list[Reservation | BaseException] = []
        for outcome in done.result():
            if outcome.error is not None:
                results.append(outcome.error)
            else:
                results.append(outcome.result())
        return results

    # -- products ------------------------------------------------------------------------

    async def product(self, product_id: int) -> Product | None:
        """The freshest view this process has; the database when it has none."""
        if self.catalog is not None and (product := self.catalog.get(product_id)):
            return product
        async with self.store.reader() as conn:
            product = await inventory.get_product(conn, product_id)
        if product is not None and self.catalog is not None:
            self.catalog.apply(product)
        return product

    async def products(self) -> list[Product]:
        async with self.store.reader() as conn:
            return await inventory.list_products(conn)

    # -- operators -----------------------------------------------------------------------

    async def create_product(
        self,
        *,
        name: str,
        price_cents: int,
        stock: int,
        sale_starts_at: int | None,
        max_per_shopper: int | None = None,
        queue: str = "off",
        admit_factor: float = 1.0,
    ) -> Product:
        for attempt in range(5):
            try:
                return await self._write(
                    lambda conn, now: inventory.create_product(
                        conn,
                        name=name,
                        price_cents=price_cents,
                        stock=stock,
                        sale_starts_at=sale_starts_at,
                        max_per_shopper=max_per_shopper,
                        queue=queue,
                        admit_factor=admit_factor,
                        now=now,
                    )
                )
            except UniqueViolation:
                # Two processes chose the same next id (PostgreSQL only): choose again.
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    async def restock(self, product_id: int, quantity: int) -> Product:
        return await self._write(
            lambda conn, now: inventory.restock(conn, product_id, quantity, now=now)
        )

    async def reduce_stock(self, product_id: int, quantity: int) -> Product:
        """Take `quantity` available units away, as the operator. Raises `ProductNotFound`,
        `StockCommitted` (fewer units are neither held nor sold)."""
        return await self._write(
            lambda conn, now: inventory.reduce_stock(conn, product_id, quantity, now=now)
        )

    async def update_product(self, product_id: int, changes: ProductChanges) -> Product:
        """Edit a product (name, price, schedule, paused, limit, waiting room), as the
        operator. Raises `ProductNotFound`, `InvalidSchedule`, `QueueInUse`."""
        return await self._write(
            lambda conn, now: inventory.update_product(conn, product_id, changes, now=now)
        )

    async def stats(
        self,
        product_id: int | None = None,
        *,
        ids: Collection[int] | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[Stats]:
        """Units per state by id (`inventory.stats`)."""
        async with self.store.reader() as conn:
            return await inventory.stats(conn, product_id, ids=ids, after=after, limit=limit)

    async def stats_totals(self) -> StatsTotals:
        """Every product's counters added up (`inventory.stats_totals`)."""
        async with self.store.reader() as conn:
            return await inventory.stats_totals(conn)

    async def reservations(
        self, *, product_id: int | None, status: Status | None, limit: int
    ) -> list[Reservation]:
        # Every product's open holds, by time left: from their index in order, whatever
        # PostgreSQL's statistics say (Store.index_order_reader). One product's come from
        # its own index, and a sort of that product's open holds only.
        every_open = status is Status.ACTIVE and product_id is None
        reader = self.store.index_order_reader if every_open else self.store.reader
        async with reader() as conn:
            return await inventory.list_reservations(
                conn, product_id=product_id, status=status, limit=limit
            )

    # -- plumbing ------------------------------------------------------------------------

    async def _write(self, operation: Callable[[Executor, int], Awaitable[Outcome[T]]]) -> T:
        outcome = await self._transactions.run(operation)
        return outcome.result()


class ReserveDeadline(Patience):
    """A reservation's deadline (`Shop`'s `deadline_ms`), looked at as its batch is formed
    and as each keyed wait ends: its `refusal` is `NotAttempted` (503 `database_busy`,
    nothing done, a `Retry-After` drawn from 1 to 3 s so that those answered together come
    back spread out) once it has waited `allowance_s` on others' account (not counting the
    time batches of its product spent in the database: a batch waiting for a row lock, as
    when another host's stranded transaction holds it, is the database's wait, ended by its
    own busy timeout), or at once when the database found a batch of its product busy (a
    lock held past the busy timeout) since it came in: its own try would most likely wait
    out the same lock, and all the requests waiting would have gone to the database
    together. None: it goes on."""

    __slots__ = ("_allowance_s",)

    def __init__(
        self, batches: GroupCommit[Waiting, Held], product_id: int, allowance_s: float | None
    ) -> None:
        super().__init__(batches, product_id)
        self._allowance_s = allowance_s

    def refusal(self) -> NotAttempted | None:
        if self.refused():
            why = "waited for a batch of its product that the database found busy,"
        elif self._allowance_s is not None and self.waited_s() >= self._allowance_s:
            why = f"waited {self._allowance_s:.1f} s for other requests' turn at the database"
        else:
            return None
        return NotAttempted(
            f"The database is busy: this reservation {why} and was not made (nothing "
            "changed); try again in a moment.",
            random.randint(1, 3),
        )


def _expired(events: Sequence[Event]) -> int:
    """How many of `events` say a hold expired."""
    return sum(
        isinstance(e, ReservationChanged) and e.reservation.status is Status.EXPIRED for e in events
    )


def _error(outcome: Outcome[Held]) -> BaseException:
    assert outcome.error is not None
    return outcome.error
