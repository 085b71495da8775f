"""The stock ledger: a row per movement in the same transaction, pages of it, and the
reconciliation that proves it adds up (and names a product where it does not)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from jobs import books as worker_books
from server.devtools.processes import ADMIN_TOKEN
from server.domain import inventory, ledger
from server.domain.clock import iso, now_ms
from server.domain.ledger import Entry, Figures
from server.domain.model import HoldRequest
from server.domain.outbox import LEDGER_COLUMNS, LEDGER_JOIN, ledger_part, render
from server.infra.metrics import LEDGER_UNRECONCILED
from server.infra.settings import Settings
from server.service.ledger import Ledger
from server.storage import migrate
from server.storage.database import Store
from tests.support import (
    assert_reconciled,
    cancel_one,
    complete_one,
    hold,
    make_product,
    outbox_bodies,
    serve,
    stats,
)

OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def rows(store: Store, product_id: int) -> list[Entry]:
    """The product's ledger, oldest first."""
    async with store.reader() as conn:
        newest_first = await ledger.entries(conn, product_id, limit=10_000)
    return newest_first[::-1]


async def outbox(store: Store, product_id: int) -> list[dict[str, Any]]:
    return await outbox_bodies(store, product_id=product_id)


def walk(entries: list[Entry]) -> list[tuple[str, int, Figures, str]]:
    return [(e.kind, e.units, e.figures, e.actor) for e in entries]


async def test_every_movement_writes_a_row_with_the_units_after_it(store: Store) -> None:
    product = await make_product(store, 5)
    first = await hold(store, product.id, 2)
    second = await hold(store, product.id, 1)
    await store.write(lambda conn: complete_one(conn, first.id, now=now_ms(), actor="shop"))
    await store.write(lambda conn: cancel_one(conn, second.id, now=now_ms()))
    late = await hold(store, product.id, 3, now=now_ms() - 10_000, hold_ms=1_000)
    await store.write(lambda conn: inventory.expire_overdue(conn, now=now_ms()))
    await store.write(lambda conn: inventory.restock(conn, product.id, 4, now=now_ms()))

    entries = await rows(store, product.id)
    assert walk(entries) == [
        ("created", 5, Figures(5, 0, 0, 5), "operator"),
        ("held", 2, Figures(3, 2, 0, 5), "shopper"),
        ("held", 1, Figures(2, 3, 0, 5), "shopper"),
        ("completed", 2, Figures(2, 1, 2, 5), "shop"),
        ("cancelled", 1, Figures(3, 0, 2, 5), "shopper"),
        ("held", 3, Figures(0, 3, 2, 5), "shopper"),
        ("expired", 3, Figures(3, 0, 2, 5), "worker"),
        ("restocked", 4, Figures(7, 0, 2, 9), "operator"),
    ]
    assert [e.reservation_id for e in entries] == [
        None,
        first.id,
        second.id,
        first.id,
        second.id,
        late.id,
        late.id,
        None,
    ]
    # Each change is a version of its own, the product's own.
    assert [e.version for e in entries] == list(range(1, 9))
    async with store.reader() as conn:
        now = await inventory.get_product(conn, product.id)
    assert now is not None
    assert now.version == entries[-1].version
    await assert_reconciled(store)


async def test_a_batch_of_holds_is_one_change_with_a_row_per_hold(store: Store) -> None:
    one = await make_product(store, 10)
    two = await make_product(store, 3)
    requests = [
        HoldRequest(one.id, 2, shopper_id="ann"),
        HoldRequest(two.id, 3),
        HoldRequest(one.id, 1, shopper_id="bob"),
        HoldRequest(two.id, 1),  # refused: nothing left
    ]
    outcomes, _ = await store.write(
        lambda conn: inventory.reserve(conn, requests, now=now_ms(), hold_ms=60_000)
    )
    assert [o.error is None for o in outcomes] == [True, True, True, False]
    held = [e for e in await rows(store, one.id) if e.kind == "held"]
    assert [(e.version, e.seq, e.units, e.figures.available, e.actor) for e in held] == [
        (2, 0, 2, 8, "shopper:ann"),
        (2, 1, 1, 7, "shopper:bob"),
    ]
    assert [e.kind for e in await rows(store, two.id)] == ["created", "held"]
    await assert_reconciled(store)


