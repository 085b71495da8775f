"""Expiry, the service's side: the web process schedules jobs (`ExpiryScheduler`), the worker
expires what is due (`Expirer`).

Where the rest of expiry is kept: a hold past its `expiresAt` *reads* EXPIRED at once
(`server.domain.model.Reservation.effective_status`); the transitions that expire it and
restore its units, each gated on `status = 'ACTIVE'` so that it happens once
(`server.domain.inventory.expire`, `expire_overdue`, and `complete_many`/`cancel_many` refusing an
overdue hold); the jobs and the sweeper that call `Expirer` (`jobs/worker.py`).

Scheduling the deferred jobs that expire holds on time.

One arq job per hold is the slow way through a wave (docs/design.md §9.4: 10,000 holds due in one
second finished ~50 s late at arq's defaults). Instead, time is cut into buckets of
`EXPIRY_BUCKET_MS`; each bucket gets one job, and by the bucket's end that job has expired
*every* hold due by then. Its job id names the bucket, so every process and every hold of
that bucket enqueues the same job and arq keeps one; each process also remembers which
buckets it has enqueued, so a wave costs one Redis round trip per bucket, not per hold.

The job is deferred to `HEAD_START_MS` before the bucket *starts*, not to its end: started
at the end, a hold due at a bucket's start waited the whole bucket and arq's poll (up to
100 + 50 ms) before its transaction even began, and the bucket's holds then went in one
burst. Started early, the job waits for each of its bucket's holds to fall due and restores
it then (`Expirer.expire_window`; never before: every pass still says `expires_at <= now`,
with now read inside its transaction), and makes the same last pass at the bucket's end
that the job always made.

A lost or failed enqueue loses nothing: the holds stay in the database, the worker's sweeper
(a timer of its own, which needs no Redis) expires them within `SWEEP_SECONDS`, and a
reservation that needs their units expires them first (`inventory.reserve`, lazy expiry).
"""

from __future__ import annotations

import asyncio
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

# How long before its bucket starts a bucket's job is deferred to: more than arq's poll
# (`poll_delay`, 50 ms, jobs/worker.py), within which a worker starts a job once its time
# has come, so that the job is waiting when the bucket's first hold falls due.
HEAD_START_MS = 100

# The least time (ms) between two passes of one job: the holds that fall due within it are
# restored together, in one transaction, rather than one transaction (and the write lock)
# for every distinct millisecond a storm's holds expire at. A hold is restored at most
# about this long after it is due, besides the pass itself.
TICK_MS = 20


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
                    _defer_until=datetime.fromtimestamp(
                        (due - self._bucket_ms - HEAD_START_MS) / 1000, UTC
                    ),
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
        self._store = store
        self._transactions = Transactions(store, publish)

    async def expire_window(self, due: int, *, window_ms: int, tick_ms: int = TICK_MS) -> Expired:
        """A bucket's job: restore each hold due in the window (`due` - `window_ms`, `due`]
        (ms) as it falls due, then, at or after `due`, every hold due by then.

        Until `due`: read (on a reader, outside any transaction: no write lock is taken
        while nothing is due) the earliest open hold of the window, wait until it is due
        and at least `tick_ms` after the previous pass, and run a pass (`expire_overdue`),
        which expires every hold due by its transaction's now: never one early, however
        early the job was started. Last, once the clock has reached `due`, the pass the job
        always made: whatever is due by then, the window's and any earlier hold. Holds made
        while it waits are read at its next wake. Raises `Busy`/`Unavailable` as
        `expire_overdue` does (the job retries; what it expired stays expired)."""
        expired: list[Reservation] = []
        started = now_ms()
        last_pass: int | None = None
        while now_ms() < due:
            async with self._store.reader() as conn:
                earliest = await inventory.next_open_expiry(conn, after=due - window_ms, until=due)
            wake = due if earliest is None else earliest
            if last_pass is not None:
                wake = max(wake, last_pass + tick_ms)
            if wake >= due:
                break
            await _sleep_until(wake)
            last_pass = now_ms()
            expired.extend((await self.expire_overdue()).reservations)
        await _sleep_until(due)
        expired.extend((await self.expire_overdue()).reservations)
        return Expired(expired, started)

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


async def _sleep_until(moment: int) -> None:
    """Return once the wall clock (`now_ms`) has reached `moment` (ms). asyncio's timers run
    on the monotonic clock and may fire a little early by the wall clock's reckoning, which
    is the one a hold's `expiresAt` and a pass's now are read on: so, again until it has."""
    while True:
        left = moment - now_ms()
        if left <= 0:
            return
        await asyncio.sleep(left / 1000)
