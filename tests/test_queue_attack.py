"""Attacks on the waiting room (issue 17) that were real bugs: each test is the attack,
and what the room must do about it. The app runs in this process, on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

import httpx
import pytest

from server.domain import inventory, waitingroom
from server.domain.clock import now_ms
from server.domain.errors import NotAdmitted, NoTicket
from server.domain.inventory import ProductChanges
from server.domain.model import HoldRequest
from server.domain.waitingroom import TicketState
from server.service.shop import Shop as ShopService
from server.service.transactions import Transactions
from server.service.waitingroom import Admitter, WaitingRoom
from server.storage.database import Store
from server.wire.schemas import ticket_view
from tests.conftest import Published
from tests.support import assert_invariant, eventually, product_in_memory, serve
from tests.test_api import app_settings, assert_error
from tests.test_queue_api import starts_in, ticket_of
from tests.test_shoppers import Shop
from tests.test_shoppers import reserve as reserve_over_http
from tests.test_waitingroom import (
    PASS_MS,
    SEED,
    START,
    join_many,
    line_order,
    reserve,
    room,
    shoppers,
    step,
)


class Writes:
    """How many write transactions a store has run (`count`) since `count_writes`."""

    count = 0


def count_writes(store: Store, monkeypatch: pytest.MonkeyPatch) -> Writes:
    """Count `store.write` calls from now on (the transactions that take the write lock)."""
    writes = Writes()
    write = store.write

    async def counted(operation: Any) -> Any:
        writes.count += 1
        return await write(operation)

    monkeypatch.setattr(store, "write", counted)
    return writes


@pytest.fixture
async def shop(database_url: str, redis_url: str, store: Store) -> AsyncIterator[Shop]:
    settings = app_settings(
        database_url, redis_url, session_secret="q" * 32, pass_seconds=30.0, queue_tick_ms=50
    )
    async for client in serve(settings):
        yield Shop(client, store)


async def _admitted(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get(path)).json()
    return body if body.get("state") == "admitted" else {}


async def test_a_pass_takes_no_more_units_than_it_was_admitted_for(shop: Shop) -> None:
    """Without a limit per shopper a pass is counted as one unit: the first admitted may not
    take the units the others were admitted for."""
    product = await shop.product(3, queue="fifo", saleStartsAt=starts_in(1.0), maxPerShopper=None)
    path = f"/api/products/{product['id']}/queue"
    shoppers = [await shop.shopper() for _ in range(3)]
    for shopper in shoppers:
        ticket_of(await shopper.post(path), 201)
    for shopper in shoppers:
        await eventually(partial(_admitted, shopper, path), within=15, what="admitted")
    greedy = await reserve_over_http(shoppers[0], product["id"], quantity=3)
    assert_error(greedy, 403, "not_admitted")
    assert (await shoppers[0].get(path)).json()["state"] == "admitted"  # the pass is kept
    for shopper in shoppers:
        held = await reserve_over_http(shopper, product["id"])
        assert held.status_code == 201, held.text
    await assert_invariant(shop.store, product["id"])


# -- the sale closed while passes are out ----------------------------------------------------


async def _edit(store: Store, product_id: int, *, now: int, **changes: Any) -> None:
    outcome = await store.write(
        lambda conn: inventory.update_product(conn, product_id, ProductChanges(**changes), now=now)
    )
    outcome.result()


@pytest.mark.parametrize("closing", ["pause", "start moved later"])
async def test_a_pass_does_not_run_out_while_the_sale_is_closed(store: Store, closing: str) -> None:
    """The operator pauses the sale (or moves its start later) for longer than a pass lasts
    while shoppers hold passes: they cannot reserve meanwhile, so their turn must not pass
    (a lapsed ticket cannot join again); they keep their turn after it reopens."""
    product = await room(store, 2, queue="random")
    first, later = shoppers(2), shoppers(4)[2:]
    await join_many(store, product.id, first + later, at=START - 1000)
    admitted = {t.shopper_id for t in (await step(store, product.id, now=START)).admitted}
    assert len(admitted) == 2
    reopens = START + 3 * PASS_MS
    if closing == "pause":
        await _edit(store, product.id, now=START + 1_000, paused=True)
    else:
        await _edit(store, product.id, now=START + 1_000, sale_starts_at=reopens)
    # The admitter steps on meanwhile (every QUEUE_TICK_MS; here every half pass).
    for now in range(START + 2_000, reopens, PASS_MS // 2):
        assert (await step(store, product.id, now=now)).lapsed == []
    if closing == "pause":
        await _edit(store, product.id, now=reopens, paused=False)
    after = await step(store, product.id, now=reopens + 1)
    assert after.lapsed == []
    assert after.admitted == []
    for shopper in admitted:
        held = await reserve(store, product.id, shopper, now=reopens + 1_000)
        assert held.reservation.shopper_id == shopper
    await assert_invariant(store, product.id)


async def test_requests_without_passes_on_a_waitlist_are_refused_without_a_write(
    store: Store, published: Published, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waitlist (a room without a start time) with people in line: a flood of requests
    without a pass is refused by reads, as for a sale with a start time. Refused in the
    reservation's transaction instead, each cost the write lock a position count (with
    20,000 in line on SQLite, 500 refusals held it 1.2 s), and its promise a unit that the
    admitted shoppers' requests were then refused for."""
    product = await room(store, 3, starts=None, limit=1)
    line = shoppers(40)
    await join_many(store, product.id, line, at=now_ms() - 1_000)
    first = [t.shopper_id for t in (await step(store, product.id, now=now_ms())).admitted]
    assert first == line[:3]
    service = ShopService(store, hold_ms=120_000, publish=published)
    service.room = WaitingRoom(store, publish=lambda news: None, opens_ms=0)
    await service.start()
    writes = count_writes(store, monkeypatch)
    try:
        bots = [*line[3:], *(f"anon:bot{n}" for n in range(40)), None]
        answers = await asyncio.gather(
            *(service.reserve(HoldRequest(product.id, 1, shopper_id=bot)) for bot in bots),
            return_exceptions=True,
        )
        assert all(isinstance(a, NotAdmitted) for a in answers), answers
        assert writes.count == 0
        for shopper in first:
            held = await service.reserve(HoldRequest(product.id, 1, shopper_id=shopper))
            assert held.reservation.shopper_id == shopper
    finally:
        await service.stop()
    await assert_invariant(store, product.id)


