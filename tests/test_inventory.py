"""The inventory operations against a real database: SQLite file and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.errors import (
    IdempotencyKeyReused,
    InsufficientStock,
    ProductNotFound,
    ReservationCancelled,
    ReservationCompleted,
    ReservationExpired,
    ReservationNotFound,
    SaleNotStarted,
    StockNow,
)
from server.domain.executor import Executor
from server.domain.model import (
    Event,
    HoldRequest,
    Outcome,
    Reservation,
    ReservationChanged,
    Status,
    StockChanged,
)
from server.storage.database import Store
from tests.support import (
    assert_invariant,
    cancel_one,
    complete_one,
    eventually,
    hold,
    make_product,
    reservation,
    stats,
)


async def reserve(store: Store, *requests: HoldRequest, now: int | None = None):  # type: ignore[no-untyped-def]
    return await store.write(
        lambda conn: inventory.reserve(
            conn, list(requests), now=now_ms() if now is None else now, hold_ms=60_000
        )
    )


async def test_reserve_takes_units_and_records_an_active_hold(store: Store) -> None:
    product = await make_product(store, 5)
    outcomes, events = await reserve(store, HoldRequest(product.id, 2))
    held = outcomes[0].result()
    assert held.reservation.status is Status.ACTIVE
    assert held.reservation.expires_at == held.reservation.created_at + 60_000
    (event,) = events
    assert isinstance(event, StockChanged)
    assert event.product.available_stock == 3
    assert event.product.version == product.version + 1
    assert (await reservation(store, held.reservation.id)).quantity == 2
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.sold) == (3, 2, 0)


async def test_reserve_refuses_more_than_is_left_and_changes_nothing(store: Store) -> None:
    product = await make_product(store, 3)
    outcomes, events = await reserve(store, HoldRequest(product.id, 5))
    with pytest.raises(InsufficientStock) as refused:
        outcomes[0].result()
    assert (refused.value.available, refused.value.requested) == (3, 5)
    assert "Only 3 left, 5 requested" in refused.value.message
    assert events == []
    s = await stats(store, product.id)
    assert (s.available, s.held) == (3, 0)


async def test_reserve_tells_a_missing_product_from_a_sold_out_one(store: Store) -> None:
    sold_out = await make_product(store, 0)
    outcomes, _ = await reserve(store, HoldRequest(999_999, 1), HoldRequest(sold_out.id, 1))
    with pytest.raises(ProductNotFound):
        outcomes[0].result()
    with pytest.raises(InsufficientStock, match="Sold out"):
        outcomes[1].result()


async def test_reserve_is_refused_before_the_sale_starts(store: Store) -> None:
    starts = now_ms() + 60_000
    product = await make_product(store, 5, sale_starts_at=starts)
    outcomes, _ = await reserve(store, HoldRequest(product.id, 1))
    with pytest.raises(SaleNotStarted):
        outcomes[0].result()
    outcomes, _ = await reserve(store, HoldRequest(product.id, 1), now=starts)
    assert outcomes[0].result().reservation.quantity == 1


async def test_a_batch_is_served_first_come_first_served(store: Store) -> None:
    product = await make_product(store, 5)
    other = await make_product(store, 1)
    outcomes, events = await reserve(
        store,
        HoldRequest(product.id, 3),
        HoldRequest(product.id, 3),  # only 2 left: refused
        HoldRequest(other.id, 1),
        HoldRequest(product.id, 2),  # fits exactly
        HoldRequest(product.id, 1),  # nothing left
    )
    granted = [o.error is None for o in outcomes]
    assert granted == [True, False, True, True, False]
    assert isinstance(outcomes[1].error, InsufficientStock)
    after = next(e.product for e in events if e.product.id == product.id)
    # The refusal carries the stock the batch left, for the shopper's page to show.
    assert outcomes[1].error.stock == StockNow(product.id, 0, 5, after.version)
    assert {e.product.id: e.product.available_stock for e in events} == {product.id: 0, other.id: 0}
    assert (await assert_invariant(store, product.id)).held == 5


async def test_a_batch_that_all_fits_takes_one_version(store: Store) -> None:
    product = await make_product(store, 10)
    _, events = await reserve(store, *[HoldRequest(product.id, 1) for _ in range(4)])
    (event,) = events
    assert event.product.version == product.version + 1
    assert event.product.available_stock == 6


async def test_an_idempotency_key_makes_one_hold(store: Store) -> None:
    product = await make_product(store, 5)
    first = (await reserve(store, HoldRequest(product.id, 2, "key-1")))[0][0].result()
    again = (await reserve(store, HoldRequest(product.id, 2, "key-1")))[0][0].result()
    assert again.replayed
    assert again.reservation.id == first.reservation.id
    assert (await stats(store, product.id)).held == 2
    other_body = (await reserve(store, HoldRequest(product.id, 3, "key-1")))[0][0]
    assert isinstance(other_body.error, IdempotencyKeyReused)


async def test_an_idempotency_key_is_free_again_after_a_day(store: Store) -> None:
    product = await make_product(store, 5)
    day_ago = now_ms() - inventory.IDEMPOTENCY_WINDOW_MS - 1
    old = await hold(store, product.id, 1, now=day_ago, key="reused")
    fresh = (await reserve(store, HoldRequest(product.id, 1, "reused")))[0][0].result()
    assert not fresh.replayed
    assert fresh.reservation.id != old.id


async def test_old_idempotency_keys_are_forgotten_in_batches(store: Store) -> None:
    product = await make_product(store, 10)
    day_ago = now_ms() - inventory.IDEMPOTENCY_WINDOW_MS - 1
    for n in range(5):
        await hold(store, product.id, 1, now=day_ago, key=f"old-{n}")
    recent = await hold(store, product.id, 1, key="recent")
    for expected in (3, 2):
        freed = await store.write(
            lambda conn: inventory.forget_old_idempotency_keys(conn, now=now_ms(), limit=3)
        )
        assert freed == expected
    async with store.reader() as conn:
        assert await inventory.get_reservation_by_key(conn, "old-0") is None
        assert (await inventory.get_reservation_by_key(conn, "recent")).id == recent.id  # type: ignore[union-attr]


async def test_complete_is_idempotent_and_keeps_the_units_sold(store: Store) -> None:
    product = await make_product(store, 5)
    held = await hold(store, product.id, 2)
    done = await store.write(lambda conn: complete_one(conn, held.id, now=now_ms()))
    assert done.result().status is Status.COMPLETED
    stock, changed = done.events
    assert isinstance(changed, ReservationChanged)
    # Held units became sold: a stock change every page hears of (nothing may come back).
    assert isinstance(stock, StockChanged)
    assert (stock.product.held_units, stock.product.available_stock) == (0, 3)
    assert stock.product.version == product.version + 2  # held, then sold
    again = await store.write(lambda conn: complete_one(conn, held.id, now=now_ms()))
    assert again.result().completed_at == done.result().completed_at
    assert again.events == []
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.sold) == (3, 0, 2)


async def test_a_hold_past_its_expiry_can_never_be_completed(store: Store) -> None:
    product = await make_product(store, 5)
    overdue = await hold(store, product.id, 2, now=now_ms() - 10_000, hold_ms=1_000)
    # No job has run: the hold is still ACTIVE in the database.
    assert (await reservation(store, overdue.id)).status is Status.ACTIVE
    refused = await store.write(lambda conn: complete_one(conn, overdue.id, now=now_ms()))
    with pytest.raises(ReservationExpired, match="expired"):
        refused.result()
    # ...and refusing it expired it on the spot, units back.
    assert (await reservation(store, overdue.id)).status is Status.EXPIRED
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.expired) == (5, 0, 2)


async def test_complete_and_cancel_answer_for_holds_in_other_states(store: Store) -> None:
    product = await make_product(store, 5)
    cancelled = await hold(store, product.id, 1)
    completed = await hold(store, product.id, 1)
    await store.write(lambda conn: cancel_one(conn, cancelled.id, now=now_ms()))
    await store.write(lambda conn: complete_one(conn, completed.id, now=now_ms()))
    refusals: list[tuple[Callable[..., Awaitable[Outcome[Reservation]]], str, type[Exception]]] = [
        (complete_one, cancelled.id, ReservationCancelled),
        (cancel_one, completed.id, ReservationCompleted),
        (complete_one, "x" * 22, ReservationNotFound),
        (cancel_one, "x" * 22, ReservationNotFound),
    ]
    for operation, reservation_id, error in refusals:
        with pytest.raises(error):
            (await _attempt(store, operation, reservation_id)).result()
    await assert_invariant(store, product.id)


async def test_a_batch_of_completes_answers_each_request_in_order(store: Store) -> None:
    """One transaction for many completes: each answered as it would be on its own (a
    hold already bought, a cancelled one, an overdue one expired on the spot, one of another
    shopper, one that does not exist), and each product changed once, whatever the mix."""
    one = await make_product(store, 10)
    two = await make_product(store, 10)
    mine = await hold(store, one.id, 2)
    other = await hold(store, two.id, 1)
    bought = await hold(store, one.id, 1)
    cancelled = await hold(store, two.id, 1)
    overdue = await hold(store, one.id, 3, now=now_ms() - 10_000, hold_ms=1_000)
    await store.write(lambda conn: complete_one(conn, bought.id, now=now_ms()))
    await store.write(lambda conn: cancel_one(conn, cancelled.id, now=now_ms()))
    before = {p.id: (await stats(store, p.id)) for p in (one, two)}
    requests = [
        inventory.Completing(mine.id),
        inventory.Completing(bought.id),
        inventory.Completing(cancelled.id),
        inventory.Completing(overdue.id),
        inventory.Completing("x" * 22),
        inventory.Completing(other.id, caller="someone"),  # a hold without a shopper: anyone's
    ]
    outcomes, events = await store.write(
        lambda conn: inventory.complete_many(conn, requests, now=now_ms())
    )
    assert outcomes[0].result().status is Status.COMPLETED
    assert outcomes[1].result().completed_at is not None
    for outcome, error in zip(
        outcomes[2:5], (ReservationCancelled, ReservationExpired, ReservationNotFound), strict=True
    ):
        with pytest.raises(error):
            outcome.result()
    assert outcomes[5].result().status is Status.COMPLETED
    stock = [e.product.id for e in events if isinstance(e, StockChanged)]
    # Each product once for the completes, and one more for the overdue hold's expiry.
    assert sorted(stock) == sorted([one.id, two.id, one.id])
    assert sum(isinstance(e, ReservationChanged) for e in events) == 3
    s1, s2 = await assert_invariant(store, one.id), await assert_invariant(store, two.id)
    assert (s1.sold - before[one.id].sold, s1.expired - before[one.id].expired) == (2, 3)
    assert s2.sold - before[two.id].sold == 1


async def test_a_batch_answers_another_shoppers_request_for_a_hold_not_found(
    store: Store,
) -> None:
    """In one batch, another shopper's complete (or cancel) of a hold before its owner's:
    the owner's request ends the hold, and the other one is not found, as on its own; it
    neither gets the hold (its product, quantity and status) nor is the ledger's actor of
    the purchase (the first request for the hold was answered with what the
    owner's UPDATE ended, whoever had asked)."""
    product = await make_product(store, 10)
    for ends in (Status.COMPLETED, Status.CANCELLED):
        (held,), _ = await reserve(store, HoldRequest(product.id, 2, shopper_id="alice"))
        hold_id = held.result().reservation.id

        async def end(
            conn: Executor, hold_id: str = hold_id, ends: Status = ends
        ) -> tuple[list[Outcome[Reservation]], list[Event]]:
            if ends is Status.COMPLETED:
                return await inventory.complete_many(
                    conn,
                    [
                        inventory.Completing(hold_id, "shopper:mallory", caller="mallory"),
                        inventory.Completing(hold_id, "shopper:alice", caller="alice"),
                    ],
                    now=now_ms(),
                )
            return await inventory.cancel_many(
                conn,
                [
                    inventory.Cancelling(hold_id, "shopper:mallory", caller="mallory"),
                    inventory.Cancelling(hold_id, "shopper:alice", caller="alice"),
                ],
                now=now_ms(),
            )

        outcomes, _ = await store.write(end)
        with pytest.raises(ReservationNotFound):
            outcomes[0].result()
        assert outcomes[1].result().status is ends
        async with store.reader() as conn:
            actors = await conn.fetch_all(
                "SELECT actor FROM stock_ledger WHERE reservation_id = :r AND movement <> 'held'",
                {"r": hold_id},
            )
        assert [row["actor"] for row in actors] == ["shopper:alice"]
    await assert_invariant(store, product.id)


async def _attempt(
    store: Store,
    operation: Callable[..., Awaitable[Outcome[Reservation]]],
    reservation_id: str,
) -> Outcome[Reservation]:
    return await store.write(lambda conn: operation(conn, reservation_id, now=now_ms()))


async def test_a_shoppers_holds_by_status_are_looked_for_among_their_newest(
    store: Store,
) -> None:
    """Listing a shopper's holds by status reads at most `walk` of their newest holds: the
    index has no status, and `status=ACTIVE` of a shopper with 30,000 ended holds read all
    of them on every request (51-102 ms of a reader). Without a status, and within the walk,
    the listing is as before."""
    product = await make_product(store, 100)
    now = now_ms()
    (first,), _ = await reserve(store, HoldRequest(product.id, 1, shopper_id="anon:bot"), now=now)
    later = []
    for n in range(1, 13):
        (outcome,), _ = await reserve(
            store, HoldRequest(product.id, 1, shopper_id="anon:bot"), now=now + n
        )
        later.append(outcome.result().reservation.id)

    async def cancel(reservation_id: str) -> None:
        await store.write(lambda conn: cancel_one(conn, reservation_id, now=now + 20))

    for reservation_id in later:
        await cancel(reservation_id)

    async def listed(status: Status | None, walk: int) -> list[str]:
        async with store.reader() as conn:
            found = await inventory.list_shopper_reservations(
                conn, "anon:bot", status=status, limit=5, walk=walk
            )
        return [r.id for r in found]

    # The one ACTIVE hold is the oldest of 13: within a walk of 13, past one of 12.
    assert await listed(Status.ACTIVE, walk=13) == [first.result().reservation.id]
    assert await listed(Status.ACTIVE, walk=12) == []
    assert await listed(Status.CANCELLED, walk=12) == later[::-1][:5]
    assert await listed(None, walk=1) == later[::-1][:5]
    assert inventory.STATUS_WALK == 1_000


async def test_cancel_restores_the_units_once(store: Store) -> None:
    product = await make_product(store, 5)
    held = await hold(store, product.id, 3)
    for _ in range(3):
        outcome = await store.write(lambda conn: cancel_one(conn, held.id, now=now_ms()))
        assert outcome.result().status is Status.CANCELLED
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.cancelled) == (5, 0, 3)


