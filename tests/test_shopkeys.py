"""Completion by the shop's backend: shop API keys (SHOP_API_KEYS, or made in the console),
the order reference it sends, and COMPLETE_BY=shop keeping shoppers from completing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest

from server.devtools.processes import ADMIN_TOKEN
from server.infra.settings import Settings
from server.storage.database import Store
from tests.support import outbox_bodies, serve

OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SHOP_KEY = "shop-backend-key-0123456789"
Client = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def client(database_url: str, redis_url: str) -> Client:
    @asynccontextmanager
    async def make(**settings: object) -> AsyncIterator[httpx.AsyncClient]:
        config = Settings(
            database_url=database_url,
            redis_url=redis_url,
            admin_token=ADMIN_TOKEN,
            shop_api_keys=(SHOP_KEY,),
            **settings,  # type: ignore[arg-type]
        )
        async for made in serve(config):
            yield made

    return make


async def hold(client: httpx.AsyncClient) -> str:
    product = await client.post(
        "/api/admin/products", json={"name": "Kept", "price": 5, "stock": 5}, headers=OPERATOR
    )
    held = await client.post(
        "/api/reservations", json={"productId": product.json()["id"], "quantity": 2}
    )
    assert held.status_code == 201, held.text
    reservation_id: str = held.json()["id"]
    return reservation_id


def shop(key: str = SHOP_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_the_shop_completes_with_its_order_reference(client: Client, store: Store) -> None:
    async with client() as http:
        reservation_id = await hold(http)
        done = await http.post(
            f"/api/reservations/{reservation_id}/complete",
            json={"orderReference": "ORD-1001"},
            headers=shop(),
        )
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "COMPLETED"
        assert done.json()["orderReference"] == "ORD-1001"
        again = await http.get(f"/api/reservations/{reservation_id}")
        assert again.json()["orderReference"] == "ORD-1001"
    async with store.reader() as conn:
        row = await conn.fetch_one(
            "SELECT actor FROM stock_ledger WHERE reservation_id = :r AND movement = 'completed'",
            {"r": reservation_id},
        )
    (event,) = await outbox_bodies(store, event_type="reservation.completed")
    assert row is not None
    assert row["actor"] == "shop"
    data = event["data"]
    assert data["reservation"]["orderReference"] == "ORD-1001"
    assert data["actor"] == "shop"


async def test_a_shopper_cannot_complete_when_the_shop_does(client: Client) -> None:
    async with client(complete_by="shop") as http:
        reservation_id = await hold(http)
        refused = await http.post(f"/api/reservations/{reservation_id}/complete")
        assert refused.status_code == 403
        assert refused.json()["code"] == "complete_by_shop"
        still = await http.get(f"/api/reservations/{reservation_id}")
        assert still.json()["status"] == "ACTIVE"
        done = await http.post(f"/api/reservations/{reservation_id}/complete", headers=shop())
        assert done.status_code == 200, done.text
        assert done.json()["orderReference"] is None


async def test_keys_made_in_the_console_complete_until_revoked(client: Client) -> None:
    async with client(complete_by="shop") as http:
        made = await http.post("/api/admin/shop-keys", json={"name": "orders"}, headers=OPERATOR)
        assert made.status_code == 201, made.text
        key = made.json()["key"]
        assert key.startswith("fsk_")
        listed = await http.get("/api/admin/shop-keys", headers=OPERATOR)
        assert "key" not in listed.json()[0]
        assert listed.json()[0]["prefix"] == key[:10]

        first = await hold(http)
        assert (
            await http.post(f"/api/reservations/{first}/complete", headers=shop(key))
        ).status_code == 200
        revoked = await http.post(
            f"/api/admin/shop-keys/{made.json()['id']}/revoke", headers=OPERATOR
        )
        assert revoked.json()["revokedAt"] is not None
        second = await hold(http)
        refused = await http.post(f"/api/reservations/{second}/complete", headers=shop(key))
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"


async def test_completion_refuses_what_it_cannot_take(client: Client) -> None:
    async with client() as http:
        reservation_id = await hold(http)
        path = f"/api/reservations/{reservation_id}/complete"
        wrong = await http.post(path, headers=shop("fsk_not-a-key-we-made"))
        assert wrong.status_code == 401
        # A mistyped SHOP_API_KEYS key reads as a shopper's token: the answer names both
        # readings, not only "send no Authorization header" (a newcomer's finding).
        mistyped = await http.post(path, headers=shop("shop-backend-key-0123456780"))
        assert mistyped.status_code == 401
        assert "neither a shop API key" in mistyped.json()["message"], mistyped.text
        by_shopper = await http.post(path, json={"orderReference": "X-1"})
        assert by_shopper.status_code == 400
        assert "shop API key" in by_shopper.json()["message"]
        for body in ({"orderReference": ""}, {"orderReference": "a\nb"}, {"other": 1}):
            bad = await http.post(path, json=body, headers=shop())
            assert bad.status_code == 400, (body, bad.text)
        # None of that completed it; the shopper still may (COMPLETE_BY=shopper).
        assert (await http.get(f"/api/reservations/{reservation_id}")).json()["status"] == (
            "ACTIVE"
        )
        assert (await http.post(path)).status_code == 200


async def test_wrong_shop_keys_are_throttled_per_address_and_logged_once(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Three tries: wrong console-style keys and a wrong guess at a SHOP_API_KEYS key (which
    looks like a shopper's token) each cost one; then every bearer token from that address is
    refused before it is looked at, the right key's too (an answer that depended on the key
    would tell the guesser when it was right), with one log line, not one per attempt."""
    caplog.set_level("WARNING", logger="server.api.ratelimit")
    async with client(admin_sign_in_limit=(3, 3600)) as http:
        reservation_id = await hold(http)
        path = f"/api/reservations/{reservation_id}/complete"
        for key in ("fsk_guess-1", "fsk_guess-2", "shop-backend-key-0123456780"):
            assert (await http.post(path, headers=shop(key))).status_code == 401
        for key in ("fsk_guess-3", "shop-backend-key-0123456781", SHOP_KEY, SHOP_KEY):
            refused = await http.post(path, headers=shop(key))
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "too_many_failed_sign_ins"
            assert 1 <= int(refused.headers["retry-after"]) <= 1200
        logged = [r for r in caplog.records if "wrong shop API keys" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]
        # The hold is untouched, and the shopper (no bearer token) is not throttled.
        assert (await http.get(f"/api/reservations/{reservation_id}")).json()["status"] == (
            "ACTIVE"
        )
        assert (await http.post(path)).status_code == 200
    # The right key from a fresh start costs nothing and is never refused.
    async with client(admin_sign_in_limit=(1, 3600)) as http:
        for _ in range(3):
            reservation_id = await hold(http)
            done = await http.post(f"/api/reservations/{reservation_id}/complete", headers=shop())
            assert done.status_code == 200, done.text


