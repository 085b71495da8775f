"""The worker's care of the shop's books, on timers of its own: reconciling the ledger,
delivering the outbox as webhooks, and removing what is older than RETENTION_DAYS.

None of it goes through Redis or arq: these need only the database, so they carry on while
Redis is away, and none of them takes one of arq's job slots from the expiry jobs. Each is
its own task on the worker's event loop; database work is in short transactions (on SQLite
the one writer thread serves them between the expiry transactions, never inside one), and
the network calls of the deliveries are made outside any transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from server.infra.metrics import LEDGER_RECONCILIATIONS, LEDGER_UNRECONCILED
from server.service.ledger import Ledger
from server.storage.errors import Busy, Unavailable

logger = logging.getLogger(__name__)


class Every:
    """Runs `work` every `seconds` (with ±10% jitter, so that several workers spread out),
    the first time after `first` seconds, until stopped. A failure is logged and the next
    round comes as usual."""

    def __init__(
        self, name: str, seconds: float, work: Callable[[], Awaitable[object]], *, first: float = 0
    ) -> None:
        self.name = name
        self.seconds = seconds
        self._work = work
        self._first = first
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        await asyncio.sleep(self._first)
        while True:
            try:
                await self._work()
            except (Busy, Unavailable) as exc:
                logger.warning("%s postponed: %s", self.name, exc)
            except Exception:
                logger.exception("%s failed", self.name)
            self.rounds += 1
            await asyncio.sleep(self.seconds * random.uniform(0.9, 1.1))


async def reconcile(ledger: Ledger) -> None:
    """One reconciliation of every product, counted, the unreconciled ones in a gauge."""
    try:
        result = await ledger.check()
    except Exception:
        LEDGER_RECONCILIATIONS.labels("failed").inc()
        raise
    LEDGER_UNRECONCILED.set(len(result.unreconciled))
    LEDGER_RECONCILIATIONS.labels("ok" if result.ok else "unreconciled").inc()
