"""The arq worker: expires holds on time, and sweeps up any that a lost job missed.

Life cycle, top to bottom (`run`): open what the jobs use (the database, a publisher, the
expirer) and start the worker's own timers (the books, then the sweeper) for the life of the
process; run arq until asked to stop, and start it again if it dies: arq's poll loop does not
survive Redis going away, and a worker that quietly stopped would leak every hold until
someone noticed. On SIGTERM it takes no new job, lets the ones in hand finish, and closes in
reverse order.

The expiry jobs come through arq, so they need Redis; the sweeper does not. It runs on a
timer of the worker's own (`jobs.books.Every`, every SWEEP_SECONDS), not as an arq cron job,
and needs only the database: with Redis down, at the worker's start or at any time after,
overdue holds are still expired within SWEEP_SECONDS (issue 15). Their live-update frames
wait in the publisher until Redis is back (server/live/publisher.py).

Both jobs expire *every* overdue hold, in bounded batches, each in its own transaction gated
on `status = 'ACTIVE'`: a job that runs twice, a job and the sweeper at once, or two workers
restore each hold's units exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq import Retry, func
from arq.worker import Worker
from prometheus_client import Counter
from redis.exceptions import RedisError

from jobs import books
from server.infra.keys import EXPIRE_DUE_JOB, HEALTH_CHECK_KEY, QUEUE_NAME
from server.infra.metrics import EXPIRY_LATENESS, HOLDS_EXPIRED
from server.infra.redis_client import READ_TIMEOUT_S, redis_client_for
from server.infra.settings import Settings
from server.live.publisher import Publisher
from server.service.delivery import Deliverer
from server.service.expiry import Expired, Expirer
from server.service.idempotency import Idempotency
from server.service.ledger import Ledger
from server.service.retention import Retention
from server.service.transactions import Transactions
from server.service.waitingroom import Admitter
from server.storage import migrate
from server.storage.database import Store
from server.storage.errors import Busy, Unavailable

logger = logging.getLogger(__name__)

Ctx = dict[str, Any]

BY_JOB = HOLDS_EXPIRED.labels("job")
BY_SWEEPER = HOLDS_EXPIRED.labels("sweeper")
JOB_GRACE_SECONDS = 10.0  # on SIGTERM, how long the jobs in hand may take to finish
MAX_RESTART_DELAY = 10.0


# -- the jobs ------------------------------------------------------------------------------


async def expire_due(ctx: Ctx, due_ms: int) -> int:
    """The job of the bucket ending at `due_ms`: restore each of its holds as it falls due,
    and by `due_ms` every hold due by then (`Expirer.expire_window`; the web process defers
    the job to a little before the bucket starts, `server.service.expiry`)."""
    settings: Settings = ctx["settings"]
    expirer: Expirer = ctx["expirer"]
    try:
        expired = await expirer.expire_window(due_ms, window_ms=settings.expiry_bucket_ms)
    except (Busy, Unavailable) as exc:
        logger.warning("expiry postponed: %s", exc)
        raise Retry(defer=1) from exc
    _count(expired, BY_JOB)
    if expired.reservations:
        late = max((r.ended_at or 0) - r.expires_at for r in expired.reservations)
        logger.debug(
            "expired %d holds due by %d, at most %d ms late",
            len(expired.reservations),
            due_ms,
            late,
        )
    return len(expired.reservations)


async def sweep(ctx: Ctx) -> int:
    """The safety net: expire whatever is overdue, whether or not its job ran, and free
    the Idempotency-Keys older than a day. Runs on the worker's own timer (`resources`),
    with no Redis involved. Raises `Busy`/`Unavailable` (the timer tries again next
    round)."""
    expirer: Expirer = ctx["expirer"]
    expired = await expirer.expire_overdue()
    _count(expired, BY_SWEEPER)
    if expired.reservations:
        logger.info(
            "sweeper expired %d overdue holds that no job had expired", len(expired.reservations)
        )
    idempotency: Idempotency = ctx["idempotency"]
    await idempotency.forget_expired()
    return len(expired.reservations)


def _count(expired: Expired, counter: Counter) -> None:
    counter.inc(len(expired.reservations))
    for reservation in expired.reservations:
        assert reservation.ended_at is not None
        EXPIRY_LATENESS.observe((reservation.ended_at - reservation.expires_at) / 1000)


# -- running them --------------------------------------------------------------------------


@asynccontextmanager
async def resources(settings: Settings) -> AsyncIterator[Ctx]:
    """What the jobs use, for the life of the process: the `ctx` arq passes them."""
    store = Store(settings.database_url, busy_timeout_ms=settings.db_busy_timeout_ms)
    await store.connect()
    try:
        if await migrate.pending(store):
            raise RuntimeError("the database needs migrations: run `python -m server migrate`")
        redis = redis_client_for(settings)
        publisher = Publisher(redis)
        publisher.start()
        try:
            ledger = Ledger(store)
            timers = [
                books.Every(
                    "reconcile", settings.reconcile_seconds, lambda: books.reconcile(ledger)
                ),
                books.Every(
                    "retention",
                    settings.retention_seconds,
                    Retention(store, days=settings.retention_days).run,
                    first=settings.retention_seconds,
                ),
            ]
            for timer in timers:
                timer.start()
            deliverer = Deliverer(
                store,
                timeout_s=settings.webhook_timeout_seconds,
                backoff_s=settings.webhook_backoff_seconds,
                retry_hours=settings.webhook_retry_hours,
                concurrency=settings.webhook_concurrency,
                poll_ms=settings.webhook_poll_ms,
                allow_local_network=settings.webhook_allow_local_network,
            )
            deliverer.start()
            # The waiting room's admitter (issue 17): it admits whenever it holds the lease,
            # as any web process's may; on its own timer, so a Redis outage stops it not.
            admitter = Admitter(
                store,
                transactions=Transactions(store, publisher.publish),
                publish=publisher.publish,
                pass_ms=round(settings.pass_seconds * 1000),
                tick_ms=settings.queue_tick_ms,
                lease_ms=settings.queue_lease_ms,
            )
            admitter.start()
            ctx: Ctx = {
                "settings": settings,
                "store": store,
                "publisher": publisher,
                "expirer": Expirer(store, publish=publisher.publish),
                "idempotency": Idempotency(store),
                "ledger": ledger,
                "deliverer": deliverer,
                "admitter": admitter,
            }
            try:
                yield ctx
            finally:
                await admitter.stop()
                await deliverer.stop()
                for timer in reversed(timers):
                    await timer.stop()
        finally:
            await publisher.stop()
            await redis.aclose()
    finally:
        await store.close()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `arq.worker.Worker`, with a new Redis client for it to own.

    arq is handed our client (`redis_pool`) rather than building its own from
    `redis_settings`: arq's pool, with or without Sentinel, sets no read timeout, so on a
    network partition its poll loop would wait on a dead connection for as long as TCP
    does (many minutes) instead of failing and being started again by `run`; nor can it
    give Sentinels a password of their own."""
    if not settings.has_redis:
        raise RuntimeError("REDIS_URL is not set; `bin/serve` starts a Redis for you")
    return {
        "functions": [func(expire_due, name=EXPIRE_DUE_JOB, keep_result=60, max_tries=10)],
        "redis_pool": redis_client_for(settings),
        "queue_name": QUEUE_NAME,
        # A deferred job starts within one poll of its time; an expiry job is deferred to
        # more than a poll before its bucket starts (server/service/expiry.py).
        "poll_delay": 0.05,
        # A bucket's job waits through its bucket (server/service/expiry.py): with 100 ms
        # buckets two or three are in hand at once during a wave, mostly asleep.
        "max_jobs": 8,
        "job_timeout": 120,
        "health_check_interval": 30,
        "health_check_key": HEALTH_CHECK_KEY,
        "handle_signals": False,  # `run` handles them
    }