async def test_a_shop_key_on_a_shoppers_endpoint_is_told_what_it_may_call(
    client: Client,
) -> None:
    """A shop's developer who cancels (or reads, or reserves) with the shop key is told that
    a shop key only completes: 403 `shop_key_not_allowed` naming that endpoint, not a 401
    about shopper sign-in tokens; nothing changes."""
    async with client() as http:
        made = await http.post("/api/admin/shop-keys", json={"name": "orders"}, headers=OPERATOR)
        console_key = made.json()["key"]
        reservation_id = await hold(http)
        product_id = (await http.get(f"/api/reservations/{reservation_id}")).json()["productId"]
        calls = [
            ("POST", f"/api/reservations/{reservation_id}/cancel", None),
            ("GET", f"/api/reservations/{reservation_id}", None),
            ("POST", "/api/reservations", {"productId": product_id, "quantity": 1}),
            ("GET", "/api/me/reservations", None),
            ("GET", "/api/reservations", None),
            ("GET", "/api/me", None),
            ("POST", f"/api/products/{product_id}/queue", None),
            ("GET", f"/api/products/{product_id}/queue", None),
            ("DELETE", f"/api/products/{product_id}/queue", None),
            ("POST", f"/reservations/{reservation_id}/cancel", None),
        ]
        for key in (SHOP_KEY, console_key, "fsk_revoked-or-mistyped"):
            for method, path, body in calls:
                refused = await http.request(method, path, json=body, headers=shop(key))
                assert refused.status_code == 403, (key, method, path, refused.text)
                answer = refused.json()
                assert answer["code"] == "shop_key_not_allowed", (method, path, refused.text)
                assert "POST /api/reservations/{id}/complete" in answer["message"]
        still = await http.get(f"/api/reservations/{reservation_id}")
        assert still.json()["status"] == "ACTIVE"
        assert (await http.get(f"/api/products/{product_id}")).json()["heldStock"] == 2
        # The one endpoint a shop key is for still takes it.
        done = await http.post(
            f"/api/reservations/{reservation_id}/complete", headers=shop(console_key)
        )
        assert done.status_code == 200, done.text
