"""Redis through Sentinel: the settings, and a failover under the real stack.

The service runs from the Procfile (two web processes and a worker) against a Redis primary,
its replica and three Sentinels (cluster/redis_ha.py), all on loopback. The primary is
killed mid-sale; the Sentinels promote the replica; then every use of Redis must have
followed it: live updates reach a connected page again, the worker takes expiry jobs from
the new primary, the rate limit counts there, and no promise was broken meanwhile (every
hold expired once, `available + held + sold == total`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from cluster.redis_ha import RedisGroup, _answers
from server.devtools.embedded_redis import free_port
from server.devtools.processes import ROOT, Service
from server.infra.keys import EVENTS_CHANNEL, HEALTH_CHECK_KEY, RATE_LIMIT_PREFIX, events_channel
from server.infra.redis_client import database_of, redis_client
from server.infra.settings import SENTINEL_ONLY, Settings, SettingsError
from server.storage.database import Store
from tests.events import listening, reservation_status
from tests.support import assert_invariant, eventually
from tests.test_drills import metric
from tests.test_live import socket_to

# -- settings ------------------------------------------------------------------------------


def test_sentinels_are_read_as_host_port_pairs() -> None:
    settings = Settings.from_env(
        {
            "REDIS_SENTINELS": "10.0.0.5:26379, sentinel-b ,[::1]:26380",
            "REDIS_SENTINEL_SERVICE": "shop",
        }
    )
    assert settings.redis_sentinels == (("10.0.0.5", 26379), ("sentinel-b", 26379), ("::1", 26380))
    assert settings.redis_sentinel_service == "shop"
    assert settings.has_redis
    assert Settings.from_env({"REDIS_SENTINELS": "a:1"}).redis_sentinel_service == "mymaster"
    assert not Settings.from_env({}).has_redis


@pytest.mark.parametrize("value", ["a:b", "a:0", ":26379", "a:70000", "[::1]:x"])
def test_a_bad_sentinel_address_is_named(value: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_SENTINELS must look like host:port"):
        Settings.from_env({"REDIS_SENTINELS": value})


def test_one_redis_or_sentinels_not_both() -> None:
    with pytest.raises(SettingsError, match="REDIS_URL and REDIS_SENTINELS are both set"):
        Settings.from_env({"REDIS_URL": "redis://x", "REDIS_SENTINELS": "a:26379"})


def test_a_database_and_credentials_behind_sentinel_are_read() -> None:
    settings = Settings.from_env(
        {
            "REDIS_SENTINELS": "10.0.0.5:26379",
            "REDIS_DB": "3",
            "REDIS_USERNAME": "shop",
            "REDIS_PASSWORD": " data pw 1",
            "REDIS_SENTINEL_USERNAME": "watcher",
            "REDIS_SENTINEL_PASSWORD": "sentinel pw 2",
        }
    )
    assert (settings.redis_db, settings.redis_username, settings.redis_password) == (
        3,
        "shop",
        " data pw 1",  # as given: a space may be part of a password
    )
    assert (settings.redis_sentinel_username, settings.redis_sentinel_password) == (
        "watcher",
        "sentinel pw 2",
    )
    shown = repr(settings)  # settings may be logged; passwords are not
    assert "data pw 1" not in shown
    assert "sentinel pw 2" not in shown
    assert Settings.from_env({"REDIS_SENTINELS": "a:1"}).redis_db == 0


@pytest.mark.parametrize("name", SENTINEL_ONLY)
def test_sentinel_credentials_beside_one_redis_are_refused(name: str) -> None:
    """One server's database and credentials are in its URL; two places would leave the
    reader to guess which one wins."""
    for env in ({"REDIS_URL": "redis://:pw@127.0.0.1:6379/2"}, {}):
        with pytest.raises(SettingsError, match=f"{name} apply with REDIS_SENTINELS only"):
            Settings.from_env({**env, name: "1"})


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_a_bad_redis_db_is_named(value: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_DB must"):
        Settings.from_env({"REDIS_SENTINELS": "a:26379", "REDIS_DB": value})


async def test_services_in_different_databases_have_events_channels_of_their_own() -> None:
    """Pub/sub ignores Redis databases: two shops sharing one Redis in databases 0 and 5
    would each receive the other's frames on one channel name."""
    clients = [redis_client("redis://127.0.0.1:1/0"), redis_client("redis://:pw@127.0.0.1:1/5")]
    try:
        assert [database_of(c) for c in clients] == [0, 5]
        assert events_channel(0) == EVENTS_CHANNEL
        assert events_channel(5) != EVENTS_CHANNEL
    finally:
        for client in clients:
            await client.aclose()


# -- a failover ----------------------------------------------------------------------------


@pytest.fixture
def redis_ha(tmp_path: Path) -> Iterator[RedisGroup]:
    group = RedisGroup(
        tmp_path / "redis-ha", "127.0.0.1", [free_port() for _ in range(5)], persist=False
    )
    try:
        group.start()
        yield group
    finally:
        group.stop()


