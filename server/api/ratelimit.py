"""A per-client limit on reservations, shared through Redis so that it holds across every
web process (and machine).

A fixed window per client: `INCR` a counter named after the client and the window, set to
expire with it. The client is the address uvicorn reports, which behind a load balancer is
the forwarded one once `FORWARDED_ALLOW_IPS` names the balancer. If Redis cannot be reached
the limit is not applied (and a warning logged): a shop would rather sell than refuse
everyone.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.infra.keys import RATE_LIMIT_PREFIX

logger = logging.getLogger(__name__)


class RateLimiter:
    def __init__(self, redis: Redis, *, count: int, per_seconds: int) -> None:
        self._redis = redis
        self._count = count
        self._per = per_seconds

    async def retry_after(self, client: str) -> int | None:
        """None if `client` may reserve now; otherwise the seconds until it may."""
        now = time.time()
        window = int(now // self._per)
        key = f"{RATE_LIMIT_PREFIX}{client}:{window}"
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, self._per * 2)
                used, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("rate limit not checked (Redis: %s)", exc)
            return None
        if int(used) <= self._count:
            return None
        return max(1, int((window + 1) * self._per - now + 0.999))
