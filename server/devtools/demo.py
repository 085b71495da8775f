"""Demo products for a fresh database, so that the page has something to sell."""

from __future__ import annotations

import functools
import logging

from server.domain import inventory
from server.domain.clock import now_ms
from server.storage.database import Store

logger = logging.getLogger(__name__)

# name, price in cents, stock, sale starts this many seconds from now (None: on sale)
PRODUCTS: list[tuple[str, int, int, int | None]] = [
    ("Aurora running shoes", 12900, 50, None),
    ("Midnight mechanical keyboard", 8900, 30, None),
    ("Studio headphones", 19900, 20, None),
    ("Espresso grinder", 14500, 15, None),
    ("Limited vinyl pressing", 3500, 100, None),
    ("Trail backpack 28 L", 9900, 40, None),
    ("Ceramic pour-over set", 4200, 60, None),
    ("Signed art print", 7500, 5, None),
    ("Smart desk lamp", 5900, 25, None),
    ("Collector's watch", 49900, 3, 120),
]


async def seed_if_empty(store: Store) -> int:
    """Create the demo products unless there are products already; returns how many."""
    async with store.reader() as conn:
        if await inventory.list_products(conn):
            return 0
    now = now_ms()
    for name, price, stock, starts_in in PRODUCTS:
        await store.write(
            functools.partial(
                inventory.create_product,
                name=name,
                price_cents=price,
                stock=stock,
                sale_starts_at=None if starts_in is None else now + starts_in * 1000,
                now=now,
            )
        )
    logger.info("seeded %d demo products", len(PRODUCTS))
    return len(PRODUCTS)
