"""Per-client limits on what costs the shop: reservations (shared through Redis, so that the
limit holds across every web process and machine) and failed operator sign-ins (in each
process's memory).

The reservation limit is a fixed window per client: `INCR` a counter named after the client
and the window, set to expire with it. The client is `server.infra.clients.client_key`: the
address uvicorn reports (behind a load balancer, the forwarded one once `FORWARDED_ALLOW_IPS`
names the balancer), later the shopper. The limit sits on the reservation's path, so it must
never make a reservation wait on Redis: each check gives up after `CHECK_TIMEOUT_S`, and after
`BREAKER_FAILURES` failures in a row the limiter stops asking Redis for
`BREAKER_RECOVERY_S` (a circuit breaker, the `circuitbreaker` package), then tries again.
While Redis cannot answer, the limit is not applied: a shop would rather sell than refuse
everyone. A frozen Redis (a stopped process, a partitioned network) once made every
reservation wait the client's 5 s read timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from circuitbreaker import CircuitBreaker, CircuitBreakerError  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.infra.keys import RATE_LIMIT_PREFIX

logger = logging.getLogger(__name__)

# A healthy Redis on the same network answers INCR+EXPIRE in well under a millisecond; one
# that has not answered in 50 ms is not going to answer in time for a shopper.
CHECK_TIMEOUT_S = 0.05
BREAKER_FAILURES = 3
BREAKER_RECOVERY_S = 10


class RateLimiter:
    """`count` reservations per client per `per_seconds`-long window, across processes."""

    def __init__(
        self,
        redis: Redis,
        *,
        count: int,
        per_seconds: int,
        timeout_s: float = CHECK_TIMEOUT_S,
        breaker_failures: int = BREAKER_FAILURES,
        breaker_recovery_s: float = BREAKER_RECOVERY_S,
    ) -> None:
        self._redis = redis
        self._count = count
        self._per = per_seconds
        self._timeout_s = timeout_s
        self._recovery_s = breaker_recovery_s
        self._off = False  # the breaker opened and Redis has not answered since
        self._breaker = CircuitBreaker(
            failure_threshold=breaker_failures,
            recovery_timeout=breaker_recovery_s,
            expected_exception=(RedisError, OSError, TimeoutError),
            name="reservation rate limit",
        )
        self._counted = self._breaker(self._count_in_redis)

    async def retry_after(self, client: str) -> int | None:
        """None if `client` may reserve now; otherwise the seconds until it may. Waits at
        most `timeout_s` for Redis; None (not limited) if Redis cannot answer."""
        now = time.time()
        window = int(now // self._per)
        try:
            used = await self._counted(f"{RATE_LIMIT_PREFIX}{client}:{window}")
        except CircuitBreakerError:
            return None  # open: not asking Redis for a while
        except (RedisError, OSError, TimeoutError) as exc:
            if self._breaker.opened and not self._off:
                self._off = True  # one line per outage, not one per reservation
                logger.warning(
                    "rate limit not applied for %g s: Redis failed %d times in a row (%s)",
                    self._recovery_s,
                    self._breaker.failure_count,
                    type(exc).__name__,
                )
            return None
        if self._off:
            self._off = False
            logger.warning("rate limit applied again: Redis answers")
        if used <= self._count:
            return None
        return max(1, int((window + 1) * self._per - now + 0.999))

    async def _count_in_redis(self, key: str) -> int:
        async with asyncio.timeout(self._timeout_s):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, self._per * 2)
                used, _ = await pipe.execute()
        return int(used)


class FailureThrottle:
    """At most `count` failures per client per `per_seconds`, as a token bucket: a client
    starts with `count` tries and earns one back every `per_seconds / count` seconds. Used
    for operator sign-ins (`count`/`per_seconds` from `ADMIN_SIGN_IN_LIMIT`): a wrong token
    costs a try; with none left, every operator request from that client is refused 429
    until one is earned back, right token or not (a refusal that depended on the token
    would tell the guesser when it was right).

    Kept in this process's memory, for at most `max_clients` clients (the oldest forgotten
    first): with W web processes a client gets W times the tries, which still turns
    guessing a token into centuries of work.
    """

    def __init__(
        self,
        count: int,
        per_seconds: float,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = float(count)
        self._rate = count / per_seconds  # tries earned back per second
        self._max_clients = max_clients
        self._clock = clock
        self._tries: dict[str, tuple[float, float]] = {}  # client → (tries left, at)

    def retry_after(self, client: str) -> int | None:
        """None if `client` may try now; otherwise whole seconds until it may."""
        left = self._left(client, self._clock())
        if left >= 1:
            return None
        return max(1, math.ceil((1 - left) / self._rate))

    def failed(self, client: str) -> None:
        """`client` just failed: one try fewer."""
        now = self._clock()
        left = self._left(client, now) - 1
        self._tries.pop(client, None)
        self._tries[client] = (left, now)  # most recent last
        while len(self._tries) > self._max_clients:
            del self._tries[next(iter(self._tries))]

    def _left(self, client: str, now: float) -> float:
        entry = self._tries.get(client)
        if entry is None:
            return self._count
        left, at = entry
        return min(self._count, left + (now - at) * self._rate)
