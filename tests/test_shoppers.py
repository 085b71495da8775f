"""Shoppers (issue 16): who is asking, whose hold is whose, limits per shopper, and
Idempotency-Keys only their own shopper can replay.

The app runs in this process on both databases (the `database_url` fixture); the limit under
concurrency runs over two real web processes (`running(..., web_concurrency=2)`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server.api.http import RequestError
from server.api.identity import COOKIE, MAX_SHOPPER_COOKIES, Identities
from server.devtools.processes import running
from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.inventory import ProductChanges
from server.domain.model import HoldRequest
from server.infra.settings import Settings
from server.service.shop import RECENT_HOLDS_COUNTED
from server.storage import migrate
from server.storage.database import Store
from tests.support import (
    assert_invariant,
    assert_reconciled,
    cancel_one,
    complete_one,
    make_product,
    serve,
    stats,
)
from tests.test_api import TOKEN, app_settings, assert_error
from tests.test_live import socket_to

JWT_SECRET = "shop-signs-its-shoppers-with-this-32-byte-secret!"


def token(
    sub: str | None = "customer-1",
    *,
    key: Any = JWT_SECRET,
    alg: str = "HS256",
    exp: float | None = None,
) -> str:
    claims: dict[str, Any] = {"exp": int(exp if exp is not None else time.time() + 600)}
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(claims, key, algorithm=alg)


def _hs256_signed_with(secret: bytes, claims: dict[str, Any]) -> str:
    """A JWT signed HS256 with `secret` by hand (PyJWT refuses to use a public key so)."""

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = part(b'{"alg":"HS256","typ":"JWT"}') + b"." + part(json.dumps(claims).encode())
    signature = hmac.new(secret, signing, hashlib.sha256).digest()
    return (signing + b"." + part(signature)).decode()


def _unsigned(claims: dict[str, Any]) -> str:
    """A JWT with `alg: none` and no signature."""
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    return (header + b"." + body + b".").decode()


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


class Shop:
    """The app in this process; each `shopper()` is a client with a cookie jar of its own."""

    def __init__(self, app: httpx.AsyncClient, store: Store) -> None:
        self.app = app
        self.store = store

    async def shopper(self) -> httpx.AsyncClient:
        """A new anonymous shopper, as a browser becomes one: by visiting."""
        client = httpx.AsyncClient(transport=self.app._transport, base_url="http://shop.test")
        me = await client.get("/api/me")
        assert me.status_code == 200
        assert me.json()["shopper"].startswith("anon:")
        assert COOKIE in client.cookies
        return client

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.app.request(method, path, headers=bearer(TOKEN), **kwargs)

    async def product(self, stock: int, **fields: Any) -> dict[str, Any]:
        response = await self.admin(
            "POST",
            "/api/admin/products",
            json={"name": "Sneaker", "price": 120, "stock": stock, **fields},
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


async def reserve(
    client: httpx.AsyncClient, product_id: int, quantity: int = 1, **headers: str
) -> httpx.Response:
    return await client.post(
        "/api/reservations",
        json={"productId": product_id, "quantity": quantity},
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


async def all_at_once(
    requests: Iterable[Coroutine[Any, Any, httpx.Response]],
) -> list[httpx.Response]:
    """The requests sent at once, their answers in order. If one fails, the others are
    cancelled and closed before this returns (`asyncio.gather` left them running past the
    client's close: their sockets were reported unclosed under a later test)."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(request) for request in requests]
    return [task.result() for task in tasks]


@pytest.fixture
async def shop(database_url: str, redis_url: str, store: Store) -> AsyncIterator[Shop]:
    settings = app_settings(
        database_url,
        redis_url,
        session_secret="x" * 32,
        shopper_jwt_secret=JWT_SECRET,
        hold_seconds=60.0,
    )
    async for client in serve(settings):
        yield Shop(client, store)


# -- 1. identity -----------------------------------------------------------------------


async def test_a_visit_gets_a_signed_http_only_lax_cookie(shop: Shop) -> None:
    page = await shop.app.get("/")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie
    # With it, the next visit gets no new one, and the shop knows the shopper.
    again = await shop.app.get("/")
    assert "set-cookie" not in again.headers
    me = (await shop.app.get("/api/me")).json()
    assert me["shopper"].startswith("anon:")
    assert me["token"] is None


async def test_over_https_the_cookie_is_secure(database_url: str, redis_url: str) -> None:
    async for client in serve(app_settings(database_url, redis_url, session_secret="y" * 32)):
        client.base_url = httpx.URL("https://shop.test")
        assert "Secure" in (await client.get("/")).headers["set-cookie"]


async def test_an_api_client_without_cookies_sends_the_token_as_a_header(shop: Shop) -> None:
    product = await shop.product(5)
    me = (await shop.app.get("/api/me", headers={"Cookie": ""})).json()
    shop.app.cookies.clear()
    header = {"Shopper_Token": me["token"]}
    held = await reserve(shop.app, product["id"], **header)
    assert held.status_code == 201
    mine = await shop.app.get("/api/me/reservations", headers={"Shopper-Token": me["token"]})
    assert [r["id"] for r in mine.json()] == [held.json()["id"]]
    assert_error(
        await reserve(shop.app, product["id"], Shopper_Token="forged.token"), 401, "unauthorized"
    )


async def test_a_cookie_this_shop_did_not_sign_is_refused_and_replaced(shop: Shop) -> None:
    product = await shop.product(5)
    shop.app.cookies.set(COOKIE, "somebody.else")
    body = assert_error(await reserve(shop.app, product["id"]), 401, "unauthorized")
    assert "cookie" in body["message"]
    assert (await stats(shop.store, product["id"])).held == 0
    replaced = await shop.app.get("/")
    assert replaced.headers["set-cookie"].startswith(f"{COOKIE}=")


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (token(exp=time.time() - 3600), "expired"),
        (token(key="another-shop-with-another-secret-of-32-bytes"), "signature"),
        (_unsigned({"sub": "x", "exp": int(time.time() + 600)}), "HS256"),
        (token(sub=None), "sub"),
        ("not-a-jwt-at-all", "not valid"),
    ],
    ids=["expired", "wrong-key", "alg-none", "no-sub", "garbage"],
)
async def test_a_bad_shop_token_is_401_never_anonymous(shop: Shop, bad: str, says: str) -> None:
    product = await shop.product(5)
    for call in (
        reserve(shop.app, product["id"], Authorization=f"Bearer {bad}"),
        shop.app.get("/api/me/reservations", headers=bearer(bad)),
    ):
        body = assert_error(await call, 401, "unauthorized")
        assert says in body["message"], body
    assert (await stats(shop.store, product["id"])).held == 0


