"""The Redis client every process uses, for publishing events and enqueueing jobs."""

from __future__ import annotations

from typing import cast

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool


def redis_client(url: str) -> ArqRedis:
    """One client for publishing and enqueueing; it connects on first use, not at import."""
    if not url:
        raise RuntimeError(
            "REDIS_URL is not set. `bin/serve` starts a Redis for you; "
            "otherwise point REDIS_URL at one, e.g. redis://127.0.0.1:6379/0"
        )
    pool = ConnectionPool.from_url(
        url, socket_connect_timeout=1.0, socket_timeout=5.0, health_check_interval=15
    )
    # from_pool: the client owns the pool, so aclose() closes its connections too.
    return cast(ArqRedis, ArqRedis.from_pool(pool))