async def test_expire_waits_for_the_hold_to_be_due_and_restores_once(store: Store) -> None:
    product = await make_product(store, 5)
    held = await hold(store, product.id, 2, hold_ms=1_000)
    early = await store.write(lambda conn: inventory.expire(conn, held.id, now=held.expires_at - 1))
    assert early.value is None
    assert early.events == []
    for _ in range(2):
        await store.write(lambda conn: inventory.expire(conn, held.id, now=held.expires_at))
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.expired) == (5, 0, 2)


async def test_expire_overdue_takes_every_overdue_hold_in_bounded_batches(store: Store) -> None:
    product = await make_product(store, 1_300)
    past = now_ms() - 60_000
    outcomes, _ = await store.write(
        lambda conn: inventory.reserve(
            conn, [HoldRequest(product.id, 1)] * 1_200, now=past, hold_ms=1_000
        )
    )
    assert all(o.error is None for o in outcomes)
    not_due = await hold(store, product.id, 1)
    sizes = []
    while True:
        done = await store.write(
            lambda conn: inventory.expire_overdue(conn, now=now_ms(), limit=500)
        )
        sizes.append(len(done.result()))
        if not done.result():
            break
    assert sizes == [500, 500, 200, 0]
    assert (await reservation(store, not_due.id)).status is Status.ACTIVE
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.expired) == (1_299, 1, 1_200)


