"""Retention: ended holds, proved ledger rows, delivered events and ended waiting-room
tickets older than RETENTION_DAYS leave the tables in bounded batches; open holds, fresh
keys, unproved rows, events still waiting for an endpoint and open tickets stay; and the
books still add up afterwards."""

from __future__ import annotations

from server.domain import inventory, waitingroom
from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.domain.retention import DAY_MS, FILE_AFTER_MS
from server.service.delivery import Deliverer
from server.service.ledger import Ledger
from server.service.retention import Retention
from server.service.webhooks import Webhooks
from server.storage.database import Store
from tests.receiver import Receiver
from tests.support import (
    assert_reconciled,
    cancel_one,
    complete_one,
    hold,
    make_product,
    outbox_bodies,
)


async def count(store: Store, table: str, where: str = "1 = 1") -> int:
    async with store.reader() as conn:
        row = await conn.fetch_one(f"SELECT COUNT(*) AS n FROM {table} WHERE {where}")
    assert row is not None
    return int(row["n"])


async def test_old_rows_go_in_bounded_batches_and_the_books_still_add_up(
    store: Store, receiver: Receiver
) -> None:
    endpoint = await Webhooks(store).create(url=receiver.url, events=[], description="")
    receiver.secret = endpoint.secret
    product = await make_product(store, 100)
    old = now_ms() - 100 * DAY_MS
    # A hundred days ago: 30 holds that ended (completed), and one still open (its worker
    # must have been down since: it is overdue, never removed while open).
    for _ in range(30):
        done = await hold(store, product.id, 1, now=old)
        await store.write(
            lambda conn, r=done.id: complete_one(conn, r, now=old + 1_000)  # type: ignore[misc]
        )
    still_open = await hold(store, product.id, 1, now=old)
    recent = await hold(store, product.id, 1, key="today")
    # The webhooks of all that, delivered (their deliveries are old too: made "then").
    sender = Deliverer(store, poll_ms=20, backoff_s=0.05, allow_local_network=True)
    await sender.drain()
    await sender.stop()
    await Ledger(store).check()  # proves the rows, so that retention may take them

    retention = Retention(store, days=90)
    first = await retention.run(batch=10, most=2)
    assert first["reservations"] == 20  # two batches of ten: bounded
    assert first["stock_ledger"] > 0
    rest = await retention.run(batch=10, most=100)
    assert first["reservations"] + rest["reservations"] == 30
    assert await count(store, "reservations") == 2
    async with store.reader() as conn:
        kept = {r.id for r in await inventory.get_reservations(conn, [still_open.id, recent.id])}
    assert kept == {still_open.id, recent.id}
    # Old ledger rows went, the product's creation and today's hold stay (not old, or not
    # proved), and the books still add up from the proved balance.
    assert await count(store, "stock_ledger", f"at < {now_ms() - 90 * DAY_MS}") == 0
    assert await count(store, "stock_ledger") >= 1
    await assert_reconciled(store)
    # Delivered events and their deliveries went; none of today's.
    assert await count(store, "outbox", f"created_at < {now_ms() - 90 * DAY_MS}") == 0
    assert await count(store, "webhook_deliveries", f"created_at < {now_ms() - 90 * DAY_MS}") == 0
    assert await count(store, "outbox") > 0


async def test_what_is_not_done_with_stays(store: Store, receiver: Receiver) -> None:
    endpoint = await Webhooks(store).create(url=receiver.url, events=[], description="")
    receiver.secret = endpoint.secret
    product = await make_product(store, 10)
    old = now_ms() - 100 * DAY_MS
    made = await hold(store, product.id, 1, now=old)
    await store.write(lambda conn: cancel_one(conn, made.id, now=old + 1))
    # Not delivered (no worker ran), not reconciled: the events and the rows wait.
    removed = await Retention(store, days=90).run()
    assert removed["stock_ledger"] == 0
    assert removed["outbox"] == 0
    assert removed["reservations"] == 1  # the ended hold itself may go
    assert await count(store, "stock_ledger", f"product_id = {product.id}") == 3


async def test_a_ledger_row_stays_while_its_event_is_kept(store: Store) -> None:
    """A reservation event's body takes the hold's id, units, figures and actor from its
    movement's ledger row at every delivery: an old, proved ledger row whose event is still
    in the outbox (waiting for an endpoint, however old) is not removed, and goes once the
    event has."""
    await Webhooks(store).create(url="https://shop.example/hooks", events=[], description="")
    product = await make_product(store, 10)
    old = now_ms() - 100 * DAY_MS
    made = await hold(store, product.id, 1, now=old)
    await store.write(lambda conn: cancel_one(conn, made.id, now=old + 1))
    await Ledger(store).check()  # proved: only the events keep the rows
    before = await outbox_bodies(store, product_id=product.id)
    assert [b["data"]["reservation"]["id"] for b in before] == [made.id, made.id]

    removed = await Retention(store, days=90).run()
    assert removed["stock_ledger"] == 0
    assert await count(store, "stock_ledger", f"product_id = {product.id}") == 3
    assert await outbox_bodies(store, product_id=product.id) == before

    await store.write(
        lambda conn: conn.execute("DELETE FROM outbox WHERE product_id = :p", {"p": product.id})
    )
    removed = await Retention(store, days=90).run()
    assert removed["stock_ledger"] == 2  # the hold's and the cancel's; not today's creation
    await assert_reconciled(store)


