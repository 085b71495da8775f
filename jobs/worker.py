"""The arq worker: expires holds on time, and sweeps up any that a lost job missed.

Life cycle, top to bottom: `startup` connects the database and the publisher and builds the
shop; arq then runs `expire_due` jobs (one per due time bucket, see server/expiry.py) and the
`sweep` cron every SWEEP_SECONDS; `shutdown` closes in reverse order.

Both jobs expire *every* overdue hold, in bounded batches, each in its own transaction gated
on `status = 'ACTIVE'`: a job that runs twice, a job and the sweeper at once, or two workers
restore each hold's units exactly once.
"""

from __future__ import annotations

import logging
from typing import Any

from arq import Retry, cron, func
from arq.connections import RedisSettings

from server import migrate
from server.clock import now_ms
from server.constants import EXPIRE_DUE_JOB, HEALTH_CHECK_KEY, QUEUE_NAME, SWEEP_JOB
from server.database import Store
from server.errors import DatabaseBusy, DatabaseUnavailable
from server.events import Publisher
from server.settings import Settings
from server.shop import Expired, Shop

logger = logging.getLogger(__name__)

Ctx = dict[str, Any]


async def startup(ctx: Ctx) -> None:
    settings: Settings = ctx["settings"]
    store = Store(settings.database_url, busy_timeout_ms=settings.db_busy_timeout_ms)
    await store.connect()
    if await migrate.pending(store):
        await store.close()
        raise RuntimeError("the database needs migrations: run `python -m server migrate`")
    publisher = Publisher(ctx["redis"])
    publisher.start()
    ctx["store"] = store
    ctx["publisher"] = publisher
    ctx["shop"] = Shop(
        store, hold_ms=round(settings.hold_seconds * 1000), publish=publisher.publish
    )
    logger.info("worker ready: sweeping every %ds", settings.sweep_seconds)


async def shutdown(ctx: Ctx) -> None:
    if "publisher" in ctx:
        await ctx["publisher"].stop()
    if "store" in ctx:
        await ctx["store"].close()


async def expire_due(ctx: Ctx, due_ms: int) -> int:
    """Expire every hold due by now (the job was deferred to `due_ms`)."""
    expired = await _expire(ctx)
    if expired.reservations:
        late = max(expired.at - r.expires_at for r in expired.reservations)
        logger.debug(
            "expired %d holds due by %d, at most %d ms late",
            len(expired.reservations),
            due_ms,
            late,
        )
    return len(expired.reservations)


async def sweep(ctx: Ctx) -> int:
    """The safety net: expire whatever is overdue, whether or not its job ran."""
    expired = await _expire(ctx)
    if expired.reservations:
        logger.info(
            "sweeper expired %d overdue holds that no job had expired", len(expired.reservations)
        )
    shop: Shop = ctx["shop"]
    await shop.forget_old_idempotency_keys()
    return len(expired.reservations)


async def _expire(ctx: Ctx) -> Expired:
    shop: Shop = ctx["shop"]
    try:
        return await shop.expire_overdue()
    except (DatabaseBusy, DatabaseUnavailable) as exc:
        logger.warning("expiry postponed: %s", exc)
        raise Retry(defer=1) from exc


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `arq.worker.Worker`."""
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set; `bin/serve` starts a Redis for you")
    return {
        "functions": [func(expire_due, name=EXPIRE_DUE_JOB, keep_result=60, max_tries=10)],
        "cron_jobs": [
            cron(
                sweep,
                name=SWEEP_JOB,
                second=set(range(0, 60, settings.sweep_seconds)),
                microsecond=0,
                run_at_startup=True,
                timeout=60,
                max_tries=1,
            )
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": QUEUE_NAME,
        # A deferred job starts within one poll of its time; the expiry jobs' lateness
        # budget is a bucket plus a poll.
        "poll_delay": 0.05,
        "max_jobs": 4,
        "job_timeout": 120,
        "health_check_interval": 30,
        "health_check_key": HEALTH_CHECK_KEY,
        "ctx": {"settings": settings, "started_ms": now_ms()},
    }