# -- what a room costs after its sale -------------------------------------------------------


def quiet_admitter(
    store: Store, published: Published, *, tick_ms: int, lease_ms: int, holder: str | None = None
) -> Admitter:
    """An admitter whose news goes nowhere, rounds `tick_ms` apart (milliseconds), with a
    lease of `lease_ms` held as `holder` if given (the holder of steps already taken)."""
    return Admitter(
        store,
        transactions=Transactions(store, published, []),
        publish=lambda news: None,
        pass_ms=PASS_MS,
        tick_ms=tick_ms,
        lease_ms=lease_ms,
        holder=holder,
    )


async def test_rooms_nobody_is_in_cost_the_admitter_no_write(
    store: Store, published: Published
) -> None:
    """Every product that ever had a room kept costing a write transaction a second (0.24 ms
    each on SQLite: 1,000 past drops with `queue: fifo` took a quarter of the write lock,
    for ever). Only rooms with someone waiting or admitted are stepped."""
    past = [await room(store, 1, starts=None) for _ in range(20)]
    await join_many(store, past[0].id, ["anon:a"], at=now_ms() - 1_000)
    await step(store, past[0].id, now=now_ms() - 900)  # admitted
    await reserve(store, past[0].id, "anon:a", now=now_ms() - 800)  # the last unit
    live = await room(store, 5, starts=None)
    await join_many(store, live.id, ["anon:b"], at=now_ms())
    admitter = quiet_admitter(store, published, tick_ms=200, lease_ms=2_000, holder="a")
    steps = await admitter.step_all()
    assert [s.product.id for s in steps if s.product is not None] == [live.id]
    assert [t.shopper_id for t in steps[0].admitted] == ["anon:b"]