async def test_ended_tickets_go_in_bounded_batches_and_open_ones_stay(store: Store) -> None:
    product = await make_product(store, 10)
    now = now_ms()
    old = now - 100 * DAY_MS
    # Long ago: 26 tickets that ended, one of each ending in turn, and 4 still open (a room
    # whose sale never came: waiting and admitted tickets are never removed, however old).
    # Two days ago: 3 that ended, within RETENTION_DAYS.
    ended = ("reserved", "sold_out", "lapsed", "left")
    tickets: list[tuple[str, str, int, int | None]] = [
        (f"anon:old{n}", ended[n % 4], old, old + n) for n in range(26)
    ]
    tickets += [(f"anon:open{n}", ("waiting", "admitted")[n % 2], old, None) for n in range(4)]
    tickets += [(f"anon:new{n}", ended[n % 4], now - 2 * DAY_MS, now - DAY_MS) for n in range(3)]

    async def write(conn: Executor) -> None:
        for n, (shopper, state, joined, ended_at) in enumerate(tickets):
            await conn.execute(
                "INSERT INTO queue_tickets (product_id, shopper_id, place, state, joined_at, "
                "admitted_at, pass_expires_at, ended_at) "
                "VALUES (:p, :s, :place, :state, :joined, :admitted, :until, :ended)",
                {
                    "p": product.id,
                    "s": shopper,
                    "place": n,
                    "state": state,
                    "joined": joined,
                    "admitted": None if state in ("waiting", "left") else joined + 1,
                    "until": None if state in ("waiting", "left") else joined + 60_000,
                    "ended": ended_at,
                },
            )
        # One of the old ones joins again (a `left` ticket reopens at the back): open now. A
        # join needs the product to have a room (a product whose `queue` is `off` makes none).
        await conn.execute("UPDATE products SET queue = 'fifo' WHERE id = :p", {"p": product.id})
        await waitingroom.join(conn, product.id, "anon:old3", now=now)

    await store.write(write)
    retention = Retention(store, days=90)
    first = await retention.run(batch=10, most=2)
    assert first["queue_tickets"] == 20  # two batches of ten: bounded
    rest = await retention.run(batch=10, most=100)
    assert rest["queue_tickets"] == 5
    assert (await retention.run())["queue_tickets"] == 0
    async with store.reader() as conn:
        rows = await conn.fetch_all(
            "SELECT shopper_id, state FROM queue_tickets WHERE product_id = :p", {"p": product.id}
        )
    kept = {str(row["shopper_id"]): str(row["state"]) for row in rows}
    assert kept == {
        "anon:old3": "waiting",
        "anon:open0": "waiting",
        "anon:open1": "admitted",
        "anon:open2": "waiting",
        "anon:open3": "admitted",
        "anon:new0": "reserved",
        "anon:new1": "sold_out",
        "anon:new2": "lapsed",
    }


async def test_ledger_rows_behind_a_batch_of_kept_events_still_go(store: Store) -> None:
    """A batch of a product's oldest ledger rows whose events are all still kept (waiting
    for an endpoint: one that failed for a day and was disabled, say, however old) does
    not keep the product's later old rows, whose events are gone, in the table forever:
    the batch is chosen among the rows retention may remove. Each run chose the oldest
    `batch` rows, removed none of them and stopped at the product."""
    await Webhooks(store).create(url="https://shop.example/hooks", events=[], description="")
    product = await make_product(store, 10)
    old = now_ms() - 100 * DAY_MS
    for n in range(4):
        made = await hold(store, product.id, 1, now=old + n * 10)
        await store.write(
            lambda conn, r=made.id, at=old + n * 10 + 1: cancel_one(conn, r, now=at)  # type: ignore[misc]
        )
    await Ledger(store).check()
    # The first two holds' events wait (never dispatched); the last two holds' events went
    # (delivered and removed: as retention would have).
    async with store.reader() as conn:
        versions = [
            int(r["version"])
            for r in await conn.fetch_all(
                "SELECT version FROM outbox WHERE product_id = :p ORDER BY version",
                {"p": product.id},
            )
        ]
    assert len(versions) == 8
    gone = versions[4]
    await store.write(
        lambda conn: conn.execute(
            "DELETE FROM outbox WHERE product_id = :p AND version >= :v",
            {"p": product.id, "v": gone},
        )
    )
    retention = Retention(store, days=90)
    for _ in range(5):  # runs enough to reach every product and row
        await retention.run(batch=2, most=10)
    cutoff = now_ms() - 90 * DAY_MS
    assert await count(store, "stock_ledger", f"product_id = {product.id} AND at < {cutoff}") == 4
    assert (
        await count(store, "stock_ledger", f"product_id = {product.id} AND version >= {gone}") == 0
    )
    await assert_reconciled(store)