async def test_a_batch_of_completes_or_of_cancels_is_one_change_per_product(
    store: Store,
) -> None:
    """Completes (and cancels) are group-committed: a batch moves each product once, with
    a ledger row and an event per hold, whoever asked and with whatever reference."""
    one = await make_product(store, 10)
    two = await make_product(store, 5)
    a = await hold(store, one.id, 2)
    b = await hold(store, two.id, 1)
    c = await hold(store, one.id, 1)
    d = await hold(store, one.id, 3)
    e = await hold(store, two.id, 2)
    completing = [
        inventory.Completing(a.id),
        inventory.Completing(b.id, actor="shop", order_reference="R-1"),
        inventory.Completing(c.id, actor="shop"),
        inventory.Completing(a.id),  # a copy in the same batch: answered as a retry
    ]
    completed, _ = await store.write(
        lambda conn: inventory.complete_many(conn, completing, now=now_ms())
    )
    assert [(o.result().id, o.result().status.value) for o in completed] == [
        (a.id, "COMPLETED"),
        (b.id, "COMPLETED"),
        (c.id, "COMPLETED"),
        (a.id, "COMPLETED"),
    ]
    assert [o.result().order_reference for o in completed] == [None, "R-1", None, None]
    cancelling = [
        inventory.Cancelling(d.id),
        inventory.Cancelling(e.id, actor=ledger.OPERATOR, reason="mispriced"),
    ]
    cancelled, _ = await store.write(
        lambda conn: inventory.cancel_many(conn, cancelling, now=now_ms())
    )
    assert [(o.result().cancelled_by, o.result().cancel_reason) for o in cancelled] == [
        ("shopper", None),
        ("operator", "mispriced"),
    ]
    assert [(e.version, e.seq, *walk([e])[0]) for e in (await rows(store, one.id))[4:]] == [
        (5, 0, "completed", 2, Figures(4, 4, 2, 10), "shopper"),
        (5, 1, "completed", 1, Figures(4, 3, 3, 10), "shop"),
        (6, 0, "cancelled", 3, Figures(7, 0, 3, 10), "shopper"),
    ]
    assert [(e.version, e.seq, *walk([e])[0]) for e in (await rows(store, two.id))[3:]] == [
        (4, 0, "completed", 1, Figures(2, 2, 1, 5), "shop"),
        (5, 0, "cancelled", 2, Figures(4, 0, 1, 5), "operator"),
    ]
    kinds = [event["type"] for event in await outbox(store, one.id)]
    assert kinds[-3:] == ["reservation.completed", "reservation.completed", "reservation.cancelled"]
    await assert_reconciled(store)


async def test_the_outbox_gets_the_events_of_the_same_transaction(store: Store) -> None:
    product = await make_product(store, 2)
    first = await hold(store, product.id, 1)
    second = await hold(store, product.id, 1)  # the last unit: sold out
    await store.write(lambda conn: cancel_one(conn, first.id, now=now_ms()))  # back
    await store.write(
        lambda conn: complete_one(
            conn, second.id, now=now_ms(), actor="shop", order_reference="A-17"
        )
    )
    await store.write(lambda conn: inventory.restock(conn, product.id, 5, now=now_ms()))
    events = await outbox(store, product.id)
    assert [e["type"] for e in events] == [
        "reservation.created",
        "reservation.created",
        "product.sold_out",
        "reservation.cancelled",
        "product.back_in_stock",
        "reservation.completed",
        "product.restocked",
    ]
    completed = events[5]["data"]
    assert completed["reservation"]["id"] == second.id
    assert completed["reservation"]["status"] == "COMPLETED"
    assert completed["reservation"]["orderReference"] == "A-17"
    assert completed["actor"] == "shop"
    assert completed["stock"]["soldUnits"] == 1
    assert events[2]["data"]["stock"]["availableStock"] == 0
    assert events[6]["data"]["units"] == 5


