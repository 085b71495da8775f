"""The operator's sale controls (issue 13, item 11), over HTTP on SQLite and PostgreSQL: edit
name and price, reschedule, pause and resume, end a sale, reduce stock (never below held and
sold), and cancel a shopper's hold. Where stock moves, the ledger has the movement, the
outbox its event, and the books still reconcile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from server.devtools.processes import ADMIN_TOKEN
from server.domain import ledger
from server.domain.clock import now_ms
from server.infra.settings import Settings
from server.storage.database import Store
from server.wire.schemas import ErrorOut, ProductOut, ReservationOut
from tests.support import assert_reconciled, outbox_bodies, serve, stats

OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def client(database_url: str, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        database_url=database_url, redis_url=redis_url, admin_token=ADMIN_TOKEN, max_quantity=10
    )
    async for client in serve(settings):
        yield client


async def new_product(client: httpx.AsyncClient, stock: int = 10, **fields: Any) -> dict[str, Any]:
    made = await client.post(
        "/api/admin/products",
        json={"name": "Lantern", "price": 12.5, "stock": stock, **fields},
        headers=OPERATOR,
    )
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


async def reserve(client: httpx.AsyncClient, product_id: int, quantity: int = 1) -> httpx.Response:
    return await client.post(
        "/api/reservations", json={"productId": product_id, "quantity": quantity}
    )


async def held(client: httpx.AsyncClient, product_id: int, quantity: int = 1) -> dict[str, Any]:
    response = await reserve(client, product_id, quantity)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    ErrorOut.model_validate(body)
    assert body["code"] == code
    assert body["message"].endswith(".")
    return body


def product_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    ProductOut.model_validate(body)
    return body


async def movements(store: Store, product_id: int) -> list[tuple[str, int, str]]:
    """The product's ledger, oldest first: (movement, units, actor)."""
    async with store.reader() as conn:
        entries = await ledger.entries(conn, product_id, limit=1000)
    return [(e.kind, e.units, e.actor) for e in reversed(entries)]


async def events(store: Store, product_id: int) -> list[dict[str, Any]]:
    return await outbox_bodies(store, product_id=product_id)


