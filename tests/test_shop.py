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
from server.storage.errors import Busy
from tests.interleaving import until
from tests.support import assert_invariant, make_product, write_lock_held_elsewhere


@contextlib.asynccontextmanager
async def shop_of_its_own(database_url: str, busy_timeout_ms: int) -> AsyncIterator[Shop]:
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