async def test_a_change_whose_event_cannot_be_written_is_not_made(store: Store) -> None:
    """The README's at-least-once rests on the event being written in the change's own
    transaction: when the event cannot be written (its table is away), neither is the hold,
    its ledger row, nor the product's new units."""
    product = await make_product(store, 2)
    await store.write(lambda conn: conn.execute("ALTER TABLE outbox RENAME TO outbox_away"))
    try:
        # Each database's own error, naming the table.
        with pytest.raises(Exception, match="outbox"):
            await hold(store, product.id, 1)
    finally:
        await store.write(lambda conn: conn.execute("ALTER TABLE outbox_away RENAME TO outbox"))
    async with store.reader() as conn:
        held = await conn.fetch_one("SELECT COUNT(*) AS n FROM reservations")
        moved = await conn.fetch_all(
            "SELECT movement FROM stock_ledger WHERE product_id = :p", {"p": product.id}
        )
    assert held is not None
    assert int(held["n"]) == 0
    assert [row["movement"] for row in moved] == ["created"]
    assert (await stats(store, product.id)).available == 2
    await assert_reconciled(store)


async def test_a_stored_event_renders_to_exactly_the_body_it_always_had(store: Store) -> None:
    """The outbox keeps what a body needs, not the body (rendered at delivery): each body is
    the very text the transaction used to write, key for key and byte for byte: the
    Standard Webhooks envelope, times as ISO 8601 with milliseconds, no escaped non-ASCII."""
    product = await make_product(store, 2)
    first = await hold(store, product.id, 1)
    second = await hold(store, product.id, 1)
    await store.write(
        lambda conn: cancel_one(
            conn, first.id, now=now_ms(), actor="operator", reason="Réservé — «test»"
        )
    )
    await store.write(
        lambda conn: complete_one(conn, second.id, now=now_ms(), order_reference="A-17")
    )
    await store.write(lambda conn: inventory.reduce_stock(conn, product.id, 1, now=now_ms()))
    async with store.reader() as conn:
        stored = await conn.fetch_all(
            "SELECT o.type, o.payload, o.product_id, o.version, o.seq, o.created_at, "
            f"{LEDGER_COLUMNS} FROM outbox o {LEDGER_JOIN} "
            "WHERE o.product_id = :p ORDER BY o.version, o.seq",
            {"p": product.id},
        )
        holds = {r.id: r for r in await inventory.get_reservations(conn, [first.id, second.id])}
    figures = {(int(e.version), int(e.seq)): e for e in await rows(store, product.id)}
    texts = []
    for row in stored:
        version, seq = int(row["version"]), int(row["seq"])
        kind, at = str(row["type"]), int(row["created_at"])
        text = render(kind, str(row["payload"]), product.id, version, seq, at, ledger_part(row))
        assert not str(row["payload"]).startswith("{")  # the compact form was stored
        entry = figures.get((version, seq)) or figures[(version, seq - 1)]
        stock = {
            "productId": product.id,
            "availableStock": entry.figures.available,
            "heldUnits": entry.figures.held,
            "soldUnits": entry.figures.sold,
            "totalStock": entry.figures.total,
            "version": version,
            "sequence": seq,
        }
        data: dict[str, Any]
        if kind.startswith("reservation."):
            assert entry.reservation_id is not None
            r = holds[entry.reservation_id]
            status = kind.split(".")[1].upper()
            done = status == "COMPLETED"
            data = {
                "reservation": {
                    "id": r.id,
                    "productId": product.id,
                    "quantity": 1,
                    "status": "ACTIVE" if status == "CREATED" else status,
                    "createdAt": iso(r.created_at),
                    "expiresAt": iso(r.expires_at),
                    "completedAt": iso(r.completed_at) if done and r.completed_at else None,
                    "orderReference": r.order_reference if done else None,
                    "cancelledBy": r.cancelled_by if status == "CANCELLED" else None,
                    "cancelReason": r.cancel_reason if status == "CANCELLED" else None,
                },
                "stock": stock,
                "actor": entry.actor,
            }
        elif kind == "product.stock_reduced":
            data = {"units": 1, "stock": stock, "actor": "operator"}
        else:
            data = {"stock": stock, "actor": entry.actor}
        expected = json.dumps(
            {"type": kind, "timestamp": iso(at), "data": data},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        assert text == expected
        texts.append(text)
    assert [json.loads(t)["type"] for t in texts] == [
        "reservation.created",
        "reservation.created",
        "product.sold_out",
        "reservation.cancelled",
        "product.back_in_stock",
        "reservation.completed",
        "product.stock_reduced",
        "product.sold_out",
    ]
    assert "Réservé — «test»" in texts[3]


def test_an_event_stored_whole_renders_as_one_stored_with_its_ledger_row() -> None:
    """Events written before reservation events left the hold's id, units, figures and
    actor to their ledger row (all fourteen fields stored) render to the same body as one
    stored today with its ledger row; one of today's without its ledger row is refused,
    not sent with a made-up hold."""
    own = ["CANCELLED", 1_000, 601_000, None, None, "operator", "Réservé"]
    part = ("h-1", 2, 7, 1, 0, 10, "operator")
    whole = [part[0], part[1], *own, *part[2:]]
    today = render("reservation.cancelled", json.dumps(own), 3, 9, 1, 2_000, part)
    before = render("reservation.cancelled", json.dumps(whole), 3, 9, 1, 2_000)
    assert today == before
    body = json.loads(today)
    assert body["data"]["reservation"]["id"] == "h-1"
    assert body["data"]["reservation"]["quantity"] == 2
    assert body["data"]["stock"]["availableStock"] == 7
    assert body["data"]["actor"] == "operator"
    with pytest.raises(ValueError, match="no ledger row"):
        render("reservation.cancelled", json.dumps(own), 3, 9, 1, 2_000)


async def test_reconciliation_names_a_product_whose_books_do_not_add_up(store: Store) -> None:
    fine = await make_product(store, 4)
    moved = await make_product(store, 4)
    await hold(store, fine.id, 1)
    await hold(store, moved.id, 1)
    # A stock change that bypasses the books: the ledger no longer adds up to the product.
    await store.write(
        lambda conn: conn.execute(
            "UPDATE products SET available_stock = available_stock - 1, "
            "sold_units = sold_units + 1, version = version + 1 WHERE id = :id",
            {"id": moved.id},
        )
    )
    result = await Ledger(store).reconcile()
    assert [p.product_id for p in result.unreconciled] == [moved.id]
    (problem,) = result.unreconciled[0].problems
    assert "adds up to available 3, held 1, sold 0" in problem
    assert "the product has available 2, held 1, sold 1" in problem


async def test_reconciliation_checks_each_row_and_the_open_holds(store: Store) -> None:
    product = await make_product(store, 6)
    kept = await hold(store, product.id, 2)
    await hold(store, product.id, 1)
    # A row whose units do not follow from the one before it...
    await store.write(
        lambda conn: conn.execute(
            "UPDATE stock_ledger SET available = 9 WHERE product_id = :p AND version = 2",
            {"p": product.id},
        )
    )
    # ...and a hold that left without its units (the product still counts them as held).
    await store.write(
        lambda conn: conn.execute(
            "UPDATE reservations SET status = 'EXPIRED', ended_at = 1 WHERE id = :id",
            {"id": kept.id},
        )
    )
    (result,) = (await Ledger(store).reconcile([product.id])).products
    assert not result.ok
    assert any(p.startswith("Row 2.0 (held 2) says available 9") for p in result.problems)
    assert any("open holds hold 1 units; the product says 3 are held" in p for p in result.problems)


async def test_the_worker_check_keeps_balances_and_reads_only_what_is_new(store: Store) -> None:
    product = await make_product(store, 10)
    for _ in range(3):
        await hold(store, product.id, 1)
    books = Ledger(store)
    first = await books.check()
    assert first.ok
    assert [p.rows_checked for p in first.products] == [4]
    await hold(store, product.id, 2)
    (again,) = (await books.reconcile()).products
    assert again.ok
    assert again.rows_checked == 1  # from the balance kept by the check
    assert again.ledger == Figures(5, 5, 0, 10)


async def test_the_worker_check_sets_its_metric(store: Store) -> None:
    product = await make_product(store, 3)
    books = Ledger(store)
    await worker_books.reconcile(books)
    assert LEDGER_UNRECONCILED._value.get() == 0
    await store.write(
        lambda conn: conn.execute(
            "UPDATE products SET total_stock = 4, available_stock = 4 WHERE id = :id",
            {"id": product.id},
        )
    )
    await worker_books.reconcile(books)
    assert LEDGER_UNRECONCILED._value.get() == 1


async def test_products_from_before_the_ledger_start_from_their_balance(
    tmp_path: pytest.TempPathFactory,
) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    store = Store(url)
    await store.connect()
    try:
        await migrate.migrate(store, up_to=4)
        await store.write(
            lambda conn: conn.execute(
                "INSERT INTO products (id, name, price_cents, total_stock, available_stock, "
                "version, created_at, updated_at, held_units, sold_units) "
                "VALUES (1, 'Old', 100, 9, 5, 12, 1, 1, 0, 4)"
            )
        )
        await migrate.migrate(store)
        await hold(store, 1, 2)
        result = await Ledger(store).reconcile()
        assert result.ok, result
        assert result.products[0].ledger == Figures(3, 2, 4, 9)
    finally:
        await store.close()


# -- the API -------------------------------------------------------------------------------


@pytest.fixture
async def client(database_url: str, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=database_url, redis_url=redis_url, admin_token=ADMIN_TOKEN)
    async for client in serve(settings):
        yield client


async def test_the_ledger_pages_newest_first(client: httpx.AsyncClient) -> None:
    made = await client.post(
        "/api/admin/products", json={"name": "Ledger", "price": 1, "stock": 10}, headers=OPERATOR
    )
    product = made.json()
    for _ in range(4):
        assert (
            await client.post("/api/reservations", json={"productId": product["id"], "quantity": 1})
        ).status_code == 201
    first = await client.get(
        f"/api/admin/products/{product['id']}/ledger", params={"limit": 3}, headers=OPERATOR
    )
    assert first.status_code == 200, first.text
    page = first.json()
    assert [e["movement"] for e in page["entries"]] == ["held"] * 3
    assert [e["available"] for e in page["entries"]] == [6, 7, 8]
    assert page["entries"][0]["actor"] == "shopper"
    second = await client.get(
        f"/api/admin/products/{product['id']}/ledger",
        params={"limit": 3, "cursor": page["nextCursor"]},
        headers=OPERATOR,
    )
    rest = second.json()
    assert [e["movement"] for e in rest["entries"]] == ["held", "created"]
    assert rest["nextCursor"] is None

    # A time range: nothing before the product was made.
    created_at = rest["entries"][-1]["at"]
    before = await client.get(
        f"/api/admin/products/{product['id']}/ledger",
        params={"until": created_at},
        headers=OPERATOR,
    )
    assert before.json()["entries"] == []
    since = await client.get(
        f"/api/admin/products/{product['id']}/ledger",
        params={"since": created_at, "until": iso(now_ms() + 1000)},
        headers=OPERATOR,
    )
    assert len(since.json()["entries"]) == 5


async def test_the_ledger_refuses_what_it_cannot_read(client: httpx.AsyncClient) -> None:
    missing = await client.get("/api/admin/products/999/ledger", headers=OPERATOR)
    assert missing.status_code == 404
    assert missing.json()["code"] == "product_not_found"
    bad = await client.get("/api/admin/products/1/ledger", params={"cursor": "x"}, headers=OPERATOR)
    assert bad.status_code == 400
    assert bad.json()["code"] == "invalid_request"
    unzoned = await client.get(
        "/api/admin/products/1/ledger", params={"since": "2026-01-01T00:00:00"}, headers=OPERATOR
    )
    assert unzoned.status_code == 400
    assert (await client.get("/api/admin/reconcile")).status_code == 401


async def test_reconcile_over_http(client: httpx.AsyncClient) -> None:
    made = await client.post(
        "/api/admin/products", json={"name": "Books", "price": 1, "stock": 3}, headers=OPERATOR
    )
    held = await client.post(
        "/api/reservations", json={"productId": made.json()["id"], "quantity": 2}
    )
    await client.post(f"/api/reservations/{held.json()['id']}/complete")
    response = await client.get("/api/admin/reconcile", headers=OPERATOR)
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True
    assert body["unreconciled"] == []
    (product,) = body["products"]
    assert (
        product["ledger"]
        == product["product"]
        == {
            "available": 1,
            "held": 0,
            "sold": 2,
            "total": 3,
        }
    )
    assert product["rowsChecked"] == 3