async def test_a_shop_token_names_the_shopper(shop: Shop) -> None:
    product = await shop.product(5)
    held = await reserve(shop.app, product["id"], Authorization=f"Bearer {token('alice')}")
    assert held.status_code == 201, held.text
    me = (await shop.app.get("/api/me", headers=bearer(token("alice")))).json()
    assert me["shopper"] == "shop:alice"
    assert me["signedIn"] is True
    assert me["units"] == {str(product["id"]): 1}
    # Another signed-in customer does not see it.
    other = await shop.app.get(
        f"/api/reservations/{held.json()['id']}", headers=bearer(token("bob"))
    )
    assert_error(other, 404, "reservation_not_found")


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
async def test_a_shop_signing_with_a_private_key(
    database_url: str, redis_url: str, store: Store, kind: str
) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = app_settings(database_url, redis_url, shopper_jwt_public_key=public.decode())
    async for client in serve(settings):
        product = await make_product(store, 5)
        good = token("carol", key=private, alg=kind)
        assert (
            await reserve(client, product.id, Authorization=f"Bearer {good}")
        ).status_code == 201
        # HS256 signed with the public key (the classic confusion) and alg none: refused.
        confused = _hs256_signed_with(public, {"sub": "carol", "exp": 9_999_999_999})
        for bad in (confused, token("carol", key="k" * 32)):
            assert_error(
                await reserve(client, product.id, Authorization=f"Bearer {bad}"),
                401,
                "unauthorized",
            )


async def test_require_shopper_token_refuses_anonymous_shoppers(
    database_url: str, redis_url: str, store: Store
) -> None:
    settings = app_settings(
        database_url, redis_url, shopper_jwt_secret=JWT_SECRET, require_shopper_token=True
    )
    async for client in serve(settings):
        product = await make_product(store, 5)
        await client.get("/")  # an anonymous cookie is no sign-in
        body = assert_error(await reserve(client, product.id), 401, "unauthorized")
        assert "signed-in" in body["message"]
        signed = await reserve(client, product.id, Authorization=f"Bearer {token()}")
        assert signed.status_code == 201
        assert (await stats(store, product.id)).held == 1


# -- 2. whose hold is whose --------------------------------------------------------------


async def test_a_hold_is_invisible_to_another_shopper(shop: Shop) -> None:
    product = await shop.product(5)
    alice, mallory = await shop.shopper(), await shop.shopper()
    held = (await reserve(alice, product["id"], 2)).json()
    path = f"/api/reservations/{held['id']}"
    for other in (mallory, shop.app):  # another shopper, and a caller that names none
        assert_error(await other.get(path), 404, "reservation_not_found")
        assert_error(await other.post(f"{path}/complete"), 404, "reservation_not_found")
        assert_error(await other.post(f"{path}/cancel"), 404, "reservation_not_found")
        assert (await other.get("/api/me/reservations")).json() == []
    assert (await stats(shop.store, product["id"])).held == 2
    assert (await alice.get(path)).json()["status"] == "ACTIVE"
    mine = (await alice.get("/api/me/reservations")).json()
    assert [r["id"] for r in mine] == [held["id"]]
    # At the root too, as the old client loads "my reservations".
    assert [r["id"] for r in (await alice.get("/reservations")).json()] == [held["id"]]
    assert (await alice.post(f"/reservations/{held['id']}/complete")).json()["status"] == (
        "COMPLETED"
    )


async def test_the_shop_backend_still_completes_any_hold(
    database_url: str, redis_url: str, store: Store
) -> None:
    settings = app_settings(
        database_url, redis_url, session_secret="z" * 32, shop_api_keys=("shop-key-0123456789",)
    )
    async for client in serve(settings):
        product = await make_product(store, 5)
        await client.get("/")
        held = (await reserve(client, product.id)).json()
        client.cookies.clear()
        done = await client.post(
            f"/api/reservations/{held['id']}/complete",
            json={"orderReference": "A-1"},
            headers=bearer("shop-key-0123456789"),
        )
        assert done.status_code == 200, done.text
        assert done.json()["orderReference"] == "A-1"


async def test_holds_without_a_shopper_work_as_before(shop: Shop) -> None:
    """The old client sends no cookie and no token: its holds are anyone's with the id."""
    product = await shop.product(5)
    held = (await reserve(shop.app, product["id"])).json()
    assert (await shop.app.get(f"/reservations/{held['id']}")).status_code == 200
    assert (await shop.app.get("/products")).status_code == 200
    cancelled = await shop.app.post(f"/reservations/{held['id']}/cancel")
    assert cancelled.json()["status"] == "CANCELLED"


async def test_a_replayed_key_from_another_shopper_never_returns_the_first_hold(
    shop: Shop,
) -> None:
    product = await shop.product(10)
    alice, mallory = await shop.shopper(), await shop.shopper()
    first = await reserve(alice, product["id"], 1, Idempotency_Key="k")
    again = await reserve(alice, product["id"], 1, Idempotency_Key="k")
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    theirs = await reserve(mallory, product["id"], 1, Idempotency_Key="k")
    assert theirs.status_code == 201
    assert theirs.json()["id"] != first.json()["id"]
    assert "idempotent-replayed" not in theirs.headers
    # And many at once, from many shoppers, with one key: each gets a hold of their own.
    others = [await shop.shopper() for _ in range(5)]
    answers = await asyncio.gather(
        *(reserve(c, product["id"], 1, Idempotency_Key="k") for c in others)
    )
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 5
    assert first.json()["id"] not in ids
    assert (await stats(shop.store, product["id"])).held == 7


async def test_a_key_without_a_shopper_is_not_replayed_from_elsewhere(shop: Shop) -> None:
    product = await shop.product(10)
    first = await reserve(shop.app, product["id"], Idempotency_Key="k")
    alice = await shop.shopper()
    mine = await reserve(alice, product["id"], Idempotency_Key="k")
    assert mine.json()["id"] != first.json()["id"]


async def test_the_rate_limit_counts_per_signed_in_shopper_and_per_address_otherwise(
    database_url: str, redis_url: str, store: Store
) -> None:
    day = 86_400  # one window for the whole test
    settings = app_settings(
        database_url,
        redis_url,
        shopper_jwt_secret=JWT_SECRET,
        session_secret="r" * 32,
        reserve_rate_limit=(2, day),
    )
    async for client in serve(settings):
        product = await make_product(store, 100)
        for sub in ("alice", "bob"):  # one address, two customers: two allowances
            auth = f"Bearer {token(sub)}"
            assert (await reserve(client, product.id, Authorization=auth)).status_code == 201
            assert (await reserve(client, product.id, Authorization=auth)).status_code == 201
            assert_error(await reserve(client, product.id, Authorization=auth), 429, "rate_limited")
        # Anonymous shoppers on one address share the address's count, however many
        # cookies they take.
        answers = []
        for _ in range(3):
            me = (await client.get("/api/me", headers={"Cookie": ""})).json()
            client.cookies.clear()
            answers.append(await reserve(client, product.id, Shopper_Token=me["token"]))
        assert [a.status_code for a in answers] == [201, 201, 429]


# -- 3. the limit per shopper ------------------------------------------------------------


async def test_the_limit_refuses_politely_and_cancel_gives_it_back(shop: Shop) -> None:
    product = await shop.product(10, maxPerShopper=2)
    assert product["maxPerShopper"] == 2
    alice = await shop.shopper()
    first = (await reserve(alice, product["id"], 1)).json()
    assert (await reserve(alice, product["id"], 1)).status_code == 201
    body = assert_error(await reserve(alice, product["id"], 1), 409, "shopper_limit_reached")
    assert body["message"] == "You can hold at most 2 of these; you have 2."
    assert (body["limit"], body["held"]) == (2, 2)
    # Another shopper is not affected.
    bob = await shop.shopper()
    assert (await reserve(bob, product["id"], 2)).status_code == 201
    assert_error(await reserve(bob, product["id"], 1), 409, "shopper_limit_reached")
    # Cancelling gives the allowance back; completing keeps it used.
    await alice.post(f"/api/reservations/{first['id']}/cancel")
    assert (await alice.get("/api/me")).json()["units"] == {str(product["id"]): 1}
    again = (await reserve(alice, product["id"], 1)).json()
    await alice.post(f"/api/reservations/{again['id']}/complete")
    assert_error(await reserve(alice, product["id"], 1), 409, "shopper_limit_reached")
    s = await assert_invariant(shop.store, product["id"])
    assert (s.held, s.sold) == (3, 1)
    await assert_reconciled(shop.store)


async def test_a_quantity_over_the_limit_at_once_is_refused(shop: Shop) -> None:
    product = await shop.product(10, maxPerShopper=2)
    alice = await shop.shopper()
    body = assert_error(await reserve(alice, product["id"], 3), 409, "shopper_limit_reached")
    assert body["message"] == "You can hold at most 2 of these; you have 0."
    assert (await reserve(alice, product["id"], 2)).status_code == 201


