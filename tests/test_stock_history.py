"""A product's stock over time, kept by the server (issue 13, item 10): read from the stock
ledger, per second over a sale's first minutes and coarser over longer ranges, with the
sale's figures; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from server.devtools.processes import ADMIN_TOKEN
from server.domain import inventory, ledger
from server.domain.clock import iso
from server.domain.model import HoldRequest
from server.infra.settings import Settings
from server.storage.database import Store
from server.wire.schemas import HistoryOut
from tests.support import complete_one, serve

OPERATOR = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T0 = 1_900_000_000_000  # a whole second, in 2030


@pytest.fixture
async def client(database_url: str, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(database_url=database_url, redis_url=redis_url, admin_token=ADMIN_TOKEN)
    async for client in serve(settings):
        yield client


async def a_sale(store: Store) -> int:
    """A product of 10 units made at T0 − 60 s, its sale at T0, holds of 2.5 s: 3 held at
    +0.2 s, 2 more at +1.5 s; the 3 bought at +2.1 s; the 2 expire at +4.0 s; 5 held at
    +4.5 s, bought at +6.0 s; then the last 2 held and bought at +8.0 s (sold out)."""

    async def write(operation: Any) -> Any:
        return (await store.write(operation)).result()

    made = await store.write(
        lambda conn: inventory.create_product(
            conn,
            name="Clocked cloak",
            price_cents=2000,
            stock=10,
            sale_starts_at=T0,
            now=T0 - 60_000,
        )
    )
    product = made.result()

    async def hold(quantity: int, at: int) -> str:
        outcomes, _ = await store.write(
            lambda conn: inventory.reserve(
                conn, [HoldRequest(product.id, quantity)], now=at, hold_ms=2_500
            )
        )
        return outcomes[0].result().reservation.id

    first = await hold(3, T0 + 200)
    await hold(2, T0 + 1_500)
    await write(lambda conn: complete_one(conn, first, now=T0 + 2_100))
    await store.write(lambda conn: inventory.expire_overdue(conn, now=T0 + 4_000))
    third = await hold(5, T0 + 4_500)
    await write(lambda conn: complete_one(conn, third, now=T0 + 6_000))
    last = await hold(2, T0 + 8_000)
    await write(lambda conn: complete_one(conn, last, now=T0 + 8_000))
    return product.id


async def history(client: httpx.AsyncClient, product_id: int, **params: str) -> dict[str, Any]:
    response = await client.get(
        f"/api/admin/products/{product_id}/history", params=params, headers=OPERATOR
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    HistoryOut.model_validate(body)
    return body


async def test_a_sale_is_drawn_per_second_from_its_ledger(
    client: httpx.AsyncClient, store: Store
) -> None:
    product_id = await a_sale(store)
    body = await history(client, product_id, since=iso(T0), until=iso(T0 + 10_000))
    assert body["stepSeconds"] == 1
    points = body["points"]
    assert [p["at"] for p in points] == [iso(T0 + n * 1000) for n in range(10)]
    figures = [(p["available"], p["held"], p["sold"], p["total"]) for p in points]
    assert figures == [
        (7, 3, 0, 10),  # 3 held
        (5, 5, 0, 10),  # 2 more
        (5, 2, 3, 10),  # the 3 bought
        (5, 2, 3, 10),  # nothing moved: carried
        (2, 5, 3, 10),  # the 2 expired, then 5 held
        (2, 5, 3, 10),
        (2, 0, 8, 10),  # the 5 bought
        (2, 0, 8, 10),
        (0, 0, 10, 10),  # the last 2 held and bought: sold out
        (0, 0, 10, 10),
    ]
    assert [p["soldIn"] for p in points] == [0, 0, 3, 0, 0, 0, 5, 0, 2, 0]

    f = body["figures"]
    assert f["startedAt"] == iso(T0)
    assert f["sellThrough"] == 1.0
    assert f["soldOutAt"] == iso(T0 + 8_000)
    assert f["timeToSellOutSeconds"] == 8.0
    assert f["holdsConverted"] == 10 / 12  # 10 units bought of 12 in holds that ended
    assert f["revenue"] == 200.0


async def test_a_longer_range_is_coarser_and_starts_from_the_units_before_it(
    client: httpx.AsyncClient, store: Store
) -> None:
    product_id = await a_sale(store)
    # From the middle of the sale: the units just before it carry into the first point.
    body = await history(client, product_id, since=iso(T0 + 3_000), until=iso(T0 + 5_000))
    assert [(p["available"], p["held"], p["sold"]) for p in body["points"]] == [
        (5, 2, 3),
        (2, 5, 3),
    ]
    # An hour: 10 s a point (600 at most), the whole sale in its first.
    hour = await history(client, product_id, since=iso(T0), until=iso(T0 + 3_600_000))
    assert hour["stepSeconds"] == 10
    assert len(hour["points"]) == 360
    assert (hour["points"][0]["available"], hour["points"][0]["sold"]) == (0, 10)
    assert hour["points"][0]["soldIn"] == 10
    # Before the product existed there is nothing to draw; from its creation, the units.
    before = await history(client, product_id, since=iso(T0 - 600_000), until=iso(T0 - 300_000))
    assert before["points"] == []
    made = await history(client, product_id, since=iso(T0 - 120_000), until=iso(T0))
    assert made["points"][0]["at"] == iso(T0 - 60_000)
    assert made["points"][0]["available"] == 10
    assert made["points"][-1]["available"] == 10


async def test_by_default_it_covers_the_sale_until_now(
    client: httpx.AsyncClient, store: Store
) -> None:
    made = await client.post(
        "/api/admin/products",
        json={"name": "Now", "price": 5, "stock": 4},
        headers=OPERATOR,
    )
    product = made.json()
    assert (
        await client.post("/api/reservations", json={"productId": product["id"], "quantity": 1})
    ).status_code == 201
    body = await history(client, product["id"])
    assert body["stepSeconds"] == 1
    assert body["points"][-1]["available"] == 3
    assert body["points"][-1]["held"] == 1
    assert body["figures"]["holdsConverted"] is None  # no hold has ended
    assert body["figures"]["soldOutAt"] is None


async def test_revenue_counts_each_unit_at_the_price_it_sold_at(
    client: httpx.AsyncClient, store: Store
) -> None:
    product = (
        await client.post(
            "/api/admin/products",
            json={"name": "Repriced", "price": 10, "stock": 5},
            headers=OPERATOR,
        )
    ).json()

    async def buy() -> None:
        held = await client.post(
            "/api/reservations", json={"productId": product["id"], "quantity": 2}
        )
        done = await client.post(f"/api/reservations/{held.json()['id']}/complete")
        assert done.status_code == 200

    await buy()
    edited = await client.patch(
        f"/api/admin/products/{product['id']}", json={"price": 12.5}, headers=OPERATOR
    )
    assert edited.status_code == 200
    await buy()
    figures = (await history(client, product["id"]))["figures"]
    assert figures["revenue"] == 45.0  # 2 × 10 + 2 × 12.50
    assert figures["sellThrough"] == 0.8


async def test_the_history_refuses_what_it_cannot_draw(client: httpx.AsyncClient) -> None:
    path = "/api/admin/products/{}/history"
    missing = await client.get(path.format(999_999), headers=OPERATOR)
    assert (missing.status_code, missing.json()["code"]) == (404, "product_not_found")
    made = await client.post(
        "/api/admin/products", json={"name": "X", "price": 1, "stock": 1}, headers=OPERATOR
    )
    product_id = made.json()["id"]
    for params in (
        {"since": iso(T0), "until": iso(T0)},
        {"since": iso(T0), "until": iso(T0 + 93 * 86_400_000)},
        {"since": "yesterday"},
        {"since": "2030-01-01T00:00:00"},  # no zone
        {"step": "1"},
    ):
        answer = await client.get(path.format(product_id), params=params, headers=OPERATOR)
        assert answer.status_code == 400, (params, answer.text)
        assert answer.json()["code"] == "invalid_request"
    assert (await client.get(path.format(product_id))).status_code == 401


def test_the_step_is_the_finest_that_draws_the_range_in_600_points() -> None:
    assert ledger.history_step(0, 600_000) == 1_000
    assert ledger.history_step(0, 600_001) == 2_000
    assert ledger.history_step(0, 86_400_000) == 300_000
    assert ledger.history_step(0, 30 * 86_400_000) == 7_200_000
    assert ledger.history_step(0, 92 * 86_400_000) == 21_600_000


async def test_a_point_after_a_storms_instant_is_one_seek_however_many_rows_share_it(
    store: Store, database_url: str
) -> None:
    """A storm's group commit writes thousands of movements of one product in one instant.
    Each point's last row before its end is then still one seek of the index, which holds
    the whole order (migration 0011): with (product_id, at) alone the instant's rows were
    read and sorted at every point (2.5 s for 121 points after four batches of 2,500)."""
    made = await store.write(
        lambda conn: inventory.create_product(
            conn, name="Stormy scarf", price_cents=500, stock=5_000, sale_starts_at=T0, now=T0
        )
    )
    product = made.result()
    await store.write(
        lambda conn: inventory.reserve(
            conn, [HoldRequest(product.id, 1)] * 2_000, now=T0 + 100, hold_ms=60_000
        )
    )
    async with store.reader() as conn:
        points = await ledger.history(conn, product.id, since=T0, until=T0 + 5_000, step=1_000)
        assert [(p.at, p.figures.held, p.figures.available) for p in points] == [
            (T0 + n * 1_000, 2_000, 3_000) for n in range(5)
        ]
        if database_url.startswith("sqlite"):
            plan = await conn.fetch_all(
                "EXPLAIN QUERY PLAN "
                + ledger._UNITS_AT.format(column="held")[1:-1].replace("at < e ", "at < :e "),
                {"p": product.id, "e": T0 + 1_000},
            )
            details = " | ".join(str(row["detail"]) for row in plan)
            assert "stock_ledger_by_moment" in details, details
            assert "TEMP B-TREE" not in details, details
