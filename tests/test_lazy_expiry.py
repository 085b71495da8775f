"""Lazy expiry (issue 15, promise 2): a hold past its expiresAt never keeps a unit from a
shopper, whether or not Redis, the expiry jobs or the worker are there. A reservation short of
stock expires the product's overdue holds in its own transaction, with the books the sweeper
would write, and the web process's fast refusal does not answer "Sold out" while they exist.
Each hold's units come back exactly once, whoever expires it first."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from server.domain import inventory, ledger
from server.domain.clock import now_ms
from server.domain.errors import InsufficientStock, ReservationExpired
from server.domain.model import (
    HoldRequest,
    Outcome,
    Reservation,
    ReservationChanged,
    Status,
    StockChanged,
)
from server.service.catalog import Catalog
from server.service.shop import BY_RESERVATION, Shop
from server.storage.database import Store
from tests.support import (
    assert_invariant,
    assert_reconciled,
    cancel_one,
    complete_one,
    hold,
    make_product,
    recount,
    reservation,
    write_lock_held_elsewhere,
)
from tests.test_ledger import outbox, rows, walk


async def overdue_hold(store: Store, product_id: int, quantity: int = 1) -> Reservation:
    """A hold whose expiresAt passed ten seconds ago, that nothing has expired."""
    return await hold(store, product_id, quantity, now=now_ms() - 11_000, hold_ms=1_000)


async def reserve(store: Store, *requests: HoldRequest):  # type: ignore[no-untyped-def]
    return await store.write(
        lambda conn: inventory.reserve(conn, list(requests), now=now_ms(), hold_ms=60_000)
    )


async def expired_rows(store: Store, product_id: int) -> Counter[str | None]:
    """How many `expired` ledger rows each hold of the product has."""
    return Counter(e.reservation_id for e in await rows(store, product_id) if e.kind == "expired")


async def expire_one(store: Store, reservation_id: str) -> None:
    """What a hold's own expiry does (a request that came too late, or its job)."""
    await store.write(lambda conn: inventory.expire(conn, reservation_id, now=now_ms()))


# -- the domain: in the reservation's own transaction ---------------------------------------


async def test_a_reservation_short_of_stock_expires_the_overdue_holds_and_is_granted(
    store: Store,
) -> None:
    product = await make_product(store, 3)
    other = await make_product(store, 1)
    late = await overdue_hold(store, product.id, 2)
    current = await hold(store, product.id, 1)
    elsewhere = await overdue_hold(store, other.id, 1)

    outcomes, events = await reserve(store, HoldRequest(product.id, 2, shopper_id="ann"))

    granted = outcomes[0].result().reservation
    assert granted.quantity == 2
    expired = await reservation(store, late.id)
    assert expired.status is Status.EXPIRED
    assert (await reservation(store, current.id)).status is Status.ACTIVE
    # Only the product that needed its units: another product's overdue hold waits for
    # the worker.
    assert (await reservation(store, elsewhere.id)).status is Status.ACTIVE
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.expired) == (0, 3, 2)
    assert s == await recount(store, product.id)

    # The events of the expiry, then of the hold, for the pages and the catalog.
    changed = [e for e in events if isinstance(e, ReservationChanged)]
    assert [(e.reservation.id, e.reservation.status) for e in changed] == [
        (late.id, Status.EXPIRED)
    ]
    stock = [e.product.available_stock for e in events if isinstance(e, StockChanged)]
    assert stock == [2, 0]

    # The books, as the sweeper writes them: a row and an event per expired hold.
    entries = await rows(store, product.id)
    assert [(kind, units, actor) for kind, units, _, actor in walk(entries)] == [
        ("created", 3, ledger.OPERATOR),
        ("held", 2, "shopper"),
        ("held", 1, "shopper"),
        ("expired", 2, ledger.WORKER),
        ("held", 2, "shopper:ann"),
    ]
    assert [e.reservation_id for e in entries if e.kind == "expired"] == [late.id]
    types = [e["type"] for e in await outbox(store, product.id)]
    assert types[-4:] == [
        "reservation.expired",
        "product.back_in_stock",
        "reservation.created",
        "product.sold_out",
    ]
    await assert_reconciled(store)


async def test_a_reservation_that_fits_leaves_overdue_holds_to_the_worker(store: Store) -> None:
    """The storm's common case costs nothing more: only a shortage looks for overdue holds."""
    product = await make_product(store, 3)
    late = await overdue_hold(store, product.id, 1)
    outcomes, _ = await reserve(store, HoldRequest(product.id, 2))
    assert outcomes[0].error is None
    assert (await reservation(store, late.id)).status is Status.ACTIVE


async def test_a_shortage_without_overdue_holds_is_refused_and_changes_nothing(
    store: Store,
) -> None:
    product = await make_product(store, 2)
    await hold(store, product.id, 2)
    before = await rows(store, product.id)
    outcomes, events = await reserve(store, HoldRequest(product.id, 1))
    assert isinstance(outcomes[0].error, InsufficientStock)
    assert events == []
    assert await rows(store, product.id) == before


