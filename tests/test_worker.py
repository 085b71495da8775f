"""Expiry with a real arq worker and a real Redis: on time, exactly once, whatever fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from jobs import worker as jobs
from server.devtools.embedded_redis import EmbeddedRedis, free_port
from server.domain import inventory
from server.domain.clock import now_ms
from server.domain.model import HoldRequest, Reservation, Status
from server.infra.keys import QUEUE_NAME, expire_due_job_id
from server.infra.redis_client import redis_client
from server.infra.settings import Settings
from server.live.publisher import Publisher
from server.service.expiry import ExpiryScheduler, due_time
from server.service.shop import Shop
from server.storage.database import Store
from tests.events import listening, reservation_status
from tests.support import assert_invariant, eventually, hold, make_product, reservation, stats

HOLD_MS = 300
BUCKET_MS = 100


def settings_for(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        hold_seconds=HOLD_MS / 1000,
        sweep_seconds=1,
        expiry_bucket_ms=BUCKET_MS,
    )


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[None]:
    """The real worker (`jobs.worker.run`, as `python -m jobs` runs it), until the block ends."""
    stopping = asyncio.Event()
    task = asyncio.create_task(jobs.run(settings, stopping))
    try:
        yield
    finally:
        stopping.set()
        await asyncio.wait_for(task, 30)


@asynccontextmanager
async def web_shop(settings: Settings) -> AsyncIterator[tuple[Shop, ExpiryScheduler, ArqRedis]]:
    """What a web process has: a shop that schedules expiry jobs and publishes events."""
    redis = redis_client(settings.redis_url)
    store = Store(settings.database_url)
    await store.connect()
    publisher = Publisher(redis)
    scheduler = ExpiryScheduler(redis, bucket_ms=settings.expiry_bucket_ms)
    publisher.start()
    scheduler.start()
    shop = Shop(store, hold_ms=HOLD_MS, publish=publisher.publish, scheduler=scheduler)
    await shop.start()
    try:
        yield shop, scheduler, redis
    finally:
        await shop.stop()
        await scheduler.stop()
        await publisher.stop()
        await store.close()
        await redis.aclose()


def job_context(settings: Settings) -> AbstractAsyncContextManager[dict[str, Any]]:
    """The `ctx` a worker gives its jobs, to call a job function directly."""
    return jobs.resources(settings)


async def test_a_hold_expires_on_time_and_its_units_come_back_once(
    database_url: str, redis_url: str
) -> None:
    settings = settings_for(database_url, redis_url)
    async with (
        web_shop(settings) as (shop, scheduler, _),
        running_worker(settings),
        listening(redis_url) as frames,
    ):
        product = await make_product(shop.store, 5)
        held = (await shop.reserve(HoldRequest(product.id, 2))).reservation
        await scheduler.wait_idle()
        assert scheduler.enqueued == 1
        (frame,) = await frames.wait_for(reservation_status(held.id, "EXPIRED"))
        assert frame["reservation"]["product"]["availableStock"] == 5
        assert (await reservation(shop.store, held.id)).status is Status.EXPIRED
        s = await assert_invariant(shop.store, product.id)
        assert (s.available, s.held, s.expired) == (5, 0, 2)


async def test_holds_due_in_one_bucket_share_one_job(database_url: str, redis_url: str) -> None:
    settings = settings_for(database_url, redis_url)
    async with web_shop(settings) as (shop, scheduler, redis):
        product = await make_product(shop.store, 50)
        holds = await asyncio.gather(*(shop.reserve(HoldRequest(product.id, 1)) for _ in range(40)))
        await scheduler.wait_idle()
        dues = {due_time(h.reservation.expires_at, BUCKET_MS) for h in holds}
        # One job per bucket the holds fell in, fewer than the holds. How many buckets 40
        # reservations span is the machine's speed (3 at load average 17, attack8), not ours.
        assert scheduler.enqueued == len(dues) < len(holds)
        queued = await redis.zrange(QUEUE_NAME, 0, -1)
        assert {q.decode() for q in queued} == {expire_due_job_id(d) for d in dues}


async def test_the_job_run_twice_and_the_sweeper_at_once_restore_once(
    database_url: str, redis_url: str
) -> None:
    settings = settings_for(database_url, redis_url)
    async with job_context(settings) as ctx, job_context(settings) as other_worker:
        store: Store = ctx["store"]
        product = await make_product(store, 100)
        past = now_ms() - 10_000
        held = [await hold(store, product.id, 2, now=past, hold_ms=1_000) for _ in range(30)]
        expired = await asyncio.gather(
            jobs.expire_due(ctx, past),
            jobs.expire_due(ctx, past),
            jobs.sweep(ctx),
            jobs.expire_due(other_worker, past),
            jobs.sweep(other_worker),
        )
        assert sum(expired) == 30  # the sweeper's timer is run()'s, not in these contexts
        s = await assert_invariant(store, product.id)
        assert (s.available, s.held, s.expired) == (100, 0, 60)
        assert {(await reservation(store, h.id)).status for h in held} == {Status.EXPIRED}


async def test_a_job_started_before_its_bucket_restores_each_hold_when_due_never_before(
    database_url: str, redis_url: str
) -> None:
    """The bucket's job is started before the bucket (as the web process defers it): it
    restores each hold of its window when the hold falls due, not at the window's end and
    never before its expiresAt, a hold made while it waits included; and, last, whatever
    else is due by the window's end (an older overdue hold)."""
    settings = settings_for(database_url, redis_url)
    window_ms = 3_000
    async with job_context(settings) as ctx:
        store: Store = ctx["store"]
        product = await make_product(store, 10)
        start = now_ms() + 1_000  # time to write the holds on a busy machine
        due = start + window_ms
        overdue = await hold(store, product.id, 1, now=start - 10_000, hold_ms=1_000)
        early = await hold(store, product.id, 2, now=start - 100_000, hold_ms=100_200)
        late = await hold(store, product.id, 3, now=due - 100_000, hold_ms=100_000)
        job = asyncio.create_task(_expire_window(ctx, due, window_ms))
        made_while_waiting = await hold(store, product.id, 1, now=start - 100_000, hold_ms=101_000)
        assert await job == 4
        ended: dict[str, int] = {}
        for h in (early, made_while_waiting, late):
            r = await reservation(store, h.id)
            assert r.status is Status.EXPIRED
            assert r.ended_at is not None
            assert r.ended_at >= r.expires_at  # never early
            ended[h.id] = r.ended_at
        # Restored when due, not when the window ended (a deadline of seconds, not a goal).
        assert ended[early.id] < due - 1_000
        assert ended[made_while_waiting.id] < due - 1_000
        assert (await reservation(store, overdue.id)).status is Status.EXPIRED
        s = await assert_invariant(store, product.id)
        assert (s.available, s.held, s.expired) == (10, 0, 7)


