"""The fast refusal never refuses what the database would grant (README: the catalog "refuses
a reservation it knows cannot succeed"), and a retry identical to the hold made is always a
replay, whatever the interleaving of batches, catalog reloads, retries and other processes.

Each example from issue 15 (item 1) and issue 10 (item 9) is a test here, and a property-based
test tries many interleavings, checking every fast refusal against the database at the
moment it is made (tests/interleaving.py), with and without a limit per shopper (issue 16:
a request whose shopper is at the limit takes nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.errors import IdempotencyKeyReused, InsufficientStock, ShopperLimitReached
from server.domain.inventory import Held, ProductChanges
from server.storage.database import Store
from tests.interleaving import GatedStore, Interleaving, gated_shop
from tests.support import assert_invariant, make_product, stats


@dataclass
class Harness:
    store: GatedStore
    elsewhere: Store

    @asynccontextmanager
    async def drive(
        self, stock: int, *, with_catalog: bool, limit: int | None = None
    ) -> AsyncIterator[Interleaving]:
        """A new product with `stock` units (and `limit` units per shopper) and a new shop;
        on leaving the block, every batch is let through until every request has its
        answer."""
        product = await make_product(self.elsewhere, stock)
        if limit is not None:
            await self.elsewhere.write(
                lambda conn: inventory.update_product(
                    conn, product.id, ProductChanges(max_per_shopper=limit), now=now_ms()
                )
            )
        shop = gated_shop(self.store, with_catalog=with_catalog)
        if shop.catalog is not None:
            await shop.catalog.reload(self.elsewhere)
        await shop.start()
        run = Interleaving(shop, self.store, self.elsewhere, product.id)
        try:
            yield run
            await run.finish()
            assert shop.promises.empty, "a promise outlived its request"
        finally:
            self.store.open_every_gate()  # so that the shop can stop
            await shop.stop()


@pytest.fixture
async def harness(database_url: str, store: Store) -> AsyncIterator[Harness]:
    gated = GatedStore(database_url)
    await gated.connect()
    yield Harness(gated, store)
    await gated.close()


WITH_AND_WITHOUT_CATALOG = pytest.mark.parametrize(
    "with_catalog", [True, False], ids=["web-catalog", "no-catalog"]
)


# -- issue 15, item 1: the examples -----------------------------------------------------


@WITH_AND_WITHOUT_CATALOG
async def test_a_committed_batch_whose_callers_have_not_resumed_is_not_counted_twice(
    harness: Harness, with_catalog: bool
) -> None:
    """A batch has committed and the stock read reflects it, but its callers have not
    resumed yet (tests/test_worker.py's false "Sold out", made deterministic): the units it
    took must not be subtracted a second time."""
    async with harness.drive(50, with_catalog=with_catalog) as run:
        first = await run.reserve(30)
        assert first.index is not None
        assert await run.commit()
        await run.reload()  # the catalog now has the stock the batch left (20)
        rest = await run.reserve(20)
        assert rest.index is not None, rest.task.exception()
        assert await run.resume()
    held = await rest.task
    assert held.reservation.quantity == 20
    s = await assert_invariant(harness.elsewhere, run.product_id)
    assert (s.available, s.held) == (0, 50)


@pytest.mark.parametrize(("stock", "quantity", "retries"), [(10, 2, 5), (50, 2, 25)])
@WITH_AND_WITHOUT_CATALOG
async def test_copies_of_one_waiting_request_promise_its_units_once(
    harness: Harness, with_catalog: bool, stock: int, quantity: int, retries: int
) -> None:
    """A client retrying while its first request still waits: the copies can only ever be
    one hold, so every other shopper can still have every other unit."""
    async with harness.drive(stock, with_catalog=with_catalog) as run:
        first = await run.reserve(quantity, "click-1")
        copies = [await run.reserve(quantity, "click-1") for _ in range(retries)]
        others = [await run.reserve(1, f"other-{n}") for n in range(stock - quantity)]
        refused = [c.request for c in others if c.index is None]
        assert not refused, f"{len(refused)} refused at once"
    made = await first.task
    replays = [await c.task for c in copies]
    assert {r.reservation.id for r in replays} == {made.reservation.id}
    assert all(r.replayed for r in replays)
    assert not any([(await c.task).replayed for c in others])
    s = await assert_invariant(harness.elsewhere, run.product_id)
    assert (s.available, s.held) == (0, stock)
    assert run.fast_refusals == 0


@WITH_AND_WITHOUT_CATALOG
async def test_a_catalog_reload_between_commit_and_resume_refuses_nothing_grantable(
    harness: Harness, with_catalog: bool
) -> None:
    """Many small batches, each committed and the catalog reloaded before its callers
    resume; every request for the units left is still sent to the database."""
    async with harness.drive(12, with_catalog=with_catalog) as run:
        calls = []
        for _ in range(6):
            calls.append(await run.reserve(2))
            await run.commit()
            await run.reload()
        assert all(c.index is not None for c in calls), [c.task for c in calls]
    assert all(isinstance(held, Held) for held in [await c.task for c in calls])
    assert (await stats(harness.elsewhere, run.product_id)).available == 0


@WITH_AND_WITHOUT_CATALOG
async def test_a_storm_of_keyed_requests_is_refused_without_the_database(
    harness: Harness, with_catalog: bool
) -> None:
    """Every request with an Idempotency-Key: each promise may be a retry of a hold already
    made (which takes nothing), so the requests behind the promises wait for their batch,
    and are then refused without a place in a batch, as a storm's thousands must be."""
    async with harness.drive(10, with_catalog=with_catalog) as run:
        promised = [await run.reserve(1, f"k-{n}") for n in range(10)]
        behind = [await run.reserve(1, f"late-{n}") for n in range(30)]
        assert all(c.index is not None for c in promised)
        assert all(c.parked and not c.task.done() for c in behind)
        while await run.resume() or await run.commit():
            pass
        assert all(c.index is None for c in behind), "sent to the database"
        assert run.fast_refusals == 30
    for call in behind:
        with pytest.raises(InsufficientStock):
            await call.task
    assert all(isinstance(held, Held) for held in [await c.task for c in promised])


# -- issue 10, item 9: a retry identical to the hold made is a replay ---------------------


@WITH_AND_WITHOUT_CATALOG
async def test_a_genuine_retry_racing_a_different_body_is_still_a_replay(
    harness: Harness, with_catalog: bool
) -> None:
    async with harness.drive(10, with_catalog=with_catalog) as run:
        original = await run.reserve(1, "k")
        await run.commit()
        await run.resume()
        blocker = await run.reserve(1)  # holds the writer, so that the next two queue together
        other_body = await run.reserve(3, "k")  # the same key, a different body...
        genuine = await run.reserve(1, "k")  # ...and a genuine retry, in the same batch
        assert blocker.index is not None
        assert genuine.index is not None
    made = await original.task
    with pytest.raises(IdempotencyKeyReused):
        await other_body.task
    replay = await genuine.task
    assert replay.replayed
    assert replay.reservation.id == made.reservation.id


@WITH_AND_WITHOUT_CATALOG
async def test_in_one_batch_requests_sharing_a_key_are_answered_as_if_one_after_another(
    harness: Harness, with_catalog: bool
) -> None:
    """The first with a key that the stock refuses makes no hold, so the next one with that
    key is a new request (as it would be had it come a moment later), and the one after that
    is compared with the hold that was made."""
    async with harness.drive(3, with_catalog=with_catalog) as run:
        taken = await run.reserve(1)  # holds the writer: the next four go in one batch
        too_many = await run.reserve(2, "k")
        assert too_many.index is not None
        await run.take_elsewhere(1)  # so that, by the time they go, only 1 is left
        fits = await run.reserve(1, "k")
        again = await run.reserve(1, "k")
        different = await run.reserve(2, "k")
    await taken.task
    with pytest.raises(InsufficientStock):
        await too_many.task
    made = await fits.task
    assert not made.replayed
    replay = await again.task
    assert replay.replayed
    assert replay.reservation.id == made.reservation.id
    with pytest.raises(IdempotencyKeyReused):
        await different.task
    s = await assert_invariant(harness.elsewhere, run.product_id)
    assert (s.available, s.held) == (0, 3)


# -- issue 16: a shopper at their limit -------------------------------------------------


async def test_a_shopper_flooding_at_their_limit_never_makes_others_sold_out(
    harness: Harness,
) -> None:
    """Attack finding A2: one shopper already at `maxPerShopper` keeps a flood of requests
    waiting (for more than the limit, and for what it would allow); every other shopper
    must still reach the database and be granted, and none is told "Sold out" while units
    are there. The flood's requests are refused by the limit, not as sold out."""
    limit, stock = 2, 100
    async with harness.drive(stock, with_catalog=True, limit=limit) as run:
        first = await run.reserve(limit, shopper="anon:scalper")
        assert await run.commit()
        assert await run.resume()
        await first.task
        blocker = await run.reserve(1, shopper="anon:early")  # holds the writer
        flood = [await run.reserve(q, shopper="anon:scalper") for q in [10] * 60 + [limit] * 60]
        honest = [await run.reserve(1, shopper=f"anon:honest-{n}") for n in range(40)]
        refused = [c.request for c in [*flood[60:], *honest] if c.index is None]
        assert not refused, f"{len(refused)} refused at once: {refused[:3]}"
        assert blocker.index is not None
        # More than the limit: refused at once, as the database would, in no batch.
        assert all(c.index is None for c in flood[:60])
        assert run.fast_refusals == 0
    for call in flood:
        with pytest.raises(ShopperLimitReached) as refused_by_limit:
            await call.task
        assert refused_by_limit.value.body() == {"limit": limit, "held": limit}
    granted = [await c.task for c in honest]
    assert all(not h.replayed for h in granted)
    s = await assert_invariant(harness.elsewhere, run.product_id)
    assert (s.available, s.held) == (stock - limit - 1 - 40, limit + 1 + 40)


async def test_one_shoppers_requests_promise_no_more_than_their_limit(harness: Harness) -> None:
    """Requests with no shopper are certain to take their units; a shopper's are not (they
    may be at their limit), and one shopper's take at most the limit between them: so the
    fast refusal still answers at once what is certainly sold out."""
    async with harness.drive(6, with_catalog=True, limit=2) as run:
        before = [await run.reserve(1) for _ in range(2)]
        flood = [await run.reserve(2, shopper="anon:a") for _ in range(10)]
        after = [await run.reserve(1) for _ in range(2)]  # 2 + 2 (at most "a's") + 2 <= 6
        assert all(c.index is not None for c in [*before, *flood, *after])
        too_many = await run.reserve(3)  # at most 6 - 4 are left, whatever "a" has
        assert too_many.index is None
        assert isinstance(too_many.task.exception(), InsufficientStock)
        fits = await run.reserve(2, shopper="anon:b")  # "a" may be at the limit already
        assert fits.index is not None
    for call in [*before, *after]:
        assert isinstance(await call.task, Held)
    outcomes = await asyncio.gather(*(c.task for c in [*flood, fits]), return_exceptions=True)
    assert isinstance(outcomes[0], Held)  # "a" had nothing: the first of theirs is granted
    assert all(isinstance(o, ShopperLimitReached) for o in outcomes[1:-1])
    assert isinstance(outcomes[-1], InsufficientStock)


# -- every interleaving ----------------------------------------------------------------

Step = tuple[str, int, int]

# A request's `b`: bit 0, whether it has a key; bits 1-2, its shopper (0: none). Another
# process's ("take"): bits 0-1, its shopper; bit 2, whether it has a key. "again": a client
# retries a hold made (here or in the other process) after losing its answer.
steps = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 3), st.integers(0, 7)),
    st.tuples(st.just("retry"), st.integers(0, 30), st.integers(0, 3)),
    st.tuples(st.just("again"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("commit"), st.just(0), st.just(0)),
    st.tuples(st.just("resume"), st.just(0), st.just(0)),
    st.tuples(st.just("reload"), st.just(0), st.just(0)),
    st.tuples(st.just("take"), st.integers(1, 2), st.integers(0, 7)),
    st.tuples(st.just("give"), st.just(0), st.just(0)),
)