def url_of(address: tuple[str, int]) -> str:
    return f"redis://{address[0]}:{address[1]}/0"


async def reserve(service: Service, product_id: int, client_ip: str) -> httpx.Response:
    async with service.client() as client:
        return await client.post(
            "/api/reservations",
            json={"productId": product_id, "quantity": 1},
            # The service trusts loopback's X-Forwarded-For: each "shopper" is counted apart.
            headers={"X-Forwarded-For": client_ip},
        )


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
    assert response.status_code == 200
    return response.text


async def subscribers(redis: Redis) -> bool:
    """Whether both web processes are subscribed to the events channel on this server."""
    ((_, count),) = await redis.pubsub_numsub(EVENTS_CHANNEL)
    return int(count) == 2


async def hold_statuses(store: Store, product_id: int) -> dict[str, str]:
    async with store.reader() as conn:
        rows = await conn.fetch_all(
            "SELECT id, status FROM reservations WHERE product_id = :p", {"p": product_id}
        )
    return {str(row["id"]): str(row["status"]) for row in rows}


@pytest.mark.slow
async def test_a_failover_loses_no_promise_and_every_use_of_redis_follows_it(
    database_url: str, redis_ha: RedisGroup, tmp_path: Path, store: Store
) -> None:
    service = Service(
        database_url,
        "",
        tmp_path / "logs",
        web_concurrency=2,
        REDIS_SENTINELS=redis_ha.sentinels_env,
        HOLD_SECONDS="2",
        # The sweeper runs at the worker's start and then rarely: expiries here are the jobs'.
        SWEEP_SECONDS="30",
        RESERVE_RATE_LIMIT="3/3600",
        RESERVE_RATE_LIMIT_WAIT_MS="5000",  # the 429 below must not depend on the load
    )
    try:
        service.start()
        product = await service.new_product(20)
        pid = product["id"]
        worker_metrics = f"http://127.0.0.1:{service.worker.env['WORKER_METRICS_PORT']}/metrics"
        async with socket_to(service) as page:
            # Before: holds that are still running when the primary dies.
            before = [await reserve(service, pid, "198.51.100.1") for _ in range(2)]
            assert [r.status_code for r in before] == [201, 201]
            await page.stock(pid, 18)

            old = redis_ha.primary()
            assert old is not None
            first = Redis.from_url(url_of(old))
            try:  # both web processes are subscribed (the second may start later than the first)
                await eventually(lambda: subscribers(first), within=30, what="two subscribers")
            finally:
                await first.aclose()
            redis_ha.server_at(old).kill()
            # Mid-failover the sale goes on: the database is the truth.
            during = await reserve(service, pid, "198.51.100.2")
            assert during.status_code == 201, during.text
            await asyncio.to_thread(
                redis_ha.wait_until,
                lambda: redis_ha.primary() not in (None, old),
                "the Sentinels to promote the replica",
            )
            new = redis_ha.primary()
            assert new is not None
            assert new != old

            # The worker: arq started again on the new primary (its health key is there),
            # and arq's own sentinel support finds it (`python -m jobs --check`).
            primary = Redis.from_url(url_of(new))
            try:

                async def worker_back() -> bool:
                    return bool(await primary.exists(HEALTH_CHECK_KEY))

                await eventually(worker_back, within=30, what="the worker on the new primary")
                check = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "jobs", "--check"],
                    cwd=ROOT,
                    env={**os.environ, "REDIS_URL": "", "REDIS_SENTINELS": redis_ha.sentinels_env},
                    capture_output=True,
                    timeout=30,
                )
                assert check.returncode == 0, check.stderr.decode()

                # Live updates: both web processes subscribed again, on the new primary, and
                # a change made now is published there and reaches the connected page.
                await eventually(
                    lambda: subscribers(primary),
                    within=30,
                    what="both web processes to resubscribe",
                )
                jobs_before = metric(
                    await scrape(worker_metrics), "flashsale_holds_expired_total", 'by="job"'
                )
                async with listening(url_of(new)) as frames:
                    after = await reserve(service, pid, "198.51.100.3")
                    assert after.status_code == 201, after.text
                    version = after.json()["product"]["version"]
                    await frames.wait_for(
                        lambda f: f.get("productId") == pid and f.get("version") == version,
                        within=15,
                    )
                left = after.json()["product"]["availableStock"]
                await page.stock(pid, left, within=15)

                # The rate limit counts on the new primary: the fourth from one client is 429.
                limited = [await reserve(service, pid, "198.51.100.9") for _ in range(4)]
                assert [r.status_code for r in limited] == [201, 201, 201, 429]
                keys = await primary.keys(f"{RATE_LIMIT_PREFIX}addr:198.51.100.9:*")
                assert len(keys) == 1

                # Holds keep expiring: every hold, made before, during and after the
                # failover, ends EXPIRED with its units back, and the page shows them back.
                async def all_expired() -> dict[str, str] | None:
                    statuses = await hold_statuses(store, pid)
                    done = all(s == "EXPIRED" for s in statuses.values())
                    return statuses if done else None

                statuses = await eventually(all_expired, within=30, what="every hold to expire")
                assert statuses is not None
                assert len(statuses) == 7
                await page.stock(pid, 20, within=15)
                stats = await assert_invariant(store, pid)
                assert (stats.available, stats.held, stats.sold) == (20, 0, 0)

                # …and at least the holds made after the failover were expired by jobs taken
                # from the new primary (the sweeper only runs at the worker's start).
                async def jobs_ran() -> float:
                    text = await scrape(worker_metrics)
                    return metric(text, "flashsale_holds_expired_total", 'by="job"') - jobs_before

                await eventually(jobs_ran, within=15, what="expiry jobs on the new primary")
            finally:
                await primary.aclose()
    finally:
        service.stop()
    assert "Traceback" not in service.logs(), service.logs()