async def _expire_window(ctx: dict[str, Any], due: int, window_ms: int) -> int:
    expired = await ctx["expirer"].expire_window(due, window_ms=window_ms)
    return len(expired.reservations)


async def test_a_worker_that_was_down_expires_the_holds_when_it_starts(
    database_url: str, redis_url: str
) -> None:
    settings = settings_for(database_url, redis_url)
    async with web_shop(settings) as (shop, scheduler, redis), listening(redis_url) as frames:
        product = await make_product(shop.store, 10)
        held = (await shop.reserve(HoldRequest(product.id, 3))).reservation
        await scheduler.wait_idle()
        # No worker is running: the hold's time passes and nothing happens...
        await eventually(lambda: _past(held.expires_at + 200), what="the hold to be well overdue")
        assert (await reservation(shop.store, held.id)).status is Status.ACTIVE
        job = Job(expire_due_job_id(due_time(held.expires_at, BUCKET_MS)), redis, QUEUE_NAME)
        assert await job.status() is JobStatus.queued
        # ...until a worker starts.
        async with running_worker(settings):
            await frames.wait_for(reservation_status(held.id, "EXPIRED"))
        s = await assert_invariant(shop.store, product.id)
        assert (s.available, s.expired) == (10, 3)


async def test_when_redis_loses_the_jobs_the_sweeper_restores_the_units(
    database_url: str, redis_url: str
) -> None:
    settings = settings_for(database_url, redis_url)
    async with web_shop(settings) as (shop, scheduler, redis), listening(redis_url) as frames:
        product = await make_product(shop.store, 10)
        held = (await shop.reserve(HoldRequest(product.id, 4))).reservation
        await scheduler.wait_idle()
        await redis.flushall()  # every job gone
        assert await redis.zcard(QUEUE_NAME) == 0
        async with running_worker(settings):
            await frames.wait_for(reservation_status(held.id, "EXPIRED"))
        s = await assert_invariant(shop.store, product.id)
        assert (s.available, s.expired) == (10, 4)


