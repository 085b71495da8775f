"""Retention (RETENTION_DAYS): the worker removes ended holds, proved ledger rows,
delivered events and ended waiting-room tickets older than that, in bounded batches
(`server.domain.retention`), each batch its own short transaction, so that the tables
stop growing and no run holds the write lock for long. Counted in
`flashsale_retention_removed_rows_total{table}`. Each run then files the waiting-room
tickets that ended more than `FILE_AFTER_MS` ago (`retention.file_tickets`), in batches of
at most `FILE_BATCH`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from server.domain import retention
from server.domain.clock import now_ms
from server.domain.executor import Executor
from server.infra.metrics import RETENTION_REMOVED
from server.storage.database import Store

logger = logging.getLogger(__name__)

BATCH = 1000
# Batches per table per run: a run removes at most this many thousand rows of each, and a
# backlog (the first run after the feature arrives on a year of data) clears over a few runs.
MOST_BATCHES = 20
PRODUCTS_PER_RUN = 200
# Tickets filed a transaction, at most: each writes a page of its own of the index of
# filed tickets (random shopper ids): on a month-old SQLite database 1,000 tickets wrote
# ~1,300 pages in ~16 ms (`python -m bench.joinpages`); a quarter of BATCH keeps each
# transaction's hold on the write lock to a few ms, should a sale's joins be waiting.
FILE_BATCH = 250


class Retention:
    """Removes what is older than `days` from the tables of `store`."""

    def __init__(self, store: Store, *, days: float) -> None:
        self.store = store
        self.days = days
        self._next_product = 0  # where the walk over products' ledgers goes on

    def cutoff(self) -> int:
        return now_ms() - round(self.days * retention.DAY_MS)

    async def run(self, *, batch: int = BATCH, most: int = MOST_BATCHES) -> dict[str, int]:
        """One run: up to `most` batches of `batch` rows from each table; the rows removed,
        by table, and (`queue_tickets_filed`) the waiting-room tickets filed."""
        cutoff = self.cutoff()
        removed = {
            "reservations": await self._batches(
                lambda conn: retention.remove_holds(conn, cutoff=cutoff, limit=batch), batch, most
            ),
            "webhook_deliveries": await self._batches(
                lambda conn: retention.remove_deliveries(conn, cutoff=cutoff, limit=batch),
                batch,
                most,
            ),
            "outbox": await self._batches(
                lambda conn: retention.remove_events(conn, cutoff=cutoff, limit=batch), batch, most
            ),
            # After the events: a ledger row stays while its outbox event does (a reservation
            # event's body is rendered from it), so the events that went free theirs now.
            "stock_ledger": await self._ledger(cutoff, batch, most),
            "queue_tickets": await self._batches(
                lambda conn: retention.remove_tickets(conn, cutoff=cutoff, limit=batch),
                batch,
                most,
            ),
        }
        for table, count in removed.items():
            if count:
                RETENTION_REMOVED.labels(table).inc(count)
        if any(removed.values()):
            logger.info("retention removed %s", removed)
        # Then the tickets that ended minutes ago are filed (moved to the index of filed
        # tickets by shopper: `retention.file_tickets`), off the next sale's joins' path.
        now = now_ms()
        filing = min(batch, FILE_BATCH)
        filed = await self._batches(
            lambda conn: retention.file_tickets(
                conn, before=now - retention.FILE_AFTER_MS, now=now, limit=filing
            ),
            filing,
            most,
        )
        if filed:
            logger.info("retention filed %d waiting-room tickets", filed)
        return {**removed, "queue_tickets_filed": filed}

    async def _batches(
        self, work: Callable[[Executor], Awaitable[int]], batch: int, most: int
    ) -> int:
        total = 0
        for _ in range(most):
            done = await self.store.write(work)
            total += done
            if done < batch:
                break
        return total

    async def _ledger(self, cutoff: int, batch: int, most: int) -> int:
        """The ledger, `PRODUCTS_PER_RUN` products a run (the walk goes on from there next
        run, and starts over after the last product), at most `most` batches in all."""
        async with self.store.reader() as conn:
            products, last = await retention.ledgers_to_trim(
                conn, self._next_product, cutoff=cutoff, limit=PRODUCTS_PER_RUN
            )
        self._next_product = last or 0
        total = 0
        budget = most
        for product_id in products:
            while budget > 0:
                budget -= 1
                async with self.store.reader() as conn:
                    versions = await retention.ledger_rows_to_remove(
                        conn, product_id, cutoff=cutoff, limit=batch
                    )
                if versions is None:
                    break
                trim = functools.partial(
                    retention.remove_ledger_rows,
                    product_id=product_id,
                    versions=versions,
                    cutoff=cutoff,
                )
                done = await self.store.write(trim)
                total += done
                if done < batch:
                    break
            if budget <= 0:
                self._next_product = product_id - 1
                break
        return total
