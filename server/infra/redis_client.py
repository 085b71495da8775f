"""The Redis client every process uses: one server (`REDIS_URL`, with its database and
credentials), or the primary that Redis Sentinel names (`REDIS_SENTINELS`,
`REDIS_SENTINEL_SERVICE`; `REDIS_DB`, `REDIS_USERNAME`/`REDIS_PASSWORD` for the servers,
`REDIS_SENTINEL_USERNAME`/`REDIS_SENTINEL_PASSWORD` for the Sentinels).

Everything a process does with Redis goes through the one client made here: publishing and
receiving live events, enqueueing expiry jobs, the rate limit, the readiness probe, the
worker's arq poll loop (arq is handed this client) and its health check. With Sentinel the
client is redis-py's `Sentinel.master_for`: every new connection asks the Sentinels where
the primary is, and a connection to a primary that was demoted is dropped (Sentinel closes
its clients when it reconfigures a server, and redis-py drops a connection that answers
READONLY). So after a failover each user of the client only has to reconnect, which each
already does after any Redis outage: the subscriber re-subscribes and resynchronises its
pages from the database, the publisher and the expiry scheduler retry, the worker starts arq
again, the rate limit fails open.

Every connection has a 1 s connect timeout and a 5 s read timeout, the Sentinels' included:
a host cut off from Redis by the network (packets dropped, no reset) must fail its calls and
reconnect, not wait for TCP to give up after many minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel

from server.infra.settings import DEFAULT_SENTINEL_SERVICE, Settings

CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 5.0
HEALTH_CHECK_INTERVAL_S = 15

_CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT_S,
    "socket_timeout": READ_TIMEOUT_S,
    "health_check_interval": HEALTH_CHECK_INTERVAL_S,
}
_SENTINEL_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT_S,
    "socket_timeout": CONNECT_TIMEOUT_S,
}


class SentinelRedis(ArqRedis):
    """An `ArqRedis` on the primary that Sentinel names; closing it also closes its
    connections to the Sentinels (redis-py's `master_for` leaves those open)."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for node in self.sentinel_manager.sentinels:
                await node.aclose()


def redis_client(
    url: str = "",
    *,
    sentinels: Sequence[tuple[str, int]] = (),
    service: str = DEFAULT_SENTINEL_SERVICE,
    db: int = 0,
    username: str = "",
    password: str = "",
    sentinel_username: str = "",
    sentinel_password: str = "",
) -> ArqRedis:
    """One client for everything a process does with Redis; it connects on first use.

    `url` is one server (`redis://user:password@host:port/db`, all but the host optional);
    `sentinels` instead are (host, port) pairs of Redis Sentinels that monitor the primary
    under the name `service`, with the primary's database `db` and credentials
    (`username`, `password`) and the Sentinels' own (`sentinel_username`,
    `sentinel_password`); empty credentials are not sent. Raises RuntimeError when neither
    `url` nor `sentinels` is given.
    """
    if sentinels:
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinels),
            sentinel_kwargs={
                **_SENTINEL_OPTIONS,
                "username": sentinel_username or None,
                "password": sentinel_password or None,
            },
            db=db,
            username=username or None,
            password=password or None,
            **_CONNECTION_OPTIONS,
        )
        client = cast(SentinelRedis, sentinel.master_for(service, redis_class=SentinelRedis))
        client.sentinel_manager = sentinel
        return client
    if not url:
        raise RuntimeError(
            "REDIS_URL is not set. `bin/serve` starts a Redis for you; otherwise point "
            "REDIS_URL at one (e.g. redis://127.0.0.1:6379/0), or REDIS_SENTINELS at the "
            "Sentinels that monitor one"
        )
    pool = ConnectionPool.from_url(url, **_CONNECTION_OPTIONS)
    # from_pool: the client owns the pool, so aclose() closes its connections too.
    return cast(ArqRedis, ArqRedis.from_pool(pool))


def database_of(redis: Redis) -> int:
    """The database number a client works in (from its URL, or REDIS_DB with Sentinel)."""
    return int(redis.connection_pool.connection_kwargs.get("db") or 0)


def redis_client_for(settings: Settings) -> ArqRedis:
    """`redis_client` for the Redis that `settings` configure."""
    return redis_client(
        settings.redis_url,
        sentinels=settings.redis_sentinels,
        service=settings.redis_sentinel_service,
        db=settings.redis_db,
        username=settings.redis_username,
        password=settings.redis_password,
        sentinel_username=settings.redis_sentinel_username,
        sentinel_password=settings.redis_sentinel_password,
    )