async def test_the_operator_sets_and_removes_the_limit(shop: Shop) -> None:
    product = await shop.product(10)
    assert product["maxPerShopper"] is None
    alice = await shop.shopper()
    assert (await reserve(alice, product["id"], 3)).status_code == 201  # no limit yet
    path = f"/api/admin/products/{product['id']}"
    patched = await shop.admin("PATCH", path, json={"maxPerShopper": 3})
    assert patched.status_code == 200
    assert patched.json()["maxPerShopper"] == 3
    # What the shopper held before the limit counts.
    assert_error(await reserve(alice, product["id"], 1), 409, "shopper_limit_reached")
    listed = (await shop.app.get(f"/api/products/{product['id']}")).json()
    assert listed["maxPerShopper"] == 3
    assert (await shop.admin("PATCH", path, json={"maxPerShopper": None})).json()[
        "maxPerShopper"
    ] is None
    assert (await reserve(alice, product["id"], 1)).status_code == 201
    assert_error(await shop.admin("PATCH", path, json={"maxPerShopper": 0}), 400, "invalid_request")
    assert_error(
        await shop.admin("PATCH", "/api/admin/products/999", json={"maxPerShopper": 2}),
        404,
        "product_not_found",
    )


async def test_max_per_shopper_is_the_default_for_new_products(
    database_url: str, redis_url: str
) -> None:
    settings = app_settings(database_url, redis_url, max_per_shopper=4)
    async for client in serve(settings):
        made = await client.post(
            "/api/admin/products",
            json={"name": "Cap", "price": 5, "stock": 9},
            headers=bearer(TOKEN),
        )
        assert made.json()["maxPerShopper"] == 4
        unlimited = await client.post(
            "/api/admin/products",
            json={"name": "Cap", "price": 5, "stock": 9, "maxPerShopper": None},
            headers=bearer(TOKEN),
        )
        assert unlimited.json()["maxPerShopper"] is None


async def test_expiry_gives_the_allowance_back_by_every_path(store: Store) -> None:
    """The worker's job (`expire`), the sweeper (`expire_overdue`) and a request that finds
    its hold overdue (`complete`/`cancel` refusing it) all go through `_restore`."""
    product = await make_product(store, 10)
    await store.write(
        lambda conn: inventory.update_product(
            conn, product.id, ProductChanges(max_per_shopper=1), now=now_ms()
        )
    )
    past = now_ms() - 10_000

    async def hold_for(shopper: str, at: int) -> str:
        outcomes, _ = await store.write(
            lambda conn: inventory.reserve(
                conn, [HoldRequest(product.id, 1, shopper_id=shopper)], now=at, hold_ms=1_000
            )
        )
        return outcomes[0].result().reservation.id

    async def units(shopper: str) -> dict[int, int]:
        async with store.reader() as conn:
            return await inventory.shopper_units(conn, shopper)

    # The sweeper takes the oldest overdue hold: b's.
    job = await hold_for("anon:a", past)
    swept = await hold_for("anon:b", past - 1_000)
    lazy = await hold_for("anon:c", past)
    assert await units("anon:a") == {product.id: 1}
    await store.write(lambda conn: inventory.expire(conn, job, now=now_ms()))
    await store.write(lambda conn: inventory.expire_overdue(conn, now=now_ms(), limit=1))
    late = await store.write(lambda conn: complete_one(conn, lazy, now=now_ms(), caller="anon:c"))
    assert late.error is not None
    assert late.error.code == "reservation_expired"
    async with store.reader() as conn:
        rows = await conn.fetch_all("SELECT shopper_id FROM shopper_allowances")
    assert rows == []  # nobody has any: no row is kept
    for shopper in ("anon:a", "anon:b", "anon:c"):
        assert await units(shopper) == {}, shopper
        outcomes, _ = await store.write(
            lambda conn, s=shopper: inventory.reserve(  # type: ignore[misc]
                conn, [HoldRequest(product.id, 1, shopper_id=s)], now=now_ms(), hold_ms=60_000
            )
        )
        assert outcomes[0].error is None, shopper
    assert swept
    await assert_invariant(store, product.id)
    await assert_reconciled(store)


async def test_a_shoppers_overdue_holds_never_count_against_them(store: Store) -> None:
    """Lazy path: no worker has expired them yet; the next request expires them itself."""
    product = await make_product(store, 10)
    await limit_per_shopper(store, product.id, 2)
    past = now_ms() - 10_000
    await store.write(
        lambda conn: inventory.reserve(
            conn, [HoldRequest(product.id, 2, shopper_id="anon:a")], now=past, hold_ms=1_000
        )
    )
    outcomes, events = await store.write(
        lambda conn: inventory.reserve(
            conn, [HoldRequest(product.id, 2, shopper_id="anon:a")], now=now_ms(), hold_ms=60_000
        )
    )
    assert outcomes[0].error is None
    assert any(getattr(e, "reservation", None) for e in events)  # the old hold's expiry
    s = await assert_invariant(store, product.id)
    assert (s.held, s.expired) == (2, 2)
    await assert_reconciled(store)


