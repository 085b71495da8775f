"""Per-client limits on what costs the shop: reservations (shared through Redis, so that the
limit holds across every web process and machine) and failed operator sign-ins and shop API
keys (in each process's memory).

The reservation limit is a fixed window per client: `INCR` a counter named after the client
and the window, set to expire with it. The client is `server.infra.clients.client_key`: the
address uvicorn reports (behind a load balancer, the forwarded one once `FORWARDED_ALLOW_IPS`
names the balancer), or the signed-in shopper. The limit sits on the reservation's path, so it
must never make a reservation wait on Redis: each check waits at most `CHECK_TIMEOUT_S` for
it. Each process also counts every client itself, and refuses a client past the limit in
its own count without asking Redis: a burst of one client's requests that a busy process
cannot hear Redis' answers for in time was once let through whole (four times the limit).
A count that Redis has not acknowledged in `REDIS_FROZEN_S`, or that fails, is Redis'
failure; after `BREAKER_FAILURES` of them in a row the limiter stops asking Redis for
`BREAKER_RECOVERY_S` (a circuit breaker, the `circuitbreaker` package), then tries again.
While Redis cannot answer, only each process's own count applies: a shop would rather sell
than refuse everyone. A frozen Redis (a stopped process, a partitioned network) once made
every reservation wait the client's 5 s read timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from circuitbreaker import CircuitBreaker, CircuitBreakerError  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server.api.http import RequestError
from server.infra.buckets import TokenBuckets
from server.infra.keys import RATE_LIMIT_PREFIX
from server.infra.metrics import DEFERRED

logger = logging.getLogger(__name__)

# A healthy Redis on the same network answers INCR+EXPIRE in well under a millisecond; a
# reservation waits at most this long for it (RESERVE_RATE_LIMIT_WAIT_MS), then goes on.
CHECK_TIMEOUT_S = 0.05
# A count Redis has not acknowledged in this long is a failure of Redis (frozen, cut off),
# not of a web process whose own event loop is busy: only these open the breaker.
REDIS_FROZEN_S = 1.0
BREAKER_FAILURES = 3
BREAKER_RECOVERY_S = 10
# Clients whose reservations this process counts itself in the current window.
MAX_LOCAL_CLIENTS = 100_000
# Counts in Redis under way at once: past this many (Redis slow or frozen, under a storm),
# a reservation is counted only here rather than open yet another connection to it.
MAX_COUNTING = 256


class RateLimiter:
    """`count` reservations per client per `per_seconds`-long window, across processes.

    Each reservation is counted twice: in this process's memory, and in Redis, shared by
    every process. The process's own count is a lower bound of the shared one, so a client
    past the limit in it is refused without asking Redis; that is what holds a burst back,
    when a busy event loop takes longer than `timeout_s` to hear Redis' answer. The count in
    Redis goes on in the background when the reservation stops waiting for it, so a
    reservation let through is still counted for the client's next ones. Only counts that
    Redis has not acknowledged within `REDIS_FROZEN_S`, or that fail, count as Redis'
    failures: after `breaker_failures` of them in a row the limiter stops asking Redis for
    `breaker_recovery_s` and applies only the process's own counts.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        count: int,
        per_seconds: int,
        timeout_s: float = CHECK_TIMEOUT_S,
        frozen_s: float = REDIS_FROZEN_S,
        breaker_failures: int = BREAKER_FAILURES,
        breaker_recovery_s: float = BREAKER_RECOVERY_S,
    ) -> None:
        self._redis = redis
        self._count = count
        self._per = per_seconds
        self._timeout_s = timeout_s
        self._frozen_s = frozen_s
        self._recovery_s = breaker_recovery_s
        self._off = False  # the breaker opened and Redis has not answered since
        self._breaker = CircuitBreaker(
            failure_threshold=breaker_failures,
            recovery_timeout=breaker_recovery_s,
            expected_exception=(RedisError, OSError, TimeoutError),
            name="reservation rate limit",
        )
        self._counted = self._breaker(self._count_in_redis)
        self._window = -1
        self._local: dict[str, int] = {}  # client → reservations this process saw this window
        self._counting: set[asyncio.Task[int]] = set()

    def over(self, client: str) -> int | None:
        """None unless `client` is already at its limit as far as this process knows (its
        own count of the client, or the shared count Redis last told it): then the whole
        seconds until the window ends. Counts nothing and waits on nothing, so it can come
        before anything that costs the shop (a lookup by Idempotency-Key in the database)."""
        now = time.time()
        window = int(now // self._per)
        if window != self._window or self._local.get(client, 0) < self._count:
            return None
        return max(1, int((window + 1) * self._per - now + 0.999))

    async def retry_after(self, client: str) -> int | None:
        """None if `client` may reserve now; otherwise the seconds until it may. Waits at
        most `timeout_s` for Redis; past that, or if Redis cannot answer, only this
        process's own count of the client decides."""
        now = time.time()
        window = int(now // self._per)
        wait = max(1, int((window + 1) * self._per - now + 0.999))
        if self._seen_here(client, window) > self._count:
            return wait
        if len(self._counting) >= MAX_COUNTING:
            return None
        counting = asyncio.ensure_future(self._counted(f"{RATE_LIMIT_PREFIX}{client}:{window}"))
        self._counting.add(counting)
        counting.add_done_callback(self._counted_in_redis)
        try:
            used = await asyncio.wait_for(asyncio.shield(counting), self._timeout_s)
        except (CircuitBreakerError, RedisError, OSError, TimeoutError):
            return None  # not waiting longer for Redis; the count goes on without us
        if window == self._window and client in self._local:
            # What every process counted: `over` knows the client is at its limit from it.
            self._local[client] = max(self._local[client], used)
        return None if used <= self._count else wait

    def _seen_here(self, client: str, window: int) -> int:
        if window != self._window or len(self._local) >= MAX_LOCAL_CLIENTS:
            self._window = window
            self._local.clear()
        seen = self._local.get(client, 0) + 1
        self._local[client] = seen
        return seen

    def _counted_in_redis(self, counting: asyncio.Task[int]) -> None:
        """A count in Redis has ended: one line per outage, not one per reservation."""
        self._counting.discard(counting)
        if counting.cancelled():
            return
        exc = counting.exception()
        if isinstance(exc, CircuitBreakerError):
            return  # open: Redis was not asked
        if exc is not None:
            if self._breaker.opened and not self._off:
                self._off = True
                logger.warning(
                    "rate limit counted only per process for %g s: Redis failed %d times in "
                    "a row (%s)",
                    self._recovery_s,
                    self._breaker.failure_count,
                    type(exc).__name__,
                )
            return
        if self._off:
            self._off = False
            logger.warning("rate limit counted in Redis again: Redis answers")

    async def _count_in_redis(self, key: str) -> int:
        async with asyncio.timeout(self._frozen_s):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, self._per * 2)
                used, _ = await pipe.execute()
        return int(used)


def refuse_if_out_of_tries(
    throttle: FailureThrottle, client: str, *, wrong: str, refusals: Any
) -> None:
    """429 `too_many_failed_sign_ins` with `Retry-After` if `client` has no try left with
    `throttle` (`wrong`: what it sent too many of, for the message; `refusals`: the metric
    counting such answers)."""
    wait = throttle.retry_after(client)
    if wait is not None:
        DEFERRED.inc(refusals)
        raise RequestError(
            429,
            "too_many_failed_sign_ins",
            f"Too many wrong {wrong} from your address; try again in {wait} seconds.",
            headers={"Retry-After": str(wait)},
        )


class FailureThrottle:
    """At most `count` failures per client per `per_seconds`, as a token bucket: a client
    starts with `count` tries and earns one back every `per_seconds / count` seconds. Used
    for operator sign-ins and shop API keys (`count`/`per_seconds` from `ADMIN_SIGN_IN_LIMIT`,
    one throttle each): a wrong token costs a try; with none left, every request carrying
    such a credential from that client is refused 429 until one is earned back, right token
    or not (a refusal that depended on the token would tell the guesser when it was right).
    The right token costs no try and waits for nothing.

    Kept in this process's memory, for at most `max_clients` clients (the oldest forgotten
    first): with W web processes a client gets W times the tries, which still turns
    guessing a token into centuries of work. A client that runs out of tries is logged
    (WARNING, naming `what`) at most once per `per_seconds`, not once per attempt.
    """

    def __init__(
        self,
        count: int,
        per_seconds: float,
        *,
        what: str = "operator token",
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count
        self._per = per_seconds
        self._what = what
        self._clock = clock
        self._tries = TokenBuckets(count, count / per_seconds, max_keys=max_clients, clock=clock)
        # When each client out of tries was last logged, of at most `max_clients` clients.
        self._logged: dict[str, float] = {}
        self._max_clients = max_clients

    def retry_after(self, client: str) -> int | None:
        """None if `client` may try now; otherwise whole seconds until it may."""
        wait = self._tries.seconds_until(client)
        return None if wait <= 0 else max(1, math.ceil(wait))

    def failed(self, client: str) -> None:
        """`client` just failed: one try fewer."""
        left = self._tries.spend(client)
        if left >= 1:
            return
        now = self._clock()
        if now - self._logged.get(client, -math.inf) < self._per:
            return
        self._logged.pop(client, None)  # most recently logged last
        self._logged[client] = now
        while len(self._logged) > self._max_clients:
            del self._logged[next(iter(self._logged))]
        logger.warning(
            "wrong %ss from %s: %d within %g s; its requests with one are refused 429 "
            "until it earns a try back (one every %g s)",
            self._what,
            client,
            self._count,
            self._per,
            self._per / self._count,
        )


# Keys of the last holds this process made or replayed (`RecentKeys`): at most 20,000 of at
# most ~300 characters each, a few MB; only holds made (rate-limited) add new ones.
RECENT_KEYS = 20_000


class RecentKeys:
    """The scoped keys of the last `most` holds this process made or replayed, oldest
    forgotten first. A client past its rate limit is answered a replay only for one of these
    (`server.api.shop`): any other key it sends is refused before the database is asked, so a
    limited client cannot make the shop read its key index once a request with fresh keys."""

    def __init__(self, most: int = RECENT_KEYS) -> None:
        self._most = most
        self._keys: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self._most:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys
