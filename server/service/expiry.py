"""Expiry, the service's side: the web process schedules jobs (`ExpiryScheduler`), the worker
expires what is due (`Expirer`).

Where the rest of expiry is kept: a hold past its `expiresAt` *reads* EXPIRED at once
(`server.domain.model.Reservation.effective_status`); the transitions that expire it and
restore its units, each gated on `status = 'ACTIVE'` so that it happens once
(`server.domain.inventory.expire`, `expire_overdue`, and `complete`/`cancel` refusing an
overdue hold); the jobs and the sweeper that call `Expirer` (`jobs/worker.py`).

Scheduling the deferred jobs that expire holds on time.

One arq job per hold is the slow way through a wave (docs/design.md §9.4: 10,000 holds due in one
second finished ~50 s late at arq's defaults). Instead, time is cut into buckets of
`EXPIRY_BUCKET_MS`; each bucket gets one job, deferred to the bucket's end, that expires
*every* hold due by then. Its job id names the bucket, so every process and every hold of
that bucket enqueues the same job and arq keeps one; each process also remembers which
buckets it has enqueued, so a wave costs one Redis round trip per bucket, not per hold.

A lost or failed enqueue loses nothing: the holds stay in the database, the worker's sweeper
(a timer of its own, which needs no Redis) expires them within `SWEEP_SECONDS`, and a
reservation that needs their units expires them first (`inventory.reserve`, lazy expiry).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.model import Reservation
from server.infra.background import Drainer
from server.infra.keys import EXPIRE_DUE_JOB, QUEUE_NAME, expire_due_job_id
from server.infra.metrics import ENQUEUE_FAILURES
from server.service.transactions import EventSink, Transactions
from server.storage.database import Store

logger = logging.getLogger(__name__)

# Buckets this far in the past are forgotten: their jobs have run.
_REMEMBER_MS = 10 * 60 * 1000


def due_time(expires_at: int, bucket_ms: int) -> int:
    """The end of the bucket holding `expires_at`: every hold of the bucket is due by then."""
    return -(-expires_at // bucket_ms) * bucket_ms


class ExpiryScheduler(Drainer):
    name = "expiry-scheduler"

    def __init__(self, arq: ArqRedis, *, bucket_ms: int) -> None:
        super().__init__()
        self._arq = arq
        self._bucket_ms = bucket_ms
        self._pending: set[int] = set()
        self._sent: set[int] = set()
        self.enqueued = 0
        self.failures = 0

    def schedule(self, expires_at: Iterable[int]) -> None:
        dues = {due_time(t, self._bucket_ms) for t in expires_at} - self._sent
        if dues:
            self._pending |= dues
            self.wake()

    def has_work(self) -> bool:
        return bool(self._pending)

    async def drain(self) -> float | None:
        pending, self._pending = sorted(self._pending), set()
        # Taken now, not after the round trip, so that batches committed meanwhile don't
        # enqueue the same bucket again.
        self._sent.update(pending)
        for due in pending:
            try:
                await self._arq.enqueue_job(
                    EXPIRE_DUE_JOB,
                    due,
                    _job_id=expire_due_job_id(due),
                    _defer_until=datetime.fromtimestamp(due / 1000, UTC),
                    _queue_name=QUEUE_NAME,
                )
            except (RedisError, OSError) as exc:
                # The sweeper will expire these holds; retrying would only pile up work
                # while Redis is away.
                self.failures += 1
                ENQUEUE_FAILURES.inc()
                self._sent.discard(due)
                logger.warning("could not enqueue the expiry job due at %d: %s", due, exc)
                continue
            self.enqueued += 1
        horizon = now_ms() - _REMEMBER_MS
        self._sent = {due for due in self._sent if due > horizon}
        return None


@dataclass(frozen=True)
class Expired:
    """A pass of the expirer: the holds it expired, and when it started (ms)."""

    reservations: list[Reservation]
    at: int


class Expirer:
    """The worker's side of expiry: expire every hold due by now, and restore its units.

    Each batch of `batch` holds is its own transaction (`inventory.expire_overdue`), gated
    on `status = 'ACTIVE'`, so a job that runs twice, a job and the sweeper at once, or two
    workers restore each hold's units exactly once. The events go to `publish` after each
    commit. Raises `Busy`/`Unavailable` when the database is (the job retries).
    """

    def __init__(self, store: Store, *, publish: EventSink) -> None:
        self._transactions = Transactions(store, publish)

    async def expire_overdue(self, *, batch: int = inventory.SWEEP_BATCH) -> Expired:
        """Expire every hold due by now, `batch` holds per transaction."""
        expired: list[Reservation] = []
        started = now_ms()
        while True:
            outcome = await self._transactions.run(
                lambda conn, now: inventory.expire_overdue(conn, now=now, limit=batch)
            )
            done = outcome.result()
            expired.extend(done)
            if len(done) < batch:
                return Expired(expired, started)