async def test_one_batch_answers_each_request_on_its_own(store: Store) -> None:
    """Group commit puts many shoppers' requests in one transaction: each is answered by
    its own shopper's allowance, first come first served."""
    product = await make_product(store, 100)
    await store.write(
        lambda conn: inventory.update_product(
            conn, product.id, ProductChanges(max_per_shopper=2), now=now_ms()
        )
    )
    requests = [
        HoldRequest(product.id, 1, shopper_id="anon:a"),
        HoldRequest(product.id, 2, shopper_id="anon:b"),
        HoldRequest(product.id, 1, shopper_id="anon:a"),
        HoldRequest(product.id, 1, shopper_id="anon:a"),  # a's third: refused
        HoldRequest(product.id, 1, shopper_id="anon:b"),  # b's third: refused
        HoldRequest(product.id, 5),  # no shopper: no limit
        HoldRequest(product.id, 3, shopper_id="anon:c"),  # over the limit at once
        HoldRequest(product.id, 2, shopper_id="anon:c"),  # fits after that
    ]
    outcomes, _ = await store.write(
        lambda conn: inventory.reserve(conn, requests, now=now_ms(), hold_ms=60_000)
    )
    codes = [o.error.code if o.error else "held" for o in outcomes]
    assert codes == [
        "held", "held", "held", "shopper_limit_reached", "shopper_limit_reached", "held",
        "shopper_limit_reached", "held",
    ]  # fmt: skip
    assert (await stats(store, product.id)).held == 1 + 2 + 1 + 5 + 2


async def test_a_request_counted_that_gets_no_stock_gives_its_allowance_back(
    store: Store,
) -> None:
    product = await make_product(store, 1)
    await store.write(
        lambda conn: inventory.update_product(
            conn, product.id, ProductChanges(max_per_shopper=2), now=now_ms()
        )
    )
    requests = [
        HoldRequest(product.id, 1, shopper_id="anon:a"),
        HoldRequest(product.id, 1, shopper_id="anon:a"),  # counted, but no stock left
    ]
    outcomes, _ = await store.write(
        lambda conn: inventory.reserve(conn, requests, now=now_ms(), hold_ms=60_000)
    )
    assert [o.error.code if o.error else "held" for o in outcomes] == [
        "held",
        "insufficient_stock",
    ]
    async with store.reader() as conn:
        assert await inventory.shopper_units(conn, "anon:a") == {product.id: 1}


async def test_allowance_rows_only_while_a_product_has_a_limit(store: Store) -> None:
    """A product without a limit keeps no allowance rows (a shopper's reservation of it
    costs no statement more than an anonymous one); setting a limit fills them from its
    ACTIVE and COMPLETED holds, not from ended ones; removing it deletes them. What the
    shop page reads (`shopper_units`) is the same before and after."""
    product = await make_product(store, 20)
    past = now_ms() - 10_000

    async def hold(shopper: str, quantity: int, *, at: int, hold_ms: int = 60_000) -> str:
        outcomes, _ = await store.write(
            lambda conn: inventory.reserve(
                conn,
                [HoldRequest(product.id, quantity, shopper_id=shopper)],
                now=at,
                hold_ms=hold_ms,
            )
        )
        return outcomes[0].result().reservation.id

    async def rows() -> dict[str, int]:
        async with store.reader() as conn:
            found = await conn.fetch_all(
                "SELECT shopper_id, units FROM shopper_allowances WHERE product_id = :p",
                {"p": product.id},
            )
        return {str(r["shopper_id"]): int(r["units"]) for r in found}

    async def units(shopper: str) -> dict[int, int]:
        async with store.reader() as conn:
            return await inventory.shopper_units(conn, shopper)

    bought = await hold("anon:a", 2, at=now_ms())
    await store.write(lambda conn: complete_one(conn, bought, now=now_ms()))
    await hold("anon:a", 1, at=now_ms())
    cancelled = await hold("anon:b", 3, at=now_ms())
    await store.write(lambda conn: cancel_one(conn, cancelled, now=now_ms()))
    expired = await hold("anon:b", 1, at=past, hold_ms=1_000)
    await store.write(lambda conn: inventory.expire(conn, expired, now=now_ms()))
    await hold("anon:c", 1, at=now_ms())
    assert await rows() == {}
    assert await units("anon:a") == {product.id: 3}
    assert await units("anon:b") == {}

    await limit_per_shopper(store, product.id, 3)
    assert await rows() == {"anon:a": 3, "anon:c": 1}
    assert await units("anon:a") == {product.id: 3}
    outcomes, _ = await store.write(
        lambda conn: inventory.reserve(
            conn,
            [
                HoldRequest(product.id, 1, shopper_id="anon:a"),  # has 3: refused
                HoldRequest(product.id, 3, shopper_id="anon:b"),  # ended holds do not count
            ],
            now=now_ms(),
            hold_ms=60_000,
        )
    )
    assert [o.error.code if o.error else "held" for o in outcomes] == [
        "shopper_limit_reached",
        "held",
    ]
    await limit_per_shopper(store, product.id, 4)  # another limit: the rows stay
    assert await rows() == {"anon:a": 3, "anon:b": 3, "anon:c": 1}
    outcome = await store.write(
        lambda conn: inventory.update_product(
            conn, product.id, ProductChanges(max_per_shopper=None), now=now_ms()
        )
    )
    outcome.result()
    assert await rows() == {}
    assert await units("anon:b") == {product.id: 3}
    await assert_invariant(store, product.id)
    await assert_reconciled(store)


