"""Attacks on the waiting room (issue 17) that were real bugs: each test is the attack,
and what the room must do about it. The app runs in this process, on both databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import pytest

from server.storage.database import Store
from tests.support import assert_invariant, eventually, serve
from tests.test_api import app_settings, assert_error
from tests.test_queue_api import starts_in, ticket_of
from tests.test_shoppers import Shop, reserve


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
    greedy = await reserve(shoppers[0], product["id"], quantity=3)
    assert_error(greedy, 403, "not_admitted")
    assert (await shoppers[0].get(path)).json()["state"] == "admitted"  # the pass is kept
    for shopper in shoppers:
        held = await reserve(shopper, product["id"])
        assert held.status_code == 201, held.text
    await assert_invariant(shop.store, product["id"])
