"""Helpers shared by the tests: making data, checking the stock invariant, waiting with a
deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from server import inventory
from server.clock import now_ms
from server.database import Store
from server.inventory import Stats
from server.model import HoldRequest, Product, Reservation

T = TypeVar("T")


def product_name() -> str:
    return f"Test product {secrets.token_hex(4)}"


async def make_product(
    store: Store, stock: int, *, price_cents: int = 1999, sale_starts_at: int | None = None
) -> Product:
    outcome = await store.write(
        lambda conn: inventory.create_product(
            conn,
            name=product_name(),
            price_cents=price_cents,
            stock=stock,
            sale_starts_at=sale_starts_at,
            now=now_ms(),
        )
    )
    return outcome.result()


async def hold(
    store: Store,
    product_id: int,
    quantity: int = 1,
    *,
    now: int | None = None,
    hold_ms: int = 120_000,
    key: str | None = None,
) -> Reservation:
    """Make one hold directly, at a chosen time (to make holds that are already overdue)."""
    outcomes, _ = await store.write(
        lambda conn: inventory.reserve(
            conn,
            [HoldRequest(product_id, quantity, key)],
            now=now_ms() if now is None else now,
            hold_ms=hold_ms,
        )
    )
    return outcomes[0].result().reservation


async def stats(store: Store, product_id: int) -> Stats:
    async with store.reader() as conn:
        (found,) = await inventory.stats(conn, product_id)
    return found


async def assert_invariant(store: Store, product_id: int) -> Stats:
    """available + held + sold == total, available >= 0 (DESIGN.md §1, promise 1)."""
    s = await stats(store, product_id)
    assert s.available >= 0, s
    assert s.available + s.held + s.sold == s.total, s
    return s


async def reservation(store: Store, reservation_id: str) -> Reservation:
    async with store.reader() as conn:
        found = await inventory.get_reservation(conn, reservation_id)
    assert found is not None
    return found


async def eventually(
    check: Callable[[], Awaitable[T]], *, within: float = 10.0, what: str = "condition"
) -> T:
    """Re-check an observable condition until it holds, failing after `within` seconds.

    For state that has no event to wait on (a row written by another process). The value
    returned by `check` must be truthy to count as done; it is returned.
    """
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)