async def test_restock_and_create_move_total_and_available_together(store: Store) -> None:
    first = await make_product(store, 5)
    second = await make_product(store, 0)
    assert second.id == first.id + 1
    await hold(store, first.id, 2)
    restocked = (
        await store.write(lambda conn: inventory.restock(conn, first.id, 10, now=now_ms()))
    ).result()
    assert (restocked.total_stock, restocked.available_stock) == (15, 13)
    await assert_invariant(store, first.id)
    missing = await store.write(lambda conn: inventory.restock(conn, 999_999, 1, now=now_ms()))
    assert isinstance(missing.error, ProductNotFound)


async def test_two_processes_cannot_oversell_through_separate_connections(
    database_url: str,
) -> None:
    """Several Stores (as several processes have) reserving at once on one database."""
    stores = [Store(database_url, busy_timeout_ms=10_000) for _ in range(3)]
    for each in stores:
        await each.connect()
    try:
        product = await make_product(stores[0], 50)

        async def storm(store: Store, n: int) -> int:
            granted = 0
            for _ in range(n):
                outcomes, _ = await reserve(store, *[HoldRequest(product.id, q) for q in (1, 2, 3)])
                granted += sum(o.result().reservation.quantity for o in outcomes if not o.error)
            return granted

        granted = await asyncio.gather(*(storm(each, 15) for each in stores))
        assert sum(granted) == 50
        s = await assert_invariant(stores[0], product.id)
        assert (s.available, s.held) == (0, 50)
    finally:
        for each in stores:
            await each.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_batch_takes_its_products_in_id_order(store: Store, database_url: str) -> None:
    """Every transaction that changes several products locks them in id order, so two can
    never wait on each other (the expiry of holds on both products, say). Shown here by a
    batch that names the higher id first: it must already hold the lower one when it
    waits for the higher."""
    low = await make_product(store, 10)
    high = await make_product(store, 10)
    other = await asyncpg.connect(database_url)
    try:
        blocker = other.transaction()
        await blocker.start()
        await other.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", high.id)
        batch = asyncio.create_task(reserve(store, HoldRequest(high.id, 1), HoldRequest(low.id, 1)))
        probe = await asyncpg.connect(database_url)
        try:

            async def low_is_locked() -> bool:
                try:
                    async with probe.transaction():
                        await probe.execute("SET LOCAL lock_timeout = '50ms'")
                        await probe.execute(
                            "SELECT 1 FROM products WHERE id = $1 FOR UPDATE", low.id
                        )
                except asyncpg.exceptions.LockNotAvailableError:
                    return True
                return False

            await eventually(low_is_locked, within=5, what="the batch to lock the lower id")
            assert not batch.done()
        finally:
            await probe.close()
        await blocker.rollback()
        outcomes, _ = await batch
        assert all(outcome.error is None for outcome in outcomes)
    finally:
        await other.close()


def test_hold_ids_begin_with_their_time_and_keep_128_random_bits() -> None:
    """A hold id is its time, in an alphabet in ASCII order, then 128 random bits: ids made
    later sort after (the holds' primary key index is written at its end, not all over it),
    and two ids made in the same millisecond differ in their random part."""
    now = now_ms()
    times = [0, 1, 63, 64, now - 1, now, now + 1, 2**47 - 1]
    ids = [inventory.new_reservation_ids(1, now=t)[0] for t in times]
    assert ids == sorted(ids)
    assert all(len(i) == 30 and inventory.is_reservation_id(i) for i in ids)
    same = inventory.new_reservation_ids(1_000, now=now)
    assert len({i[:8] for i in same}) == 1
    assert len({i[8:] for i in same}) == 1_000
    raw = [base64.urlsafe_b64decode(i[8:] + "==") for i in same]
    assert all(len(r) == 16 for r in raw)
    # Every bit of the random part varies (none fixed by the encoding).
    ored = 0
    for r in raw:
        ored |= int.from_bytes(r, "big")
    assert ored == 2**128 - 1