async def run(settings: Settings, stopping: asyncio.Event) -> None:
    """Run the worker until `stopping` is set: the sweeper on its own timer, which needs
    no Redis, for the whole time, and arq beside it, started again whenever it dies."""
    async with resources(settings) as ctx:
        sweeper = books.Every("sweeper", settings.sweep_seconds, lambda: sweep(ctx))
        sweeper.start()
        try:
            await _run_arq(settings, ctx, stopping)
        finally:
            await sweeper.stop()


async def _run_arq(settings: Settings, ctx: Ctx, stopping: asyncio.Event) -> None:
    delay = 0.5
    while not stopping.is_set():
        started = time.monotonic()
        crash = await _run_once(settings, ctx, stopping)
        if crash is None:
            return
        if time.monotonic() - started > 60:
            delay = 0.5
        logger.warning("worker stopped (%r); starting it again in %.1f s", crash, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
        delay = min(delay * 2, MAX_RESTART_DELAY)


async def _run_once(settings: Settings, ctx: Ctx, stopping: asyncio.Event) -> BaseException | None:
    """One arq worker, until it dies (returns why) or `stopping` is set (returns None)."""
    worker = Worker(**worker_settings(settings), ctx=dict(ctx))
    main = asyncio.create_task(worker.main(), name="arq-worker")
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        worker.allow_pick_jobs = False
        in_hand = [task for task in worker.tasks.values() if not task.done()]
        if in_hand:
            logger.info("stopping: finishing %d job(s) in hand, taking no new ones", len(in_hand))
            _, unfinished = await asyncio.wait(in_hand, timeout=JOB_GRACE_SECONDS)
            if unfinished:
                logger.warning(
                    "%d job(s) still running after %.0f s; cancelling them (their holds are "
                    "expired by the next worker)",
                    len(unfinished),
                    JOB_GRACE_SECONDS,
                )
                for task in unfinished:
                    task.cancel()
        crash = None
        if main.done() and not main.cancelled():
            crash = main.exception()
        await _stop(worker, main)
        await _close(worker)
    if crash is None and not stopping.is_set():
        crash = RuntimeError("arq's worker returned")
    return crash


async def _stop(worker: Worker, main: asyncio.Task[None]) -> None:
    """End arq's loop: between two polls if it can, else by cancelling it.

    In burst mode with no job left to start, arq's loop returns by itself at its next poll,
    without a cancellation landing in the middle of a Redis call: redis-py can swallow one
    that lands while a read waits inside its socket timeout (redis/redis-py#2551), and the
    worker's client has one (server/infra/redis_client.py); a single cancel then sometimes
    left the loop polling and the worker never stopped. A loop stuck in a call to a Redis
    that is gone is cancelled, again until it ends."""
    worker.burst = True
    worker.max_burst_jobs = 0
    await asyncio.wait({main}, timeout=READ_TIMEOUT_S + 1)
    while not main.done():
        main.cancel()
        await asyncio.wait({main}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        main.result()


async def _close(worker: Worker) -> None:
    # arq's close() cancels what is left, deletes its health key and closes its pool; with
    # Redis gone the delete raises, so close the pool ourselves then.
    try:
        await worker.close()
    except (RedisError, OSError, asyncio.CancelledError) as exc:
        logger.debug("arq's close failed: %r", exc)
        with contextlib.suppress(RedisError, OSError, RuntimeError):
            await worker.pool.aclose()
