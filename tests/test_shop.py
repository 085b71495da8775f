"""The service layer's storm path: reservations the database could not grant anyway are
answered at once, without waiting behind the ones it will."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from server.domain import inventory
from server.domain.errors import InsufficientStock, ReservationNotFound
from server.domain.model import HoldRequest
from server.service.catalog import Catalog
from server.service.shop import Shop
from server.storage.database import Store
from server.storage.errors import Busy, NotAttempted
from tests.interleaving import until
from tests.support import assert_invariant, make_product, write_lock_held_elsewhere


@contextlib.asynccontextmanager
async def shop_of_its_own(
    database_url: str, busy_timeout_ms: int, *, deadline_ms: int | None = None
) -> AsyncIterator[Shop]:
    """A shop with a catalog over a store of its own, whose writes wait `busy_timeout_ms`
    at most for the database's lock."""
    store = Store(database_url, busy_timeout_ms=busy_timeout_ms)
    await store.connect()
    catalog = Catalog()
    shop = Shop(
        store,
        hold_ms=120_000,
        publish=lambda events: None,
        catalog=catalog,
        deadline_ms=deadline_ms,
    )
    await shop.start()
    try:
        yield shop
    finally:
        await shop.stop()
        await store.close()


@pytest.fixture
async def shop_with_catalog(store: Store) -> AsyncIterator[Shop]:
    catalog = Catalog()
    shop = Shop(store, hold_ms=120_000, publish=lambda events: None, catalog=catalog)
    await shop.start()
    await catalog.reload(store)
    yield shop
    await shop.stop()


async def test_requests_beyond_the_units_promised_are_refused_before_the_database_answers(
    store: Store, shop_with_catalog: Shop, database_url: str
) -> None:
    shop = shop_with_catalog
    product = await make_product(store, 100)
    assert shop.catalog is not None
    await shop.catalog.reload(store)

    async with write_lock_held_elsewhere(database_url, product.id):
        # The database cannot commit anything now: the first hundred wait for it, and
        # the fifty behind them, for whom no unit is left, are answered meanwhile.
        tasks = [asyncio.create_task(shop.reserve(HoldRequest(product.id, 1))) for _ in range(150)]
        await asyncio.wait(tasks, timeout=2)
        refused = [t for t in tasks if t.done()]
        assert len(refused) == 50
        for task in refused:
            error = task.exception()
            assert isinstance(error, InsufficientStock)
            assert error.message == "Sold out: no units are left."
        assert all(not t.done() for t in tasks[:100])

    held = await asyncio.gather(*tasks[:100])
    assert len({h.reservation.id for h in held}) == 100
    stats = await assert_invariant(store, product.id)
    assert (stats.available, stats.held) == (0, 100)


async def test_a_retry_of_a_waiting_request_joins_it_even_with_nothing_left_to_promise(
    store: Store, shop_with_catalog: Shop, database_url: str
) -> None:
    shop = shop_with_catalog
    product = await make_product(store, 1)
    assert shop.catalog is not None
    await shop.catalog.reload(store)

    async with write_lock_held_elsewhere(database_url, product.id):
        first = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1, "click-1")))
        retry = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1, "click-1")))
        other = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1, "click-2")))
        # "click-1" may itself be a retry of a hold already made, which takes nothing:
        # "click-2" waits for its batch before it is told the product is sold out.
        await until(lambda: shop.promises.parked == 1, "click-2 to wait for click-1's batch")
        assert not first.done()
        assert not retry.done()
        assert not other.done()

    one, again = await first, await retry
    assert one.reservation.id == again.reservation.id
    assert again.replayed
    with pytest.raises(InsufficientStock):
        await other
    assert (await assert_invariant(store, product.id)).held == 1