def shopper(n: int) -> str | None:
    return f"anon:s{n}" if n else None


async def play(run: Interleaving, script: list[Step]) -> None:
    note(f"product {run.product_id}, steps {script}")
    keyed: list[tuple[str, int, str | None]] = []
    for action, a, b in script:
        if action == "reserve":
            # Keys of their own: every example shares the database.
            key = f"p{run.product_id}-key-{len(keyed)}" if b & 1 else None
            who = shopper(b >> 1)
            if key is not None:
                keyed.append((key, a, who))
            await run.reserve(a, key, who)
        elif action == "retry" and keyed:
            key, quantity, who = keyed[a % len(keyed)]
            # Mostly the same body (a genuine retry); sometimes another one.
            await run.reserve(quantity if b else quantity % 3 + 1, key, who)
        elif action == "again":
            made = [k for k in keyed if await run._hold_of(k[0]) is not None]
            if made:
                key, quantity, who = made[a % len(made)]
                await run.reserve(quantity, key, who)
        elif action == "commit":
            await run.commit()
        elif action == "resume":
            await run.resume()
        elif action == "reload":
            await run.reload()
        elif action == "take":
            key = f"p{run.product_id}-key-{len(keyed)}" if b & 4 else None
            if key is not None:
                keyed.append((key, a, shopper(b & 3)))
            await run.take_elsewhere(a, shopper(b & 3), key)
        elif action == "give":
            await run.give_back_elsewhere()