async def test_the_admitting_process_tells_its_own_pages_its_news_at_once(
    store: Store, published: Published
) -> None:
    """A web process's admitter hands its step's news to that process's hub (`local`) as
    it publishes it, not a round trip through Redis later: on a loop busy with a sale's
    joins the close's news took 0.4 s to come back to the very process that made it (the
    waiting room's bench). The news is the same; the other processes hear it from Redis."""
    product = await room(store, 1, starts=None)
    await join_many(store, product.id, ["anon:a", "anon:b"], at=now_ms())
    sent: list[waitingroom.RoomChanged] = []
    told: list[waitingroom.RoomChanged] = []
    admitter = Admitter(
        store,
        transactions=Transactions(store, published, []),
        publish=sent.extend,
        pass_ms=PASS_MS,
        tick_ms=60_000,
        lease_ms=120_000,
    )
    admitter.local = told.extend
    await admitter.step_all()
    assert told == sent
    assert [n.passed for n in told] == [frozenset({"anon:a"})]


async def test_the_first_admissions_come_at_the_start_not_a_tick_later(
    store: Store, published: Published
) -> None:
    """The admitter's rounds are a tick apart (here 60 s), but the round that knows of a
    sale's start runs its next at that start: the first admissions are what a sale's first
    second waits for, and a round up to a tick late met the start's storm of joins (the
    waiting room's bench: the first admission 0.1 to 2.1 s after the start). The start is
    3 s ahead so that the first round runs before it even on a busy machine (300 ms was
    not always enough to make the room and its line)."""
    starts = now_ms() + 3_000
    product = await room(store, 2, starts=starts)
    await join_many(store, product.id, ["anon:a", "anon:b", "anon:c"], at=now_ms())
    admitter = quiet_admitter(store, published, tick_ms=60_000, lease_ms=120_000)
    assert [s.admitted for s in await admitter.step_all()] == [[]]  # before the start
    assert admitter.next_start == starts
    admitter.start()
    try:

        async def admitted() -> list[str]:
            order = await line_order(store, product.id)
            return [] if len(order) > 1 else order

        # Two admitted (two units), one still waiting: long before the next tick.
        await eventually(admitted, within=20, what="the first admissions, at the start")
    finally:
        await admitter.stop()


async def test_those_who_join_before_a_start_moved_later_are_drawn_too(store: Store) -> None:
    """A random room opens; the operator then moves the start later. Those who join before
    the new start joined before a start too: they get drawn places (the room's key's
    order, among those still waiting from before the first start), ahead of those who
    arrived while it was open, and are not served in arrival order. Positions are hidden
    again until the new start. Nothing is written at either start."""
    product = await room(store, 1, queue="random")
    early, late = shoppers(50), [f"anon:late{n:03d}" for n in range(60)]
    await join_many(store, product.id, early, at=START - 1_000)
    first = await step(store, product.id, now=START)
    assert len(first.admitted) == 1
    await join_many(store, product.id, ["anon:open"], at=START + 200)  # while it was open
    later = START + 10 * PASS_MS
    await _edit(store, product.id, now=START + 500, sale_starts_at=later)
    await join_many(store, product.id, late, at=START + 1_000)
    order = await line_order(store, product.id)
    places = {s: waitingroom.drawn_place(SEED, START, s) for s in early}
    places |= {s: waitingroom.drawn_place(SEED, later, s) for s in late}
    drawn = sorted([*early, *late], key=places.__getitem__)
    admitted = first.admitted[0].shopper_id
    assert order == [s for s in drawn if s != admitted] + ["anon:open"]
    assert [s for s in order if s in late] != late  # not arrival order (1 in 60! by chance)
    async with store.reader() as conn:
        moved = await inventory.get_product(conn, product.id)
    assert moved is not None
    assert waitingroom.order_hidden(moved, START + 2_000)
    assert not waitingroom.order_hidden(moved, later)