async def test_units_promised_to_a_batch_that_failed_are_offered_again(
    database_url: str,
) -> None:
    async with shop_of_its_own(database_url, busy_timeout_ms=200) as shop:
        product = await make_product(shop.store, 1)
        assert shop.catalog is not None
        await shop.catalog.reload(shop.store)
        async with write_lock_held_elsewhere(database_url, product.id):
            with pytest.raises(Busy):
                await shop.reserve(HoldRequest(product.id, 1))
        held = await shop.reserve(HoldRequest(product.id, 1))
        assert held.reservation.quantity == 1


async def test_requests_waiting_for_a_batch_the_database_found_busy_do_not_follow_it(
    database_url: str,
) -> None:
    """Twenty keyed requests wait for the batch ahead of them to settle (it may be a retry,
    which takes nothing). The database is busy and that batch fails: they are answered
    `NotAttempted` (503, nothing changed, Retry-After spread over 1-3 s) instead of all
    going to the busy database together, each to wait out the busy timeout again."""
    async with shop_of_its_own(database_url, busy_timeout_ms=300) as shop:
        store = shop.store
        product = await make_product(store, 10)
        assert shop.catalog is not None
        await shop.catalog.reload(store)
        async with write_lock_held_elsewhere(database_url, product.id):
            first = asyncio.create_task(shop.reserve(HoldRequest(product.id, 10, "k-0")))
            await until(lambda: shop._holds.requests == 1, "the first batch to be sent")
            behind = [
                asyncio.create_task(shop.reserve(HoldRequest(product.id, 1, f"k-{n}")))
                for n in range(1, 21)
            ]
            await until(lambda: shop.promises.parked == 20, "the twenty to wait for it")
            answers = await asyncio.gather(first, *behind, return_exceptions=True)
        assert isinstance(answers[0], Busy), answers[0]
        for answer in answers[1:]:
            assert isinstance(answer, NotAttempted), answer
            assert 1 <= answer.retry_after_s <= 3
            assert "nothing changed" in str(answer)
        assert shop._holds.requests == 1, "the waiting requests went to the database"
        assert shop.promises.empty
        assert (await assert_invariant(store, product.id)).held == 0


async def test_a_request_queued_behind_a_batch_the_database_refused_is_not_tried(
    database_url: str,
) -> None:
    """A request queued behind a batch of its product (not a keyed wait: units are left for
    both) is answered `NotAttempted` at once when the database refuses that batch (busy),
    never tried: it would have waited the busy timeout again."""
    async with shop_of_its_own(database_url, busy_timeout_ms=300) as shop:
        product = await make_product(shop.store, 10)
        assert shop.catalog is not None
        await shop.catalog.reload(shop.store)
        async with write_lock_held_elsewhere(database_url, product.id):
            first = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1)))
            await until(lambda: shop._holds.requests == 1, "the first batch to be sent")
            behind = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1)))
            await until(lambda: shop.reserve_backlog == 1, "the second to queue behind it")
            answers = await asyncio.gather(first, behind, return_exceptions=True)
        assert isinstance(answers[0], Busy)
        assert not isinstance(answers[0], NotAttempted)
        assert isinstance(answers[1], NotAttempted), answers[1]
        assert "a batch of its product that the database found busy" in str(answers[1])
        assert shop._holds.requests == 1, "the request behind went to the database"
        assert shop.promises.empty
        # A request that comes after the refusal is tried as usual.
        held = await shop.reserve(HoldRequest(product.id, 2))
        assert held.reservation.quantity == 2