DATA_PASSWORD = "data-secret-1"
SENTINEL_PASSWORD = "sentinel-secret-2"


@pytest.mark.slow
async def test_sentinel_with_passwords_and_a_database_other_than_0(
    database_url: str, tmp_path: Path, store: Store
) -> None:
    """Sentinels with a password of their own, Redis servers with another, and database 3:
    every use of Redis (live updates, the job queue and the worker, its health check, the
    rate limit, the readiness probe) works through them, in database 3 only."""
    group = RedisGroup(
        tmp_path / "redis-ha",
        "127.0.0.1",
        [free_port() for _ in range(5)],
        persist=False,
        password=DATA_PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
    )
    service = Service(
        database_url,
        "",
        tmp_path / "logs",
        web_concurrency=1,
        REDIS_SENTINELS=group.sentinels_env,
        REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD,
        REDIS_PASSWORD=DATA_PASSWORD,
        REDIS_DB="3",
        HOLD_SECONDS="1",
        SWEEP_SECONDS="30",  # expiries here are the jobs'
        RESERVE_RATE_LIMIT="2/3600",
    )
    try:
        group.start()
        primary = group.primary()
        assert primary is not None
        # Without the passwords neither the Sentinels nor the servers answer: the service
        # below can only be working through them.
        ask = b"SENTINEL get-master-addr-by-name mymaster\r\n"
        assert _answers(group.sentinels[0], ask).startswith(b"-NOAUTH")
        assert _answers(primary).startswith(b"-NOAUTH")
        service.start()
        host, port = primary
        url = f"redis://:{DATA_PASSWORD}@{host}:{port}"
        db3, db0 = Redis.from_url(f"{url}/3"), Redis.from_url(f"{url}/0")
        try:
            async with service.client() as client:
                ready = (await client.get("/readyz")).json()
            assert ready["status"] == "ok", ready
            product = await service.new_product(5)
            pid = product["id"]
            async with (
                socket_to(service) as page,
                listening(f"{url}/3", events_channel(3)) as ours,
                listening(f"{url}/0") as plain,
            ):
                made = await reserve(service, pid, "198.51.100.7")
                assert made.status_code == 201, made.text
                hold = made.json()["id"]
                await page.stock(pid, 4)
                # The frame went out on database 3's channel, not on the plain one.
                await ours.wait_for(lambda f: f.get("productId") == pid)
                # The hold expires through a job from database 3's queue.
                await ours.wait_for(reservation_status(hold, "EXPIRED"), within=20)
                await page.stock(pid, 5)
                assert not [f for f in plain.frames if f.get("productId") == pid]

            async def worker_alive() -> bool:
                return bool(await db3.exists(HEALTH_CHECK_KEY))

            await eventually(worker_alive, within=30, what="the worker's health key")
            check = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "jobs", "--check"],
                cwd=ROOT,
                env={**os.environ, **service.worker.env},
                capture_output=True,
                timeout=30,
            )
            assert check.returncode == 0, check.stderr.decode()
            limited = [await reserve(service, pid, "198.51.100.8") for _ in range(3)]
            assert [r.status_code for r in limited] == [201, 201, 429]
            assert await db3.keys(f"{RATE_LIMIT_PREFIX}addr:198.51.100.8:*")
            assert await db0.dbsize() == 0  # nothing of the service's in database 0
        finally:
            await db3.aclose()
            await db0.aclose()
    finally:
        service.stop()
        group.stop()
    assert "Traceback" not in service.logs(), service.logs()


@pytest.mark.slow
async def test_the_client_closes_its_sentinel_connections(redis_ha: RedisGroup) -> None:
    client = redis_client(sentinels=redis_ha.sentinels)
    assert await client.ping()
    await client.set("k", "v")
    sentinel_clients: list[Any] = list(client.sentinel_manager.sentinels)  # type: ignore[attr-defined]
    await client.aclose()
    for node in sentinel_clients:
        pool = node.connection_pool
        assert not pool._in_use_connections
        assert all(not c.is_connected for c in pool._available_connections)
