"""A harness that runs a real `Shop` on a real database one step at a time, in an order the
test chooses: a batch of reservations is sent to the database, commits, and its callers
resume as three separate steps, and between any two of them the test may send more
requests, retry one, reload the catalog, or change the stock from "another process".

It is how tests/test_promises.py checks every fast refusal against the database: at the
moment a request is refused without reaching the database, the database is asked what it
would have done with it (`would_grant`). A request that waits for the promises with a key to
settle before its refusal is reckoned (server/service/promises.py) is *parked*: it is
answered or sent on in the step that resumes their batch, and checked then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.errors import InsufficientStock, ShopperLimitReached
from server.domain.inventory import Held
from server.domain.model import Event, HoldRequest, Reservation, StockChanged
from server.service.batching import Check
from server.service.catalog import Catalog
from server.service.shop import Shop, Waiting
from server.storage.database import Store
from tests.support import cancel_one

T = TypeVar("T")


async def until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Let other tasks and the database's threads run until `check()` holds (a deadline, no
    fixed sleep: each turn waits a millisecond at most)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.001)


@dataclass
class Gate:
    """One write transaction held at the door: it begins when `commit` is set, and its
    caller gets the result only when `resume` is set."""

    calls: range  # which calls (by submission order) its batch carries
    commit: asyncio.Event = field(default_factory=asyncio.Event)
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)


class GatedStore(Store):
    """A `Store` whose write transactions wait for the test at the door and after commit.

    `taken` is asked, as a batch arrives, how many requests the shop has put into batches so
    far: the batch is the ones since the previous gate."""

    def __init__(self, url: str) -> None:
        super().__init__(url, busy_timeout_ms=5_000)
        self.gates: list[Gate] = []
        self.taken: Callable[[], int] = lambda: 0
        self.open = False  # True: let every transaction through at once
        self._given = 0

    def restart(self, taken: Callable[[], int]) -> None:
        """For a new shop: no gates yet, and none left open."""
        self.gates, self.taken, self.open, self._given = [], taken, False, 0

    def open_every_gate(self) -> None:
        self.open = True
        for gate in self.gates:
            gate.commit.set()
            gate.resume.set()

    async def write(self, work: Callable[[Any], Awaitable[T]], *, index_order: bool = False) -> T:
        if self.open:
            return await super().write(work, index_order=index_order)
        taken = self.taken()
        gate = Gate(range(self._given, taken))
        self._given = taken
        self.gates.append(gate)
        await gate.commit.wait()
        try:
            return await super().write(work, index_order=index_order)
        finally:
            gate.committed.set()
            await gate.resume.wait()


@dataclass
class Call:
    request: HoldRequest
    task: asyncio.Task[Held]
    index: int | None  # its place in the order of submission; None if answered at once
    hold_before: Reservation | None  # the hold its key had made when it was sent, if any
    checked: bool = False
    parked: bool = False  # waited for keyed promises to settle before it was answered


class Interleaving:
    """Drives one product of a gated shop. Every method is one step."""

    def __init__(self, shop: Shop, store: GatedStore, elsewhere: Store, product_id: int) -> None:
        self.shop = shop
        self.store = store
        self.elsewhere = elsewhere  # another process's connection: ungated
        self.product_id = product_id
        self.calls: list[Call] = []
        self.by_index: dict[int, Call] = {}
        self.taken_elsewhere: list[str] = []
        self.fast_refusals = 0
        self.parked: list[Call] = []  # waiting for keyed promises to settle
        # Each request's place in the order the shop submits them to its group commit (the
        # order of the batches), by the request object's identity.
        self._places: dict[int, int] = {}
        store.restart(taken=lambda: shop._holds.requests)
        holds, submit = shop._holds, shop._holds.submit

        async def recorded(request: Waiting, *, check: Check | None = None) -> Held:
            self._places[id(request.request)] = len(self._places)
            return await submit(request, check=check)

        holds.submit = recorded  # type: ignore[method-assign]

    # -- steps -----------------------------------------------------------------------

    async def reserve(
        self, quantity: int, key: str | None = None, shopper: str | None = None
    ) -> Call:
        """A request arrives (from `shopper`, if known): it is answered at once, or sent
        towards the database."""
        request = HoldRequest(self.product_id, quantity, key, shopper)
        hold_before = await self._hold_of(key)
        parked = self.shop.promises.parked
        task = asyncio.create_task(self.shop.reserve(request))
        await until(
            lambda: (
                task.done() or id(request) in self._places or self.shop.promises.parked > parked
            ),
            "the request to be answered",
        )
        call = Call(request, task, self._places.get(id(request)), hold_before)
        self.calls.append(call)
        if call.index is not None:
            self.by_index[call.index] = call
        elif task.done():
            await self._check_refusal(call)
        else:
            call.parked = True
            self.parked.append(call)
        return call

    async def _check_refusal(self, call: Call) -> None:
        """`call` was answered without reaching the database: a refusal must hold against
        the database *now*."""
        error = call.task.exception()
        if isinstance(error, InsufficientStock | ShopperLimitReached):
            self.fast_refusals += isinstance(error, InsufficientStock)
            assert not await self.would_grant(call.request), (
                f"refused {call.request} {'after waiting' if call.parked else 'at once'}, "
                f"but the database would grant it: {await self.describe()}"
            )

    async def _unpark(self) -> None:
        """Once a batch's callers resumed: let each parked request whose promises settled be
        answered, sent on, or parked again, and check the answered ones."""

        def unanswered() -> list[Call]:
            return [
                c for c in self.parked if not c.task.done() and id(c.request) not in self._places
            ]

        await until(
            lambda: len(unanswered()) == self.shop.promises.parked,
            "the parked requests to be answered, sent on or parked again",
        )
        still = unanswered()
        for call in self.parked:
            if call in still:
                continue
            call.index = self._places.get(id(call.request))
            if call.index is not None:
                self.by_index[call.index] = call
            else:
                await self._check_refusal(call)
        self.parked = still

    async def commit(self) -> bool:
        """The oldest batch sent to the database commits (False if none is waiting)."""
        gate = next((g for g in self.store.gates if not g.commit.is_set()), None)
        if gate is None:
            if self.shop.reserve_backlog == 0:
                return False
            # Queued behind a batch that has not resumed: it arrives once that one does.
            if any(not g.resume.is_set() for g in self.store.gates):
                return False
            await until(lambda: any(not g.commit.is_set() for g in self.store.gates), "a batch")
            gate = next(g for g in self.store.gates if not g.commit.is_set())
        gate.commit.set()
        await asyncio.wait_for(gate.committed.wait(), 10)
        return True

    async def resume(self) -> bool:
        """The oldest committed batch's callers get their answers."""
        gate = next(
            (g for g in self.store.gates if g.committed.is_set() and not g.resume.is_set()), None
        )
        if gate is None:
            return False
        gate.resume.set()
        tasks = [self.by_index[i].task for i in gate.calls if i in self.by_index]
        await until(lambda: all(t.done() for t in tasks), "the batch's callers to resume")
        await self._unpark()
        return True

    async def reload(self) -> None:
        catalog = self.shop.catalog
        if catalog is not None:
            await catalog.reload(self.store)

    async def take_elsewhere(
        self, quantity: int, shopper: str | None = None, key: str | None = None
    ) -> None:
        """Another process holds units of the product (if it has them; for `shopper`, if
        within their limit; with the Idempotency-Key `key`, which a client may then retry
        here)."""
        request = HoldRequest(self.product_id, quantity, key, shopper)
        outcomes, events = await self.elsewhere.write(
            lambda conn: inventory.reserve(conn, [request], now=now_ms(), hold_ms=600_000)
        )
        if outcomes[0].value is not None:
            self.taken_elsewhere.append(outcomes[0].value.reservation.id)
        self._announce(events)

    async def give_back_elsewhere(self) -> None:
        """Another process cancels one of its holds: units come back."""
        if self.taken_elsewhere:
            reservation_id = self.taken_elsewhere.pop(0)
            outcome = await self.elsewhere.write(
                lambda conn: cancel_one(conn, reservation_id, now=now_ms())
            )
            self._announce(outcome.events)

    def _announce(self, events: Sequence[Event]) -> None:
        """The other process's stock frames reach this one (through Redis, in real life)."""
        catalog = self.shop.catalog
        for event in events:
            if catalog is not None and isinstance(event, StockChanged):
                p = event.product
                catalog.apply_stock(p.id, p.available_stock, p.version)

    async def finish(self) -> None:
        """Let every batch commit and resume until every call has its answer."""
        while not all(c.task.done() for c in self.calls):
            progressed = await self.resume() or await self.commit()
            if not progressed:
                await until(
                    lambda: (
                        any(not g.resume.is_set() for g in self.store.gates)
                        or all(c.task.done() for c in self.calls)
                    ),
                    "the next batch",
                )

    # -- the oracle --------------------------------------------------------------------

    async def would_grant(self, request: HoldRequest) -> bool:
        """Would the database grant `request` if it were queued now, behind the requests
        already waiting for it (first come, first served, one hold per key; a request whose
        shopper it would take past the product's limit takes nothing)?"""
        async with self.store.reader() as conn:
            product = await inventory.get_product(conn, self.product_id)
        assert product is not None
        limit, available = product.max_per_shopper, product.available_stock
        allowances: dict[str, int] = {}

        async def takes(asked: HoldRequest) -> bool:
            nonlocal available
            shopper = asked.shopper_id
            if shopper is not None and shopper not in allowances:
                allowances[shopper] = await self._allowance(shopper)
            if (
                limit is not None
                and shopper is not None
                and allowances[shopper] + asked.quantity > limit
            ):
                return False
            if asked.quantity > available:
                return False
            available -= asked.quantity
            if shopper is not None:
                allowances[shopper] += asked.quantity
            return True

        keys: set[str] = set()
        for call in self._uncommitted():
            key = call.request.idempotency_key
            if key is not None:
                if key in keys or await self._hold_of(key) is not None:
                    continue  # a replay: it takes nothing
                keys.add(key)
            await takes(call.request)
        return await takes(request)

    async def _allowance(self, shopper: str) -> int:
        """The shopper's units of the product, as the database counts them for the limit."""
        async with self.store.reader() as conn:
            row = await conn.fetch_one(
                "SELECT units FROM shopper_allowances WHERE shopper_id = :s AND product_id = :p",
                {"s": shopper, "p": self.product_id},
            )
        return 0 if row is None else int(row["units"])

    def _uncommitted(self) -> list[Call]:
        committed: set[int] = set()
        for gate in self.store.gates:
            if gate.committed.is_set():
                committed.update(gate.calls)
        return [self.by_index[i] for i in sorted(self.by_index) if i not in committed]

    async def _hold_of(self, key: str | None) -> Reservation | None:
        if key is None:
            return None
        async with self.store.reader() as conn:
            return await inventory.get_reservation_by_key(conn, key)

    async def describe(self) -> str:
        async with self.store.reader() as conn:
            product = await inventory.get_product(conn, self.product_id)
        catalog = self.shop.catalog
        cached = catalog.get(self.product_id) if catalog is not None else None
        waiting = [c.request for c in self._uncommitted()]
        return f"database {product}, catalog {cached}, waiting {waiting}"


def gated_shop(store: GatedStore, *, with_catalog: bool) -> Shop:
    return Shop(
        store,
        hold_ms=120_000,
        publish=lambda events: None,
        catalog=Catalog() if with_catalog else None,
    )