async def test_ended_tickets_are_filed_in_bounded_batches_and_still_found_by_shopper(
    store: Store, database_url: str
) -> None:
    """Tickets that ended more than FILE_AFTER_MS ago are filed (moved to the index of
    filed tickets by shopper, migration 0021), a bounded batch at a time; open ones and
    those ended lately are not; and a shopper's tickets are found whether filed or not,
    a filed one opened again among the open ones first."""
    rooms = [await make_product(store, 10) for _ in range(3)]
    now = now_ms()
    before = now - FILE_AFTER_MS
    # One shopper in three rooms: a ticket that ended long ago (to file), one that ended a
    # minute ago (not yet) and one waiting (never). And 24 other shoppers' ended tickets.
    shopper = "anon:regular"
    tickets: list[tuple[int, str, str, int | None]] = [
        (rooms[0].id, shopper, "sold_out", before - 5_000),
        (rooms[1].id, shopper, "lapsed", now - 60_000),
        (rooms[2].id, shopper, "waiting", None),
    ]
    tickets += [(rooms[0].id, f"anon:other{n}", "sold_out", before - n) for n in range(24)]

    async def write(conn: Executor) -> None:
        for n, (product_id, who, state, ended_at) in enumerate(tickets):
            await conn.execute(
                "INSERT INTO queue_tickets (product_id, shopper_id, place, state, joined_at, "
                "admitted_at, pass_expires_at, ended_at) "
                "VALUES (:p, :s, :place, :state, :joined, NULL, NULL, :ended)",
                {
                    "p": product_id,
                    "s": who,
                    "place": n,
                    "state": state,
                    "joined": now - DAY_MS + n,
                    "ended": ended_at,
                },
            )

        # Rooms (a product whose `queue` is `off` makes no ticket: the join below).
        for room in rooms:
            await conn.execute("UPDATE products SET queue = 'fifo' WHERE id = :p", {"p": room.id})

    await store.write(write)
    retention = Retention(store, days=90)
    first = await retention.run(batch=10, most=2)
    assert first["queue_tickets_filed"] == 20  # two batches of ten: bounded
    rest = await retention.run(batch=10, most=100)
    assert rest["queue_tickets_filed"] == 5
    assert (await retention.run())["queue_tickets_filed"] == 0
    async with store.reader() as conn:
        rows = await conn.fetch_all(
            "SELECT product_id, shopper_id, filed_at FROM queue_tickets WHERE shopper_id = :s "
            "OR shopper_id LIKE 'anon:other%'",
            {"s": shopper},
        )
    filed = {(int(r["product_id"]), str(r["shopper_id"])) for r in rows if r["filed_at"]}
    assert filed == {(rooms[0].id, shopper)} | {(rooms[0].id, f"anon:other{n}") for n in range(24)}

    # The shopper's tickets, filed or not: the open one first, then the latest joined.
    async with store.reader() as conn:
        theirs = await waitingroom.tickets_of_shopper(conn, shopper)
    assert [(t.product_id, t.state.value) for t in theirs] == [
        (rooms[2].id, "waiting"),
        (rooms[1].id, "lapsed"),
        (rooms[0].id, "sold_out"),
    ]
    # The filed ticket opened again (a join) stays filed and is found, among the open ones.
    await store.write(lambda conn: waitingroom.join(conn, rooms[0].id, shopper, now=now_ms()))
    async with store.reader() as conn:
        theirs = await waitingroom.tickets_of_shopper(conn, shopper)
        assert [
            t.state.value for t in await waitingroom.tickets_of_shopper(conn, shopper, limit=2)
        ] == [
            "waiting",
            "waiting",
        ]
    assert {(t.product_id, t.state.value) for t in theirs} == {
        (rooms[0].id, "waiting"),
        (rooms[1].id, "lapsed"),
        (rooms[2].id, "waiting"),
    }
    if database_url.startswith("sqlite"):
        # A sale's joins write no index by shopper over every ticket kept: only the live
        # tickets' (the month's cost: `python -m bench.joinpages`), and a shopper's tickets
        # are read through the live and the filed index, no table scan.
        async with store.reader() as conn:
            indexes = await conn.fetch_all(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'queue_tickets' AND sql IS NOT NULL"
            )
            by_shopper = {
                str(r["name"]): str(r["sql"])
                for r in indexes
                if "(shopper_id)" in str(r["sql"]).replace(" ", "")
            }
            assert set(by_shopper) == {
                "queue_tickets_live_of_shopper",
                "queue_tickets_filed_of_shopper",
            }, by_shopper
            plan = await conn.fetch_all(
                "EXPLAIN QUERY PLAN " + waitingroom.TICKETS_OF_SHOPPER, {"s": shopper, "limit": 100}
            )
        details = " | ".join(str(row["detail"]) for row in plan)
        assert "queue_tickets_live_of_shopper" in details, details
        assert "queue_tickets_filed_of_shopper" in details, details