@pytest.mark.parametrize(("available", "factor", "passes"), [(100, 1.1, 110), (50, 2.2, 110)])
def test_admit_factor_counts_in_decimal(available: int, factor: float, passes: int) -> None:
    """100 units × admitFactor 1.1 is 110 passes, not 111: in binary floating point it is
    110.00000000000001, which rounded up admitted one more than the operator asked."""
    product = product_in_memory(
        total_stock=available, available_stock=available, admit_factor=factor
    )
    assert waitingroom.passes_for(product) == passes


async def test_if_none_match_any_is_not_modified_for_a_ticket_that_exists(shop: Shop) -> None:
    """`If-None-Match: *` asks "only if there is none": a ticket that exists is 304 (it was
    a 200 with the whole ticket); with no ticket it is still the 404."""
    product = await shop.product(5, queue="fifo", saleStartsAt=starts_in(600))
    path = f"/api/products/{product['id']}/queue"
    shopper = await shop.shopper()
    assert_error(await shopper.get(path, headers={"If-None-Match": "*"}), 404, "no_ticket")
    ticket_of(await shopper.post(path), 201)
    assert (await shopper.get(path, headers={"If-None-Match": "*"})).status_code == 304
    etag = (await shopper.get(path)).headers["etag"]
    assert (await shopper.get(path, headers={"If-None-Match": f'"x", W/{etag}'})).status_code == 304
    assert (await shopper.get(path, headers={"If-None-Match": '"x"'})).status_code == 200


def test_a_room_closed_by_the_end_of_its_sale_does_not_say_sold_out() -> None:
    """The sale ends with units left while people wait: their tickets end `sold_out` (the
    room is closed), but "every unit has been sold" would be untrue."""
    ended = product_in_memory(
        total_stock=10, available_stock=7, sale_starts_at=START, sale_ends_at=START + 60_000
    )
    ticket = waitingroom.Ticket(1, "anon:a", 1, TicketState.SOLD_OUT, START - 1, ended_at=START)
    line = waitingroom.Lineup(1, START + 61_000, (), 0)
    view = ticket_view(ticket, ended, line, now=START + 61_000)
    assert view["message"] == "The sale has ended."
    sold = replace(ended, sale_ends_at=None, available_stock=0)
    assert ticket_view(ticket, sold, line, now=START + 61_000)["message"].startswith("Sold out")


async def test_an_admitted_shopper_alone_does_not_gate_a_waitlist_with_units_free(
    store: Store,
) -> None:
    """A waitlist (no start time) is used "whenever nothing is available": one shopper who
    joined and was admitted must not make every other buyer join while 99 units are free
    and nobody waits. The units the admitted passes may take stay theirs."""
    product = await room(store, 3, starts=None)
    await join_many(store, product.id, ["anon:a", "anon:b"], at=START)
    assert len((await step(store, product.id, now=START + 100)).admitted) == 2
    held = await reserve(store, product.id, "anon:buyer", now=START + 200)  # the third unit
    assert held.reservation.shopper_id == "anon:buyer"
    with pytest.raises(NotAdmitted):  # the other two are the admitted shoppers'
        await reserve(store, product.id, "anon:another", now=START + 300)
    for shopper in ("anon:a", "anon:b"):
        assert (await reserve(store, product.id, shopper, now=START + 400)).reservation
    await assert_invariant(store, product.id)


# -- a second sale of the same product ---------------------------------------------------------