async def test_migration_0009_keeps_the_rows_of_limited_products_only(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/before.db")
    await store.connect()
    try:
        await migrate.migrate(store, up_to=8)
        await store.write(
            lambda conn: conn.execute(
                "INSERT INTO products (id, name, price_cents, total_stock, available_stock, "
                "version, created_at, updated_at, held_units, max_per_shopper) VALUES "
                "(1, 'Free', 100, 9, 8, 2, 1, 1, 1, NULL), (2, 'Capped', 100, 9, 8, 2, 1, 1, 1, 2)"
            )
        )
        await store.write(
            lambda conn: conn.execute(
                "INSERT INTO shopper_allowances (shopper_id, product_id, units) "
                "VALUES ('anon:a', 1, 1), ('anon:a', 2, 1)"
            )
        )
        await migrate.migrate(store)
        async with store.reader() as conn:
            rows = await conn.fetch_all("SELECT shopper_id, product_id FROM shopper_allowances")
        assert [(r["shopper_id"], r["product_id"]) for r in rows] == [("anon:a", 2)]
    finally:
        await store.close()


async def test_me_counts_no_overdue_hold_as_held(shop: Shop) -> None:
    """A hold past its expiry that no worker has expired yet is not the shopper's any more
    (their next reservation expires it first): `units` leaves it out, as the limit does."""
    alice = await shop.shopper()
    shopper = (await alice.get("/api/me")).json()["shopper"]
    limited = await shop.product(10, maxPerShopper=5)
    unlimited = await shop.product(10, maxPerShopper=None)
    past = now_ms() - 10_000
    for product_id, quantity, at, hold_ms in [
        (limited["id"], 2, past, 1_000),  # overdue
        (limited["id"], 1, now_ms(), 60_000),  # held
        (unlimited["id"], 3, past, 1_000),  # overdue
        (unlimited["id"], 1, now_ms(), 60_000),  # held
    ]:
        request = HoldRequest(product_id, quantity, shopper_id=shopper)
        outcomes, _ = await shop.store.write(
            functools.partial(inventory.reserve, requests=[request], now=at, hold_ms=hold_ms)
        )
        assert outcomes[0].error is None
    me = (await alice.get("/api/me")).json()
    assert me["units"] == {str(limited["id"]): 1, str(unlimited["id"]): 1}
    # And the limit agrees: 4 more fit (5 - 1), the overdue hold expired on the way.
    assert (await reserve(alice, limited["id"], 4)).status_code == 201
    units = (await alice.get("/api/me")).json()["units"]
    assert units == {str(limited["id"]): 5, str(unlimited["id"]): 1}


async def test_me_reads_a_bounded_page_of_a_shoppers_holds(shop: Shop) -> None:
    """`units` of a product without a limit is counted from the holds that can still be
    ACTIVE and the shopper's newest RECENT_HOLDS_COUNTED (it read every hold the shopper
    ever made: ~30 ms after 30,000); of a product with one, the allowance row, exact."""
    alice = await shop.shopper()
    shopper = (await alice.get("/api/me")).json()["shopper"]
    limited = await shop.product(1_000, maxPerShopper=1_000)
    unlimited = await shop.product(1_000, maxPerShopper=None)
    bought = RECENT_HOLDS_COUNTED + 5
    past = now_ms() - 86_400_000
    # The limited product's holds first: the newest page is of the unlimited one's.
    for at, product in ((past, limited), (past + 10_000, unlimited)):
        requests = [HoldRequest(product["id"], 1, shopper_id=shopper)] * bought
        outcomes, _ = await shop.store.write(
            functools.partial(inventory.reserve, requests=requests, now=at, hold_ms=60_000)
        )
        assert all(o.value is not None for o in outcomes)
        completing = [inventory.Completing(o.value.reservation.id) for o in outcomes if o.value]
        ended, _ = await shop.store.write(
            functools.partial(inventory.complete_many, requests=completing, now=at + 1_000)
        )
        assert all(o.error is None for o in ended)
    assert (await reserve(alice, unlimited["id"], 2)).status_code == 201
    units = (await alice.get("/api/me")).json()["units"]
    assert units == {
        str(limited["id"]): bought,
        # The active hold, and the newest of the purchases but one.
        str(unlimited["id"]): 2 + RECENT_HOLDS_COUNTED - 1,
    }


async def limit_per_shopper(store: Store, product_id: int, limit: int) -> None:
    outcome = await store.write(
        lambda conn: inventory.update_product(
            conn, product_id, ProductChanges(max_per_shopper=limit), now=now_ms()
        )
    )
    outcome.result()


# -- 7. the limit under concurrency, over two web processes -------------------------------


@pytest.mark.slow
# 600 requests through two web processes: 70-85 s here at a load average of 20, over 120 s at
# 25-30, where pytest-timeout's signal stopped the event loop mid-request and the client's
# sockets were reported unclosed. A hung service still fails each request at 30 s.
@pytest.mark.timeout(300)
async def test_300_concurrent_requests_from_one_shopper_and_from_50_over_two_processes(
    database_url: str, redis_url: str, tmp_path: Path, store: Store
) -> None:
    with running(
        database_url, redis_url, tmp_path / "logs", web_concurrency=2,
        SHOPPER_JWT_SECRET=JWT_SECRET,
    ) as service:  # fmt: skip
        one = await service.new_product(1_000, maxPerShopper=2)
        many = await service.new_product(1_000, maxPerShopper=2)
        # 100 connections for 300 requests: a request waits for a free one as long as it takes
        # (each still times out at 30 s once sent). The default 30 s wait for one counted the
        # time the 200 requests ahead of it took: on a busy machine, its speed, not a hang.
        limits = httpx.Limits(max_connections=100)
        timeout = httpx.Timeout(30, pool=None)
        async with service.client(limits=limits, timeout=timeout) as client:
            me = (await client.get("/api/me")).json()
            client.cookies.clear()
            # One anonymous shopper (its token as a header, so every connection carries it),
            # 300 requests at once: exactly 2 units held.
            answers = await all_at_once(
                reserve(client, one["id"], 1, Shopper_Token=me["token"]) for _ in range(300)
            )
            statuses = Counter(a.status_code for a in answers)
            assert statuses == {201: 2, 409: 298}, statuses
            assert {a.json()["code"] for a in answers if a.status_code == 409} == {
                "shopper_limit_reached"
            }
            # 50 signed-in shoppers, 6 requests each at once: each holds at most 2.
            subs = [f"customer-{n}" for n in range(50)]
            answers = await all_at_once(
                reserve(client, many["id"], 1, Authorization=f"Bearer {token(sub)}")
                for sub in subs
                for _ in range(6)
            )
            statuses = Counter(a.status_code for a in answers)
            assert statuses == {201: 100, 409: 200}, statuses

    async with store.reader() as conn:
        holds = await inventory.list_reservations(
            conn, product_id=many["id"], status=None, limit=1000
        )
    per_shopper = Counter(h.shopper_id for h in holds)
    assert set(per_shopper) == {f"shop:{sub}" for sub in subs}
    assert set(per_shopper.values()) == {2}
    for product in (one, many):
        s = await assert_invariant(store, product["id"])
        assert s.held == (2 if product is one else 100)
    await assert_reconciled(store)


@pytest.mark.slow
async def test_watch_over_the_socket_shows_only_the_shoppers_own_holds(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    with running(database_url, redis_url, tmp_path / "logs", web_concurrency=1) as service:
        product = await service.new_product(10)
        async with service.client() as alice, service.client() as mallory:
            await alice.get("/")
            await mallory.get("/")
            mine = (await reserve(alice, product["id"])).json()
            cookie = {"Cookie": f"{COOKIE}={alice.cookies[COOKIE]}"}
            theirs = {"Cookie": f"{COOKIE}={mallory.cookies[COOKIE]}"}
            watch = {"type": "watch", "reservations": [mine["id"]]}
            async with (
                socket_to(service, additional_headers=theirs) as spy,
                socket_to(service, additional_headers=cookie) as owner,
            ):
                await spy.send(watch)
                await owner.send(watch)
                await owner.status(mine["id"], "ACTIVE")
                await alice.post(f"/api/reservations/{mine['id']}/cancel")
                await owner.status(mine["id"], "CANCELLED")
                # The spy's socket got the product's stock frames, never the hold.
                await spy.stock(product["id"], 10)
                assert not [f for f in spy.frames.frames if f["type"] == "reservation"]


def test_a_remembered_token_is_refused_once_it_expires() -> None:
    """Verified tokens are remembered (a shopper's next request is not verified again),
    but only until their `exp`."""
    identities = Identities(Settings(session_secret="s" * 32, shopper_jwt_secret=JWT_SECRET))
    fresh = token("dora")
    assert identities._signed_in(fresh) == "shop:dora"
    assert fresh in identities._tokens
    stale = token("dora", exp=time.time() - 3600)
    identities._tokens[stale] = ("shop:dora", time.time() - 3600)  # as if verified back then
    with pytest.raises(RequestError) as refused:
        identities._signed_in(stale)
    assert refused.value.status == 401
    assert "expired" in refused.value.message


# -- what the attack review found (identity) ----------------------------------------------


@pytest.mark.parametrize(
    "others",
    ['prefs={"a":1,"b":[2]}', 'x="unterminated', "a=b c", "theme=dark"],
    ids=["json-value", "open-quote", "space", "plain"],
)
async def test_other_cookies_on_the_domain_never_hide_the_shoppers_own(
    shop: Shop, others: str
) -> None:
    """http.cookies gave up on the whole header at one cookie it could not read, so the
    customer became a new shopper on every page and could not buy their own hold."""
    alice = await shop.shopper()
    me = (await alice.get("/api/me")).json()
    mine = f"{COOKIE}={alice.cookies[COOKIE]}"
    product = await shop.product(5)
    held = (await reserve(alice, product["id"])).json()
    mixed = {"Cookie": f"{others}; {mine}"}
    bare = shop.app  # no jar: only the header we give
    bare.cookies.clear()
    again = await bare.get("/api/me", headers=mixed)
    assert again.json().get("shopper") == me["shopper"], again.text
    assert "set-cookie" not in again.headers
    done = await bare.post(f"/api/reservations/{held['id']}/complete", headers=mixed)
    assert done.status_code == 200, done.text
    # Split over two Cookie headers (HTTP/2 may), in either order.
    for first, second in ((others, mine), (mine, others)):
        raw = await bare.get(
            "/api/me", headers=httpx.Headers([("cookie", first), ("cookie", second)])
        )
        assert raw.json()["shopper"] == me["shopper"]


async def test_a_malformed_shopper_cookie_is_401_not_anonymous(shop: Shop) -> None:
    product = await shop.product(5)
    shop.app.cookies.clear()
    for value in ['"', "", "a.b.c", '"quoted.value"']:
        answer = await reserve(shop.app, product["id"], Cookie=f"{COOKIE}={value}")
        assert_error(answer, 401, "unauthorized")
    assert (await stats(shop.store, product["id"])).held == 0


def test_a_cookie_header_full_of_backslashes_costs_no_time() -> None:
    """Before Python 3.11.10, http.cookies took 0.68 s of CPU for a 15 KB Cookie header of
    backslashes (CVE-2024-7592), on the event loop of every process it reached. Reading only
    our own cookie, pair by pair, is linear: here a thousandth of that is a generous bound
    (CPU time, not wall time, so a busy machine does not move it)."""
    identities = Identities(Settings(session_secret="s" * 32))
    header = f'{COOKIE}="' + "\\\\" * 7500 + '"'
    scope = {"headers": [(b"cookie", header.encode())]}
    started = time.process_time()
    for _ in range(10):
        assert identities.cookie_shopper(scope) == "bad"  # not signed here: a 401
    assert time.process_time() - started < 0.1


def test_a_cookie_header_full_of_shopper_cookies_costs_a_few_signature_checks() -> None:
    """Each `shopper` cookie's signature is an HMAC to check: a 15 KB Cookie header of
    1,150 `shopper=x.y` cost 1,150 of them, 7 ms of CPU a request (30 to 150 ms of the
    event loop on a busy machine), from any client, on any shopper route. At most
    `MAX_SHOPPER_COOKIES` are checked; a browser's few are all read."""
    identities = Identities(Settings(session_secret="s" * 32))
    signer = identities._signer
    checks = 0

    def counted(value: str | bytes) -> bytes:
        nonlocal checks
        checks += 1
        return signer.unsign(value)

    identities._signer = SimpleNamespace(unsign=counted, sign=signer.sign)  # type: ignore[assignment]
    header = "; ".join([f"{COOKIE}=x.y"] * 1150)
    assert identities.cookie_shopper({"headers": [(b"cookie", header.encode())]}) == "bad"
    assert checks <= 10  # a browser sends a few
    # A browser's few (a path's and the root's): the one signed here names the shopper.
    shopper, token = identities.new_anonymous()
    few = "; ".join([f"{COOKIE}=x.y"] * (MAX_SHOPPER_COOKIES - 1) + [f"{COOKIE}={token}"])
    assert identities.cookie_shopper({"headers": [(b"cookie", few.encode())]}) == shopper


@pytest.mark.parametrize("exp", [10**400, "1900000000", True], ids=["huge", "string", "bool"])
async def test_an_odd_exp_is_401_or_served_never_a_500(shop: Shop, exp: Any) -> None:
    # PyJWT will not encode such an `exp`: the claims signed by hand.
    raw = _hs256_signed_with(JWT_SECRET.encode(), {"sub": "odd", "exp": exp})
    answer = await shop.app.get("/api/me", headers=bearer(raw))
    assert answer.status_code in (200, 401), answer.text
    if isinstance(exp, int) and not isinstance(exp, bool):
        assert answer.json()["shopper"] == "shop:odd"
    else:
        assert "exp" in answer.json()["message"]


def test_audience_and_issuer_are_checked_when_the_shop_names_them() -> None:
    exp = int(time.time() + 600)
    plain = Identities(Settings(session_secret="s" * 32, shopper_jwt_secret=JWT_SECRET))
    # Unnamed: a token with an `aud` (identity providers put one in every token) is taken.
    with_aud = jwt.encode({"sub": "ann", "exp": exp, "aud": "anything"}, JWT_SECRET)
    assert plain._signed_in(with_aud) == "shop:ann"

    strict = Identities(
        Settings(
            session_secret="s" * 32,
            shopper_jwt_secret=JWT_SECRET,
            shopper_jwt_audience="flash-sale",
            shopper_jwt_issuer="https://shop.example",
        )
    )
    good = {"sub": "ann", "exp": exp, "aud": "flash-sale", "iss": "https://shop.example"}
    assert strict._signed_in(jwt.encode(good, JWT_SECRET)) == "shop:ann"
    for claims, says in (
        ({**good, "aud": "password-reset"}, "aud"),
        ({k: v for k, v in good.items() if k != "aud"}, "aud"),
        ({**good, "iss": "https://evil.example"}, "issued"),
        ({k: v for k, v in good.items() if k != "iss"}, "iss"),
    ):
        with pytest.raises(RequestError) as refused:
            strict._signed_in(jwt.encode(claims, JWT_SECRET))
        assert refused.value.status == 401
        assert says in refused.value.message, refused.value.message
