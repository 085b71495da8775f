"""Demo products for a fresh database, so that the page has something to sell."""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

from server.domain import inventory
from server.domain.clock import now_ms
from server.storage.database import Store

logger = logging.getLogger(__name__)


class DemoProduct(NamedTuple):
    """A demo product: price in cents, stock in units, and when its sale starts, in seconds
    from the seeding (None: on sale at once)."""

    name: str
    cents: int
    stock: int
    starts_in: int | None = None
    queue: str = "off"  # its waiting room: "off", "fifo" or "random"


PRODUCTS: list[DemoProduct] = [
    DemoProduct("Aurora running shoes", 12900, 50),
    DemoProduct("Midnight mechanical keyboard", 8900, 30),
    DemoProduct("Studio headphones", 19900, 20),
    DemoProduct("Espresso grinder", 14500, 15),
    DemoProduct("Limited vinyl pressing", 3500, 100),
    DemoProduct("Trail backpack 28 L", 9900, 40),
    DemoProduct("Ceramic pour-over set", 4200, 60),
    DemoProduct("Signed art print", 7500, 5),
    DemoProduct("Smart desk lamp", 5900, 25),
    # A drop: its waiting room is open from the start (QUEUE_OPENS_SECONDS before the sale),
    # so the page's lobby can be tried: join, the random draw at the start, a pass.
    DemoProduct("Collector's watch", 49900, 3, starts_in=120, queue="random"),
]


async def seed_if_empty(store: Store) -> int:
    """Create the demo products unless there are products already; returns how many."""
    async with store.reader() as conn:
        if await inventory.list_products(conn):
            return 0
    now = now_ms()
    for product in PRODUCTS:
        starts_in = product.starts_in
        await store.write(
            functools.partial(
                inventory.create_product,
                name=product.name,
                price_cents=product.cents,
                stock=product.stock,
                sale_starts_at=None if starts_in is None else now + starts_in * 1000,
                queue=product.queue,
                now=now,
            )
        )
    logger.info("seeded %d demo products", len(PRODUCTS))
    return len(PRODUCTS)