async def check_answers(run: Interleaving) -> None:
    """Every answer agrees with the holds in the database."""
    for call in run.calls:
        key = call.request.idempotency_key
        error = call.task.exception()
        body = (call.request.product_id, call.request.quantity)
        hold = await run._hold_of(key)
        if isinstance(error, IdempotencyKeyReused):
            assert hold is not None, call
            assert (hold.product_id, hold.quantity) != body, call
            continue
        if call.hold_before is not None:
            before = call.hold_before
            if (before.product_id, before.quantity) == body:
                # A retry identical to the hold made is always a replay.
                assert error is None, (call, error)
                assert call.task.result().reservation.id == before.id
                assert call.task.result().replayed
        if error is None and key is not None:
            assert hold is not None
            assert call.task.result().reservation.id == hold.id
        if error is not None:
            assert isinstance(error, InsufficientStock | ShopperLimitReached), error


@pytest.mark.parametrize("with_catalog", [True, False], ids=["web-catalog", "no-catalog"])
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# A2's shape, which random scripts rarely hit: "s1" is at the limit, asks again (that
# request takes nothing), and "s2" asks for what is left.
@example(
    stock=3,
    limit=2,
    script=[
        *[("reserve", 2, 2), ("commit", 0, 0), ("resume", 0, 0)],
        *[("reserve", 1, 2), ("reserve", 1, 4)],
    ],
)
# A client's retry of a hold already made, while it waits for its batch, takes nothing: a
# request for the last unit that arrives meanwhile must still reach the database. The hold
# made here, or in another process (its figure reaches this one's catalog).
@example(
    stock=2,
    limit=None,
    script=[
        *[("reserve", 1, 1), ("commit", 0, 0), ("resume", 0, 0)],
        *[("again", 0, 0), ("reserve", 1, 0)],
    ],
)
@example(stock=2, limit=None, script=[("take", 1, 4), ("again", 0, 0), ("reserve", 1, 0)])
@given(
    stock=st.integers(1, 6),
    limit=st.one_of(st.none(), st.integers(1, 3)),
    script=st.lists(steps, max_size=30),
)
async def test_every_fast_refusal_holds_against_the_database(
    harness: Harness, with_catalog: bool, stock: int, limit: int | None, script: list[Step]
) -> None:
    async with harness.drive(stock, with_catalog=with_catalog, limit=limit) as run:
        await play(run, script)
    await check_answers(run)
    await assert_invariant(harness.elsewhere, run.product_id)