async def test_a_new_sale_of_the_product_draws_a_new_order(store: Store) -> None:
    """Finding 3 of the second attack: with the place HMAC(key, shopper) alone, a second
    drop of the same product gave every shopper the place of the first, which all saw once
    it started. The place is drawn for the sale's start: the same 200 shoppers, joining a
    second sale (a new start) in the same order, are put in an order independent of the
    first's (|rho| < 0.2 with the fixed key), and leaving and joining again before the
    same start keeps the place."""
    product = await room(store, 1, queue="random")
    people = shoppers(200)
    await join_many(store, product.id, people, at=START - 60_000)
    first = await line_order(store, product.id)
    # Leaving and joining again before the same start: the same place, no re-roll.
    await store.write(lambda conn: waitingroom.leave(conn, product.id, first[-1], now=START - 500))
    await join_many(store, product.id, [first[-1]], at=START - 400)
    assert await line_order(store, product.id) == first
    # The first sale ends (every ticket sold out), the operator sets a new start.
    await store.write(
        lambda conn: conn.execute(
            "UPDATE queue_tickets SET state = 'sold_out', ended_at = :t WHERE product_id = :p",
            {"t": START + 1000, "p": product.id},
        )
    )
    second_start = START + 86_400_000
    await _edit(store, product.id, now=START + 2000, sale_starts_at=second_start)
    await join_many(store, product.id, people, at=second_start - 60_000)
    second = await line_order(store, product.id)
    assert sorted(second) == people
    assert second == sorted(people, key=lambda s: waitingroom.drawn_place(SEED, second_start, s))
    rank = {s: i for i, s in enumerate(first)}
    n = len(people)
    rho = 1 - 6 * sum((rank[s] - i) ** 2 for i, s in enumerate(second)) / (n * (n * n - 1))
    assert abs(rho) < 0.2, f"rank correlation {rho:.3f} between two sales' orders"


async def test_a_join_draws_for_the_start_the_row_has_not_a_stale_copy(store: Store) -> None:
    """A catalog's copy of the start may lag a PATCH: the insert draws only for the start
    the product's row has in its transaction (otherwise it inserts nothing, reads the row's
    start and tries again)."""
    product = await room(store, 1, queue="random")

    async def join_stale(conn: Any) -> Any:
        await waitingroom.room_key(conn, product.id, new=SEED)
        return await waitingroom.join(conn, product.id, "anon:x", now=START - 500, starts=START - 7)

    ticket, made = await store.write(join_stale)
    assert made
    assert ticket.place == waitingroom.drawn_place(SEED, START, "anon:x")


async def test_a_leave_that_changes_nothing_costs_no_write_news_or_admission_round(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaves are not rate limited: a flood of DELETEs from a shopper with no ticket, or
    one whose ticket has ended, was a write transaction, a message to every web process
    and an admission round at once, each. Only a leave that ends an
    open ticket costs those."""
    product = await room(store, 3, starts=None)
    await join_many(store, product.id, ["anon:in", "anon:gone"], at=now_ms() - 1_000)
    news: list[Any] = []
    nudges: list[int] = []
    waiting = WaitingRoom(store, publish=news.extend, opens_ms=0, nudge=nudges.append)
    await waiting.leave(product.id, "anon:gone")
    assert [n.shoppers for n in news] == [frozenset({"anon:gone"})]
    assert nudges == [product.id]
    news.clear()
    nudges.clear()
    writes = count_writes(store, monkeypatch)
    for _ in range(20):
        await waiting.leave(product.id, "anon:gone")  # left already: 204 again
        with pytest.raises(NoTicket):
            await waiting.leave(product.id, "anon:never")
    assert (writes.count, news, nudges) == (0, [], [])
    await waiting.leave(product.id, "anon:in")
    assert writes.count == 1
    assert [n.shoppers for n in news] == [frozenset({"anon:in"})]
    ticket = await waiting.ticket(product.id, "anon:in")
    assert ticket["state"] == "left"