async def test_a_batch_grants_what_the_overdue_holds_give_back_first_come_first_served(
    store: Store,
) -> None:
    product = await make_product(store, 4)
    for _ in range(3):
        await overdue_hold(store, product.id, 1)
    await hold(store, product.id, 1)
    outcomes, _ = await reserve(
        store, *(HoldRequest(product.id, q) for q in (2, 2, 1)), HoldRequest(product.id, 1)
    )
    assert [o.error is None for o in outcomes] == [True, False, True, False]
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.expired) == (0, 4, 3)
    await assert_reconciled(store)


async def test_every_unit_is_restored_once_when_reservations_jobs_and_sweepers_race(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Lazy expiries in batches of several products, sweepers and per-hold expiries, from
    separate connections (as separate processes have) at once: every overdue hold ends
    EXPIRED with one ledger row, its units counted back once, nothing oversold, and on
    PostgreSQL no two of them wait on each other (one lock order)."""
    caplog.set_level(logging.INFO, logger="server.storage.database")
    stores = [Store(database_url, busy_timeout_ms=20_000) for _ in range(4)]
    for each in stores:
        await each.connect()
    store = stores[0]
    try:
        products = [await make_product(store, 60) for _ in range(3)]
        late: list[Reservation] = []
        for product in products:
            for _ in range(60):
                late.append(await overdue_hold(store, product.id))
        rng = random.Random(15)
        granted: list[int] = []

        async def shoppers(each: Store) -> None:
            for _ in range(25):
                chosen = rng.sample(products, 2)
                outcomes, _ = await reserve(each, *(HoldRequest(p.id, 2) for p in chosen))
                granted.extend(o.result().reservation.quantity for o in outcomes if not o.error)

        async def sweeper(each: Store) -> None:
            for _ in range(20):
                await each.write(lambda conn: inventory.expire_overdue(conn, now=now_ms(), limit=7))

        async def jobs(each: Store) -> None:
            for late_hold in rng.sample(late, 60):
                await expire_one(each, late_hold.id)

        await asyncio.gather(
            shoppers(stores[0]), shoppers(stores[1]), sweeper(stores[2]), jobs(stores[3])
        )
        await store.write(lambda conn: inventory.expire_overdue(conn, now=now_ms(), limit=500))

        held = 0
        for product in products:
            s = await assert_invariant(store, product.id)
            assert s == await recount(store, product.id)
            assert s.expired == 60, s
            held += s.held
            counts = await expired_rows(store, product.id)
            assert set(counts.values()) == {1}
        assert granted, "no reservation was granted units of an overdue hold"
        assert held == sum(granted)
        assert "deadlock" not in caplog.text
        assert {(await reservation(store, h.id)).status for h in late} == {Status.EXPIRED}
        await assert_reconciled(store)
    finally:
        for each in stores:
            await each.close()


# -- the web process: the fast refusal -------------------------------------------------------


async def shop_over(store: Store) -> Shop:
    catalog = Catalog()
    shop = Shop(store, hold_ms=120_000, publish=lambda events: None, catalog=catalog)
    await shop.start()
    await catalog.reload(store)
    return shop


async def test_the_fast_refusal_does_not_say_sold_out_while_held_units_are_overdue(
    store: Store,
) -> None:
    product = await make_product(store, 2)
    late = await overdue_hold(store, product.id, 2)
    shop = await shop_over(store)
    counted = BY_RESERVATION._value.get()
    try:
        known = shop.catalog.get(product.id) if shop.catalog else None
        assert known is not None
        assert (known.available_stock, known.held_units) == (0, 2)
        held = await shop.reserve(HoldRequest(product.id, 2))
        assert held.reservation.quantity == 2
        assert (await reservation(store, late.id)).status is Status.EXPIRED
        assert BY_RESERVATION._value.get() == counted + 1  # flashsale_holds_expired_total
    finally:
        await shop.stop()


async def test_the_fast_refusal_sees_units_another_process_gave_back(store: Store) -> None:
    """The worker (another process, its event unheard while Redis is down) expired the
    hold after this process last saw the product: the refusal reads the product again."""
    product = await make_product(store, 2)
    await overdue_hold(store, product.id, 2)
    shop = await shop_over(store)
    try:
        await store.write(lambda conn: inventory.expire_overdue(conn, now=now_ms()))
        held = await shop.reserve(HoldRequest(product.id, 1))
        assert held.reservation.quantity == 1
    finally:
        await shop.stop()


async def test_units_held_and_not_due_are_refused_at_once_without_the_write_lock(
    store: Store, database_url: str
) -> None:
    product = await make_product(store, 2)
    await hold(store, product.id, 2)
    shop = await shop_over(store)
    try:
        async with write_lock_held_elsewhere(database_url, product.id):
            for _ in range(3):
                refusal = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1)))
                done, _ = await asyncio.wait({refusal}, timeout=5)
                assert done, "a refusal waited for the database's write lock"
                assert isinstance(refusal.exception(), InsufficientStock)
    finally:
        await shop.stop()


async def test_overdue_holds_send_the_request_to_the_database_even_under_the_write_lock(
    store: Store, database_url: str
) -> None:
    """The other side of the same rule: with an overdue hold the request is not refused
    from what the process knows; it waits for the database, which grants it."""
    product = await make_product(store, 1)
    await overdue_hold(store, product.id, 1)
    shop = await shop_over(store)
    try:
        async with write_lock_held_elsewhere(database_url, product.id):
            request = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1)))
            done, _ = await asyncio.wait({request}, timeout=0.3)
            assert not done, "refused from what the process knows"
        held = await request
        assert held.reservation.quantity == 1
    finally:
        await shop.stop()


# -- a late complete or cancel: the hold expires with that request's actor ------------------


async def expired_actors(store: Store, product_id: int) -> dict[str | None, str]:
    """Who the ledger and the outbox say expired each of the product's holds: hold id →
    the `expired` row's actor, checked equal to its `reservation.expired` event's."""
    by_row = {
        e.reservation_id: e.actor for e in await rows(store, product_id) if e.kind == "expired"
    }
    by_event = {
        e["data"]["reservation"]["id"]: e["data"]["actor"]
        for e in await outbox(store, product_id)
        if e["type"] == "reservation.expired"
    }
    assert by_row == by_event
    return by_row


@pytest.mark.parametrize(
    ("end", "actor"),
    [
        (complete_one, ledger.SHOP),
        (complete_one, ledger.SHOPPER),
        (cancel_one, ledger.SHOPPER),
        (cancel_one, ledger.OPERATOR),
    ],
)
async def test_a_late_complete_or_cancel_expires_the_hold_as_its_caller_not_the_worker(
    store: Store, end: Callable[..., Awaitable[Outcome[Reservation]]], actor: str
) -> None:
    """README, webhooks: "A hold that a late complete or cancel finds overdue expires then,
    with that request's actor (`shopper`, `shop` or `operator`)": the worker did not expire
    it, and the books say who did."""
    product = await make_product(store, 3)
    late = await overdue_hold(store, product.id, 2)

    refused = await store.write(lambda conn: end(conn, late.id, now=now_ms(), actor=actor))

    with pytest.raises(ReservationExpired):
        refused.result()
    assert (await reservation(store, late.id)).status is Status.EXPIRED
    assert await expired_actors(store, product.id) == {late.id: actor}
    # Expired once, units back once; the worker's sweep after it finds nothing to do.
    await store.write(lambda conn: inventory.expire_overdue(conn, now=now_ms()))
    assert await expired_actors(store, product.id) == {late.id: actor}
    s = await assert_invariant(store, product.id)
    assert (s.available, s.held, s.expired) == (3, 0, 2)
    await assert_reconciled(store)


async def test_a_batch_of_late_completes_expires_each_hold_as_its_first_caller(
    store: Store,
) -> None:
    """In one batch (complete and cancel are group-committed), each overdue hold expires as
    the caller of the first request for it, beside a hold that completes as usual; the
    sweeper's own expiry of another product's hold stays the worker's."""
    product = await make_product(store, 5)
    other = await make_product(store, 1)
    by_shop = await overdue_hold(store, product.id)
    by_shopper = await overdue_hold(store, product.id)
    current = await hold(store, product.id)
    swept = await overdue_hold(store, other.id)

    outcomes, _ = await store.write(
        lambda conn: inventory.complete_many(
            conn,
            [
                inventory.Completing(by_shop.id, actor=ledger.SHOP),
                inventory.Completing(by_shopper.id, actor=ledger.SHOPPER),
                inventory.Completing(by_shop.id, actor=ledger.SHOPPER),  # a second ask
                inventory.Completing(current.id, actor=ledger.SHOP),
            ],
            now=now_ms(),
        )
    )
    await store.write(lambda conn: inventory.expire_overdue(conn, now=now_ms()))

    assert [type(o.error) for o in outcomes] == [
        ReservationExpired,
        ReservationExpired,
        ReservationExpired,
        type(None),
    ]
    assert await expired_actors(store, product.id) == {
        by_shop.id: ledger.SHOP,
        by_shopper.id: ledger.SHOPPER,
    }
    assert await expired_actors(store, other.id) == {swept.id: ledger.WORKER}
    completed = [e for e in await rows(store, product.id) if e.kind == "completed"]
    assert [(e.reservation_id, e.actor) for e in completed] == [(current.id, ledger.SHOP)]
    await assert_reconciled(store)