async def test_a_batch_waiting_for_its_products_lock_does_not_use_up_the_deadline_behind_it(
    database_url: str,
) -> None:
    """The partition drill's case: a batch waits for a row lock another host's stranded
    transaction holds, past the deadline of the request of the same product queued behind
    it; that wait is the database's (ended by its busy timeout), so once the lock is freed
    the request is tried and made, not answered 503."""
    async with shop_of_its_own(database_url, busy_timeout_ms=30_000, deadline_ms=200) as shop:
        product = await make_product(shop.store, 10)
        assert shop.catalog is not None
        await shop.catalog.reload(shop.store)
        async with write_lock_held_elsewhere(database_url, product.id):
            first = asyncio.create_task(shop.reserve(HoldRequest(product.id, 1)))
            await until(lambda: shop._holds.requests == 1, "the first batch to be sent")
            behind = asyncio.create_task(shop.reserve(HoldRequest(product.id, 2)))
            await until(lambda: shop.reserve_backlog == 1, "the second to queue behind it")
            queued = asyncio.get_running_loop().time()
            await until(
                lambda: asyncio.get_running_loop().time() - queued > 0.6,
                "three times the deadline to pass",
            )
            assert not behind.done()
        held = await asyncio.gather(first, behind)
        assert [h.reservation.quantity for h in held] == [1, 2]
        assert shop._holds.requests == 2
        assert (await assert_invariant(shop.store, product.id)).held == 3


async def test_a_request_queued_behind_another_products_batch_past_its_deadline_is_not_made(
    database_url: str,
) -> None:
    """The batch in flight holds another product, and waits for the database's lock (held
    elsewhere, a busy timeout of 30 s) past the deadline of the request queued behind it:
    that request waited on others' account, and is answered `NotAttempted` as its batch is
    formed, never tried; the batch in flight is still answered."""
    async with shop_of_its_own(database_url, busy_timeout_ms=30_000, deadline_ms=200) as shop:
        locked = await make_product(shop.store, 10)
        other = await make_product(shop.store, 10)
        assert shop.catalog is not None
        await shop.catalog.reload(shop.store)
        async with write_lock_held_elsewhere(database_url, locked.id):
            first = asyncio.create_task(shop.reserve(HoldRequest(locked.id, 1)))
            await until(lambda: shop._holds.requests == 1, "the first batch to be sent")
            behind = asyncio.create_task(shop.reserve(HoldRequest(other.id, 2)))
            await until(lambda: shop.reserve_backlog == 1, "the second to queue behind it")
            queued = asyncio.get_running_loop().time()
            await until(
                lambda: asyncio.get_running_loop().time() - queued > 0.3,
                "the deadline to pass",
            )
            assert not first.done()
        held = await first
        assert held.reservation.quantity == 1
        with pytest.raises(NotAttempted, match=r"waited 0\.2 s .*nothing changed"):
            await behind
        assert shop._holds.requests == 1, "the late request went to the database"
        assert shop.promises.empty
        assert (await assert_invariant(shop.store, other.id)).held == 0


async def test_completes_and_cancels_that_arrive_together_share_transactions(
    store: Store, shop_with_catalog: Shop
) -> None:
    """Like reservations, the completes (and the cancels) waiting while one transaction runs
    go together in the next: the product changes once per batch, not once per hold, and
    each caller still gets its own answer (another shopper's hold is not found)."""
    shop = shop_with_catalog
    product = await make_product(store, 100)
    held = [
        (await shop.reserve(HoldRequest(product.id, 1, shopper_id=f"s{n % 2}"))).reservation
        for n in range(40)
    ]
    async with store.reader() as conn:
        before = await inventory.get_product(conn, product.id)
    assert before is not None

    async def end(n: int, reservation_id: str) -> str:
        try:
            if n < 30:
                done = await shop.complete(reservation_id, caller=f"s{n % 2}")
            else:
                done = await shop.cancel(reservation_id, caller="s0")
        except ReservationNotFound:
            return "not found"
        return done.status.value

    answers = await asyncio.gather(*(end(n, r.id) for n, r in enumerate(held)))
    assert answers == ["COMPLETED"] * 30 + ["CANCELLED", "not found"] * 5
    s = await assert_invariant(store, product.id)
    assert (s.sold, s.cancelled, s.held) == (30, 5, 5)
    async with store.reader() as conn:
        after = await inventory.get_product(conn, product.id)
    assert after is not None
    assert after.version - before.version < 35  # fewer changes than holds ended
