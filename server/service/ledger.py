"""The stock ledger's use cases: reading a product's movements and its history, and
reconciling the books.

The rows themselves are written by the inventory operations, in their own transactions
(`server.domain.books`). Reconciliation reads one consistent snapshot (`Store.snapshot`,
no write lock); the worker's periodic check also records each proved product's balance
(one short write), so that the next check reads only the rows written since.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from server.domain import ledger
from server.domain.clock import now_ms
from server.domain.inventory import Stats, get_product, stats
from server.domain.ledger import Entry, Reconciled
from server.domain.model import Product
from server.storage.database import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciliation:
    """A reconciliation of every product (or of some), as of `at` (ms)."""

    at: int
    products: list[Reconciled]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.products)

    @property
    def unreconciled(self) -> list[Reconciled]:
        return [p for p in self.products if not p.ok]


@dataclass(frozen=True, slots=True)
class History:
    """A product's units over a range (`points`, one per `step` ms), its counters now
    (`stats`), when its sale started (`started`, ms) and, if every unit is sold, when the
    last one was (`sold_out_at`, ms)."""

    product: Product
    since: int
    until: int
    step: int
    points: list[ledger.Point]
    stats: Stats
    started: int
    sold_out_at: int | None


class Ledger:
    """The books of `store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def entries(
        self,
        product_id: int,
        *,
        limit: int,
        before: tuple[int, int] | None = None,
        since: int | None = None,
        until: int | None = None,
    ) -> list[Entry] | None:
        """Up to `limit` of a product's movements, newest first (see
        `server.domain.ledger.entries`); None if there is no such product."""
        async with self.store.reader() as conn:
            if await get_product(conn, product_id) is None:
                return None
            return await ledger.entries(
                conn, product_id, limit=limit, before=before, since=since, until=until
            )

    async def history(self, product_id: int, *, since: int | None, until: int) -> History | None:
        """The product's units over [since, until) ms (`since` None: from the start of its
        sale, or its creation), at the finest step that draws it in at most
        `ledger.MAX_POINTS` points, and the sale's figures; None if there is no such
        product. Raises `ValueError` for a range that is empty or longer than
        `ledger.MAX_HISTORY_MS`."""
        async with self.store.reader() as conn:
            product = await get_product(conn, product_id)
            if product is None:
                return None
            start = product.sale_starts_at or product.created_at
            if since is None:
                since = min(max(start, until - ledger.MAX_HISTORY_MS), until - 1000)
            if since >= until:
                raise ValueError("since must be before until")
            if until - since > ledger.MAX_HISTORY_MS:
                raise ValueError("the range can be at most 92 days")
            step = ledger.history_step(since, until)
            points = await ledger.history(conn, product_id, since=since, until=until, step=step)
            (figures,) = await stats(conn, product_id)
            sold_out = None
            if figures.sold > 0 and figures.available == 0 and figures.held == 0:
                sold_out = await ledger.sold_out_at(conn, product_id)
        return History(product, since, until, step, points, figures, start, sold_out)

    async def reconcile(self, product_ids: Sequence[int] | None = None) -> Reconciliation:
        """Prove that the ledger adds up, per product; changes nothing."""
        at = now_ms()
        async with self.store.snapshot() as conn:
            products = await ledger.reconcile(conn, product_ids)
        return Reconciliation(at, products)

    async def check(self) -> Reconciliation:
        """Reconcile every product, then keep the balance of each that adds up (the worker's
        periodic check). Logs an error naming every product that does not."""
        result = await self.reconcile()
        proved = [p for p in result.products if p.ok]
        if proved:
            await self.store.write(lambda conn: ledger.record_balances(conn, proved, now=now_ms()))
        for product in result.unreconciled:
            logger.error(
                "the ledger of product %d does not reconcile: %s",
                product.product_id,
                " ".join(product.problems),
            )
        return result