def at(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


# -- edit ---------------------------------------------------------------------------------


async def test_an_edit_changes_only_what_is_sent_and_moves_no_stock(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = await new_product(client)
    edited = product_of(
        await client.patch(
            f"/api/admin/products/{product['id']}",
            json={"name": "  Storm lantern ", "price": 14.99},
            headers=OPERATOR,
        )
    )
    assert (edited["name"], edited["price"]) == ("Storm lantern", 14.99)
    assert edited["availableStock"] == edited["totalStock"] == 10
    assert edited["version"] > product["version"]  # pages and catalogs keep the highest
    shown = (await client.get(f"/api/products/{product['id']}")).json()
    assert (shown["name"], shown["price"]) == ("Storm lantern", 14.99)
    assert await movements(store, product["id"]) == [("created", 10, "operator")]
    # The shop's systems hear of it: product.updated, at the product's new version.
    event = (await events(store, product["id"]))[-1]
    assert event["type"] == "product.updated"
    assert event["data"]["changed"] == ["name", "price"]
    assert event["data"]["actor"] == "operator"
    assert event["data"]["product"] == {
        "productId": product["id"],
        "name": "Storm lantern",
        "price": 14.99,
        "saleStartsAt": None,
        "saleEndsAt": None,
        "paused": False,
        "maxPerShopper": product["maxPerShopper"],
        "queue": "off",
        "admitFactor": 1.0,
        "version": edited["version"],
    }
    # The limit per shopper and the waiting room are part of what the shop hears of (a
    # newcomer's finding: changing them sent an event that named neither).
    limited = product_of(
        await client.patch(
            f"/api/admin/products/{product['id']}",
            json={"maxPerShopper": 3, "queue": "fifo", "admitFactor": 1.5},
            headers=OPERATOR,
        )
    )
    event = (await events(store, product["id"]))[-1]
    assert event["data"]["changed"] == ["maxPerShopper", "queue", "admitFactor"]
    assert {k: event["data"]["product"][k] for k in ("maxPerShopper", "queue", "admitFactor")} == {
        "maxPerShopper": 3,
        "queue": "fifo",
        "admitFactor": 1.5,
    }
    assert event["data"]["product"]["version"] == limited["version"]
    await assert_reconciled(store)


async def test_an_edit_refuses_what_it_cannot_do_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    product = await new_product(client)
    path = f"/api/admin/products/{product['id']}"
    for body, field in [
        ({}, ""),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": None}, "name"),
        ({"price": -1}, "price"),
        ({"price": 1.234}, "price"),
        ({"price": None}, "price"),
        ({"paused": "yes"}, "paused"),
        ({"saleStartsAt": "2030-01-01T10:00"}, "saleStartsAt"),
        ({"stock": 5}, "stock"),
    ]:
        answer = refused(
            await client.patch(path, json=body, headers=OPERATOR), 400, "invalid_request"
        )
        if field:
            assert answer["details"][0]["field"] == field, body
    refused(await client.patch(path, json={"name": "X"}), 401, "unauthorized")
    refused(
        await client.patch("/api/admin/products/999999", json={"name": "X"}, headers=OPERATOR),
        404,
        "product_not_found",
    )
    after = (await client.get(f"/api/products/{product['id']}")).json()
    assert after == product


async def test_rescheduling_moves_the_start_for_new_holds(client: httpx.AsyncClient) -> None:
    product = await new_product(client)
    path = f"/api/admin/products/{product['id']}"
    later = product_of(
        await client.patch(
            path, json={"saleStartsAt": "2031-03-01T09:00:00+01:00"}, headers=OPERATOR
        )
    )
    assert later["saleStartsAt"] == "2031-03-01T08:00:00.000Z"
    refused(await reserve(client, product["id"]), 409, "sale_not_started")
    now = product_of(await client.patch(path, json={"saleStartsAt": None}, headers=OPERATOR))
    assert now["saleStartsAt"] is None
    await held(client, product["id"])


# -- pause, resume, end -------------------------------------------------------------------


async def test_a_paused_sale_refuses_new_holds_and_still_sells_those_made(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = await new_product(client, name="Tent")
    earlier = await held(client, product["id"], 2)
    paused = product_of(
        await client.post(f"/api/admin/products/{product['id']}/pause", headers=OPERATOR)
    )
    assert paused["paused"] is True
    again = product_of(
        await client.post(f"/api/admin/products/{product['id']}/pause", headers=OPERATOR)
    )
    assert again["paused"] is True
    body = refused(await reserve(client, product["id"]), 409, "sale_paused")
    assert body["message"] == (
        "Reservations for Tent are paused by the shop for now; try again in a little while."
    )
    listed = (await client.get(f"/api/products/{product['id']}")).json()
    assert listed["paused"] is True
    bought = await client.post(f"/api/reservations/{earlier['id']}/complete")
    assert bought.status_code == 200, bought.text

    resumed = product_of(
        await client.post(f"/api/admin/products/{product['id']}/resume", headers=OPERATOR)
    )
    assert resumed["paused"] is False
    updates = [e for e in await events(store, product["id"]) if e["type"] == "product.updated"]
    assert [(e["data"]["changed"], e["data"]["product"]["paused"]) for e in updates] == [
        (["paused"], True),
        (["paused"], True),
        (["paused"], False),
    ]
    await held(client, product["id"])
    # Pausing and resuming move no stock: the ledger has the holds and the sale only.
    assert [m[0] for m in await movements(store, product["id"])] == [
        "created",
        "held",
        "completed",
        "held",
    ]
    await assert_reconciled(store)


async def test_pause_by_patch_too(client: httpx.AsyncClient) -> None:
    product = await new_product(client)
    path = f"/api/admin/products/{product['id']}"
    assert product_of(await client.patch(path, json={"paused": True}, headers=OPERATOR))["paused"]
    refused(await reserve(client, product["id"]), 409, "sale_paused")
    assert not product_of(await client.patch(path, json={"paused": False}, headers=OPERATOR))[
        "paused"
    ]
    await held(client, product["id"])


async def test_an_ended_sale_refuses_new_holds_and_can_be_reopened(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = await new_product(client, name="Kayak")
    earlier = await held(client, product["id"])
    before = now_ms()
    ended = product_of(
        await client.post(f"/api/admin/products/{product['id']}/end", headers=OPERATOR)
    )
    assert ended["saleEndsAt"] is not None
    assert datetime.fromisoformat(ended["saleEndsAt"]).timestamp() * 1000 >= before - 1
    body = refused(await reserve(client, product["id"]), 409, "sale_ended")
    assert body["message"].startswith("The sale of Kayak ended at ")
    # The hold made before the end can still be bought; the units left stay in stock.
    assert (await client.post(f"/api/reservations/{earlier['id']}/complete")).status_code == 200
    s = await stats(store, product["id"])
    assert (s.available, s.sold, s.total) == (9, 1, 10)

    reopened = product_of(
        await client.patch(
            f"/api/admin/products/{product['id']}", json={"saleEndsAt": None}, headers=OPERATOR
        )
    )
    assert reopened["saleEndsAt"] is None
    await held(client, product["id"])


async def test_a_sale_cannot_end_before_it_starts(client: httpx.AsyncClient) -> None:
    product = await new_product(client, saleStartsAt=at(timedelta(days=2)))
    path = f"/api/admin/products/{product['id']}"
    refused(await client.post(f"{path}/end", headers=OPERATOR), 409, "invalid_schedule")
    refused(
        await client.patch(path, json={"saleEndsAt": at(timedelta(days=1))}, headers=OPERATOR),
        409,
        "invalid_schedule",
    )
    ends = at(timedelta(days=3))
    scheduled = product_of(await client.patch(path, json={"saleEndsAt": ends}, headers=OPERATOR))
    assert scheduled["saleEndsAt"] is not None
    # Moving the start past the end is refused the same way.
    refused(
        await client.patch(path, json={"saleStartsAt": at(timedelta(days=4))}, headers=OPERATOR),
        409,
        "invalid_schedule",
    )


# -- reduce stock -------------------------------------------------------------------------


async def test_reducing_stock_takes_available_units_and_writes_the_books(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = await new_product(client, 10)
    await held(client, product["id"], 3)
    reduced = product_of(
        await client.post(
            f"/api/admin/products/{product['id']}/reduce", json={"quantity": 4}, headers=OPERATOR
        )
    )
    assert (reduced["availableStock"], reduced["heldStock"], reduced["totalStock"]) == (3, 3, 6)
    assert (await movements(store, product["id"]))[-1] == ("reduced", 4, "operator")
    last = (await events(store, product["id"]))[-1]
    assert last["type"] == "product.stock_reduced"
    assert last["data"]["units"] == 4
    assert last["data"]["stock"]["totalStock"] == 6
    await assert_reconciled(store)

    # Taking the rest sells it out: the shop hears of that too.
    product_of(
        await client.post(
            f"/api/admin/products/{product['id']}/reduce", json={"quantity": 3}, headers=OPERATOR
        )
    )
    assert [e["type"] for e in (await events(store, product["id"]))[-2:]] == [
        "product.stock_reduced",
        "product.sold_out",
    ]
    await assert_reconciled(store)


async def test_stock_never_goes_below_held_and_sold(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = await new_product(client, 10)
    await held(client, product["id"], 3)
    bought = await held(client, product["id"], 2)
    assert (await client.post(f"/api/reservations/{bought['id']}/complete")).status_code == 200
    path = f"/api/admin/products/{product['id']}/reduce"
    body = refused(
        await client.post(path, json={"quantity": 6}, headers=OPERATOR), 409, "stock_committed"
    )
    assert body["message"] == (
        "Only 5 units can be taken away, 6 asked: the stock cannot go below the 3 held and 2 sold."
    )
    assert body["stock"]["availableStock"] == 5
    for bad in ({"quantity": 0}, {"quantity": -1}, {"quantity": 1.5}, {}):
        refused(await client.post(path, json=bad, headers=OPERATOR), 400, "invalid_request")
    refused(
        await client.post(
            "/api/admin/products/999999/reduce", json={"quantity": 1}, headers=OPERATOR
        ),
        404,
        "product_not_found",
    )
    s = await stats(store, product["id"])
    assert (s.available, s.held, s.sold, s.total) == (5, 3, 2, 10)
    await assert_reconciled(store)


async def test_reductions_racing_holds_never_undercut_them(
    client: httpx.AsyncClient, store: Store
) -> None:
    """Holds and reductions at the same moment: each reduction is all or nothing, no hold
    granted loses its units, and the stock ends exactly at what was held plus what is left."""
    product = await new_product(client, 40)
    path = f"/api/admin/products/{product['id']}/reduce"
    answers = await asyncio.gather(
        *[reserve(client, product["id"], 2) for _ in range(15)],
        *[client.post(path, json={"quantity": 3}, headers=OPERATOR) for _ in range(10)],
    )
    holds = [a for a in answers[:15] if a.status_code == 201]
    reductions = [a for a in answers[15:] if a.status_code == 200]
    assert all(a.status_code in (201, 409) for a in answers[:15])
    assert all(a.status_code in (200, 409) for a in answers[15:])
    s = await stats(store, product["id"])
    assert s.held == 2 * len(holds)
    assert s.total == 40 - 3 * len(reductions)
    assert s.available == s.total - s.held >= 0
    assert sum(1 for m in await movements(store, product["id"]) if m[0] == "reduced") == len(
        reductions
    )
    await assert_reconciled(store)


# -- cancel a hold ------------------------------------------------------------------------


async def test_the_operator_cancels_a_hold_and_the_shopper_and_shop_are_told(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = await new_product(client, 5)
    hold = await held(client, product["id"], 2)
    path = f"/api/admin/reservations/{hold['id']}/cancel"
    cancelled = await client.post(path, json={"reason": "Duplicate order"}, headers=OPERATOR)
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    ReservationOut.model_validate(body)
    assert (body["status"], body["cancelledBy"], body["cancelReason"]) == (
        "CANCELLED",
        "operator",
        "Duplicate order",
    )
    assert body["product"]["availableStock"] == 5
    # The shopper's page reads the same from the hold.
    mine = (await client.get(f"/api/reservations/{hold['id']}")).json()
    assert (mine["status"], mine["cancelledBy"], mine["cancelReason"]) == (
        "CANCELLED",
        "operator",
        "Duplicate order",
    )
    assert (await movements(store, product["id"]))[-1] == ("cancelled", 2, "operator")
    event = (await events(store, product["id"]))[-1]
    assert event["type"] == "reservation.cancelled"
    assert event["data"]["actor"] == "operator"
    assert event["data"]["reservation"]["cancelReason"] == "Duplicate order"
    # Again: unchanged (idempotent), and no second movement.
    again = await client.post(path, headers=OPERATOR)
    assert again.status_code == 200
    assert again.json()["cancelReason"] == "Duplicate order"
    assert sum(1 for m in await movements(store, product["id"]) if m[0] == "cancelled") == 1
    await assert_reconciled(store)


async def test_a_shoppers_own_cancel_says_so(client: httpx.AsyncClient) -> None:
    product = await new_product(client, 5)
    hold = await held(client, product["id"])
    mine = (await client.post(f"/api/reservations/{hold['id']}/cancel")).json()
    assert (mine["cancelledBy"], mine["cancelReason"]) == ("shopper", None)


async def test_the_operator_cannot_cancel_what_is_bought_missing_or_unauthorised(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = await new_product(client, 5)
    bought = await held(client, product["id"])
    assert (await client.post(f"/api/reservations/{bought['id']}/complete")).status_code == 200
    refused(
        await client.post(f"/api/admin/reservations/{bought['id']}/cancel", headers=OPERATOR),
        409,
        "reservation_completed",
    )
    for missing in ("x" * 22, "not-an-id"):
        refused(
            await client.post(f"/api/admin/reservations/{missing}/cancel", headers=OPERATOR),
            404,
            "reservation_not_found",
        )
    hold = await held(client, product["id"])
    refused(await client.post(f"/api/admin/reservations/{hold['id']}/cancel"), 401, "unauthorized")
    refused(
        await client.post(
            f"/api/admin/reservations/{hold['id']}/cancel",
            json={"reason": "x" * 201},
            headers=OPERATOR,
        ),
        400,
        "invalid_request",
    )
    assert (await client.get(f"/api/reservations/{hold['id']}")).json()["status"] == "ACTIVE"
    s = await stats(store, product["id"])
    assert (s.available, s.held, s.sold) == (3, 1, 1)


async def test_every_operator_endpoint_refuses_query_parameters_it_does_not_take(
    client: httpx.AsyncClient,
) -> None:
    """`GET /api/admin/reconcile?productId=8` once answered every product, as if filtered:
    the operator endpoints that take no query parameters ignored them, while those that take
    some refused the others. Every operator operation in the document is asked with one it
    does not list: 400 `invalid_request` naming it, the document says so, nothing changes."""
    product = await new_product(client, stock=5)
    hold = await held(client, product["id"])
    spec = (await client.get("/api/openapi.json")).json()
    filled = {
        "product_id": str(product["id"]),
        "reservation_id": hold["id"],
        "endpoint_id": "1",
        "key_id": "1",
        "event_id": "msg_" + "a" * 26,
    }
    asked = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if operation.get("security") != [{"operatorToken": []}]:
                continue
            named = {p.get("name") for p in operation["parameters"] if p.get("in") == "query"}
            unknown = "productId" if "productId" not in named else "bogus"
            url = path
            for name, value in filled.items():
                url = url.replace("{" + name + "}", value)
            answer = await client.request(
                method.upper(),
                f"{url}?{unknown}=8",
                headers=OPERATOR,
                json={"quantity": 1} if method != "get" else None,
            )
            body = refused(answer, 400, "invalid_request")
            assert body["details"][0]["field"] == unknown, (method, path, body)
            assert "invalid_request" in str(operation["responses"]["400"]), (method, path)
            asked += 1
    assert asked >= 25
    after = product_of(await client.get(f"/api/products/{product['id']}"))
    assert (after["availableStock"], after["heldStock"], after["totalStock"]) == (4, 1, 5)
    reconciled = await client.get("/api/admin/reconcile", headers=OPERATOR)
    assert reconciled.status_code == 200, reconciled.text
    assert reconciled.json()["ok"] is True