async def test_a_hold_made_while_redis_is_down_stands_and_expires_once_it_is_back(
    database_url: str, own_redis: EmbeddedRedis
) -> None:
    settings = settings_for(database_url, own_redis.url)
    async with web_shop(settings) as (shop, scheduler, _):
        product = await make_product(shop.store, 10)
        own_redis.stop()
        held = (await shop.reserve(HoldRequest(product.id, 2))).reservation
        await scheduler.wait_idle()
        assert scheduler.failures >= 1
        assert (await reservation(shop.store, held.id)).status is Status.ACTIVE
        assert (await stats(shop.store, product.id)).held == 2

        own_redis.start()
        async with running_worker(settings), listening(own_redis.url) as frames:
            await frames.wait_for(reservation_status(held.id, "EXPIRED"))
            s = await assert_invariant(shop.store, product.id)
            assert (s.available, s.expired) == (10, 2)


async def test_the_sweeper_frees_idempotency_keys_older_than_a_day(
    database_url: str, redis_url: str
) -> None:
    settings = settings_for(database_url, redis_url)
    async with job_context(settings) as ctx:
        store: Store = ctx["store"]
        product = await make_product(store, 5)
        day_ago = now_ms() - inventory.IDEMPOTENCY_WINDOW_MS - 1
        await hold(store, product.id, 1, now=day_ago, key="yesterday")
        await jobs.sweep(ctx)
        async with store.reader() as conn:
            assert await inventory.get_reservation_by_key(conn, "yesterday") is None


async def _past(ms: int) -> bool:
    return now_ms() > ms


async def test_the_worker_outlives_a_redis_outage(
    database_url: str, own_redis: EmbeddedRedis
) -> None:
    """arq's own loop dies when Redis goes away; the worker starts it again and goes on
    expiring holds, including one made and due while Redis was down."""
    settings = settings_for(database_url, own_redis.url)
    async with web_shop(settings) as (shop, _, _), running_worker(settings):
        product = await make_product(shop.store, 10)
        async with listening(own_redis.url) as frames:  # the worker is up and expiring
            first = (await shop.reserve(HoldRequest(product.id, 1))).reservation
            await frames.wait_for(reservation_status(first.id, "EXPIRED"))
        own_redis.stop()
        held = (await shop.reserve(HoldRequest(product.id, 2))).reservation
        # Down for longer than the hold: the worker (polling every 50 ms) notices meanwhile.
        await eventually(lambda: _past(held.expires_at + 300), what="the hold to be overdue")
        own_redis.start()
        async with listening(own_redis.url) as frames:
            await frames.wait_for(reservation_status(held.id, "EXPIRED"), within=30)
        s = await assert_invariant(shop.store, product.id)
        assert (s.available, s.expired) == (10, 3)


async def _expired(store: Store, reservation_id: str) -> bool:
    return (await reservation(store, reservation_id)).status is Status.EXPIRED


async def test_the_sweeper_expires_holds_while_redis_is_down(
    database_url: str, own_redis: EmbeddedRedis
) -> None:
    """The sweeper is the worker's own timer, not an arq cron job: Redis dying while the
    worker runs does not stop it (issue 15). A hold made and due during the outage, with no
    job anywhere, is expired with Redis still down."""
    settings = settings_for(database_url, own_redis.url)
    store = Store(database_url)
    await store.connect()
    try:
        async with running_worker(settings):
            product = await make_product(store, 10)
            async with listening(own_redis.url) as frames:  # the worker is up and expiring
                first = (await shop_hold(store, product.id)).id
                await frames.wait_for(reservation_status(first, "EXPIRED"))
            own_redis.kill()
            held = await hold(store, product.id, 3, now=now_ms() - 5_000, hold_ms=1_000)
            await eventually(lambda: _expired(store, held.id), what="the sweeper, Redis down")
            s = await assert_invariant(store, product.id)
            assert (s.available, s.held, s.expired) == (10, 0, 4)
    finally:
        await store.close()


async def test_a_worker_started_while_redis_is_down_sweeps(database_url: str) -> None:
    """Redis down at the worker's start: arq cannot start (it is tried again and again),
    and the sweeper runs meanwhile."""
    settings = settings_for(database_url, f"redis://127.0.0.1:{free_port()}/0")
    store = Store(database_url)
    await store.connect()
    try:
        product = await make_product(store, 5)
        held = await hold(store, product.id, 2, now=now_ms() - 5_000, hold_ms=1_000)
        async with running_worker(settings):
            await eventually(lambda: _expired(store, held.id), what="the sweeper, no Redis")
        s = await assert_invariant(store, product.id)
        assert (s.available, s.held, s.expired) == (5, 0, 2)
    finally:
        await store.close()


async def shop_hold(store: Store, product_id: int) -> Reservation:
    """A hold that falls due at once (HOLD_MS), whose expiry the worker's sweeper sees."""
    return await hold(store, product_id, 1, hold_ms=HOLD_MS)
